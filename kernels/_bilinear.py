"""Shared Triton pieces of the bilinear kernels (``upsample_add``, ``upsample_concat``).

PyTorch's ``align_corners=False`` size-based index rule, for output index ``d`` on an axis resized from
``n_in`` to ``n_out``::

    scale = float32(n_in) / float32(n_out)          # computed on the host, exactly as PyTorch does
    src   = max((d + 0.5) * scale - 0.5, 0)
    i0    = floor(src);  i1 = min(i0 + 1, n_in - 1)
    l1    = src - i0;    l0 = 1 - l1

Gather-form backward: input index ``i`` is read by every output ``d`` with ``i0(d) == i`` (weight ``l0``) or
``i1(d) == i`` (weight ``l1``). As ``i0`` is non-decreasing in ``d`` and ``i1(d) == i`` means ``i0(d) == i - 1``
(or ``i0(d) == i`` at the clamped last index), those ``d`` are exactly the contiguous range
``[first(i - 1), first(i + 1))`` where ``first(k)`` is the smallest ``d`` with ``i0(d) >= k``.
``first`` is estimated in closed form and then corrected with the exact rule, so a rounding in the estimate
can never drop or add an output.

Tiles are 3D ``[BLOCK_H, BLOCK_W, BLOCK_C]`` sized by the layout (see ``tile_shape``): the innermost
dimension of the layout gets the widest block (W for NCHW, C for channels_last); strides equal to 1 are
specialised by Triton, so that dimension is accessed contiguously and vectorised either way.
"""

from __future__ import annotations

import triton
import triton.language as tl


MAX_TILE = 2048  # elements per program: enough work per program to stream, small enough for registers


def tile_shape(height: int, width: int, channels: int, channels_last: bool) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, BLOCK_C) for a map of this size: the layout's innermost dimension first (C for
    channels_last, else W, up to 128 wide: contiguous vector access), then the others fill the program up to
    MAX_TILE elements, so that small maps (the PPM's 1x1..6x6) still give each program enough work."""
    p2 = triton.next_power_of_2
    if channels_last:
        block_c = min(p2(channels), 128)
        block_w = min(p2(width), MAX_TILE // block_c)
        block_h = min(p2(height), MAX_TILE // (block_c * block_w))
    else:
        block_w = min(p2(width), 128)
        block_h = min(p2(height), MAX_TILE // block_w)
        block_c = min(p2(channels), MAX_TILE // (block_w * block_h))
    return block_h, block_w, block_c


def program_count(batch: int, channels: int, height: int, width: int, tile: tuple[int, int, int]) -> int:
    """Programs of a launch that tiles a (batch, channels, height, width) map (see ``tile_coordinates``)."""
    block_h, block_w, block_c = tile
    return batch * triton.cdiv(channels, block_c) * triton.cdiv(height, block_h) * triton.cdiv(width, block_w)


def launch_warps(tile: tuple[int, int, int]) -> int:
    return 8 if tile[0] * tile[1] * tile[2] >= 2048 else 4


@triton.jit
def source_index(d, scale, n_in, ALIGN_CORNERS: tl.constexpr = False):
    """PyTorch's rule (``area_pixel_compute_source_index`` + ``guard_index_and_lambda``, fp32) for output
    indices ``d`` (int tensor) on an axis of ``n_in`` inputs: returns (i0, i1, l0, l1)."""
    d_f = d.to(tl.float32)
    if ALIGN_CORNERS:
        src = d_f * scale
    else:
        src = tl.maximum((d_f + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), n_in - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)  # the clamps are PyTorch's guard
    l0 = 1.0 - l1
    i1 = tl.minimum(i0 + 1, n_in - 1)
    return i0, i1, l0, l1


@triton.jit
def first_output_at_least(k, scale, inverse_scale, n_in, n_out):
    """Smallest output index d in [0, n_out] whose i0(d) >= k (n_out when there is none); k: int tensor."""
    estimate = tl.math.ceil((k.to(tl.float32) + 0.5) * inverse_scale - 0.5).to(tl.int32)
    d = tl.minimum(tl.maximum(estimate, 0), n_out)
    # One exact correction step each way: the estimate is within one of the answer.
    below = tl.maximum(d - 1, 0)
    i0_below, _, _, _ = source_index(below, scale, n_in)
    d = tl.where((d > 0) & (i0_below >= k), d - 1, d)
    here = tl.minimum(d, n_out - 1)
    i0_here, _, _, _ = source_index(here, scale, n_in)
    d = tl.where((d < n_out) & (i0_here < k), d + 1, d)
    return tl.where(k <= 0, 0, d)


@triton.jit
def gather_range(i, scale, inverse_scale, n_in, n_out):
    """Output indices [lo, hi) that read input index ``i`` (as i0 or i1)."""
    lo = first_output_at_least(i - 1, scale, inverse_scale, n_in, n_out)
    hi = first_output_at_least(i + 1, scale, inverse_scale, n_in, n_out)
    return lo, hi


@triton.jit
def gather_weight(d, i, scale, n_in):
    """Weight with which output ``d`` reads input ``i``: l0 if i0 == i, plus l1 if i1 == i (both at the border)."""
    i0, i1, l0, l1 = source_index(d, scale, n_in)
    return tl.where(i0 == i, l0, 0.0) + tl.where(i1 == i, l1, 0.0)


@triton.jit
def axis_offset(index, stride, WIDE: tl.constexpr):
    """``index * stride`` as an element offset; in int64 when a tensor may pass 2**31 elements."""
    # One return statement: the compiler (not the interpreter) requires every return of a jit function to
    # have the same type, and the two branches would return int64 and int32.
    if WIDE:
        index = index.to(tl.int64)
    return index * stride


@triton.jit
def offsets(b, c, h, w, stride_b, stride_c, stride_h, stride_w, WIDE: tl.constexpr):
    """Element offsets of (b, c, h, w) (broadcastable)."""
    return (axis_offset(b, stride_b, WIDE) + axis_offset(c, stride_c, WIDE)
            + axis_offset(h, stride_h, WIDE) + axis_offset(w, stride_w, WIDE))


@triton.jit
def split_program_id(pid, fastest, middle, slower):
    """``pid`` as coordinates (a, b, c, rest) of a grid whose axes, fastest first, have ``fastest``, ``middle``
    and ``slower`` programs, and then any number: pid = ((rest * slower + c) * middle + b) * fastest + a."""
    a = pid % fastest
    rest = pid // fastest
    b = rest % middle
    rest = rest // middle
    return a, b, rest % slower, rest // slower


@triton.jit
def tile_coordinates(local_pid, channels, height, width, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """(b, c [1,1,C], h [H,1,1], w [1,W,1], mask) of program ``local_pid`` over a (B, channels, height, width) grid
    of tiles, W tiles fastest, then H, C, B."""
    tw, th, tc, b = split_program_id(local_pid, tl.cdiv(width, BLOCK_W), tl.cdiv(height, BLOCK_H),
                                     tl.cdiv(channels, BLOCK_C))
    h = (th * BLOCK_H + tl.arange(0, BLOCK_H))[:, None, None]
    w = (tw * BLOCK_W + tl.arange(0, BLOCK_W))[None, :, None]
    c = (tc * BLOCK_C + tl.arange(0, BLOCK_C))[None, None, :]
    mask = (h < height) & (w < width) & (c < channels)
    return b, c, h, w, mask


@triton.jit
def resize_tile(src_ptr, b, c, oh, ow, mask, in_h, in_w, scale_h, scale_w,
                stride_b, stride_c, stride_h, stride_w, WIDE: tl.constexpr):
    """fp32 bilinear value of the output positions (oh [H,1,1], ow [1,W,1]) of channels c of batch b:
    h-lerp of w-lerps, the order of PyTorch's kernels. Indices and weights are per row and per column."""
    h0, h1, lh0, lh1 = source_index(oh, scale_h, in_h)
    w0, w1, lw0, lw1 = source_index(ow, scale_w, in_w)
    base = src_ptr + axis_offset(b, stride_b, WIDE) + axis_offset(c, stride_c, WIDE)
    row0 = base + axis_offset(h0, stride_h, WIDE)
    row1 = base + axis_offset(h1, stride_h, WIDE)
    col0 = axis_offset(w0, stride_w, WIDE)
    col1 = axis_offset(w1, stride_w, WIDE)
    x00 = tl.load(row0 + col0, mask=mask, other=0.0).to(tl.float32)
    x01 = tl.load(row0 + col1, mask=mask, other=0.0).to(tl.float32)
    x10 = tl.load(row1 + col0, mask=mask, other=0.0).to(tl.float32)
    x11 = tl.load(row1 + col1, mask=mask, other=0.0).to(tl.float32)
    top = lw0 * x00 + lw1 * x01
    bottom = lw0 * x10 + lw1 * x11
    return lh0 * top + lh1 * bottom


@triton.jit
def resize_backward_tile(grad_ptr, b, c, ih, iw, mask, out_h, out_w, in_h, in_w,
                         scale_h, scale_w, inverse_scale_h, inverse_scale_w, c_grad,
                         stride_b, stride_c, stride_h, stride_w, WIDE: tl.constexpr):
    """fp32 gradient of the input positions (ih [H,1,1], iw [1,W,1]) of channels c (grad channels c + c_grad):
    for each output row d that reads them (increasing), the weighted sum over the output columns e that read
    them (increasing), times the row weight. A fixed order: deterministic. Masked lanes load 0 and the
    weights are finite, so lanes outside a range add exactly nothing."""
    d_lo, d_hi = gather_range(ih, scale_h, inverse_scale_h, in_h, out_h)
    e_lo, e_hi = gather_range(iw, scale_w, inverse_scale_w, in_w, out_w)
    rows = tl.max(tl.where(ih < in_h, d_hi - d_lo, 0))
    cols = tl.max(tl.where(iw < in_w, e_hi - e_lo, 0))
    base = grad_ptr + axis_offset(b, stride_b, WIDE) + axis_offset(c + c_grad, stride_c, WIDE)
    acc = tl.zeros(mask.shape, tl.float32)
    for t in range(0, rows):
        d = d_lo + t
        row_mask = mask & (d < d_hi)
        row_ptr = base + axis_offset(d, stride_h, WIDE)
        row = tl.zeros(mask.shape, tl.float32)
        for s in range(0, cols):
            e = e_lo + s
            g = tl.load(row_ptr + axis_offset(e, stride_w, WIDE), mask=row_mask & (e < e_hi), other=0.0)
            row += gather_weight(e, iw, scale_w, in_w) * g.to(tl.float32)
        acc += gather_weight(d, ih, scale_h, in_h) * row
    return acc
