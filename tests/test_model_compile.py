"""The converted model under ``torch.compile`` with Inductor, in training, on CPU (the backend `auto` picks there).

Why this test exists: with torch 2.13 on CPU, Inductor returned all-zero gradients (with the right loss) for
the converted model's training step when the main loss resized the head's logits a second time, next to the
full-resolution logits the model returns and an auxiliary loss; eager and ``aot_eager`` were right, and so was
transformers' model, which takes its loss of the returned logits. The converted model now hands those logits
to ``upsample_cross_entropy(resized=...)``, whose eager backend takes the loss of them: transformers' graph.

Tolerance: Inductor reorders the fp32 sums of BatchNorm statistics and convolution backward, and training-mode
BatchNorm over a batch of 2 amplifies that through 1/std; 1e-3 of each gradient's largest magnitude covers it
(measured: below 1e-4), while the failure this guards against is an error of 100%.
"""

import copy

import pytest
import torch
from models import batch, reference_model

import upernet_fast

GRAD_RTOL = 1e-3


@pytest.mark.slow
def test_inductor_training_step_gradients_match_transformers_eager():
    # 64x64 images put the last feature map at 2x2: pool scales above 2 would make Inductor's CPU code
    # generation fail on the backward of adaptive pooling with more bins than inputs (a PyTorch limitation
    # that transformers' model hits too), so the pyramid uses scales 1 and 2 here.
    # A fresh dynamo state, as in a new process: code objects compiled earlier in this process at other sizes
    # (tests/test_train_compile.py, when it runs first) would be recompiled here with automatic dynamic shapes,
    # and torch 2.13's Inductor fails on those ("cannot determine truth value of Relational").
    torch._dynamo.reset()
    reference = reference_model(pool_scales=[1, 2])
    converted = upernet_fast.convert(copy.deepcopy(reference))
    reference.train(), converted.train()
    pixels, labels = batch(size=64)
    assert labels.dtype == torch.int64

    compiled = torch.compile(converted, fullgraph=True)
    out = compiled(pixels, labels=labels)
    out.loss.backward()
    expected = reference(pixels, labels=labels)
    expected.loss.backward()

    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-5)
    params = dict(converted.named_parameters())
    checked = 0
    for name, ref_param in reference.named_parameters():
        if ref_param.grad is None:
            continue
        got, want = params[name].grad, ref_param.grad
        assert got is not None, f"{name}: no gradient in the compiled model"
        scale = want.abs().max().item()
        if scale < 1e-8:  # exactly-cancelling gradients (a shift before training BatchNorm): rounding noise only
            continue
        error = (got - want).abs().max().item() / scale
        assert error < GRAD_RTOL, f"{name}: gradient relative error {error:.3g} (scale {scale:.3g})"
        checked += 1
    assert checked > 50, f"only {checked} parameters had a gradient to compare"
