"""torch.export of a converted model: wherever it works for transformers' model, it works for ours.

transformers' own UperNet tests export the model with dynamic batch, height and width. Our argument checks once
rejected symbolic sizes (``size must be two positive ints``), and ``int()`` on a size would have pinned it; the
checks now validate what is known and leave symbolic sizes to the tracer's guards.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from models import batch, reference_model
from torch.export import Dim

import upernet_fast

pytestmark = pytest.mark.slow

# Height and width multiples of 32 (the backbone's total stride), as transformers' test exports them.
DYNAMIC = {"pixel_values": {0: Dim("batch", min=1, max=4), 2: 32 * Dim("h", min=1, max=8), 3: 32 * Dim("w", min=1, max=8)}}


def _export(model, pixels, dynamic_shapes=None):
    return torch.export.export(model, (pixels,), dynamic_shapes=dynamic_shapes, strict=False)


def test_dynamic_export_matches_eager_at_other_shapes():
    reference = reference_model().eval()
    _export(reference, batch(size=64)[0], DYNAMIC)  # the premise: transformers' model exports
    model = upernet_fast.convert(reference_model().eval())
    program = _export(model, batch(size=64)[0], DYNAMIC)
    # Sizes the exported program of transformers' model also accepts (its trace at 64x64 guards on at least two
    # stride-32 cells per side, ours the same).
    for batch_size, height, width in ((3, 128, 64), (1, 96, 160)):
        pixels = torch.randn(batch_size, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.no_grad():
            expected = reference(pixels).logits
            got = program.module()(pixels).logits
        assert got.shape == (batch_size, 3, height, width)
        # fp32, same ATen ops in the same order: equal up to the exported graph's own reassociation.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_static_export_after_a_failed_dynamic_export(monkeypatch):
    concat_module = importlib.import_module("upernet_fast.ops.upsample_concat")

    def refuse(name, size):
        raise ValueError("forced failure inside the head")

    monkeypatch.setattr(concat_module, "check_size", refuse)
    with pytest.raises(ValueError, match="forced failure inside the head"):
        _export(upernet_fast.convert(reference_model().eval()), batch(size=64)[0], DYNAMIC)
    monkeypatch.undo()
    model = upernet_fast.convert(reference_model().eval())
    pixels = batch(size=64)[0]
    program = _export(model, pixels)
    with torch.no_grad():
        got = program.module()(pixels).logits
        autograd_free = model(pixels).logits
    # The program holds the ATen path of the eval 3x3 blocks: Winograd (ops/winograd_conv_bn_relu.py) runs
    # only in eager, untraced, autograd-free calls on the CPU. So the program is bitwise eager with autograd on
    # (the ATen path, as traced), and within float32 rounding of eager without it (Winograd). The 1x1 convs run as
    # matrix products in untraced eager calls (ops/conv_bn_relu.py's pointwise_conv, another summation order),
    # so that comparison keeps ATen's 1x1 conv in eager too.
    monkeypatch.setattr(importlib.import_module("upernet_fast.ops.conv_bn_relu"), "pointwise_why_not",
                        lambda *args: "kept ATen's in this comparison")
    assert torch.equal(got, model(pixels).logits.detach())
    monkeypatch.undo()
    torch.testing.assert_close(got, autograd_free, rtol=1e-4, atol=1e-4)
