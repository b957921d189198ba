"""The compiled CPU kernels (torch.ops.upernet_fast_cpp, csrc/cpu/) called directly: the bilinear ops, the pyramid
pooling and BatchNorm+ReLU, each against the eager reference (PyTorch) and against the Triton kernels under the
interpreter (three independent implementations); float64 gradcheck; bitwise repeat and thread-count invariance.
The loss has its own file (test_cpp_upsample_cross_entropy.py).

The extension is built by the first test that needs it (.ci/setup builds it beforehand); a build failure fails
these tests, never skips them.

Tolerances:
* float32 forward against PyTorch: the same formulas and, for pooling, the same summation order, but PyTorch's
  kernels derive bilinear weights on another code path (separable passes, FMA contraction in its AVX2 build),
  which moves the last bit of some elements: rtol 1e-6 / atol 2e-6 at values of magnitude ~1-5.
* float32 against the Triton kernels: the same expressions in the same order with no FMA contraction on either
  side (the extension is built with -ffp-contract=off; the interpreter evaluates with numpy), so bitwise.
* float32 gradients (gather order against PyTorch's scatter; BN reductions in another order): rtol/atol 1e-5
  relative to the largest value.
* bfloat16: error against a float64 reference at most 2x PyTorch's own bfloat16 error plus one bf16 ulp at the
  value's magnitude (the kernels accumulate in float32 and round once).
* float64: 1e-12 (the only differences are summation orders).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layouts import LAYOUTS, in_layout

from upernet_fast import cpp_extension, reference


@pytest.fixture(scope="module")
def ops():
    cpp_extension.load()  # builds on first use; raises (test error) if the build fails
    return torch.ops.upernet_fast_cpp


def _randn(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _assert_close(actual, expected, dtype):
    if dtype == torch.float64:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=2e-6)


def _assert_grad_close(actual, expected, scale=None):
    """Relative to the largest expected value, or to ``scale`` where the gradient itself may cancel to ~0."""
    scale = (expected.abs().max().item() if scale is None else scale) + 1e-30
    torch.testing.assert_close(actual.double() / scale, expected.double() / scale, rtol=1e-5, atol=1e-5)


def _to_double(value):
    if isinstance(value, torch.Tensor):
        return value.double()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_double(v) for v in value)
    return value


def _assert_bf16_close(actual, inputs_fn, torch_fn):
    """actual (bf16) vs the float64 result of the same bf16 inputs: error <= 2 * PyTorch's own bf16 error + one
    bf16 ulp at the value's magnitude."""
    inputs = inputs_fn(torch.bfloat16)
    truth = torch_fn(*_to_double(inputs))
    theirs = torch_fn(*inputs).double()
    ours = actual.double()
    ulp = truth.abs().clamp_min(1e-3) * 2.0**-8
    ours_err = (ours - truth).abs()
    their_err = (theirs - truth).abs()
    assert bool((ours_err <= 2 * their_err + ulp).all()), float((ours_err - 2 * their_err - ulp).max())


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(ints)


def _assert_same_bits(a, b):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same_bits(x, y)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(_bits(a), _bits(b)), "not bitwise identical"


def _with_threads(n, fn):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def _deterministic(fn):
    """fn() bitwise identical on repeat and with 1, 2 and 3 threads (3: an uneven split of the work)."""
    first = _with_threads(2, fn)
    _assert_same_bits(first, _with_threads(2, fn))
    for n in (1, 3):
        _assert_same_bits(first, _with_threads(n, fn))


def _is_channels_last(t):
    return t.dim() == 4 and t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) > 1


# ------------------------------------------------------------------------------------------ upsample_add

# (B, C, h, w) -> (H, W), each labelled with what it covers.
RESIZE_CASES = {
    "1x1_to_1x1": ((1, 3, 1, 1), (1, 1)),  # minimal map, equal size (the copy path)
    "1x1_to_5x3": ((2, 3, 1, 1), (5, 3)),  # one source pixel, every output clamps to it
    "2x_4x4_to_8x8": ((2, 3, 4, 4), (8, 8)),  # the FPN ratio, tiny
    "7x5_to_13x11": ((1, 5, 7, 5), (13, 11)),  # non-integer ratios, odd channels, batch 1
    "13x11_to_7x5": ((2, 3, 13, 11), (7, 5)),  # down-sampling: some inputs are read by no output
    "5x11_to_11x5": ((1, 9, 5, 11), (11, 5)),  # up on one axis, down on the other; C > one vector (8 lanes)
    "one_channel": ((2, 1, 3, 4), (7, 9)),  # C == 1: both layouts are one
}


@pytest.mark.parametrize("case", RESIZE_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_upsample_add_forward_and_backward_match_eager(ops, case, layout, dtype):
    (b, c, h, w), (H, W) = RESIZE_CASES[case]
    low = in_layout(_randn((b, c, h, w), dtype, 1), layout)
    lateral = in_layout(_randn((b, c, H, W), dtype, 2), layout)
    out = ops.upsample_add(low, lateral)
    _assert_close(out, reference.upsample_add(low, lateral), dtype)
    assert _is_channels_last(out) == _is_channels_last(torch.empty_like(lateral))  # lateral's layout
    if (h, w) == (H, W):
        return  # the autograd formula passes the gradient through; the backward op is never called
    grad = in_layout(_randn((b, c, H, W), dtype, 3), layout)
    leaf = low.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.upsample_add(leaf, lateral), leaf, grad)
    cl = _is_channels_last(low)
    got = ops.upsample_add_backward(grad, list(low.shape), cl)
    assert _is_channels_last(got) == (cl and c > 1)
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    else:
        _assert_grad_close(got, expected)


@pytest.mark.parametrize("case", ["2x_4x4_to_8x8", "7x5_to_13x11", "13x11_to_7x5"])
@pytest.mark.parametrize("layout", ["contiguous", "sliced_channels_last"])
def test_upsample_add_matches_triton_bitwise(ops, case, layout):
    import upernet_fast.ops  # noqa: F401  (registers torch.ops.upernet_fast)

    (b, c, h, w), (H, W) = RESIZE_CASES[case]
    low = in_layout(_randn((b, c, h, w), seed=1), layout)
    lateral = in_layout(_randn((b, c, H, W), seed=2), layout)
    _assert_same_bits(ops.upsample_add(low, lateral), torch.ops.upernet_fast.upsample_add(low, lateral))
    grad = _randn((b, c, H, W), seed=3)
    cl = _is_channels_last(low)
    _assert_same_bits(ops.upsample_add_backward(grad, list(low.shape), cl),
                      torch.ops.upernet_fast.upsample_add_backward(grad, list(low.shape), cl))


def test_upsample_add_bf16(ops):
    def inputs(dtype):
        return _randn((2, 9, 7, 5), dtype, 1), _randn((2, 9, 13, 11), dtype, 2)

    _assert_bf16_close(ops.upsample_add(*inputs(torch.bfloat16)), inputs, reference.upsample_add)
    grad64 = _randn((2, 9, 13, 11), torch.float64, 3)

    def backward(low, lateral):
        leaf = low.detach().clone().requires_grad_()
        return torch.autograd.grad(reference.upsample_add(leaf, lateral), leaf, grad64.to(low.dtype))[0]

    got = ops.upsample_add_backward(grad64.bfloat16(), [2, 9, 7, 5], False)
    _assert_bf16_close(got, inputs, backward)


# --------------------------------------------------------------------------------------- upsample_concat

CONCAT_CASES = {
    # the FPN concat in miniature: the first map at size (copied), three upsampled
    "fpn": ([(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 2), (2, 2, 1, 1)], (8, 8)),
    # the PPM concat: pooled maps 1..6 up to an odd 7x5, the feature map first
    "ppm": ([(1, 6, 7, 5), (1, 3, 1, 1), (1, 3, 2, 2), (1, 3, 3, 3), (1, 3, 6, 6)], (7, 5)),
    # down-sampling and mixed ratios; more inputs than one Triton launch takes (5)
    "mixed": ([(1, 2, 9, 13), (1, 3, 5, 3), (1, 1, 4, 4), (1, 2, 11, 7), (1, 3, 2, 9), (1, 2, 6, 6)], (6, 6)),
}


def _concat_backward_args(shapes, size, layout_cl):
    sizes, offsets, flags, which = [], [], [], []
    offset = 0
    for k, (_, c, h, w) in enumerate(shapes):
        if (h, w) != tuple(size):
            sizes += [c, h, w]
            offsets.append(offset)
            flags.append(layout_cl and c > 1)
            which.append(k)
        offset += c
    return sizes, offsets, flags, which


@pytest.mark.parametrize("case", CONCAT_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_upsample_concat_forward_and_backward_match_eager(ops, case, layout, dtype):
    shapes, size = CONCAT_CASES[case]
    tensors = [in_layout(_randn(s, dtype, k), layout) for k, s in enumerate(shapes)]
    out = ops.upsample_concat(tensors, list(size))
    _assert_close(out, reference.upsample_concat(tensors, size), dtype)
    assert _is_channels_last(out) == _is_channels_last(tensors[0])
    grad = in_layout(_randn(out.shape, dtype, 9), layout)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    expected = torch.autograd.grad(reference.upsample_concat(leaves, size), leaves, grad)
    sizes, offsets, flags, which = _concat_backward_args(shapes, size, "channels_last" in layout)
    got = ops.upsample_concat_backward(grad, sizes, offsets, flags)
    assert len(got) == len(which)
    for g, k, flag in zip(got, which, flags):
        assert _is_channels_last(g) == flag
        if dtype == torch.float64:
            torch.testing.assert_close(g, expected[k], rtol=1e-12, atol=1e-12)
        else:
            _assert_grad_close(g, expected[k])


@pytest.mark.parametrize("case", ["fpn", "mixed"])
def test_upsample_concat_matches_triton_bitwise(ops, case):
    import upernet_fast.ops  # noqa: F401

    shapes, size = CONCAT_CASES[case]
    tensors = [in_layout(_randn(s, seed=k), "sliced") for k, s in enumerate(shapes)]
    _assert_same_bits(ops.upsample_concat(tensors, list(size)),
                      torch.ops.upernet_fast.upsample_concat(tensors, list(size)))
    grad = _randn((shapes[0][0], sum(s[1] for s in shapes), *size), seed=9)
    sizes, offsets, flags, _ = _concat_backward_args(shapes, size, False)
    _assert_same_bits(ops.upsample_concat_backward(grad, sizes, offsets, flags),
                      torch.ops.upernet_fast.upsample_concat_backward(grad, sizes, offsets, flags))


def test_upsample_concat_bf16(ops):
    shapes, size = CONCAT_CASES["fpn"]

    def inputs(dtype):
        return [_randn(s, dtype, k) for k, s in enumerate(shapes)], size

    _assert_bf16_close(ops.upsample_concat(inputs(torch.bfloat16)[0], list(size)), inputs, reference.upsample_concat)


# ------------------------------------------------------------------------------- adaptive_avg_pool_multi

POOL_CASES = {
    "ppm_5x7": ((2, 6, 5, 7), (1, 2, 3, 6)),  # odd map, overlapping windows, out > in along H (6 > 5)
    "16x16": ((1, 9, 16, 16), (1, 2, 3, 6)),  # the real PPM grid, overlapping windows (16 -> 3, 16 -> 6)
    "1x1": ((2, 3, 1, 1), (1, 2, 3)),  # a 1x1 map pooled up: every bin repeats the pixel
    "many_scales": ((1, 4, 9, 4), (1, 2, 3, 4, 5, 6, 7, 8, 9)),  # more scales than one Triton launch (8)
}


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_pool_forward_and_backward_match_eager(ops, case, layout, dtype):
    shape, scales = POOL_CASES[case]
    x = in_layout(_randn(shape, dtype, 1), layout)
    outs = ops.adaptive_avg_pool_multi(x, list(scales))
    from upernet_fast.kernels._utils import is_channels_last, memory_format

    for out, ref in zip(outs, reference.adaptive_avg_pool_multi(x, scales), strict=True):
        _assert_close(out, ref, dtype)
        assert out.is_contiguous(memory_format=memory_format(is_channels_last(x)))
    grads = [in_layout(_randn(o.shape, dtype, 10 + k), layout) for k, o in enumerate(outs)]
    leaf = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(reference.adaptive_avg_pool_multi(leaf, scales), leaf, grads)
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    got = ops.adaptive_avg_pool_multi_backward(grads, list(shape), cl)
    if dtype == torch.float64:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    else:
        _assert_grad_close(got, expected)


@pytest.mark.parametrize("case", ["ppm_5x7", "many_scales"])
def test_pool_matches_triton(ops, case):
    import upernet_fast.ops  # noqa: F401

    shape, scales = POOL_CASES[case]
    x = in_layout(_randn(shape, seed=1), "sliced_channels_last")
    # Forward: the window sums run in another order (Triton: per tile, rows first; here PyTorch's rows-outer,
    # columns-inner order), so a few ulp. Backward: the same expression, bins in the same order: bitwise.
    for ours, theirs in zip(ops.adaptive_avg_pool_multi(x, list(scales)),
                            torch.ops.upernet_fast.adaptive_avg_pool_multi(x, list(scales)), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    grads = [_randn((shape[0], shape[1], s, s), seed=10 + k) for k, s in enumerate(scales)]
    for cl in (False, True):
        _assert_same_bits(ops.adaptive_avg_pool_multi_backward(grads, list(shape), cl),
                          torch.ops.upernet_fast.adaptive_avg_pool_multi_backward(grads, list(shape), cl))


def test_pool_bf16(ops):
    def inputs(dtype):
        return _randn((2, 6, 5, 7), dtype, 1), (1, 2, 3, 6)

    outs = ops.adaptive_avg_pool_multi(inputs(torch.bfloat16)[0], [1, 2, 3, 6])
    for k, out in enumerate(outs):
        _assert_bf16_close(out, inputs, lambda x, s, k=k: reference.adaptive_avg_pool_multi(x, s)[k])


# ------------------------------------------------------------------------------------------ BatchNorm+ReLU

BN_SHAPES = {
    "odd": (3, 7, 5, 6),  # odd everything
    "multi_chunk": (2, 9, 45, 50),  # 4500 pixels per channel: several fixed chunks (2048) across batches
    "one_pixel_each": (2, 4, 1, 1),  # two values per channel
    # Small NCHW maps are computed in blocks of up to 16 channels (csrc/cpu/reduce.h block_channels): three blocks,
    # the last one partial.
    "channel_blocks": (2, 37, 3, 5),
    # The fused backward keeps g_relu on channels of at most 1024 pixels, in blocks of 1024 values (bn_relu.cpp
    # fused_into): 128 pixels, blocks of 8 channels, the last one partial.
    "kept_blocks": (2, 21, 8, 8),
}


def _bn_train_cpp(ops, x, weight, bias, eps, grad):
    mean, var = ops.bn_relu_channel_stats(x)
    invstd = torch.rsqrt(var + eps)
    y = ops.bn_relu_apply(x, mean, invstd, weight, bias)
    sum_g, sum_gxhat = ops.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
    count = x.numel() // x.shape[1]
    dx = ops.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, float(count))
    return mean, var, y, dx, sum_gxhat, sum_g


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_bn_relu_train_matches_eager(ops, shape, layout, dtype):
    n, c, h, w = BN_SHAPES[shape]
    x = in_layout(_randn((n, c, h, w), dtype, 1) * 3 + 1, layout)
    weight, bias = _randn((c,), dtype, 2), _randn((c,), dtype, 3)
    grad = in_layout(_randn((n, c, h, w), dtype, 4), layout)
    eps = 1e-5
    mean, var, y, dx, gw, gb = _bn_train_cpp(ops, x, weight, bias, eps, grad)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(mean.double(), mean_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(var.double(), var_ref, rtol=tol, atol=tol)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias)]
    ref = F.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], training=True, eps=eps))
    expected = torch.autograd.grad(ref, leaves, grad)
    _assert_close(y, ref.detach(), dtype) if dtype == torch.float64 else torch.testing.assert_close(
        y, ref.detach(), rtol=1e-5, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    # dx cancels to ~0 when a channel has 2 values (xhat = +-1): compare it at the scale of its terms.
    dx_scale = (grad.abs().max() * weight.abs().max() * torch.rsqrt(var + eps).max()).item()
    for got, exp, scale in zip((dx, gw, gb), expected, (dx_scale, None, None)):
        if dtype == torch.float64:
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10 * (scale or 1.0))
        else:
            _assert_grad_close(got, exp, scale)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_bn_relu_matches_triton(ops, layout):
    from upernet_fast.kernels import bn_relu as kernels

    x = in_layout(_randn((2, 5, 7, 9), seed=1) * 2 + 0.5, layout)
    weight, bias, grad = _randn((5,), seed=2), _randn((5,), seed=3), in_layout(_randn((2, 5, 7, 9), seed=4), layout)
    mean, var = ops.bn_relu_channel_stats(x)
    t_mean, t_var = kernels.channel_stats(x)
    # Different fixed partitions (Triton: 4 parts under the interpreter; here 2048-pixel chunks): a few ulp.
    torch.testing.assert_close(mean, t_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(var, t_var, rtol=1e-6, atol=1e-7)
    invstd = torch.rsqrt(t_var + 1e-5)
    # The elementwise passes evaluate the same expression from the same statistics: bitwise.
    _assert_same_bits(ops.bn_relu_apply(x, t_mean, invstd, weight, bias),
                      kernels.bn_relu_apply(x, t_mean, invstd, weight, bias))
    sums = ops.bn_relu_backward_reduce(grad, x, t_mean, invstd, weight, bias)
    t_sums = kernels.bn_relu_backward_reduce(grad, x, t_mean, invstd, weight, bias)
    for a, b in zip(sums, t_sums):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # grad_x: the C++ pass folds each channel's constants into two fused multiply-adds per value
    # (csrc/cpu/bn_relu_passes.h grad_input_coefs), Triton evaluates the unfolded expression: different roundings, a
    # few ulp of the largest value.
    _assert_grad_close(ops.bn_relu_backward_input(grad, x, t_mean, invstd, weight, bias, *t_sums, 126.0),
                       kernels.bn_relu_backward_input(grad, x, t_mean, invstd, weight, bias, *t_sums, 126.0))


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_bn_relu_backward_fused_is_reduce_then_input_bitwise(ops, shape, dtype):
    """The one-pass NCHW backward gives exactly the two-op backward's bits (sums and grad_x), for 1, 2 and 3
    threads; channels_last is refused with a message naming the two ops to use."""
    n, c, h, w = BN_SHAPES[shape]
    x = (_randn((n, c, h, w), seed=1) * 3 + 1).to(dtype)
    weight, bias, grad = _randn((c,), seed=2), _randn((c,), seed=3), _randn((n, c, h, w), seed=4).to(dtype)
    mean, var = ops.bn_relu_channel_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    sum_g, sum_gxhat = ops.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
    dx = ops.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, float(n * h * w))
    fused = _with_threads(2, lambda: ops.bn_relu_backward_fused(grad, x, mean, invstd, weight, bias))
    _assert_same_bits(list(fused), [dx, sum_g, sum_gxhat])
    _deterministic(lambda: ops.bn_relu_backward_fused(grad, x, mean, invstd, weight, bias))
    # The in-place form (grad_x written over grad): the same bits.
    written = grad.clone()
    sums = _with_threads(2, lambda: ops.bn_relu_backward_fused_(written, x, mean, invstd, weight, bias))
    _assert_same_bits([written, *sums], [dx, sum_g, sum_gxhat])
    if c > 1 and h * w > 1:
        cl = x.contiguous(memory_format=torch.channels_last)
        with pytest.raises(RuntimeError, match="x must be NCHW .*bn_relu_backward_reduce"):
            ops.bn_relu_backward_fused(grad, cl, mean, invstd, weight, bias)
        with pytest.raises(RuntimeError, match="x must be NCHW .*bn_relu_backward_fused_, .*bn_relu_backward_reduce"):
            ops.bn_relu_backward_fused_(grad.clone(), cl, mean, invstd, weight, bias)
        with pytest.raises(RuntimeError, match="grad must be NCHW-contiguous for bn_relu_backward_fused_"):
            ops.bn_relu_backward_fused_(grad.contiguous(memory_format=torch.channels_last), x, mean, invstd, weight,
                                        bias)
    with pytest.raises(RuntimeError, match="grad must not share memory with x"):
        ops.bn_relu_backward_fused_(x, x, mean, invstd, weight, bias)


# (shape, whether the forward's statistics take the small-map path, whether the backward's sums do): the rules of
# csrc/cpu/reduce.h small_nchw_stats (rows of at most 64 pixels, at most 256 pixels per channel over the batch) and
# small_nchw_grads (at most 64 pixels per channel over the batch). The blocks are moved by register transposes
# (reduce.h transpose_values, AVX-512): 16 x 16 tiles, and the narrow tiles of at most 4 pixels (6x6's last 4, 2x2,
# 1x3) or at most 4 rows, here with full and partial blocks of channels (21 = 16 + 5, 7).
SMALL_MAPS = [((2, 37, 3, 5), True, True), ((1, 512, 6, 6), True, True), ((3, 20, 1, 2), True, True),
              ((1, 9, 8, 8), True, True), ((4, 20, 6, 6), True, False), ((2, 9, 7, 7), True, False),
              ((2, 21, 2, 2), True, True), ((1, 7, 1, 3), True, True)]


@pytest.mark.parametrize("shape,small_stats,small_grads", SMALL_MAPS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_bn_relu_small_nchw_map_gives_the_channels_last_bits(ops, shape, small_stats, small_grads, dtype):
    """Small NCHW maps (csrc/cpu/reduce.h small_nchw_stats, small_nchw_grads) are summed one channel per vector
    lane, in pixel order, exactly as channels_last maps are: their statistics and the one-call op's outputs (forward),
    or their backward sums and gradients (backward), have the channels_last map's bits. Also the proof that these
    paths ran: the large-map NCHW path sums along pixels in vector lanes and then across them, another order, whose
    bits differ from these on random data (checked by turning each path off: every case of that path then fails)."""
    n, c, h, w = shape
    x = (_randn(shape, seed=1) * 3 + 1).to(dtype)
    grad = _randn(shape, seed=4).to(dtype)
    weight, bias = _randn((c,), seed=2), _randn((c,), seed=3)
    cl, grad_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, grad))
    assert not cl.is_contiguous()  # (a 1x1 map would be both layouts at once: the shapes have 2 pixels or more)
    mean, var = ops.bn_relu_channel_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    if small_stats:
        _assert_same_bits([mean, var], list(ops.bn_relu_channel_stats(cl)))
        steps = []
        for t in (x, cl):
            buffers = [torch.zeros(c, dtype=mean.dtype), torch.ones(c, dtype=mean.dtype)]
            step = ops.bn_relu_train_step(t, weight.to(mean.dtype), bias.to(mean.dtype), *buffers,
                                          torch.zeros((), dtype=torch.long), 0.1, 1e-5)
            steps.append([step[0].contiguous(), *step[1:], *buffers])
        _assert_same_bits(*steps)
        _deterministic(lambda: ops.bn_relu_channel_stats(x))
    if small_grads:
        sums = ops.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
        _assert_same_bits(list(sums), list(ops.bn_relu_backward_reduce(grad_cl, cl, mean, invstd, weight, bias)))
        dx = ops.bn_relu_backward_input(grad_cl, cl, mean, invstd, weight, bias, *sums, float(n * h * w))
        fused = ops.bn_relu_backward_fused(grad, x, mean, invstd, weight, bias)
        _assert_same_bits([fused[0].contiguous(), *fused[1:]], [dx.contiguous(), *sums])


def test_bn_relu_training_backward_takes_the_fused_kernel_for_nchw_only(ops, monkeypatch):
    """The composite's cpp backward (the Python path: SyncBatchNorm, or buffers the one-call op does not take,
    here none tracked) calls the one-pass kernel on NCHW maps and the two-op pair on channels_last ones (call
    recording: a silent fallback would pass every parity test). The one-call op's C++ backward is checked the
    same way in test_bn_relu_train_step.py."""
    import importlib

    from upernet_fast import ops as public

    bn_module = importlib.import_module("upernet_fast.ops.bn_relu")  # the module (the package exports the function)
    calls = []
    real = bn_module._cpp_kernels

    def recording():
        kernels = real()
        for name in ("bn_relu_backward_fused", "bn_relu_backward_reduce", "bn_relu_backward_input"):
            setattr(kernels, name, (lambda f, name: lambda *a: calls.append(name) or f(*a))(getattr(kernels, name), name))
        return kernels

    monkeypatch.setattr(bn_module, "_cpp_kernels", recording)
    for fmt, expected in ((torch.contiguous_format, ["bn_relu_backward_fused"]),
                          (torch.channels_last, ["bn_relu_backward_reduce", "bn_relu_backward_input"])):
        calls.clear()
        bn = torch.nn.BatchNorm2d(6, track_running_stats=False).train()
        y = _randn((2, 6, 9, 7), seed=1).contiguous(memory_format=fmt).requires_grad_()
        out = public.bn_relu(y, bn, backend="cpp")
        (grad_y,) = torch.autograd.grad(out, y, _randn(out.shape, seed=2))
        expected_grad = torch.autograd.grad(reference.bn_relu(y, torch.nn.BatchNorm2d(6).train()), y,
                                            _randn(out.shape, seed=2))[0]
        _assert_grad_close(grad_y, expected_grad)
        assert calls == expected, (fmt, calls)


# Rows (one channel's pixels of one image) of 30 values (2x7x5x6), exactly one float vector (16), 63 (three vectors
# and 15), one double vector (8) and 9: full and partial vectors of the rows of csrc/cpu/reduce.h map_channel_params
# (the forward, whose last partial vector is the full one ending the row) and map_elementwise (the backward), for
# float32 and float64; and a 1x1 map of 21 channels, which map_channel_params runs along its channels.
EVAL_SHAPES = [(2, 7, 5, 6), (1, 3, 4, 4), (3, 5, 9, 7), (2, 3, 2, 4), (2, 6, 3, 3), (2, 21, 1, 1)]


@pytest.mark.parametrize("shape", EVAL_SHAPES)
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "sliced"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_bn_relu_eval_matches_eager(ops, shape, layout, dtype):
    c = shape[1]
    x = in_layout(_randn(shape, dtype, 1), layout)
    scale, shift = _randn((c,), dtype, 2), _randn((c,), dtype, 3)
    grad = in_layout(_randn(shape, dtype, 4), layout)
    y = ops.bn_relu_eval(x, scale, shift)
    leaves = [t.detach().clone().requires_grad_() for t in (x, scale, shift)]
    ref = F.relu(leaves[0] * leaves[1].view(1, -1, 1, 1) + leaves[2].view(1, -1, 1, 1))
    torch.testing.assert_close(y, ref.detach(), rtol=0, atol=0)  # one multiply and one add: exact
    expected = torch.autograd.grad(ref, leaves, grad)
    got = ops.bn_relu_eval_backward(grad, y, x, scale)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for g, e in zip(got[1:], expected[1:]):
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        else:
            _assert_grad_close(g, e)


def test_bn_relu_bf16(ops):
    x64 = _randn((2, 6, 5, 7), torch.float64, 1) * 2
    w64, b64 = _randn((6,), torch.float64, 2), _randn((6,), torch.float64, 3)

    def inputs(dtype):
        return x64.to(dtype), w64.to(dtype), b64.to(dtype)

    def torch_fn(x, w, b):
        return F.relu(F.batch_norm(x, None, None, w, b, training=True, eps=1e-5))

    x, w, b = inputs(torch.bfloat16)
    mean, var = ops.bn_relu_channel_stats(x)
    assert mean.dtype == torch.float32
    y = ops.bn_relu_apply(x, mean, torch.rsqrt(var + 1e-5), w, b)
    assert y.dtype == torch.bfloat16
    _assert_bf16_close(y, inputs, torch_fn)


# ------------------------------------------------------------------------------------------ float64 gradcheck


class _UpsampleAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, low, lateral):
        ctx.low_shape = list(low.shape)
        return torch.ops.upernet_fast_cpp.upsample_add(low, lateral)

    @staticmethod
    def backward(ctx, grad):
        return torch.ops.upernet_fast_cpp.upsample_add_backward(grad.contiguous(), ctx.low_shape, False), grad


class _Concat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shape_b = list(b.shape[1:])
        ctx.channels_a = a.shape[1]
        return torch.ops.upernet_fast_cpp.upsample_concat([a, b], list(a.shape[-2:]))

    @staticmethod
    def backward(ctx, grad):
        (grad_b,) = torch.ops.upernet_fast_cpp.upsample_concat_backward(grad, ctx.shape_b, [ctx.channels_a], [False])
        return grad[:, : ctx.channels_a], grad_b


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = list(x.shape)
        return tuple(torch.ops.upernet_fast_cpp.adaptive_avg_pool_multi(x, [1, 2, 3, 6]))

    @staticmethod
    def backward(ctx, *grads):
        return torch.ops.upernet_fast_cpp.adaptive_avg_pool_multi_backward(list(grads), ctx.shape, False)


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ops = torch.ops.upernet_fast_cpp
        mean, var = ops.bn_relu_channel_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        return ops.bn_relu_apply(x, mean, invstd, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        ops = torch.ops.upernet_fast_cpp
        x, weight, bias, mean, invstd = ctx.saved_tensors
        grad = grad.contiguous()
        sum_g, sum_gxhat = ops.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
        count = float(x.numel() // x.shape[1])
        dx = ops.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, count)
        return dx, sum_gxhat, sum_g


class _BNReLUEval(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, shift):
        y = torch.ops.upernet_fast_cpp.bn_relu_eval(x, scale, shift)
        ctx.save_for_backward(y, x, scale)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, x, scale = ctx.saved_tensors
        return torch.ops.upernet_fast_cpp.bn_relu_eval_backward(grad.contiguous(), y, x, scale)


def test_gradcheck_float64(ops):
    def r(*shape, seed):
        return _randn(shape, torch.float64, seed).requires_grad_()

    assert torch.autograd.gradcheck(_UpsampleAdd.apply, (r(1, 2, 3, 4, seed=1), r(1, 2, 5, 7, seed=2)))
    assert torch.autograd.gradcheck(_UpsampleAdd.apply, (r(1, 2, 5, 7, seed=1), r(1, 2, 3, 4, seed=2)))  # down
    assert torch.autograd.gradcheck(_Concat.apply, (r(1, 2, 5, 6, seed=3), r(1, 3, 2, 3, seed=4)))
    assert torch.autograd.gradcheck(_Pool.apply, (r(1, 2, 5, 7, seed=5),))
    # BN: values kept away from the ReLU kink (gradcheck's finite differences must not cross it).
    x = (_randn((2, 3, 3, 4), torch.float64, 6) * 2).requires_grad_()
    w, b = r(3, seed=7), r(3, seed=8)
    assert torch.autograd.gradcheck(_BNReLU.apply, (x, w, b), atol=1e-6)
    assert torch.autograd.gradcheck(_BNReLUEval.apply, (x, w, b), atol=1e-6)


# ------------------------------------------------------------------------------- determinism and threads


def test_every_op_is_bitwise_deterministic_for_any_thread_count(ops):
    # Sizes that give every thread several work items and the BN sums several chunks per channel.
    low, lateral = _randn((2, 16, 20, 24), seed=1), _randn((2, 16, 37, 45), seed=2)
    low_cl = low.contiguous(memory_format=torch.channels_last)
    grad = _randn((2, 16, 37, 45), seed=3)
    _deterministic(lambda: ops.upsample_add(low, lateral))
    _deterministic(lambda: ops.upsample_add_backward(grad, [2, 16, 20, 24], False))
    _deterministic(lambda: ops.upsample_add_backward(grad, [2, 16, 20, 24], True))
    _deterministic(lambda: ops.upsample_concat([lateral, low_cl], [37, 45]))
    _deterministic(lambda: ops.upsample_concat_backward(_randn((2, 32, 37, 45), seed=4), [16, 20, 24], [16], [True]))
    x = _randn((2, 24, 16, 16), seed=5)
    _deterministic(lambda: ops.adaptive_avg_pool_multi(x, [1, 2, 3, 6]))
    pooled = ops.adaptive_avg_pool_multi(x, [1, 2, 3, 6])
    _deterministic(lambda: ops.adaptive_avg_pool_multi_backward(pooled, [2, 24, 16, 16], False))
    _deterministic(lambda: ops.adaptive_avg_pool_multi_backward(pooled, [2, 24, 16, 16], True))
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = (_randn((3, 12, 41, 43), seed=6) * 2 + 1).contiguous(memory_format=fmt)
        g = _randn((3, 12, 41, 43), seed=7).contiguous(memory_format=fmt)
        w, b = _randn((12,), seed=8), _randn((12,), seed=9)
        _deterministic(lambda: _bn_train_cpp(ops, y, w, b, 1e-5, g))
        _deterministic(lambda: ops.bn_relu_eval_backward(g, ops.bn_relu_eval(y, w, b), y, w))


# ------------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(ops):
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(RuntimeError, match="low must be a 4D"):
        ops.upsample_add(torch.randn(2, 4, 4), x)
    with pytest.raises(RuntimeError, match="same batch and channel sizes"):
        ops.upsample_add(torch.randn(1, 3, 2, 2), x)
    with pytest.raises(RuntimeError, match="float32, float64 or bfloat16"):
        ops.upsample_add(x.half(), x.half())
    with pytest.raises(RuntimeError, match="same dtype"):
        ops.upsample_add(x.double(), x)
    with pytest.raises(RuntimeError, match="low_size must be"):
        ops.upsample_add_backward(x, [1, 3, 2, 2], False)
    with pytest.raises(RuntimeError, match="non-empty list of Tensors"):  # the dispatcher's own check
        ops.upsample_concat([], [2, 2])
    with pytest.raises(RuntimeError, match=r"tensors\[1\] has batch size"):
        ops.upsample_concat([x, torch.randn(2, 2, 4, 4)], [4, 4])
    with pytest.raises(RuntimeError, match="channel_offsets"):
        ops.upsample_concat_backward(x, [2, 2, 2], [1], [False])
    with pytest.raises(RuntimeError, match="scales must be positive"):
        ops.adaptive_avg_pool_multi(x, [1, 0])
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have shape"):
        ops.adaptive_avg_pool_multi_backward([torch.randn(1, 3, 2, 2)], [1, 2, 4, 4], False)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.bn_relu_apply(x, torch.zeros(2), torch.ones(2), torch.ones(3), torch.zeros(2))
    with pytest.raises(RuntimeError, match="count must be positive"):
        ops.bn_relu_backward_input(x, x, *[torch.zeros(2)] * 4, torch.zeros(2), torch.zeros(2), 0.0)
