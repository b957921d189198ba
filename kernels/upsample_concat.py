"""Triton kernels of ``upsample_concat``: ``cat([t if t is size else interpolate(t, size) for t in tensors], 1)``.

Forward: one launch writes every input straight into its channel slice of the output (no upsampled
intermediates, no ``torch.cat``). The 1D grid is split into consecutive program ranges, one per input
(``end0 <= end1 <= ...``); a program finds its input with scalar compares, then runs the same tile code as
``upsample_add``: a strided copy for an input already at ``size``, the bilinear gather otherwise. Up to
``MAX_INPUTS`` inputs share a launch (UperNet needs 4: the FPN concat, and 1 + len(pool_scales) = 5 for the
PPM concat); more are handled in several launches of up to ``MAX_INPUTS`` each.

Backward: the grad of an input already at ``size`` is a channel slice (a view) of the incoming grad and
needs no kernel. The grads of resized inputs are computed in one launch, each by the gather-form bilinear
backward of its channel slice, program ranges per input as in the forward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from upernet_fast.kernels import _bilinear as bl
from upernet_fast.kernels import _utils as u

MAX_INPUTS = 5


@triton.jit
def _forward_slot(local_pid, x_ptr, out_ptr, channels, in_h, in_w, c_offset, scale_h, scale_w,
                  x_sb, x_sc, x_sh, x_sw, out_h, out_w, o_sb, o_sc, o_sh, o_sw,
                  SAME_SIZE: tl.constexpr, WIDE: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, h, w, mask = bl.tile_coordinates(local_pid, channels, out_h, out_w, BLOCK_H, BLOCK_W, BLOCK_C)
    if SAME_SIZE:
        value = tl.load(x_ptr + bl.offsets(b, c, h, w, x_sb, x_sc, x_sh, x_sw, WIDE), mask=mask, other=0.0)
    else:
        value = bl.resize_tile(x_ptr, b, c, h, w, mask, in_h, in_w, scale_h, scale_w, x_sb, x_sc, x_sh, x_sw, WIDE)
    tl.store(out_ptr + bl.offsets(b, c + c_offset, h, w, o_sb, o_sc, o_sh, o_sw, WIDE),
             value.to(out_ptr.dtype.element_ty), mask=mask)


# The forward and backward kernels take one pointer slot per input (x0..x4 with their sizes and strides) and
# call the per-slot function once per slot: Triton has no arrays of pointers, so the repeated lines here are
# those unrolled slots, not copied logic (the logic is in _forward_slot / _backward_slot).
@triton.jit
def _upsample_concat_forward_kernel(
    out_ptr, out_h, out_w, o_sb, o_sc, o_sh, o_sw,
    x0, c0, h0, w0, off0, sch0, scw0, sb0, sc0, sh0, sw0, end0,
    x1, c1, h1, w1, off1, sch1, scw1, sb1, sc1, sh1, sw1, end1,
    x2, c2, h2, w2, off2, sch2, scw2, sb2, sc2, sh2, sw2, end2,
    x3, c3, h3, w3, off3, sch3, scw3, sb3, sc3, sh3, sw3, end3,
    x4, c4, h4, w4, off4, sch4, scw4, sb4, sc4, sh4, sw4, end4,
    NUM_INPUTS: tl.constexpr,
    SAME0: tl.constexpr, SAME1: tl.constexpr, SAME2: tl.constexpr, SAME3: tl.constexpr, SAME4: tl.constexpr,
    WIDE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < end0:
        _forward_slot(pid, x0, out_ptr, c0, h0, w0, off0, sch0, scw0, sb0, sc0, sh0, sw0,
                      out_h, out_w, o_sb, o_sc, o_sh, o_sw, SAME0, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 1:
        if (pid >= end0) & (pid < end1):
            _forward_slot(pid - end0, x1, out_ptr, c1, h1, w1, off1, sch1, scw1, sb1, sc1, sh1, sw1,
                          out_h, out_w, o_sb, o_sc, o_sh, o_sw, SAME1, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 2:
        if (pid >= end1) & (pid < end2):
            _forward_slot(pid - end1, x2, out_ptr, c2, h2, w2, off2, sch2, scw2, sb2, sc2, sh2, sw2,
                          out_h, out_w, o_sb, o_sc, o_sh, o_sw, SAME2, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 3:
        if (pid >= end2) & (pid < end3):
            _forward_slot(pid - end2, x3, out_ptr, c3, h3, w3, off3, sch3, scw3, sb3, sc3, sh3, sw3,
                          out_h, out_w, o_sb, o_sc, o_sh, o_sw, SAME3, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 4:
        if (pid >= end3) & (pid < end4):
            _forward_slot(pid - end3, x4, out_ptr, c4, h4, w4, off4, sch4, scw4, sb4, sc4, sh4, sw4,
                          out_h, out_w, o_sb, o_sc, o_sh, o_sw, SAME4, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)


@triton.jit
def _backward_slot(local_pid, grad_ptr, gi_ptr, channels, in_h, in_w, c_offset,
                   scale_h, scale_w, inverse_h, inverse_w, gi_sb, gi_sc, gi_sh, gi_sw,
                   out_h, out_w, g_sb, g_sc, g_sh, g_sw,
                   WIDE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    b, c, h, w, mask = bl.tile_coordinates(local_pid, channels, in_h, in_w, BLOCK_H, BLOCK_W, BLOCK_C)
    acc = bl.resize_backward_tile(grad_ptr, b, c, h, w, mask, out_h, out_w, in_h, in_w,
                                  scale_h, scale_w, inverse_h, inverse_w, c_offset, g_sb, g_sc, g_sh, g_sw, WIDE)
    tl.store(gi_ptr + bl.offsets(b, c, h, w, gi_sb, gi_sc, gi_sh, gi_sw, WIDE),
             acc.to(gi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_concat_backward_kernel(
    grad_ptr, out_h, out_w, g_sb, g_sc, g_sh, g_sw,
    x0, c0, h0, w0, off0, sch0, scw0, ih0, iw0, sb0, sc0, sh0, sw0, end0,
    x1, c1, h1, w1, off1, sch1, scw1, ih1, iw1, sb1, sc1, sh1, sw1, end1,
    x2, c2, h2, w2, off2, sch2, scw2, ih2, iw2, sb2, sc2, sh2, sw2, end2,
    x3, c3, h3, w3, off3, sch3, scw3, ih3, iw3, sb3, sc3, sh3, sw3, end3,
    x4, c4, h4, w4, off4, sch4, scw4, ih4, iw4, sb4, sc4, sh4, sw4, end4,
    NUM_INPUTS: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < end0:
        _backward_slot(pid, grad_ptr, x0, c0, h0, w0, off0, sch0, scw0, ih0, iw0, sb0, sc0, sh0, sw0,
                       out_h, out_w, g_sb, g_sc, g_sh, g_sw, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 1:
        if (pid >= end0) & (pid < end1):
            _backward_slot(pid - end0, grad_ptr, x1, c1, h1, w1, off1, sch1, scw1, ih1, iw1, sb1, sc1, sh1, sw1,
                           out_h, out_w, g_sb, g_sc, g_sh, g_sw, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 2:
        if (pid >= end1) & (pid < end2):
            _backward_slot(pid - end1, grad_ptr, x2, c2, h2, w2, off2, sch2, scw2, ih2, iw2, sb2, sc2, sh2, sw2,
                           out_h, out_w, g_sb, g_sc, g_sh, g_sw, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 3:
        if (pid >= end2) & (pid < end3):
            _backward_slot(pid - end2, grad_ptr, x3, c3, h3, w3, off3, sch3, scw3, ih3, iw3, sb3, sc3, sh3, sw3,
                           out_h, out_w, g_sb, g_sc, g_sh, g_sw, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)
    if NUM_INPUTS > 4:
        if (pid >= end3) & (pid < end4):
            _backward_slot(pid - end3, grad_ptr, x4, c4, h4, w4, off4, sch4, scw4, ih4, iw4, sb4, sc4, sh4, sw4,
                           out_h, out_w, g_sb, g_sc, g_sh, g_sw, WIDE, BLOCK_H, BLOCK_W, BLOCK_C)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def upsample_concat_forward(
    tensors: Sequence[torch.Tensor], size: Sequence[int], out: torch.Tensor
) -> torch.Tensor:
    """Writes ``cat([t if t is size else interpolate(t, size) for t in tensors], dim=1)`` into ``out``
    (B, sum C_i, *size), any strides; returns ``out``."""
    out_h, out_w = size
    batch = out.shape[0]
    offsets = [0]
    for t in tensors:
        offsets.append(offsets[-1] + t.shape[1])
    tile = bl.tile_shape(out_h, out_w, max(t.shape[1] for t in tensors), u.is_channels_last(out))
    wide = u.needs_int64(out, *tensors)
    for chunk in _chunks(list(range(len(tensors))), MAX_INPUTS):
        slots, same, end = [], [], 0
        for k in chunk:
            t = tensors[k]
            channels, in_h, in_w = t.shape[1:]
            end += bl.program_count(batch, channels, out_h, out_w, tile)
            same.append((in_h, in_w) == (out_h, out_w))
            slots.append((t, channels, in_h, in_w, offsets[k], u.axis_scale(in_h, out_h),
                          u.axis_scale(in_w, out_w), *t.stride(), end))
        # Unused slots repeat the first one; NUM_INPUTS keeps them out of the compiled kernel.
        slots += [slots[0]] * (MAX_INPUTS - len(slots))
        same += [True] * (MAX_INPUTS - len(same))
        _upsample_concat_forward_kernel[(end,)](
            out, out_h, out_w, *out.stride(),
            *[arg for slot in slots for arg in slot],
            NUM_INPUTS=len(chunk), SAME0=same[0], SAME1=same[1], SAME2=same[2], SAME3=same[3], SAME4=same[4],
            WIDE=wide, BLOCK_H=tile[0], BLOCK_W=tile[1], BLOCK_C=tile[2], num_warps=bl.launch_warps(tile),
        )
    return out


def upsample_concat_backward(
    grad: torch.Tensor, grad_inputs: Sequence[torch.Tensor], channel_offsets: Sequence[int]
) -> list[torch.Tensor]:
    """Writes into each ``grad_inputs[k]`` (B, C_k, h_k, w_k), a resized input's grad, the gather-form bilinear
    backward of ``grad``'s channels ``[channel_offsets[k], channel_offsets[k] + C_k)``; returns them."""
    out_h, out_w = grad.shape[-2:]
    batch = grad.shape[0]
    if not grad_inputs:
        return list(grad_inputs)
    first = grad_inputs[0]
    tile = bl.tile_shape(
        max(g.shape[2] for g in grad_inputs),
        max(g.shape[3] for g in grad_inputs),
        max(g.shape[1] for g in grad_inputs),
        u.is_channels_last(first),
    )
    wide = u.needs_int64(grad, *grad_inputs)
    for chunk in _chunks(list(range(len(grad_inputs))), MAX_INPUTS):
        slots, end = [], 0
        for k in chunk:
            g = grad_inputs[k]
            channels, in_h, in_w = g.shape[1:]
            end += bl.program_count(batch, channels, in_h, in_w, tile)
            slots.append((
                g, channels, in_h, in_w, channel_offsets[k],
                u.axis_scale(in_h, out_h), u.axis_scale(in_w, out_w),
                u.axis_inverse_scale(in_h, out_h), u.axis_inverse_scale(in_w, out_w),
                *g.stride(), end,
            ))
        slots += [slots[0]] * (MAX_INPUTS - len(slots))
        _upsample_concat_backward_kernel[(end,)](
            grad, out_h, out_w, *grad.stride(),
            *[arg for slot in slots for arg in slot],
            NUM_INPUTS=len(chunk), WIDE=wide,
            BLOCK_H=tile[0], BLOCK_W=tile[1], BLOCK_C=tile[2], num_warps=bl.launch_warps(tile),
        )
    return list(grad_inputs)
