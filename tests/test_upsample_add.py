"""upsample_add: the Triton kernels (under TRITON_INTERPRET=1 on CPU, or on CUDA) against the eager reference.

Tolerances:
* fp32 forward vs PyTorch's CPU kernel: that kernel derives its weights on another code path (separable
  passes), which differs in the last bit on about half of the elements, so outputs are compared to a few ulp
  (rtol 1e-6, atol 2e-6 at values of magnitude ~1-10). On CPU (no FMA contraction) the forward is also checked
  bitwise against an fp32 mirror of the index rule evaluated in the kernel's order of operations.
* gradients in every dtype, and fp16/bf16 outputs: error against a float64 reference at most 2x PyTorch's own
  error in that dtype, plus one ulp of the dtype at the value's magnitude (the kernel accumulates in fp32 and
  rounds once; a gradient sums up to (H/h)*(W/w)*4 terms in another order than PyTorch's scatter, so its
  rounding grows with the ratio; the reference can be luckier on a few elements).
"""

from __future__ import annotations


import pytest
import torch
from conftest import TRITON_DEVICE
from layouts import LAYOUTS, in_layout
from op_testing import OpSpec, OpTests, layout_inputs

from upernet_fast import reference
from upernet_fast.ops.upsample_add import upsample_add

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (B, C, h, w) -> (H, W), each case labelled with what it covers.
CASES = {
    "1x1_to_1x1": ((1, 3, 1, 1), (1, 1)),  # minimal map, equal size (the copy path)
    "1x1_to_5x3": ((2, 3, 1, 1), (5, 3)),  # one source pixel, every output clamps to it
    "2x_4x4_to_8x8": ((2, 3, 4, 4), (8, 8)),  # the FPN ratio (64 -> 128), tiny
    "7x5_to_13x11": ((1, 5, 7, 5), (13, 11)),  # non-integer ratios, odd channels, batch 1
    "13x11_to_7x5": ((2, 3, 13, 11), (7, 5)),  # downsampling: some inputs are read by no output
    "equal_6x6": ((2, 5, 6, 6), (6, 6)),  # equal size: interpolate is a copy
    "5x11_to_11x5": ((1, 3, 5, 11), (11, 5)),  # up on one axis, down on the other
}


def _random(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(TRITON_DEVICE)


def _mirror_resize(x: torch.Tensor, size) -> torch.Tensor:
    """fp32 bilinear resize written out from the index rule, in the kernel's order of operations."""

    def axis(n_in, n_out):
        scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
        d = torch.arange(n_out, dtype=torch.float32)
        src = ((d + 0.5) * scale - 0.5).clamp_min(0.0)
        i0 = src.long()
        i1 = (i0 + 1).clamp_max(n_in - 1)
        l1 = src - i0.float()
        return i0, i1, 1.0 - l1, l1

    x = x.float().cpu()
    h0, h1, lh0, lh1 = axis(x.shape[2], size[0])
    w0, w1, lw0, lw1 = axis(x.shape[3], size[1])
    rows0, rows1 = x[:, :, h0], x[:, :, h1]
    top = lw0 * rows0[..., w0] + lw1 * rows0[..., w1]
    bottom = lw0 * rows1[..., w0] + lw1 * rows1[..., w1]
    return lh0[:, None] * top + lh1[:, None] * bottom


def _run(low, lateral, grad):
    low = low.detach().requires_grad_()
    lateral = lateral.detach().requires_grad_()
    out = upsample_add(low, lateral, backend="triton")
    grad_low, grad_lateral = torch.autograd.grad(out, (low, lateral), grad)
    return out, grad_low, grad_lateral


def _reference(low, lateral, grad, dtype):
    low = low.detach().to(dtype).requires_grad_()
    lateral = lateral.detach().to(dtype).requires_grad_()
    out = reference.upsample_add(low, lateral)
    grad_low, grad_lateral = torch.autograd.grad(out, (low, lateral), grad.to(dtype))
    return out, grad_low, grad_lateral


def _assert_close_to_reference(ours, low, lateral, grad):
    dtype = low.dtype
    exact = _reference(low.cpu(), lateral.cpu(), grad.cpu(), torch.float64)
    theirs = _reference(low.cpu(), lateral.cpu(), grad.cpu(), dtype)
    names = ("out", "grad_low", "grad_lateral")
    if dtype == torch.float32:
        torch.testing.assert_close(ours[0].cpu(), theirs[0], rtol=1e-6, atol=2e-6)
        ours, theirs, exact, names = ours[1:], theirs[1:], exact[1:], names[1:]
    for name, got, mine, want in zip(names, ours, theirs, exact):
        our_error = (got.cpu().double() - want).abs().max().item()
        their_error = (mine.double() - want).abs().max().item()
        ulp = torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
        assert our_error <= 2 * their_error + ulp, f"{name}: error {our_error} vs PyTorch's {their_error}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_matches_reference(case, layout):
    (b, c, h, w), (H, W) = CASES[case]
    low = in_layout(_random((b, c, h, w), torch.float32, 1), layout)
    lateral = in_layout(_random((b, c, H, W), torch.float32, 2), layout)
    grad = in_layout(_random((b, c, H, W), torch.float32, 3), layout)
    ours = _run(low, lateral, grad)
    _assert_close_to_reference(ours, low, lateral, grad)
    assert not any(t.isnan().any() for t in ours)  # the NaN padding around sliced views was never read
    if TRITON_DEVICE == "cpu":
        assert torch.equal(ours[0], lateral + _mirror_resize(low, (H, W))), "forward not bitwise the index rule"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision_matches_reference(case, dtype):
    (b, c, h, w), (H, W) = CASES[case]
    low = _random((b, c, h, w), dtype, 4)
    lateral = _random((b, c, H, W), dtype, 5)
    grad = _random((b, c, H, W), dtype, 6)
    _assert_close_to_reference(_run(low, lateral, grad), low, lateral, grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_half_precision_layouts(dtype, layout):
    (b, c, h, w), (H, W) = CASES["7x5_to_13x11"]
    low = in_layout(_random((b, c, h, w), dtype, 7), layout)
    lateral = in_layout(_random((b, c, H, W), dtype, 8), layout)
    grad = in_layout(_random((b, c, H, W), dtype, 9), layout)
    _assert_close_to_reference(_run(low, lateral, grad), low, lateral, grad)


def test_output_layout_follows_lateral():
    low = _random((2, 3, 4, 4), torch.float32, 10)
    lateral = _random((2, 3, 8, 8), torch.float32, 11)
    assert upsample_add(low, lateral, backend="triton").is_contiguous()
    out = upsample_add(low, lateral.contiguous(memory_format=torch.channels_last), backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_every_output_element_is_written():
    from upernet_fast.kernels.upsample_add import upsample_add_forward
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward

    low = _random((2, 5, 7, 5), torch.float32, 12)
    lateral = _random((2, 5, 13, 11), torch.float32, 13)
    out = torch.full_like(lateral, float("nan"))
    upsample_add_forward(low, lateral, out=out)
    assert torch.equal(out, upsample_add(low, lateral, backend="triton"))
    grad_low = torch.full_like(low, float("nan"))
    upsample_concat_backward(lateral, [grad_low], [0])
    assert not grad_low.isnan().any()


def test_lateral_grad_is_the_incoming_grad_and_backward_is_bitwise_repeatable():
    low = _random((2, 3, 7, 5), torch.float32, 14)
    lateral = _random((2, 3, 13, 11), torch.float32, 15)
    grad = _random((2, 3, 13, 11), torch.float32, 16)
    _, grad_low_1, grad_lateral = _run(low, lateral, grad)
    _, grad_low_2, _ = _run(low, lateral, grad)
    assert grad_lateral.data_ptr() == grad.data_ptr()  # no copy
    assert torch.equal(grad_low_1, grad_low_2)


def test_equal_size_grads_are_not_shared_between_leaves():
    # At equal size both grads are the incoming grad; autograd must still give each leaf its own .grad.
    low = _random((1, 3, 4, 5), torch.float32, 25).requires_grad_()
    lateral = _random((1, 3, 4, 5), torch.float32, 26).requires_grad_()
    upsample_add(low, lateral, backend="triton").backward(torch.ones(1, 3, 4, 5, device=TRITON_DEVICE))
    low.grad.add_(1.0)
    assert torch.equal(lateral.grad, torch.ones_like(lateral))


def test_int64_indexing_path(monkeypatch):
    # Tensors past 2**31 elements are too big for a test; force the int64 offset path on a small one instead.
    from upernet_fast.kernels import _utils as kernel_utils

    (b, c, h, w), (H, W) = CASES["7x5_to_13x11"]
    low = _random((b, c, h, w), torch.float32, 17)
    lateral = _random((b, c, H, W), torch.float32, 18)
    grad = _random((b, c, H, W), torch.float32, 19)
    narrow = _run(low, lateral, grad)
    monkeypatch.setattr(kernel_utils, "needs_int64", lambda *tensors: True)
    wide = _run(low, lateral, grad)
    assert all(torch.equal(a, b) for a, b in zip(narrow, wide))


def test_gather_ranges_match_brute_force():
    # For each input index, the output range that reads it, from the kernels' closed form plus exact
    # correction, against a brute force over the index rule: every ratio up to 40 (up, down, equal,
    # non-integer such as 7->13 and 5->11, borders clamped) and a few large ones.
    # The brute force takes i0 from the kernels' own index rule on this device (fused multiply-add on a GPU, see
    # source_indices); on the CPU that rule is checked against PyTorch's here as well.
    from bilinear_probes import gather_ranges, source_indices

    pairs = [(a, b) for a in range(1, 41) for b in range(1, 41)]
    pairs += [(7, 13), (5, 11), (64, 128), (128, 512), (300, 7), (999, 1000), (1000, 999), (1, 4096), (4096, 1)]
    n_in, n_out, index, want_lo, want_hi = [], [], [], [], []
    for a, b in pairs:
        scale = torch.tensor(a, dtype=torch.float32) / torch.tensor(b, dtype=torch.float32)
        i0 = source_indices(a, b, TRITON_DEVICE).long().cpu()
        if TRITON_DEVICE == "cpu":
            src = ((torch.arange(b, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
            assert i0.equal(src.long().clamp_max(a - 1)), (a, b)
        i1 = (i0 + 1).clamp_max(a - 1)
        for i in range(a):
            readers = torch.nonzero((i0 == i) | (i1 == i)).flatten()
            n_in.append(a)
            n_out.append(b)
            index.append(i)
            # An input read by no output (downsampling) must get an empty range.
            want_lo.append(int(readers[0]) if len(readers) else None)
            want_hi.append(int(readers[-1]) + 1 if len(readers) else None)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=TRITON_DEVICE)  # noqa: E731
    lo, hi = (t.cpu().tolist() for t in gather_ranges(as_tensor(n_in), as_tensor(n_out), as_tensor(index)))
    for k in range(len(index)):
        if want_lo[k] is None:
            assert lo[k] == hi[k], (n_in[k], n_out[k], index[k], lo[k], hi[k])
        else:
            assert (lo[k], hi[k]) == (want_lo[k], want_hi[k]), (n_in[k], n_out[k], index[k], lo[k], hi[k])


def test_reference_gradcheck_float64():
    for (b, c, h, w), (H, W) in [((1, 2, 3, 2), (5, 3)), ((1, 1, 5, 4), (3, 2))]:
        low = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
        lateral = torch.randn(b, c, H, W, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(reference.upsample_add, (low, lateral))


def _bad_calls():
    low, lateral = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 8, 8)
    return [
        (lambda: upsample_add(torch.randn(1, 3, 4, 4), lateral), ValueError, "same batch and channel"),
        (lambda: upsample_add(torch.randn(2, 4, 4, 4), lateral), ValueError, "same batch and channel"),
        (lambda: upsample_add(torch.randn(3, 4, 4), lateral), ValueError, "low must be a 4D"),
        (lambda: upsample_add(low, torch.randn(2, 3, 8)), ValueError, "lateral must be a 4D"),
        (lambda: upsample_add(low.long(), lateral), TypeError, "low must be a floating-point tensor"),
        (lambda: upsample_add(low.double().to(TRITON_DEVICE), lateral.double().to(TRITON_DEVICE), backend="triton"),
         RuntimeError, "float64"),
    ]


def _kernel_calls(device):
    low, lateral, grad = (_random(shape, torch.float32, seed).to(device) for shape, seed in
                          (((1, 3, 4, 3), 20), ((1, 3, 7, 5), 21), ((1, 3, 7, 5), 22)))
    return [
        ("upsample_add", (low.requires_grad_(), lateral.requires_grad_())),
        ("upsample_add_backward", (grad, [1, 3, 4, 3], False)),
        ("upsample_add_backward", (grad, [1, 3, 4, 3], True)),
    ]


class TestShared(OpTests):
    # fp32 tolerance: a few ulp, see the module docstring.
    spec = OpSpec(
        name="upsample_add",
        make_inputs=lambda device, layout, seed: tuple(layout_inputs([(2, 3, 5, 4), (2, 3, 13, 11)], device, layout, seed)),
        run=lambda inputs, backend: (upsample_add(*inputs, backend=backend),),
        kernel_calls=_kernel_calls,
        bad_calls=_bad_calls(),
        rtol=1e-5,
        atol=2e-6,
    )


def test_eager_is_bitwise_the_reference():
    low, lateral = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 6, 6)
    assert upsample_add(low, lateral, backend="eager").equal(reference.upsample_add(low, lateral))


def test_mixed_dtypes_promote_like_addition():
    low = torch.randn(2, 3, 3, 3, device=TRITON_DEVICE).bfloat16().requires_grad_()
    lateral = torch.randn(2, 3, 6, 6, device=TRITON_DEVICE, requires_grad=True)
    ours = upsample_add(low, lateral, backend="triton")
    expected = upsample_add(low, lateral, backend="eager")
    assert ours.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-2)  # bf16 resize in the reference
    ours.sum().backward()
    assert low.grad.dtype == torch.bfloat16 and lateral.grad.dtype == torch.float32
