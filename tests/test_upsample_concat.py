"""upsample_concat: the Triton kernels (under TRITON_INTERPRET=1 on CPU, or on CUDA) against the eager reference.

Tolerances: as in test_upsample_add.py. fp32 forward: a few ulp (rtol 1e-6, atol 2e-6) against PyTorch's CPU
kernel, whose weights come from another code path. Gradients in every dtype, and fp16/bf16 outputs: error
against a float64 reference at most 2x PyTorch's own error in that dtype plus one ulp at the value's magnitude
(a gradient sums up to (H/h)*(W/w)*4 terms, in another order than PyTorch's scatter, so its rounding grows with
the ratio). Channel slices of inputs already at ``size`` are copies and must be bitwise equal, as their grads.
"""

from __future__ import annotations


import pytest
import torch
from conftest import TRITON_DEVICE
from layouts import LAYOUTS, in_layout
from op_testing import OpSpec, OpTests, layout_inputs

from upernet_fast import reference
from upernet_fast.ops.upsample_concat import upsample_concat

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Per case: the inputs' (C, h, w) (batch shared) and the target size, labelled with what each covers.
CASES = {
    # The FPN concat, tiny: one map at size (copied), three upsampled 2x, 4x, 8x.
    "fpn_8x8": ((2, [(3, 8, 8), (3, 4, 4), (3, 2, 2), (3, 1, 1)]), (8, 8)),
    # The PPM concat, tiny: the input map then 1 + len(pool_scales) = 5 inputs, pooled maps 1, 2, 3, 6.
    "ppm_6x6": ((1, [(5, 6, 6), (3, 1, 1), (3, 2, 2), (3, 3, 3), (3, 6, 6)]), (6, 6)),
    # Non-integer up and down ratios, odd channels, batch 1, no input at size.
    "odd_ratios_13x11": ((1, [(3, 7, 5), (5, 17, 13), (1, 13, 11)]), (13, 11)),
    "1x1_to_1x1": ((2, [(3, 1, 1), (5, 1, 1)]), (1, 1)),  # minimal maps, everything is a copy
    "1x1_to_5x3": ((2, [(3, 1, 1)]), (5, 3)),  # a single input, a single source pixel
}


def _inputs(case, dtype, layout, seed=0):
    (batch, shapes), size = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        in_layout(torch.randn((batch, *shape), generator=gen).to(dtype).to(TRITON_DEVICE), layout) for shape in shapes
    ]
    grad_shape = (batch, sum(s[0] for s in shapes), *size)
    grad = in_layout(torch.randn(grad_shape, generator=gen).to(dtype).to(TRITON_DEVICE), layout)
    return tensors, size, grad


def _run(tensors, size, grad, backend="triton"):
    tensors = [t.detach().requires_grad_() for t in tensors]
    out = upsample_concat(tensors, size, backend=backend)
    return out, torch.autograd.grad(out, tensors, grad)


def _reference(tensors, size, grad, dtype):
    tensors = [t.detach().cpu().to(dtype).requires_grad_() for t in tensors]
    out = reference.upsample_concat(tensors, size)
    return out, torch.autograd.grad(out, tensors, grad.cpu().to(dtype))


def _assert_close_to_reference(tensors, size, grad):
    out, grads = _run(tensors, size, grad)
    dtype = tensors[0].dtype
    exact_out, exact_grads = _reference(tensors, size, grad, torch.float64)
    their_out, their_grads = _reference(tensors, size, grad, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out.cpu(), their_out, rtol=1e-6, atol=2e-6)
        ours, theirs, exact = grads, their_grads, exact_grads
    else:
        ours, theirs, exact = [out, *grads], [their_out, *their_grads], [exact_out, *exact_grads]
    for got, mine, want in zip(ours, theirs, exact):
        our_error = (got.cpu().double() - want).abs().max().item()
        their_error = (mine.double() - want).abs().max().item()
        ulp = torch.finfo(dtype).eps * max(want.abs().max().item(), 1.0)
        assert our_error <= 2 * their_error + ulp, f"error {our_error} vs PyTorch's {their_error}"
    # Inputs already at size are copied into their slice, and their grads are slices of grad: both exact.
    offset = 0
    for t, g in zip(tensors, grads):
        channels = t.shape[1]
        if tuple(t.shape[-2:]) == tuple(size):
            assert torch.equal(out[:, offset : offset + channels], t)
            assert torch.equal(g, grad[:, offset : offset + channels])
        offset += channels
    assert not any(t.isnan().any() for t in [out, *grads])  # NaN padding around sliced views was never read
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fp32_matches_reference(case, layout):
    _assert_close_to_reference(*_inputs(case, torch.float32, layout))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["fpn_8x8", "ppm_6x6", "odd_ratios_13x11"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_precision_matches_reference(case, dtype, layout):
    _assert_close_to_reference(*_inputs(case, dtype, layout))


def test_mixed_layouts_and_output_layout_is_torch_cats():
    tensors, size, grad = _inputs("fpn_8x8", torch.float32, "contiguous")
    tensors = [tensors[0].contiguous(memory_format=torch.channels_last), tensors[1], in_layout(tensors[2], "sliced"),
               tensors[3]]
    out, grads = _assert_close_to_reference(tensors, size, grad)
    assert out.is_contiguous()  # some inputs are NCHW: NCHW, as torch.cat
    assert grads[0].is_contiguous(memory_format=torch.channels_last)  # each gradient in its input's layout
    assert grads[1].is_contiguous() and grads[2].is_contiguous()
    # Every input allocated channels_last: channels_last. fpn_8x8 also has a 1x1 map, which has no layout of its own
    # and takes no part in the choice (torch.cat would follow its size-1 strides; see _new_output).
    tensors = [t.contiguous(memory_format=torch.channels_last) for t in tensors]
    assert tensors[-1].shape[-2:] == (1, 1)
    out, _ = _run(tensors, size, grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out, _ = _run(tensors[:3], size, grad[:, : sum(t.shape[1] for t in tensors[:3])])
    assert out.stride() == reference.upsample_concat(tensors[:3], size).stride()  # no 1x1 map: torch.cat's


def test_more_inputs_than_one_launch_takes():
    # Past MAX_INPUTS (5) inputs the launcher splits into several launches; slices must still line up.
    from upernet_fast.kernels.upsample_concat import MAX_INPUTS

    gen = torch.Generator().manual_seed(1)
    shapes = [(2, 1 + k % 3, 1 + k % 4, 2 + k % 3) for k in range(MAX_INPUTS + 2)] + [(2, 2, 4, 5)]
    tensors = [torch.randn(s, generator=gen).to(TRITON_DEVICE) for s in shapes]
    grad = torch.randn((2, sum(s[1] for s in shapes), 4, 5), generator=gen).to(TRITON_DEVICE)
    _assert_close_to_reference(tensors, (4, 5), grad)


def test_every_output_element_is_written():
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward, upsample_concat_forward

    tensors, size, grad = _inputs("ppm_6x6", torch.float32, "contiguous")
    out = torch.full((1, 17, *size), float("nan"), device=TRITON_DEVICE)
    upsample_concat_forward(tensors, size, out)
    assert torch.equal(out, upsample_concat(tensors, size, backend="triton"))
    resized = tensors[1:4]
    grad_inputs = [torch.full_like(t, float("nan")) for t in resized]
    upsample_concat_backward(grad, grad_inputs, [5, 8, 11])
    assert not any(g.isnan().any() for g in grad_inputs)


def test_backward_is_bitwise_repeatable_and_same_size_grads_are_copies():
    tensors, size, grad = _inputs("fpn_8x8", torch.float32, "contiguous", seed=3)
    _, first = _run(tensors, size, grad)
    _, second = _run(tensors, size, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # A same-size input's grad is its slice of grad, copied: a view would keep all of grad alive as long as it.
    channels = tensors[0].shape[1]
    assert torch.equal(first[0], grad[:, :channels]) and first[0].data_ptr() != grad.data_ptr()
    # Unless it is the whole of grad: then it is grad itself.
    _, (only,) = _run(tensors[:1], size, grad[:, :channels].contiguous())
    assert only.shape == tensors[0].shape


def test_int64_indexing_path(monkeypatch):
    # Tensors past 2**31 elements are too big for a test; force the int64 offset path on a small one instead.
    from upernet_fast.kernels import _utils as kernel_utils

    tensors, size, grad = _inputs("odd_ratios_13x11", torch.float32, "contiguous")
    out, grads = _run(tensors, size, grad)
    monkeypatch.setattr(kernel_utils, "needs_int64", lambda *tensors: True)
    wide_out, wide_grads = _run(tensors, size, grad)
    assert torch.equal(out, wide_out) and all(torch.equal(a, b) for a, b in zip(grads, wide_grads))


def test_reference_gradcheck_float64():
    tensors = [
        torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 1, 2, 1, dtype=torch.float64, requires_grad=True),
        torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(lambda *ts: reference.upsample_concat(ts, (3, 3)), tuple(tensors))


def _kernel_calls(device):
    # One input at size, one resized (a 2x4 -> 4x4 ratio on one axis only): small, the interpreter is slow.
    gen = torch.Generator().manual_seed(4)
    tensors = [torch.randn(s, generator=gen).to(device).requires_grad_() for s in [(1, 2, 4, 4), (1, 3, 2, 4)]]
    grad = torch.randn((1, 5, 4, 4), generator=gen).to(device)
    return [
        ("upsample_concat", (tensors, [4, 4])),
        ("upsample_concat_backward", (grad, [3, 2, 4, 2, 1, 1], [0, 3], [False, True])),
    ]


def _bad_calls():
    x = torch.randn(2, 3, 4, 4)
    return [
        (lambda: upsample_concat([x, torch.randn(1, 3, 2, 2)], (4, 4)), ValueError, r"tensors\[1\] has batch size 1"),
        (lambda: upsample_concat([x, torch.randn(3, 2, 2)], (4, 4)), ValueError, r"tensors\[1\] must be a 4D"),
        (lambda: upsample_concat([], (4, 4)), TypeError, "non-empty list"),
        (lambda: upsample_concat(x, (4, 4)), TypeError, "non-empty list"),
        (lambda: upsample_concat([x], (4, 0)), ValueError, "size must be two positive ints"),
        (lambda: upsample_concat([x], (4, 4, 4)), ValueError, "size must be two positive ints"),
        (lambda: upsample_concat([x, x.long()], (4, 4)), TypeError, r"tensors\[1\] must be a floating-point tensor"),
        (lambda: upsample_concat([x.double().to(TRITON_DEVICE)], (4, 4), backend="triton"), RuntimeError, "float64"),
    ]


class TestShared(OpTests):
    # The FPN pattern at odd sizes: one map at size (a copy), three resized (up, and down on one axis).
    spec = OpSpec(
        name="upsample_concat",
        make_inputs=lambda device, layout, seed: (
            layout_inputs([(2, 3, 9, 7), (2, 2, 5, 4), (2, 1, 3, 2), (2, 2, 11, 3)], device, layout, seed),
        ),
        run=lambda inputs, backend: (upsample_concat(inputs[0], (9, 7), backend=backend),),
        kernel_calls=_kernel_calls,
        bad_calls=_bad_calls(),
        rtol=1e-5,
        atol=2e-6,  # a few ulp, see the module docstring
        # The output takes the first input's layout (test_mixed_layouts_and_output_layout_follows_first_input);
        # torch.cat makes it NCHW when one input's layout is ambiguous, as the 1-channel map here.
        layout_like_reference=False,
    )


def test_eager_is_bitwise_the_reference():
    tensors = [torch.randn(1, 2, 3, 3), torch.randn(1, 1, 1, 1)]
    assert torch.equal(upsample_concat(tensors, (3, 3), backend="eager"), reference.upsample_concat(tensors, (3, 3)))


def test_mixed_dtypes_promote_like_torch_cat():
    # Under autocast a backbone may hand fp32 features next to bf16 branches; torch.cat promotes to fp32.
    x = torch.randn(2, 3, 6, 6, device=TRITON_DEVICE, requires_grad=True)
    branch = torch.randn(2, 4, 2, 2, device=TRITON_DEVICE).bfloat16().requires_grad_()
    ours = upsample_concat([x, branch], (6, 6), backend="triton")
    expected = upsample_concat([x, branch], (6, 6), backend="eager")
    assert ours.dtype == expected.dtype == torch.float32
    # The reference resizes the branch in bf16 before promoting; ours resizes after: bf16 rounding apart.
    torch.testing.assert_close(ours, expected, rtol=1e-2, atol=1e-2)
    ours.sum().backward()
    assert x.grad.dtype == torch.float32 and branch.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_output_layout_is_torch_cat_layout(backend):
    """channels_last only when every input is, as torch.cat lays out the resized inputs: the convolution that reads
    the concat then sees the layout transformers' model gives it (on the CPU, oneDNN's channels_last backward of
    fpn_bottleneck measured 1.8x slower than the NCHW one the reference runs)."""
    from op_testing import KERNEL_BACKENDS, require_backend

    require_backend(backend)
    device = KERNEL_BACKENDS[backend][1]
    big, small = torch.randn(2, 3, 6, 5, device=device), torch.randn(2, 4, 3, 2, device=device)
    cl = torch.channels_last
    for layouts in ((cl, cl), (cl, None), (None, cl), (None, None)):
        tensors = [t.contiguous(memory_format=f) if f else t for t, f in zip((big, small), layouts)]
        ours = upsample_concat(tensors, (6, 5), backend=backend)
        eager = reference.upsample_concat(tensors, (6, 5))
        assert ours.stride() == eager.stride(), (layouts, ours.stride(), eager.stride())
        torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)
