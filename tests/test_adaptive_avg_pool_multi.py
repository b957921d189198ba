"""adaptive_avg_pool_multi: the Triton kernels and custom ops against the eager reference.

Runs on CUDA when there is a GPU, else on CPU tensors under Triton's interpreter (conftest sets it up).
Tolerances:
* fp32: the kernel does the reference's arithmetic (sum in fp32, then / kh / kw) in another summation order,
  over at most H*W terms here, so results agree to a few fp32 ulps: rtol 1e-5, atol 1e-6.
* fp16/bf16: both sides accumulate in fp32 and round once per output (PyTorch's backward rounds once per
  scale and again when autograd adds the scales), so against a float64 reference our error is at most 2x
  PyTorch's own plus half an ulp at magnitude 1.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_DEVICE
from layouts import LAYOUTS, in_layout
from op_testing import OpSpec, OpTests, layout_inputs

from upernet_fast import reference
from upernet_fast.kernels import _utils as kernel_utils
from upernet_fast.kernels import adaptive_avg_pool_multi as kernels
from upernet_fast.ops import adaptive_avg_pool_multi

OP = "adaptive_avg_pool_multi"
UPERNET_SCALES = (1, 2, 3, 6)
CL = torch.channels_last

# (shape, scales), each labelled with what it covers.
EDGE_CASES = {
    "real_scales_16x16": ((1, 5, 16, 16), UPERNET_SCALES),  # scales 3 and 6 overlap on 16; odd C=5
    "map_1x1": ((1, 3, 1, 1), UPERNET_SCALES),  # 1x1 map, every scale but 1 larger than the map; batch 1
    "non_square_odd_7x5": ((2, 3, 7, 5), UPERNET_SCALES),  # non-square, odd sides, overlaps on both axes
    "scale_above_map": ((1, 5, 4, 4), (6,)),  # s > n: windows repeat pixels; single scale
    "single_scale_list": ((2, 3, 9, 13), [4]),  # scales given as a list; 9 % 4 and 13 % 4 != 0
    "wider_than_a_tile": ((1, 2, 9, 37), UPERNET_SCALES),  # windows span several 4x16 tiles: the loops
}


def _make_input(shape, dtype, layout, seed=0):
    """A (B, C, H, W) input in the given layout (see tests/layouts.py: sliced ones sit in NaN-filled storage)."""
    gen = torch.Generator().manual_seed(seed)
    return in_layout(torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(TRITON_DEVICE), layout)


def _reference_grad(x, scales, grads):
    leaf = x.detach().requires_grad_()  # same storage and strides: clone() would make sliced inputs dense
    torch.autograd.backward(list(reference.adaptive_avg_pool_multi(leaf, scales)), list(grads))
    return leaf.grad


def _random_grads(x, scales, seed=1):
    gen = torch.Generator().manual_seed(seed)
    B, C = x.shape[:2]
    return [torch.randn((B, C, s, s), generator=gen).to(x.dtype).to(x.device) for s in scales]


def _is_channels_last(t):
    return t.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_fp32_matches_reference(case, layout):
    shape, scales = EDGE_CASES[case]
    x = _make_input(shape, torch.float32, layout)
    leaf = x.detach().requires_grad_()  # keeps the sliced layout under test
    outs = adaptive_avg_pool_multi(leaf, scales, backend="triton")
    refs = reference.adaptive_avg_pool_multi(x, scales)
    assert len(outs) == len(scales)
    for out, ref, s in zip(outs, refs, scales):
        assert out.shape == ref.shape == (shape[0], shape[1], s, s)
        assert out.dtype == ref.dtype
        # Same memory format as PyTorch gives (channels_last in -> channels_last out).
        assert _is_channels_last(out) == _is_channels_last(ref)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = _random_grads(x, scales)
    torch.autograd.backward(list(outs), grads)
    expected = _reference_grad(x, scales, grads)
    assert _is_channels_last(leaf.grad) == _is_channels_last(expected)
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", ("real_scales_16x16", "non_square_odd_7x5"))
def test_low_precision_within_twice_pytorch_error(case, dtype, layout):
    shape, scales = EDGE_CASES[case]
    x = _make_input(shape, dtype, layout)
    grads = _random_grads(x, scales)
    half_ulp_at_one = torch.finfo(dtype).eps / 2

    exact = reference.adaptive_avg_pool_multi(x.double(), scales)
    torch_outs = reference.adaptive_avg_pool_multi(x, scales)
    ours = kernels.pool_forward(x, scales)
    for out, torch_out, ref in zip(ours, torch_outs, exact):
        assert out.dtype == dtype and _is_channels_last(out) == _is_channels_last(torch_out)
        torch_err = (torch_out.double() - ref).abs().max().item()
        our_err = (out.double() - ref).abs().max().item()
        assert our_err <= 2 * torch_err + half_ulp_at_one, (our_err, torch_err)

    exact_grad = _reference_grad(x.double(), scales, [g.double() for g in grads])
    torch_grad = _reference_grad(x, scales, grads)
    our_grad = kernels.pool_backward(grads, x.shape, scales, kernel_utils.is_channels_last(x))
    assert our_grad.dtype == dtype
    torch_err = (torch_grad.double() - exact_grad).abs().max().item()
    our_err = (our_grad.double() - exact_grad).abs().max().item()
    assert our_err <= 2 * torch_err + half_ulp_at_one, (our_err, torch_err)


@pytest.mark.parametrize("shape", ((1, 2, 7, 4), (1, 1, 1, 9)))
def test_every_scale_up_to_twelve(shape):
    # Scales 1..12 on sides 7, 4, 1 and 9: divisible, overlapping and s > n bins, and more scales than one
    # launch takes (8), so the forward runs two launches and the backward accumulates the second.
    scales = list(range(1, 13))
    x = _make_input(shape, torch.float32, "contiguous")
    for out, ref in zip(kernels.pool_forward(x, scales), reference.adaptive_avg_pool_multi(x, scales)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = _random_grads(x, scales)
    got = kernels.pool_backward(grads, x.shape, scales, channels_last=False)
    torch.testing.assert_close(got, _reference_grad(x, scales, grads), rtol=1e-5, atol=1e-6)


def test_backward_is_the_adjoint_of_forward():
    # <pool(x), g> == <x, pool_backward(g)> for any x, g: ties the two kernels together without the reference.
    shape, scales = (2, 3, 11, 7), UPERNET_SCALES
    x = _make_input(shape, torch.float32, "contiguous", seed=3)
    grads = _random_grads(x, scales, seed=4)
    lhs = sum((o.double() * g.double()).sum() for o, g in zip(kernels.pool_forward(x, scales), grads))
    rhs = (x.double() * kernels.pool_backward(grads, x.shape, scales, False).double()).sum()
    assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_nan_poisoned_outputs_are_fully_overwritten(layout):
    shape, scales = (2, 5, 7, 5), UPERNET_SCALES
    x = _make_input(shape, torch.float32, layout)
    fmt = CL if layout == "channels_last" else torch.contiguous_format
    poisoned = [
        torch.full((2, 5, s, s), float("nan"), device=x.device).contiguous(memory_format=fmt) for s in scales
    ]
    outs = kernels.pool_forward(x, scales, out=poisoned)
    assert all(o is p for o, p in zip(outs, poisoned))
    for out, ref in zip(outs, reference.adaptive_avg_pool_multi(x, scales)):
        assert not out.isnan().any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    grads = _random_grads(x, scales)
    grad_in = torch.full(shape, float("nan"), device=x.device).contiguous(memory_format=fmt)
    got = kernels.pool_backward(grads, shape, scales, layout == "channels_last", out=grad_in)
    assert got is grad_in and not got.isnan().any()
    torch.testing.assert_close(got, _reference_grad(x, scales, grads), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_backward_is_bitwise_repeatable(dtype):
    shape, scales = (2, 5, 16, 16), UPERNET_SCALES
    x = _make_input(shape, dtype, "channels_last")
    grads = _random_grads(x, scales)
    first = kernels.pool_backward(grads, shape, scales, True)
    second = kernels.pool_backward(grads, shape, scales, True)
    assert torch.equal(first, second)


def test_int64_offsets_path(monkeypatch):
    # Tensors past 2**31 elements do not fit in this test; lower the threshold so the int64 code path runs.
    monkeypatch.setattr(kernel_utils, "INT32_MAX", 8)
    shape, scales = (2, 3, 7, 5), UPERNET_SCALES
    x = _make_input(shape, torch.float32, "sliced")
    assert kernel_utils.needs_int64(x)
    for out, ref in zip(kernels.pool_forward(x, scales), reference.adaptive_avg_pool_multi(x, scales)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = _random_grads(x, scales)
    got = kernels.pool_backward(grads, shape, scales, False)
    torch.testing.assert_close(got, _reference_grad(x, scales, grads), rtol=1e-5, atol=1e-6)


def test_int64_needed_for_big_strides():
    big_view = torch.empty_strided((2, 2, 2, 2), (2**31, 4, 2, 1), device="meta")
    assert kernel_utils.needs_int64(big_view)
    assert not kernel_utils.needs_int64(torch.empty((16, 768, 16, 16), device="meta"))


def test_outputs_left_out_of_the_loss():
    # Only scales 1 and 6 enter the loss: the other outputs' gradients reach the backward op as zeros.
    shape, scales = (2, 3, 7, 5), UPERNET_SCALES
    x = _make_input(shape, torch.float32, "contiguous")
    leaf = x.clone().requires_grad_()
    outs = adaptive_avg_pool_multi(leaf, scales, backend="triton")
    (outs[0].sum() + outs[3].pow(2).sum()).backward()
    ref_leaf = x.clone().requires_grad_()
    ref = reference.adaptive_avg_pool_multi(ref_leaf, scales)
    (ref[0].sum() + ref[3].pow(2).sum()).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_reference_gradcheck_float64():
    # Tiny non-divisible map (5x4 to 2 and 3): the oracle itself is differentiated correctly.
    x = torch.randn((1, 2, 5, 4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.adaptive_avg_pool_multi(t, (2, 3)), (x,))


def _kernel_calls(device):
    x = _make_input((2, 3, 7, 5), torch.float32, "contiguous").to(device).requires_grad_()
    return [
        ("adaptive_avg_pool_multi", (x, [1, 2, 3, 6])),
        ("adaptive_avg_pool_multi_backward", (_random_grads(x, (1, 2, 6)), [2, 3, 7, 5], False)),
    ]


class TestShared(OpTests):
    # The PPM scales on an odd, non-divisible map (overlapping bins, 6 > 5 repeats pixels).
    spec = OpSpec(
        name=OP,
        make_inputs=lambda device, layout, seed: (layout_inputs([(2, 3, 7, 5)], device, layout, seed)[0],),
        run=lambda inputs, backend: adaptive_avg_pool_multi(inputs[0], UPERNET_SCALES, backend=backend),
        kernel_calls=_kernel_calls,
        bad_calls=[
            (lambda: adaptive_avg_pool_multi(torch.randn(1, 2, 4, 4), [0], backend="triton"), ValueError, "scales"),
            (lambda: adaptive_avg_pool_multi(torch.randn(1, 2, 4, 4, dtype=torch.float64, device=TRITON_DEVICE), UPERNET_SCALES,
                                             backend="triton"), RuntimeError, "float64"),
        ],
        rtol=1e-5,
        atol=1e-6,  # fp32 sums of at most 35 terms in another order
    )


def test_triton_refuses_float64_with_reason():
    x = torch.randn((1, 2, 4, 4), dtype=torch.float64, device=TRITON_DEVICE)
    with pytest.raises(RuntimeError, match="float64"):
        adaptive_avg_pool_multi(x, UPERNET_SCALES, backend="triton")


def test_eager_is_bitwise_the_reference():
    x = torch.randn((1, 2, 4, 4))
    outs = adaptive_avg_pool_multi(x, UPERNET_SCALES, backend="eager")
    for out, s in zip(outs, UPERNET_SCALES):
        assert torch.equal(out, F.adaptive_avg_pool2d(x, s))


def test_bad_arguments_name_themselves():
    x = torch.randn((1, 2, 4, 4))
    with pytest.raises(ValueError, match="scales"):
        adaptive_avg_pool_multi(x, [0], backend="triton")
    with pytest.raises(ValueError, match="x must be a 4D tensor"):
        adaptive_avg_pool_multi(x[0], UPERNET_SCALES, backend="triton")
