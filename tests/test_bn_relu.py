"""bn_relu (BatchNorm + ReLU with batch statistics): the Triton kernels and op against the eager reference.

The ConvBNReLU block built on it is tested in test_conv_bn_relu.py, SyncBatchNorm across processes in
test_bn_relu_sync.py. Tolerances: fp32, the same per-channel statistics summed in another order (two-level
partials, Chan merges): a few ulp of the values' magnitude, rtol = atol = 1e-5.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from layouts import in_layout
from op_testing import OpSpec, OpTests
from torch import nn

from upernet_fast.ops import bn_relu

# The module itself (upernet_fast.ops re-exports a function of the same name).
bn_module = importlib.import_module("upernet_fast.ops.bn_relu")

DEV = TRITON_DEVICE


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _kernel_calls(device):
    torch.manual_seed(13)
    calls = []
    for layout in ("contiguous", "channels_last"):
        x = in_layout(torch.randn(2, 5, 3, 4, device=device), layout).requires_grad_(True)
        w = torch.rand(5, device=device, requires_grad=True) + 0.5
        b = torch.randn(5, device=device, requires_grad=True)
        calls.append(("bn_relu_train", (x, w, b, 1e-5, "")))
        mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)
        args = (torch.randn_like(x), x.detach(), w.detach(), b.detach(), mean, torch.rsqrt(var + 1e-5), "")
        calls.append(("bn_relu_train_backward", args))
    return calls


def _shared_inputs(device, layout, seed):
    generator = torch.Generator().manual_seed(seed)
    batch_norm = nn.BatchNorm2d(5)  # initialised on the CPU, where the generator lives
    with torch.no_grad():
        batch_norm.weight.uniform_(0.5, 1.5, generator=generator)
        batch_norm.bias.uniform_(-0.5, 0.5, generator=generator)
    batch_norm = batch_norm.to(device)
    y = in_layout(torch.randn(3, 5, 7, 5, generator=generator).to(device), layout).requires_grad_()
    return y, batch_norm, batch_norm.weight, batch_norm.bias  # the parameters: their gradients are checked too


def _bad_calls():
    bn = nn.BatchNorm2d(4).to(DEV).eval()
    y = torch.randn(2, 4, 3, 3, device=DEV)
    return [
        (lambda: bn_relu(y, bn, backend="triton"), RuntimeError, "uses running statistics"),
        (lambda: bn_relu(torch.randn(2, 3, 3, 3, device=DEV), bn), ValueError, r"y must have 4 channels"),
        (lambda: bn_relu(y, nn.Identity()), TypeError, "batch_norm must be a torch.nn BatchNorm"),
        (lambda: bn_relu(y[0], bn), ValueError, "y must be a 4D"),
    ]


class TestShared(OpTests):
    spec = OpSpec(
        name="bn_relu",
        make_inputs=_shared_inputs,
        run=lambda inputs, backend: (bn_relu(inputs[0], inputs[1], backend=backend),),
        kernel_calls=_kernel_calls,
        bad_calls=_bad_calls(),
        rtol=1e-5,
        atol=1e-5,
        # The C++ backend's training op is the same Python composite over the extension's kernel ops.
        kernel_names={"cpp": {"bn_relu_train": "upernet_fast::bn_relu_train_cpp",
                              "bn_relu_train_backward": "upernet_fast::bn_relu_train_cpp_backward"}},
    )


# ----------------------------------------------------------------------------------------- raw kernels


def test_kernels_read_in_bounds_and_write_every_element():
    """Inputs are views into NaN-filled storage (an out-of-bounds read would show as NaN) and outputs start
    as NaN (an element left unwritten would stay NaN)."""
    from upernet_fast.kernels import bn_relu as kernels

    torch.manual_seed(18)
    shape = (2, 5, 7, 3)
    for channels_last in (False, True):
        numel = torch.Size(shape).numel()

        def padded(t):
            storage = torch.full((numel + 64,), float("nan"), device=DEV)
            view = storage[32:32 + numel]
            if channels_last:
                view.copy_(t.permute(0, 2, 3, 1).reshape(-1))
                return view.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
            view.copy_(t.reshape(-1))
            return view.view(shape)

        x = padded(torch.randn(shape, device=DEV) + 1)
        g = padded(torch.randn(shape, device=DEV))
        assert kernels.is_channels_last(x) == channels_last
        mean, var = kernels.channel_stats(x)
        _close(mean, x.mean((0, 2, 3)), rtol=1e-6, atol=1e-6, what="mean")
        _close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6, what="var")
        invstd = torch.rsqrt(var + 1e-5)
        w, b = torch.rand(5, device=DEV) + 0.5, torch.randn(5, device=DEV) * 0.3
        y = kernels.bn_relu_apply(x, mean, invstd, w, b, out=torch.full_like(x, float("nan")))
        want = F.relu(F.batch_norm(x, None, None, w, b, training=True, eps=1e-5))
        _close(y, want, rtol=1e-5, atol=1e-5, what="apply")
        sum_g, sum_gxhat = kernels.bn_relu_backward_reduce(g, x, mean, invstd, w, b)
        g_relu = g * (want > 0)
        xhat = (x - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
        _close(sum_g, g_relu.sum((0, 2, 3)), rtol=1e-5, atol=1e-5, what="sum g")
        _close(sum_gxhat, (g_relu * xhat).sum((0, 2, 3)), rtol=1e-5, atol=1e-5, what="sum g*xhat")
        count = numel // shape[1]
        dx = kernels.bn_relu_backward_input(g, x, mean, invstd, w, b, sum_g, sum_gxhat, count,
                                            out=torch.full_like(x, float("nan")))
        want_dx = (w * invstd).view(1, -1, 1, 1) * (
            g_relu - (sum_g / count).view(1, -1, 1, 1) - xhat * (sum_gxhat / count).view(1, -1, 1, 1))
        _close(dx, want_dx, rtol=1e-5, atol=1e-5, what="dx")


def test_channel_stats_no_cancellation_with_large_offset():
    """A large common offset (mean 1e4, std 1) ruins sum/sumsq in fp32; the two-pass/Chan merge keeps it."""
    from upernet_fast.kernels import bn_relu as kernels

    torch.manual_seed(19)
    x = torch.randn(2, 3, 24, 23, device=DEV, dtype=torch.float64) + 1e4
    mean, var = kernels.channel_stats(x.float())
    want_var = x.var((0, 2, 3), unbiased=False)
    _close(mean.double(), x.mean((0, 2, 3)), rtol=1e-6, atol=0.0, what="mean")
    # fp32 storage of x alone limits the variance to about 1e4 * 2**-24 * ... : 1e-3 relative is far tighter
    # than sum/sumsq (which loses everything at this offset).
    _close(var.double(), want_var, rtol=1e-3, atol=0.0, what="var")


# ---------------------------------------------------------------------------------- bn_relu (BN+ReLU alone)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_bn_relu_training_matches_batch_norm_then_relu(layout):
    # fp32: the same per-channel statistics in another summation order; 1e-5 covers that rounding.
    torch.manual_seed(0)
    bn_ref = nn.BatchNorm2d(5, momentum=None).to(DEV)
    with torch.no_grad():
        bn_ref.weight.uniform_(0.5, 1.5), bn_ref.bias.uniform_(-0.5, 0.5)
    bn_ours = copy.deepcopy(bn_ref)
    for step in range(2):
        y = in_layout(torch.randn(3, 5, 7, 5, device=DEV), layout)
        grad = torch.randn(3, 5, 7, 5, device=DEV)
        y_ref, y_ours = y.detach().requires_grad_(), y.detach().requires_grad_()  # keep the layout (no copy)
        out_ref = F.relu(bn_ref(y_ref))
        out_ours = bn_relu(y_ours, bn_ours, backend="triton")
        torch.testing.assert_close(out_ours, out_ref, rtol=1e-5, atol=1e-5)
        out_ref.backward(grad), out_ours.backward(grad)
        torch.testing.assert_close(y_ours.grad, y_ref.grad, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(bn_ours, name).grad, getattr(bn_ref, name).grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn_ours.running_mean, bn_ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn_ours.running_var, bn_ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(bn_ours.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 2


def test_bn_relu_in_eval_mode_runs_the_reference():
    bn = nn.BatchNorm2d(4).to(DEV).eval()
    y = torch.randn(2, 4, 3, 3, device=DEV)
    torch.testing.assert_close(bn_relu(y, bn, backend="eager"), F.relu(bn(y)))


# ------------------------------------------------------------- eval on the C++ backend, autograd-free, one call


def _eval_batch_norm(dtype, affine):
    generator = torch.Generator().manual_seed(31)
    bn = nn.BatchNorm2d(5, affine=affine).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(5, generator=generator) * 2 - 1)
        bn.running_var.copy_(torch.rand(5, generator=generator) + 0.5)
        if affine:
            bn.weight.copy_(torch.rand(5, generator=generator) * 3 - 1)
            bn.bias.copy_(torch.rand(5, generator=generator) * 2 - 1)
    return bn.double() if dtype == torch.float64 else bn


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "sliced"))
@pytest.mark.parametrize("affine", (True, False))
def test_cpp_eval_without_autograd_is_one_call_with_the_same_bits(dtype, layout, affine):
    """Autograd-free eval calls compute BN's scale and shift inside the C++ op (bn_relu_eval_from_buffers) with
    exactly the bits of the differentiable path's tensor ops (that path is what runs when a gradient is needed);
    the profiler records which op ran."""
    from op_testing import require_backend

    require_backend("cpp")
    bn = _eval_batch_norm(dtype, affine)
    y = in_layout(torch.randn(2, 5, 7, 3, generator=torch.Generator().manual_seed(32)).to(dtype), layout)
    with torch.no_grad(), torch.profiler.profile() as prof:
        fast = bn_relu(y, bn, backend="cpp")
    assert "upernet_fast_cpp::bn_relu_eval_from_buffers" in {e.name for e in prof.events()}
    with torch.profiler.profile() as prof:
        differentiable = bn_relu(y.detach().requires_grad_(), bn, backend="cpp")
    assert "upernet_fast_cpp::bn_relu_eval_from_buffers" not in {e.name for e in prof.events()}
    assert torch.equal(fast, differentiable.detach()) and fast.stride() == differentiable.stride()
    _close(fast, F.relu(bn(y)), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype ==
           torch.bfloat16 else 1e-6, what="eval against BatchNorm2d")


def test_cpp_eval_from_buffers_opcheck_and_bad_arguments():
    from op_testing import require_backend

    require_backend("cpp")
    op = torch.ops.upernet_fast_cpp.bn_relu_eval_from_buffers
    for affine in (True, False):
        bn = _eval_batch_norm(torch.float32, affine)
        for fmt in (torch.contiguous_format, torch.channels_last):
            y = torch.randn(2, 5, 4, 6).contiguous(memory_format=fmt)
            params = (bn.weight.detach(), bn.bias.detach()) if affine else (None, None)  # nothing requires grad
            torch.library.opcheck(op.default, (y, bn.running_mean, bn.running_var, *params, 1e-5))
    bn = _eval_batch_norm(torch.float32, True)
    y = torch.randn(2, 5, 4, 6)
    with pytest.raises(RuntimeError, match="weight and bias must both be tensors or both be None"):
        op(y, bn.running_mean, bn.running_var, bn.weight.detach(), None, 1e-5)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \(5,\)"):
        op(y, bn.running_mean, bn.running_var[:4], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="inference-only"):
        op(y.requires_grad_(), bn.running_mean, bn.running_var, None, None, 1e-5)
