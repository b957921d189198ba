"""Multi-scale adaptive average pooling in Triton: every pooled map in one launch, backward in one launch.

Bins are PyTorch's: along an axis of size ``n`` pooled to ``s``, output ``o`` averages
``[(o*n)//s, ((o+1)*n + s-1)//s)``; windows overlap when ``n % s != 0`` and repeat pixels when ``s > n``.

Forward (``_pool_forward_kernel``): one program per (batch, channel block, output row ``oh`` of one scale),
the rows of every scale concatenated in grid order. The program streams the rows of its band
``[h0, h1)`` in (BLOCK_H, BLOCK_W, BLOCK_C) tiles, sums each tile over its rows, and adds each column sum to
every output bin of the row whose window holds that column (a 0/1 window mask, so overlapping windows need
no special case). Accumulation is fp32; the result is cast to the input dtype.

Backward (``_pool_backward_kernel``): gather form, one program per (batch, channel block, tile of the
input plane). Element ``(h, w)`` lies in the output rows ``(h*s)//H ..= ((h+1)*s + H-1)//H - 1`` (and the
same along ``w``), so each element adds, scale by scale and bin by bin in a fixed order, ``g / kh / kw``
of those bins. No atomics, no zero fill: every grad_input element is written once, bitwise deterministic.

Layout: the input may have any strides. Outputs, incoming gradients and grad_input are dense in the input's
memory format (NCHW, or channels_last when the input's strides are channels-last-like, as PyTorch's
``suggest_memory_format``). A launch handles up to ``MAX_SCALES_PER_LAUNCH`` scales (one pointer argument
each); longer scale lists take one launch per group of that many, the backward accumulating group by group.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from upernet_fast.kernels import _utils as u

MAX_SCALES_PER_LAUNCH = 8


def _groups(scales: Sequence[int]) -> list[tuple[int, ...]]:
    scales = tuple(int(s) for s in scales)
    return [scales[i : i + MAX_SCALES_PER_LAUNCH] for i in range(0, len(scales), MAX_SCALES_PER_LAUNCH)]


def _pad(items: Sequence, filler) -> list:
    """Pad per-scale arguments to the kernel's fixed MAX_SCALES_PER_LAUNCH slots (unused slots are never read)."""
    return list(items) + [filler] * (MAX_SCALES_PER_LAUNCH - len(items))


@triton.jit
def _dense_offsets(b, c, row, col, C, s, CHANNELS_LAST: tl.constexpr):
    """Element offsets of (b, c, row, col) in a dense (B, C, s, s) tensor; broadcast shapes are the caller's."""
    if CHANNELS_LAST:
        return ((b * s + row) * s + col) * C + c
    return ((b * C + c) * s + row) * s + col


@triton.jit
def _advance_scale(local, s, scale_idx, next_s, NEXT_IDX: tl.constexpr):
    """Step from one scale's rows to the next when ``local`` lies past this scale's ``s`` rows."""
    past = local >= s
    return tl.where(past, local - s, local), tl.where(past, next_s, s), tl.where(past, NEXT_IDX, scale_idx)


# Both kernels take one pointer slot per scale (o0..o7 / g0..g7 with S0..S7): Triton has no arrays of
# pointers, so the repeated per-scale lines in them are those unrolled slots, not copied logic.
@triton.jit(do_not_specialize=["S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7"])
def _pool_forward_kernel(
    x_ptr,
    o0, o1, o2, o3, o4, o5, o6, o7,
    S0, S1, S2, S3, S4, S5, S6, S7,
    C, H, W,
    stride_b, stride_c, stride_h, stride_w,
    n_cblocks, n_bc,
    NUM_SCALES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # Programs run output row by output row (the rows of every scale concatenated, in order), so the largest
    # windows (scale 1 comes first in UperNet's list) start first; inside a row, (batch, channel block).
    pid = tl.program_id(0)
    oh = pid // n_bc
    bc = pid % n_bc
    b = bc // n_cblocks
    cblock = bc % n_cblocks
    s = S0 + oh * 0
    scale_idx = oh * 0
    if NUM_SCALES > 1:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S1, 1)
    if NUM_SCALES > 2:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S2, 2)
    if NUM_SCALES > 3:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S3, 3)
    if NUM_SCALES > 4:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S4, 4)
    if NUM_SCALES > 5:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S5, 5)
    if NUM_SCALES > 6:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S6, 6)
    if NUM_SCALES > 7:
        oh, s, scale_idx = _advance_scale(oh, s, scale_idx, S7, 7)

    h0 = (oh * H) // s
    h1 = ((oh + 1) * H + s - 1) // s
    kh = h1 - h0

    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    rows = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_W)
    if USE_INT64:
        b = b.to(tl.int64)
        c = c.to(tl.int64)
    x_plane = x_ptr + b * stride_b
    c_off = (c * stride_c)[None, None, :]

    for ow_start in range(0, s, BLOCK_S):
        ow = ow_start + tl.arange(0, BLOCK_S)
        ow_mask = ow < s
        w0 = (ow * W) // s
        w1 = ((ow + 1) * W + s - 1) // s
        # Columns this chunk of bins reads: from its first window's start to its last window's end.
        ow_last = tl.minimum(ow_start + BLOCK_S, s) - 1
        col_begin = (ow_start * W) // s
        col_end = ((ow_last + 1) * W + s - 1) // s
        acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        for h_start in range(h0, h1, BLOCK_H):
            h = h_start + rows
            h_mask = h < h1
            if USE_INT64:
                h = h.to(tl.int64)
            h_off = (h * stride_h)[:, None, None]
            for w_start in range(col_begin, col_end, BLOCK_W):
                w = w_start + cols
                w_mask = w < col_end
                w_idx = w
                if USE_INT64:
                    w_idx = w.to(tl.int64)
                ptrs = x_plane + h_off + (w_idx * stride_w)[None, :, None] + c_off
                mask = h_mask[:, None, None] & w_mask[None, :, None] & c_mask[None, None, :]
                tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                col_sums = tl.sum(tile, axis=0)  # (BLOCK_W, BLOCK_C)
                in_window = (w[:, None] >= w0[None, :]) & (w[:, None] < w1[None, :])  # (BLOCK_W, BLOCK_S)
                picked = tl.where(in_window[:, :, None], col_sums[:, None, :], 0.0)
                acc += tl.sum(picked, axis=0)
        kw = (w1 - w0).to(tl.float32)
        # Divide by kh then kw, as PyTorch's kernels do.
        result = acc / kh.to(tl.float32) / kw[:, None]
        ow_out = ow
        if USE_INT64:
            ow_out = ow.to(tl.int64)
        offs = _dense_offsets(b, c[None, :], oh, ow_out[:, None], C, s, CHANNELS_LAST)
        # The scale index as a vector: the interpreter rejects a mask made with a scalar bool.
        scale_of_row = (ow * 0 + scale_idx)[:, None]
        mask = ow_mask[:, None] & c_mask[None, :]
        out_value = result.to(o0.dtype.element_ty)
        tl.store(o0 + offs, out_value, mask=mask & (scale_of_row == 0))
        if NUM_SCALES > 1:
            tl.store(o1 + offs, out_value, mask=mask & (scale_of_row == 1))
        if NUM_SCALES > 2:
            tl.store(o2 + offs, out_value, mask=mask & (scale_of_row == 2))
        if NUM_SCALES > 3:
            tl.store(o3 + offs, out_value, mask=mask & (scale_of_row == 3))
        if NUM_SCALES > 4:
            tl.store(o4 + offs, out_value, mask=mask & (scale_of_row == 4))
        if NUM_SCALES > 5:
            tl.store(o5 + offs, out_value, mask=mask & (scale_of_row == 5))
        if NUM_SCALES > 6:
            tl.store(o6 + offs, out_value, mask=mask & (scale_of_row == 6))
        if NUM_SCALES > 7:
            tl.store(o7 + offs, out_value, mask=mask & (scale_of_row == 7))


@triton.jit
def _gather_scale(acc, g_ptr, s, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST: tl.constexpr):
    """Add to ``acc`` (BLOCK_H, BLOCK_W, BLOCK_C) every bin of one scale whose window holds each element."""
    # Bins holding row h: oh with (oh*H)//s <= h < ((oh+1)*H + s-1)//s, i.e. oh_lo ..= oh_hi below.
    oh_lo = (h * s) // H
    oh_hi = ((h + 1) * s + H - 1) // H - 1
    ow_lo = (w * s) // W
    ow_hi = ((w + 1) * s + W - 1) // W - 1
    # At most this many bins hold one row (2 when s <= H; more when s > H repeats rows).
    span_h = (s + H - 1) // H + 1
    span_w = (s + W - 1) // W + 1
    for dh in range(0, span_h):
        oh = oh_lo + dh
        valid_h = (oh <= oh_hi) & h_mask
        # Any oh >= 0 has a window of at least one row, so kh >= 1 even on masked lanes.
        kh = (((oh + 1) * H + s - 1) // s - (oh * H) // s).to(tl.float32)
        for dw in range(0, span_w):
            ow = ow_lo + dw
            valid_w = (ow <= ow_hi) & w_mask
            kw = (((ow + 1) * W + s - 1) // s - (ow * W) // s).to(tl.float32)
            offs = _dense_offsets(b, c[None, None, :], oh[:, None, None], ow[None, :, None], C, s, CHANNELS_LAST)
            mask = valid_h[:, None, None] & valid_w[None, :, None] & c_mask[None, None, :]
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += g / kh[:, None, None] / kw[None, :, None]
    return acc


@triton.jit(do_not_specialize=["S0", "S1", "S2", "S3", "S4", "S5", "S6", "S7"])
def _pool_backward_kernel(
    gi_ptr,
    g0, g1, g2, g3, g4, g5, g6, g7,
    S0, S1, S2, S3, S4, S5, S6, S7,
    C, H, W,
    n_cblocks, n_wblocks, n_tiles,
    NUM_SCALES: tl.constexpr,
    CHANNELS_LAST: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    USE_INT64: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # Tiles of one (batch, channel block) run side by side: they read the same small gradients.
    pid = tl.program_id(0)
    bc = pid // n_tiles
    tile = pid % n_tiles
    b = bc // n_cblocks
    cblock = bc % n_cblocks
    h = (tile // n_wblocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    w = (tile % n_wblocks) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
    h_mask = h < H
    w_mask = w < W
    c_mask = c < C
    if USE_INT64:
        b = b.to(tl.int64)
        c = c.to(tl.int64)
        h = h.to(tl.int64)
        w = w.to(tl.int64)

    if CHANNELS_LAST:
        gi_offs = ((b * H + h[:, None, None]) * W + w[None, :, None]) * C + c[None, None, :]
    else:
        gi_offs = ((b * C + c[None, None, :]) * H + h[:, None, None]) * W + w[None, :, None]
    mask = h_mask[:, None, None] & w_mask[None, :, None] & c_mask[None, None, :]

    if ACCUMULATE:
        acc = tl.load(gi_ptr + gi_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_H, BLOCK_W, BLOCK_C), dtype=tl.float32)
    # Fixed order: scale by scale, and inside a scale bin rows then bin columns ascending.
    acc = _gather_scale(acc, g0, S0, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 1:
        acc = _gather_scale(acc, g1, S1, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 2:
        acc = _gather_scale(acc, g2, S2, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 3:
        acc = _gather_scale(acc, g3, S3, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 4:
        acc = _gather_scale(acc, g4, S4, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 5:
        acc = _gather_scale(acc, g5, S5, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 6:
        acc = _gather_scale(acc, g6, S6, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    if NUM_SCALES > 7:
        acc = _gather_scale(acc, g7, S7, b, c, h, w, C, H, W, h_mask, w_mask, c_mask, CHANNELS_LAST)
    tl.store(gi_ptr + gi_offs, acc.to(gi_ptr.dtype.element_ty), mask=mask)


def _block_sizes(C: int, H: int, W: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, BLOCK_C): tiles of at most 4 x 16 x 32 elements (16 fp32 per thread at 4 warps);
    the forward's window-mask product is BLOCK_W x BLOCK_S x BLOCK_C, at most 16 x 8 x 32."""
    return u.pow2_at_most(H, 4), u.pow2_at_most(W, 16), u.pow2_at_most(C, 32)


def pool_forward(
    x: torch.Tensor, scales: Sequence[int], out: Sequence[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Every ``adaptive_avg_pool2d(x, s)`` for ``s`` in ``scales``, in ``ceil(len(scales)/8)`` launches (one for
    up to 8 scales).

    x: (B, C, H, W), any strides, fp32/fp16/bf16. Returns one (B, C, s, s) tensor per scale, dense in the
    memory format of :func:`upernet_fast.kernels._utils.is_channels_last`. ``out``: optional preallocated outputs of exactly that
    shape, dtype and layout (tests fill them with NaN to prove every element is written).
    """
    B, C, H, W = x.shape
    channels_last = u.is_channels_last(x)
    fmt = u.memory_format(channels_last)
    if out is None:
        out = [torch.empty((B, C, s, s), dtype=x.dtype, device=x.device, memory_format=fmt) for s in scales]
    out = list(out)
    if len(out) != len(scales):
        raise ValueError(f"out must hold one tensor per scale ({len(scales)}), got {len(out)}")
    for o, s in zip(out, scales):
        if o.shape != (B, C, s, s) or o.dtype != x.dtype or not o.is_contiguous(memory_format=fmt):
            raise ValueError(f"out tensor for scale {s} must be a dense {(B, C, s, s)} {x.dtype} tensor in {fmt}")

    block_h, block_w, block_c = _block_sizes(C, H, W)
    n_cblocks = triton.cdiv(C, block_c)
    use_int64 = u.needs_int64(x, *out)
    done = 0
    for group in _groups(scales):
        group_out = out[done : done + len(group)]
        done += len(group)
        grid = (u.checked_grid(B * n_cblocks * sum(group), "adaptive_avg_pool_multi"),)
        _pool_forward_kernel[grid](
            x,
            *_pad(group_out, group_out[0]),
            *_pad(group, 1),
            C, H, W,
            *x.stride(),
            n_cblocks, B * n_cblocks,
            NUM_SCALES=len(group),
            CHANNELS_LAST=channels_last,
            USE_INT64=use_int64,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            BLOCK_S=u.pow2_at_most(max(group), 8),
            num_warps=4,
        )
    return out


def pool_backward(
    grads: Sequence[torch.Tensor],
    input_shape: Sequence[int],
    scales: Sequence[int],
    channels_last: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gradient of :func:`pool_forward` with respect to its input, gather form, one launch for up to 8 scales.

    grads: one (B, C, s, s) gradient per scale (any strides: made dense in the chosen format when they are
    not). Returns grad_input (B, C, H, W), dense in channels_last when ``channels_last`` else NCHW.
    ``out``: optional preallocated grad_input of exactly that shape and layout.
    """
    B, C, H, W = (int(n) for n in input_shape)
    fmt = u.memory_format(channels_last)
    grads = [g.contiguous(memory_format=fmt) for g in grads]
    dtype, device = grads[0].dtype, grads[0].device
    if out is None:
        out = torch.empty((B, C, H, W), dtype=dtype, device=device, memory_format=fmt)
    elif out.shape != (B, C, H, W) or out.dtype != dtype or not out.is_contiguous(memory_format=fmt):
        raise ValueError(f"out must be a dense {(B, C, H, W)} {dtype} tensor in {fmt}")

    block_h, block_w, block_c = _block_sizes(C, H, W)
    n_cblocks = triton.cdiv(C, block_c)
    n_wblocks = triton.cdiv(W, block_w)
    n_tiles = triton.cdiv(H, block_h) * n_wblocks
    grid = (u.checked_grid(B * n_cblocks * n_tiles, "adaptive_avg_pool_multi"),)
    use_int64 = u.needs_int64(out, *grads)
    done = 0
    for group in _groups(scales):
        group_grads = grads[done : done + len(group)]
        _pool_backward_kernel[grid](
            out,
            *_pad(group_grads, group_grads[0]),
            *_pad(group, 1),
            C, H, W,
            n_cblocks, n_wblocks, n_tiles,
            NUM_SCALES=len(group),
            CHANNELS_LAST=channels_last,
            ACCUMULATE=done > 0,
            USE_INT64=use_int64,
            BLOCK_H=block_h,
            BLOCK_W=block_w,
            BLOCK_C=block_c,
            num_warps=4,
        )
        done += len(group)
    return out
