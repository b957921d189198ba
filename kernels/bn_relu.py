"""Triton kernels of the training-mode BatchNorm + ReLU that follows a convolution: the ``bn_relu`` op, and so
the ``ConvBNReLU`` block in training.

Every kernel reads the conv output ``x`` of shape (N, C, H, W) stored densely either as NCHW
(``x.is_contiguous()``) or as NHWC (``channels_last``); ``P = N * H * W`` values per channel.

Forward, two launches for the statistics and one for the output:
  1. ``_stats_partial_kernel``: grid (parts, channel blocks). Each program walks a fixed, contiguous range of
     pixels tile by tile; per tile it computes an exact two-pass mean and M2 (sum of squared deviations) in
     registers, and merges tiles into its running (count, mean, M2) with Chan's formula. No atomics.
  2. ``_stats_finalize_kernel``: per channel, combines the parts in a fixed order, two-pass again (the global
     mean first, then M2 = sum(M2_i + n_i * (mean_i - mean)^2)), so no catastrophic cancellation.
  3. ``_apply_kernel``: y = relu((x - mean) * invstd * w + b), fp32 arithmetic, stored in x's dtype.

Backward, from the saved conv output and per-channel statistics only (xhat and the ReLU mask are recomputed
with the same helper as the forward, so the mask is the forward's mask bit for bit):
  4. ``_backward_partial_kernel`` + ``_backward_finalize_kernel``: per channel, sum(g_relu) and
     sum(g_relu * (x - mean)), fixed-order partial sums.
  5. ``_backward_apply_kernel``: dx = w * invstd * (g_relu - sum_g / M - xhat * sum_gxhat / M).

Host launchers at the bottom take and return torch tensors; they allocate every output themselves, and
accept an optional preallocated ``out`` for the elementwise passes (tests poison it with NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from upernet_fast.kernels._utils import elementwise_block, interpreting
from upernet_fast.kernels._utils import is_channels_last as _channels_last_rule

# Programs along the pixel axis of a reduction: enough to fill an H100 (132 SMs) several times over with
# the channel blocks, few enough that the finalize pass reads a small array. Fewer under the interpreter.
_MAX_PARTS = 256
_MAX_PARTS_INTERPRETED = 4


@triton.jit
def _tile_offsets(p, c, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of pixels ``p`` (flattened n, h, w) and channels ``c``: a [len(p), len(c)] tile."""
    p64 = p.to(tl.int64)
    c64 = c.to(tl.int64)
    if CHANNELS_LAST:
        return p64[:, None] * C + c64[None, :]
    n = p64 // HW
    hw = p64 - n * HW
    return (n * C)[:, None] * HW + c64[None, :] * HW + hw[:, None]


@triton.jit
def _bn_affine(x, mean, invstd, weight, bias):
    """The pre-ReLU value, one expression shared by forward and backward so the ReLU mask is identical."""
    return (x - mean) * invstd * weight + bias


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr, AXIS: tl.constexpr):
    """The channels of this program's block (its index along grid axis ``AXIS``) and their mask."""
    c = tl.program_id(AXIS) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def _parts_tile(start, num_parts, C, c, c_mask, BLOCK_PARTS: tl.constexpr):
    """Parts [start, start + BLOCK_PARTS) of a (parts, C) buffer of partial sums: their indices, the offsets of
    the tile (parts x the channel block) and its mask: the finalize kernels' loop step."""
    i = start + tl.arange(0, BLOCK_PARTS)
    return i, i[:, None] * C + c[None, :], (i < num_parts)[:, None] & c_mask[None, :]


@triton.jit
def _part_tile(first, start, pixels_per_part, P, c_mask, BLOCK_P: tl.constexpr):
    """Pixels [first + start, first + start + BLOCK_P) of the part that starts at pixel ``first``, masked to
    the part and the map, and the tile's mask with the channel block's: the partial reductions' loop step."""
    p = first + start + tl.arange(0, BLOCK_P)
    p_mask = (p < P) & (p < first + pixels_per_part)
    return p, p_mask, p_mask[:, None] & c_mask[None, :]


@triton.jit
def _stats_partial_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, C, HW, P, pixels_per_part,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    part = tl.program_id(0)
    c, c_mask = _channel_block(C, BLOCK_C, 1)
    run_n = tl.zeros([BLOCK_C], tl.float32)
    run_mean = tl.zeros([BLOCK_C], tl.float32)
    run_m2 = tl.zeros([BLOCK_C], tl.float32)
    first = part * pixels_per_part
    for start in range(0, pixels_per_part, BLOCK_P):
        p, p_mask, mask = _part_tile(first, start, pixels_per_part, P, c_mask, BLOCK_P)
        v = tl.load(x_ptr + _tile_offsets(p, c, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        tile_n = tl.sum(p_mask.to(tl.float32), axis=0)
        tile_mean = tl.sum(v, axis=0) / tl.maximum(tile_n, 1.0)
        dev = tl.where(mask, v - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(dev * dev, axis=0)
        # Chan's merge of (run_n, run_mean, run_m2) with the tile's (tile_n, tile_mean, tile_m2).
        new_n = run_n + tile_n
        frac = tile_n / tl.maximum(new_n, 1.0)
        delta = tile_mean - run_mean
        run_mean = run_mean + delta * frac
        run_m2 = run_m2 + tile_m2 + delta * delta * run_n * frac
        run_n = new_n
    tl.store(part_mean_ptr + part * C + c, run_mean, mask=c_mask)
    tl.store(part_m2_ptr + part * C + c, run_m2, mask=c_mask)


@triton.jit
def _stats_finalize_kernel(
    part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, C, P, num_parts, pixels_per_part,
    BLOCK_PARTS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c, c_mask = _channel_block(C, BLOCK_C, 0)
    # Pass 1: the mean, weighting each part by its pixel count (known from the fixed partition).
    acc = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, num_parts, BLOCK_PARTS):
        i, offs, mask = _parts_tile(start, num_parts, C, c, c_mask, BLOCK_PARTS)
        count = tl.minimum(tl.maximum(P - i * pixels_per_part, 0), pixels_per_part).to(tl.float32)
        m = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        acc += tl.sum(count[:, None] * m, axis=0)
    mean = acc / P
    # Pass 2: M2 about the global mean (every term non-negative: no cancellation).
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, num_parts, BLOCK_PARTS):
        i, offs, mask = _parts_tile(start, num_parts, C, c, c_mask, BLOCK_PARTS)
        count = tl.minimum(tl.maximum(P - i * pixels_per_part, 0), pixels_per_part).to(tl.float32)
        m = tl.load(part_mean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(part_m2_ptr + offs, mask=mask, other=0.0)
        d = m - mean[None, :]
        m2 += tl.sum(q + count[:, None] * d * d, axis=0)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(var_ptr + c, m2 / P, mask=c_mask)


@triton.jit
def _apply_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, numel, C, channel_div, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // channel_div) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    z = _bn_affine(x, mean, invstd, w, b)
    tl.store(y_ptr + offs, tl.maximum(z, 0.0).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_partial_kernel(
    g_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_g_ptr, part_gx_ptr, C, HW, P, pixels_per_part,
    CHANNELS_LAST: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    part = tl.program_id(0)
    c, c_mask = _channel_block(C, BLOCK_C, 1)
    mean = tl.load(mean_ptr + c, mask=c_mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    sum_g = tl.zeros([BLOCK_C], tl.float32)
    sum_gx = tl.zeros([BLOCK_C], tl.float32)
    first = part * pixels_per_part
    for start in range(0, pixels_per_part, BLOCK_P):
        p, p_mask, mask = _part_tile(first, start, pixels_per_part, P, c_mask, BLOCK_P)
        offs = _tile_offsets(p, c, C, HW, CHANNELS_LAST)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _bn_affine(x, mean[None, :], invstd[None, :], w[None, :], b[None, :])
        g_relu = tl.where(mask & (z > 0.0), g, 0.0)
        sum_g += tl.sum(g_relu, axis=0)
        sum_gx += tl.sum(g_relu * (x - mean[None, :]), axis=0)
    tl.store(part_g_ptr + part * C + c, sum_g, mask=c_mask)
    tl.store(part_gx_ptr + part * C + c, sum_gx, mask=c_mask)


@triton.jit
def _backward_finalize_kernel(
    part_g_ptr, part_gx_ptr, invstd_ptr, sum_g_ptr, sum_gxhat_ptr, C, num_parts,
    BLOCK_PARTS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c, c_mask = _channel_block(C, BLOCK_C, 0)
    acc_g = tl.zeros([BLOCK_C], tl.float32)
    acc_gx = tl.zeros([BLOCK_C], tl.float32)
    for start in range(0, num_parts, BLOCK_PARTS):
        _, offs, mask = _parts_tile(start, num_parts, C, c, c_mask, BLOCK_PARTS)
        acc_g += tl.sum(tl.load(part_g_ptr + offs, mask=mask, other=0.0), axis=0)
        acc_gx += tl.sum(tl.load(part_gx_ptr + offs, mask=mask, other=0.0), axis=0)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    tl.store(sum_g_ptr + c, acc_g, mask=c_mask)
    tl.store(sum_gxhat_ptr + c, acc_gx * invstd, mask=c_mask)


@triton.jit
def _backward_apply_kernel(
    g_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sum_g_ptr, sum_gxhat_ptr, inv_count,
    numel, C, channel_div, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = (offs // channel_div) % C
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=mask, other=0.0)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    mean_g = tl.load(sum_g_ptr + c, mask=mask, other=0.0) * inv_count
    mean_gxhat = tl.load(sum_gxhat_ptr + c, mask=mask, other=0.0) * inv_count
    z = _bn_affine(x, mean, invstd, w, b)
    g_relu = tl.where(z > 0.0, g, 0.0)
    xhat = (x - mean) * invstd
    dx = w * invstd * (g_relu - mean_g - xhat * mean_gxhat)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------- launchers


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` is stored NHWC; the launchers take dense (NCHW-contiguous or channels_last) tensors only."""
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"x must be NCHW-contiguous or channels_last, got strides {x.stride()} for {tuple(x.shape)}")
    return _channels_last_rule(x)


def _channel_div(x: torch.Tensor) -> int:
    # Flat index i of a dense tensor lies in channel (i // channel_div) % C.
    return 1 if x.shape[1] == 1 or is_channels_last(x) else x.shape[2] * x.shape[3]


def _reduction_config(x: torch.Tensor) -> tuple[bool, int, int, int, int, int]:
    """(channels_last, BLOCK_P, BLOCK_C, num_parts, pixels_per_part, channel blocks) of a reduction over x."""
    n, c, h, w = x.shape
    pixels = n * h * w
    channels_last = is_channels_last(x)
    if channels_last:  # channels are contiguous: wide channel tiles, coalesced along C
        block_c = min(64, triton.next_power_of_2(c))
        block_p = max(16, min(64, 4096 // block_c))
    else:  # pixels are contiguous within a channel: long pixel tiles, few channels
        block_c = min(4, triton.next_power_of_2(c))
        block_p = 512
    block_p = min(block_p, max(16, triton.next_power_of_2(pixels)))
    max_parts = _MAX_PARTS_INTERPRETED if interpreting() else _MAX_PARTS
    tiles = triton.cdiv(pixels, block_p)
    channel_blocks = triton.cdiv(c, block_c)
    # Fixed partition: depends on the shape only, so the summation order (and the result) is reproducible.
    num_parts = max(1, min(max_parts, tiles, triton.cdiv(4 * max_parts, channel_blocks)))
    pixels_per_part = triton.cdiv(tiles, num_parts) * block_p
    num_parts = triton.cdiv(pixels, pixels_per_part)
    return channels_last, block_p, block_c, num_parts, pixels_per_part, channel_blocks


def _finalize_config(channels: int, num_parts: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_PARTS, BLOCK_C) of a finalize kernel: channel blocks of up to 64, partials read 64 at a time."""
    block_c = min(64, triton.next_power_of_2(channels))
    return (triton.cdiv(channels, block_c),), min(64, triton.next_power_of_2(num_parts)), block_c


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x (N, C, H, W), fp32, deterministic. N * H * W must be >= 1."""
    n, c, h, w = x.shape
    pixels = n * h * w
    channels_last, block_p, block_c, num_parts, ppp, channel_blocks = _reduction_config(x)
    part_mean = torch.empty((num_parts, c), dtype=torch.float32, device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _stats_partial_kernel[(num_parts, channel_blocks)](
        x, part_mean, part_m2, c, h * w, pixels, ppp,
        CHANNELS_LAST=channels_last, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    mean = torch.empty(c, dtype=torch.float32, device=x.device)
    var = torch.empty_like(mean)
    grid, block_parts, fin_c = _finalize_config(c, num_parts)
    _stats_finalize_kernel[grid](
        part_mean, part_m2, mean, var, c, pixels, num_parts, ppp, BLOCK_PARTS=block_parts, BLOCK_C=fin_c,
    )
    return mean, var


def bn_relu_apply(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """relu((x - mean) * invstd * weight + bias) per channel, in x's dtype and layout."""
    y = torch.empty_like(x) if out is None else out
    numel = x.numel()
    block = elementwise_block(numel)
    _apply_kernel[(triton.cdiv(numel, block),)](
        x, y, mean, invstd, weight, bias, numel, x.shape[1], _channel_div(x), BLOCK=block,
    )
    return y


def bn_relu_backward_reduce(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel (fp32): sum(g_relu) and sum(g_relu * xhat). ``grad`` must have x's layout."""
    n, c, h, w = x.shape
    pixels = n * h * w
    channels_last, block_p, block_c, num_parts, ppp, channel_blocks = _reduction_config(x)
    part_g = torch.empty((num_parts, c), dtype=torch.float32, device=x.device)
    part_gx = torch.empty_like(part_g)
    _backward_partial_kernel[(num_parts, channel_blocks)](
        grad, x, mean, invstd, weight, bias, part_g, part_gx, c, h * w, pixels, ppp,
        CHANNELS_LAST=channels_last, BLOCK_P=block_p, BLOCK_C=block_c,
    )
    sum_g = torch.empty(c, dtype=torch.float32, device=x.device)
    sum_gxhat = torch.empty_like(sum_g)
    grid, block_parts, fin_c = _finalize_config(c, num_parts)
    _backward_finalize_kernel[grid](
        part_g, part_gx, invstd, sum_g, sum_gxhat, c, num_parts, BLOCK_PARTS=block_parts, BLOCK_C=fin_c,
    )
    return sum_g, sum_gxhat


def bn_relu_backward_input(
    grad: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    sum_g: torch.Tensor,
    sum_gxhat: torch.Tensor,
    count: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx = w * invstd * (g_relu - sum_g / count - xhat * sum_gxhat / count), in x's dtype and layout."""
    dx = torch.empty_like(x) if out is None else out
    numel = x.numel()
    block = elementwise_block(numel)
    _backward_apply_kernel[(triton.cdiv(numel, block),)](
        grad, x, dx, mean, invstd, weight, bias, sum_g, sum_gxhat, 1.0 / count, numel, x.shape[1],
        _channel_div(x), BLOCK=block,
    )
    return dx
