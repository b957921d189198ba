"""Upsample-into-concat (the FPN and PPM concats): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import recompute, reference
from upernet_fast._checks import (
    check_feature_map,
    check_same_placement,
    check_size,
    is_feature_map,
    promote_for_kernels,
)
from upernet_fast.kernels._utils import is_channels_last, memory_format
from upernet_fast.ops._kernel_op import KernelOp

OP = "upsample_concat"


def upsample_concat(tensors: Sequence[torch.Tensor], size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """``cat([t if t.shape[-2:] == size else interpolate(t, size, bilinear) for t in tensors], dim=1)``.

    tensors: (B, C_i, h_i, w_i) with the same batch and device (floating dtypes promote as in torch.cat);
    returns (B, sum C_i, *size).
    Differentiable in every input.
    """
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:  # (a tensor is neither)
        raise TypeError("tensors must be a non-empty list or tuple of 4D tensors")
    tensors = tuple(tensors)
    one_dtype = _plain_maps(tensors)
    if one_dtype is None:  # the checks that name what is wrong (and their messages) only on failure
        names = [f"tensors[{i}]" for i in range(len(tensors))]
        for name, t in zip(names, tensors):
            check_feature_map(name, t)
        check_same_placement(names, tensors, dtype=False)
        for name, t in zip(names[1:], tensors[1:]):
            if t.shape[0] != tensors[0].shape[0]:
                raise ValueError(f"{name} has batch size {t.shape[0]} but tensors[0] has {tensors[0].shape[0]}")
        one_dtype = False  # (unreachable: a failed check raised above)
    size = check_size("size", size)
    # One device (checked); with one dtype, the first map's placement is the call's.
    impl = _backend.select(OP, backend, tensors, size, like=tensors[0] if one_dtype else None)
    parts = tensors if one_dtype else promote_for_kernels(impl.backend, tensors)
    out = impl.fn(parts, size)
    # A resize and a copy of its inputs: rebuilt in the backward rather than saved (upernet_fast.recompute).
    recompute.remember(out, lambda *rebuilt: impl.fn(rebuilt, size), parts)
    return out


def _plain_maps(tensors: tuple) -> bool | None:
    """None unless every check of the entry point passes (feature maps on one device with one batch size); then
    whether they also share one dtype (else they are promoted for the kernels, as under autocast)."""
    first = tensors[0]
    if not is_feature_map(first):
        return None
    batch, on_cpu, dtype = first.shape[0], first.is_cpu, first.dtype
    one_dtype = True
    for t in tensors[1:]:
        # same_device(t, first), inlined: this loop runs on every call, over up to five maps in the model
        if not (is_feature_map(t) and ((on_cpu and t.is_cpu) or t.device == first.device) and t.shape[0] == batch):
            return None
        if t.dtype is not dtype:  # (dtypes are singletons)
            one_dtype = False
    return one_dtype


# ---- kernel backends: one declaration (schemas, fakes, autograd) for the Triton and the C++ kernels --------


def _new_map(like: torch.Tensor, shape: Sequence[int], channels_last: bool) -> torch.Tensor:
    return torch.empty(list(shape), dtype=like.dtype, device=like.device, memory_format=memory_format(channels_last))


def _new_output(tensors: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """The concat, in the layout torch.cat gives the resized inputs: channels_last only when every input is.

    The layout eager gives matters beyond this op: the convolution that reads the concat (``fpn_bottleneck``,
    the PPM ``bottleneck``) runs its backward up to 1.8x slower on the CPU with a channels_last input than
    with the NCHW one transformers' model hands it (oneDNN, 2048->512 3x3 at 64x64: 5.1 s against 3.0 s).
    One departure from torch.cat: an input with a single channel or a 1x1 map has no layout of its own (both
    layouts' strides describe it, and Inductor treats the strides of its size-1 dimensions as free, so that
    traced and run-time strides may differ there); it takes no part in the choice.
    """
    first = tensors[0]
    shape = (first.shape[0], sum(t.shape[1] for t in tensors), size[0], size[1])
    return _new_map(first, shape, concat_channels_last(tensors))


def concat_channels_last(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the concat is channels_last (:func:`_new_output`'s rule)."""
    voters = [t for t in tensors if t.shape[1] != 1 and t.shape[2] * t.shape[3] != 1]
    return bool(voters) and all(is_channels_last(t) for t in voters)


def _new_grads(grad: torch.Tensor, shapes: list[int], channels_last: list[bool]) -> list[torch.Tensor]:
    """Grads of the resized inputs: input k has shape (B, *shapes[3k:3k+3]), channels_last when channels_last[k]."""
    return [
        _new_map(grad, (grad.shape[0], *shapes[3 * k : 3 * k + 3]), channels_last[k])
        for k in range(len(channels_last))
    ]


def _setup_context(ctx, inputs, output):
    tensors, size = inputs
    ctx.shapes = [tuple(t.shape[1:]) for t in tensors]
    ctx.channels_last = [is_channels_last(t) for t in tensors]
    ctx.size = tuple(size)


def _backward(backward_op, ctx, grad):
    grads: list[torch.Tensor | None] = [None] * len(ctx.shapes)
    resized, shapes, offsets, layouts = [], [], [], []
    offset = 0
    for k, (channels, height, width) in enumerate(ctx.shapes):
        if ctx.needs_input_grad[0][k]:  # one flag per tensor of the list
            if (height, width) == ctx.size:
                # A copy, not a view, unless it is the whole grad: a view would keep every input's channels of
                # the concat's gradient alive until this input's producer has run its backward. In the FPN that
                # held a 64 MiB gradient for a 16 MiB slice, the CPU training step's peak (batch 2, 256x256).
                piece = grad[:, offset : offset + channels]
                keep_view = channels == grad.shape[1]
                grads[k] = piece if keep_view else piece.clone(memory_format=memory_format(ctx.channels_last[k]))
            else:
                resized.append(k)
                shapes += [channels, height, width]
                offsets.append(offset)
                layouts.append(ctx.channels_last[k])
        offset += channels
    if resized:
        for k, g in zip(resized, backward_op(grad, shapes, offsets, layouts)):
            grads[k] = g
    return grads, None


KERNEL_OP = KernelOp(
    "upsample_concat(Tensor[] tensors, SymInt[] size) -> Tensor",
    lambda tensors, size: _new_output(tensors, size),
    backward_schema=(
        "upsample_concat_backward(Tensor grad, SymInt[] shapes, SymInt[] channel_offsets, bool[] channels_last) -> Tensor[]"
    ),
    backward_fake=lambda grad, shapes, channel_offsets, channels_last: _new_grads(grad, shapes, channels_last),
    setup_context=_setup_context,
    backward=_backward,
)


def _triton_forward(tensors: list[torch.Tensor], size: list[int]) -> torch.Tensor:
    from upernet_fast.kernels.upsample_concat import upsample_concat_forward

    return upsample_concat_forward(tensors, size, _new_output(tensors, size))


def _triton_backward(
    grad: torch.Tensor, shapes: list[int], channel_offsets: list[int], channels_last: list[bool]
) -> list[torch.Tensor]:
    """Grads of the resized inputs, input k occupying grad's channels from channel_offsets[k]."""
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward

    return upsample_concat_backward(grad, _new_grads(grad, shapes, channels_last), channel_offsets)


# The tensors whose device and dtype select the backend (given here, every backend's: no scan of the arguments).
_backend.register(OP, "eager", reference.upsample_concat, tensors=lambda tensors, size: tensors)
# The kernel ops themselves, called with the entry point's tuples (their list arguments take tuples).
_backend.register(OP, "triton", KERNEL_OP.define("upernet_fast", _triton_forward, _triton_backward))
_backend.register(OP, "cpp", KERNEL_OP.in_extension(_backend.CPP_NAMESPACE))
