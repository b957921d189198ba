"""Argument checking of the public ops (every backend shares it): errors name the argument and the expectation."""

import pytest
import torch

from upernet_fast import ops


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: ops.adaptive_avg_pool_multi(torch.randn(3, 4, 4), (1, 2)), ValueError, "x must be a 4D tensor"),
        (lambda: ops.adaptive_avg_pool_multi(torch.randn(1, 3, 4, 4), (0, 2)), ValueError, "scales must be"),
        (lambda: ops.adaptive_avg_pool_multi(torch.randn(1, 3, 4, 4), ()), ValueError, "scales must be"),
        (lambda: ops.adaptive_avg_pool_multi(torch.zeros(1, 3, 4, 4, dtype=torch.long), (1,)), TypeError, "x must be a floating"),
        (lambda: ops.adaptive_avg_pool_multi(torch.randn(1, 0, 4, 4), (1,)), ValueError, "x must have no empty"),
        (lambda: ops.upsample_add(torch.randn(1, 3, 2, 2), torch.randn(1, 4, 4, 4)), ValueError, "same batch and channel"),
        (lambda: ops.upsample_add(torch.randn(1, 3, 2, 2), torch.randn(3, 4, 4)), ValueError, "lateral must be a 4D"),
        (lambda: ops.upsample_concat(torch.randn(1, 3, 2, 2), (4, 4)), TypeError, "tensors must be a non-empty list"),
        (lambda: ops.upsample_concat([], (4, 4)), TypeError, "tensors must be a non-empty list"),
        (lambda: ops.upsample_concat([torch.randn(1, 3, 2, 2)], (4,)), ValueError, "size must be two positive ints"),
        (lambda: ops.upsample_concat([torch.randn(1, 3, 2, 2), torch.randn(2, 3, 2, 2)], (4, 4)), ValueError, r"tensors\[1\] has batch size 2"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4)), TypeError, "labels must be an integer"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(4, 4, dtype=torch.long)), ValueError, "labels must be a 3D"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(2, 4, 4, dtype=torch.long)), ValueError, r"labels must have shape \(B, H, W\)"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.full((1, 4, 4), 3)), ValueError, r"labels must lie in \[0, 3\)"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.full((1, 4, 4), -1)), ValueError, r"found -1"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), weight=torch.ones(4)), ValueError, r"weight must be a \(3,\)"),
        (lambda: ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long), resized=torch.randn(1, 3, 2, 2)), ValueError, r"resized must be logits resized to the labels' size, shape \(1, 3, 4, 4\)"),
        (lambda: ops.conv_bn_relu(torch.randn(1, 2, 4, 4), torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)), ValueError, "x must have 3 channels"),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_ignore_index_may_lie_outside_the_class_range():
    labels = torch.full((1, 4, 4), -100)
    labels[0, 0, 0] = 1
    loss = ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), labels, ignore_index=-100)
    assert torch.isfinite(loss)


def test_ops_run_and_differentiate_on_the_eager_backend():
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    pooled = ops.adaptive_avg_pool_multi(x, [1, 2, 3, 6], backend="eager")
    assert [tuple(p.shape) for p in pooled] == [(2, 3, s, s) for s in (1, 2, 3, 6)]
    out = ops.upsample_concat([x, *pooled], (7, 5), backend="eager")
    assert out.shape == (2, 15, 7, 5)
    ops.upsample_add(pooled[2], out[:, :3], backend="eager").sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "mean_all"])
def test_loss_of_already_resized_logits_is_the_eager_loss_bitwise(reduction):
    """``resized=`` (a model's full-resolution logits) spares the eager backend its own resize: same values and
    gradients, bitwise, since the resize it skips is the same call."""
    import torch.nn.functional as F

    logits = torch.randn(2, 5, 7, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 29, 23))
    labels[:, :3] = 255
    weight = torch.rand(5) + 0.5
    plain = ops.upsample_cross_entropy(logits, labels, reduction=reduction, weight=weight, backend="eager")
    (grad_plain,) = torch.autograd.grad(plain.sum(), logits)
    resized = F.interpolate(logits, size=(29, 23), mode="bilinear", align_corners=False)
    reused = ops.upsample_cross_entropy(logits, labels, reduction=reduction, weight=weight, backend="eager",
                                        resized=resized)
    (grad_reused,) = torch.autograd.grad(reused.sum(), logits)
    assert torch.equal(plain, reused) and torch.equal(grad_plain, grad_reused)
    # A resized tensor that disagrees with the logits shows the eager backend really takes the loss of it.
    shifted = ops.upsample_cross_entropy(logits, labels, reduction=reduction, weight=weight, backend="eager",
                                         resized=resized.detach() * 2)
    assert not torch.equal(shifted, plain)


def test_double_backward_through_triton_says_what_to_do():
    from conftest import TRITON_DEVICE

    low = torch.randn(1, 2, 3, 3, device=TRITON_DEVICE, requires_grad=True)
    lateral = torch.randn(1, 2, 6, 6, device=TRITON_DEVICE)
    out = ops.upsample_add(low, lateral, backend="triton")
    (grad,) = torch.autograd.grad(out.square().sum(), low, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='eager'"):
        grad.sum().backward()
    # eager supports it, as transformers does
    out = ops.upsample_add(low, lateral, backend="eager")
    (grad,) = torch.autograd.grad(out.square().sum(), low, create_graph=True)
    grad.sum().backward()
    assert low.grad is not None


def test_custom_ops_run_on_their_inputs_device():
    # Triton launches on the current CUDA device: every custom op body is wrapped to make the input's current.
    from upernet_fast.ops import _triton_support

    seen = []

    def body(x, items):
        seen.append(x)
        return x

    wrapped = _triton_support.on_input_device(body)
    x = torch.ones(1)
    assert wrapped(x, [x]) is x and seen == [x]  # CPU tensors: no device context needed
    assert wrapped.__wrapped__ is body  # custom_op reads the signature through functools.wraps
