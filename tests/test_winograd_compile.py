"""The Winograd blocks of a converted model under torch.compile (CPU, eval, autograd-free).

Dynamo cannot trace the filter cache, so under torch.compile each block is one opaque custom op that looks the
cache up when it runs (upernet_fast/ops/winograd_conv_bn_relu.py, end of module). These tests prove that the
compiled model runs those ops (calls counted where their implementations call the C++ kernels), in one graph,
with the eager model's values, without recomputing the transforms per call, and that an in-place parameter
update reaches a compiled model; torch.export keeps ATen's convolution.
"""

from __future__ import annotations

import copy

import pytest
import torch
from models import reference_model

import upernet_fast
from upernet_fast.ops import winograd_conv_bn_relu as winograd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _cpp():
    from op_testing import require_backend

    require_backend("cpp")


@pytest.fixture
def calls(monkeypatch):
    """Counts of the C++ Winograd calls and filter transforms made from now on (eager or compiled)."""
    counts = {"block": 0, "concat": 0, "transform": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(winograd, "winograd_conv_bias_relu", counted("block", winograd.winograd_conv_bias_relu))
    monkeypatch.setattr(winograd, "_concat_block", counted("concat", winograd._concat_block))
    monkeypatch.setattr(winograd, "winograd_filter_transform", counted("transform", winograd.winograd_filter_transform))
    return counts


def _model():
    # The tests' small UperNet (ConvNeXt backbone, channels_last features). At 96x96 the FPN maps are 24, 12, 6
    # and 3 pixels: fpn_convs at 24 and 12 run Winograd (2 blocks), the FPN bottleneck runs fused with its concat
    # at 24 (1); the 6x6 and 3x3 maps and the PPM (3x3) keep ATen (MIN_SIDE).
    winograd._CACHE.clear()
    return upernet_fast.convert(copy.deepcopy(reference_model()), backend="cpp").eval()


PIXELS = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5))


def test_compiled_model_runs_the_winograd_blocks_in_one_graph(calls):
    model = _model()
    with torch.no_grad():
        eager = model(PIXELS).logits
        assert (calls["block"], calls["concat"]) == (2, 1), calls  # the eager path ran them
        calls.update(block=0, concat=0, transform=0)
        compiled = torch.compile(model, fullgraph=True)  # fullgraph: a graph break would raise
        first = compiled(PIXELS).logits
        assert (calls["block"], calls["concat"]) == (2, 1), calls
        assert calls["transform"] == 0, calls  # the compiled ops found the transforms the eager calls made
        second = compiled(PIXELS).logits
        assert (calls["block"], calls["concat"], calls["transform"]) == (4, 2, 0), calls
    # The Winograd blocks give the eager bits; Inductor compiles the ops around them (1x1 convs, resizes,
    # layer norms) in its own summation order: float32 rounding, relative to the largest logit.
    scale = eager.abs().max()
    assert ((first - eager).abs().max() / scale).item() <= 1e-5
    assert torch.equal(first, second)


def test_compiled_model_sees_in_place_parameter_updates(calls):
    # The stale-transform hazard under compile: a write through .data changes values without a new graph or a
    # version bump the compiled code would notice; the op compares every input of the fold when it runs.
    model = _model()
    compiled = torch.compile(model, fullgraph=True)
    head = model.decode_head
    with torch.no_grad():
        before = compiled(PIXELS).logits
        head.fpn_convs[0].conv.weight.data.mul_(0.5)
        head.fpn_bottleneck.batch_norm.running_var.data.mul_(3.0)
        calls.update(transform=0)
        after = compiled(PIXELS).logits
        assert calls["transform"] == 2, calls  # exactly the two changed blocks were transformed again
        winograd._CACHE.clear()
        expected = model(PIXELS).logits  # eager, transforms made afresh from the updated parameters
    assert not torch.allclose(after, before)
    assert ((after - expected).abs().max() / expected.abs().max()).item() <= 1e-5


def test_export_keeps_atens_convolution():
    model = _model()
    with torch.no_grad():
        program = torch.export.export(model, (PIXELS,), strict=False)
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("winograd" in t for t in targets), sorted(targets)
    assert any("conv" in t for t in targets), sorted(targets)
    assert winograd._tracing_why_not() is None  # outside export: compile and eager may take Winograd


def test_opcheck_of_the_compiled_block_ops():
    # Schemas, fake kernels (shape and layout the compiled graph plans for) and dispatch of both custom ops,
    # with and without the optional conv bias and BN affine parameters, in both layouts.
    gen = torch.Generator().manual_seed(6)
    weight = torch.randn(6, 9, 3, 3, generator=gen)
    bn = [torch.rand(6, generator=gen) + 0.5, torch.randn(6, generator=gen), torch.randn(6, generator=gen),
          torch.rand(6, generator=gen) + 0.5]  # weight, bias, running mean, running var
    for conv_bias, bn_weight, bn_bias in ((torch.randn(6, generator=gen), bn[0], bn[1]), (None, None, None)):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(2, 9, 10, 11, generator=gen).contiguous(memory_format=fmt)
            params = (weight, conv_bias, bn_weight, bn_bias, bn[2], bn[3], 1e-5)
            torch.library.opcheck(winograd.compiled_block, (x, *params))
            low = torch.randn(2, 4, 3, 4, generator=gen).contiguous(memory_format=fmt)
            tensors = [x[:, :5].contiguous(memory_format=fmt), low]
            torch.library.opcheck(winograd.compiled_concat_block, (tensors, [10, 11], *params))
