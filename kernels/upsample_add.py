"""Triton kernels of ``upsample_add``: ``lateral + interpolate(low, size=lateral.shape[-2:])`` and its backward.

Forward: one pass. Each program owns one tile of the output (and of ``lateral``, same indices), computes the
four source indices and weights per output row and column once, gathers the four ``low`` values (cached
reads: neighbouring outputs share them), adds ``lateral`` in fp32 and writes once.

Backward: the grad of ``lateral`` is the incoming grad itself (no kernel); the grad of ``low`` is the gather-form
bilinear backward, which ``upsample_concat``'s backward launcher computes for a single slice at channel offset 0
(one kernel for both ops): each program owns a tile of ``grad_low`` and, for each of its elements, sums the
weighted output gradients of the contiguous output range that reads it (see ``_bilinear.py``), rows then
columns in increasing order. No atomics, no zero fill, bitwise identical run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from upernet_fast.kernels import _bilinear as bl
from upernet_fast.kernels import _utils as u


@triton.jit
def _upsample_add_forward_kernel(
    low_ptr, lateral_ptr, out_ptr,
    channels, in_h, in_w, out_h, out_w, scale_h, scale_w,
    low_sb, low_sc, low_sh, low_sw,
    lat_sb, lat_sc, lat_sh, lat_sw,
    out_sb, out_sc, out_sh, out_sw,
    SAME_SIZE: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, c, h, w, mask = bl.tile_coordinates(tl.program_id(0), channels, out_h, out_w, BLOCK_H, BLOCK_W, BLOCK_C)
    if SAME_SIZE:
        # interpolate() at equal size is a copy in PyTorch: no 0-weight neighbour reads (inf * 0 would be NaN).
        up = tl.load(low_ptr + bl.offsets(b, c, h, w, low_sb, low_sc, low_sh, low_sw, WIDE), mask=mask, other=0.0)
        up = up.to(tl.float32)
    else:
        up = bl.resize_tile(low_ptr, b, c, h, w, mask, in_h, in_w, scale_h, scale_w,
                            low_sb, low_sc, low_sh, low_sw, WIDE)
    lateral = tl.load(lateral_ptr + bl.offsets(b, c, h, w, lat_sb, lat_sc, lat_sh, lat_sw, WIDE), mask=mask, other=0.0)
    result = lateral.to(tl.float32) + up
    tl.store(out_ptr + bl.offsets(b, c, h, w, out_sb, out_sc, out_sh, out_sw, WIDE),
             result.to(out_ptr.dtype.element_ty), mask=mask)


def upsample_add_forward(low: torch.Tensor, lateral: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``lateral + interpolate(low, lateral.shape[-2:])``; ``out`` (lateral's shape and dtype, any strides) is
    written when given (tests poison it), else allocated in ``lateral``'s layout."""
    batch, channels, out_h, out_w = lateral.shape
    in_h, in_w = low.shape[-2:]
    if out is None:
        out = torch.empty_like(lateral)
    tile = bl.tile_shape(out_h, out_w, channels, u.is_channels_last(out))
    grid = (bl.program_count(batch, channels, out_h, out_w, tile),)
    _upsample_add_forward_kernel[grid](
        low, lateral, out,
        channels, in_h, in_w, out_h, out_w, u.axis_scale(in_h, out_h), u.axis_scale(in_w, out_w),
        *low.stride(), *lateral.stride(), *out.stride(),
        SAME_SIZE=(in_h, in_w) == (out_h, out_w), WIDE=u.needs_int64(low, lateral, out),
        BLOCK_H=tile[0], BLOCK_W=tile[1], BLOCK_C=tile[2], num_warps=bl.launch_warps(tile),
    )
    return out
