"""Upsample-into-concat (the FPN and PPM concats): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_same_placement, check_size, promote_for_kernels
from upernet_fast.ops._triton_support import (
    forbid_double_backward,
    on_input_device,
    triton_unavailable,
    triton_why_not,
)

OP = "upsample_concat"


def upsample_concat(tensors: Sequence[torch.Tensor], size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """``cat([t if t.shape[-2:] == size else interpolate(t, size, bilinear) for t in tensors], dim=1)``.

    tensors: (B, C_i, h_i, w_i) with the same batch and device (floating dtypes promote as in torch.cat);
    returns (B, sum C_i, *size).
    Differentiable in every input.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise TypeError("tensors must be a non-empty list or tuple of 4D tensors")
    tensors = tuple(tensors)
    names = [f"tensors[{i}]" for i in range(len(tensors))]
    for name, t in zip(names, tensors):
        check_feature_map(name, t)
    check_same_placement(names, tensors, dtype=False)
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but tensors[0] has {tensors[0].shape[0]}")
    size = check_size("size", size)
    impl = _backend.select(OP, backend, tensors, size)
    return impl.fn(promote_for_kernels(impl.backend, tensors), size)


_backend.register(OP, "eager", reference.upsample_concat)


# ---- Triton backend: custom ops (opaque to torch.compile, no graph break), fake kernels, autograd ----------


def _channels_last(t: torch.Tensor) -> bool:
    from upernet_fast.kernels._bilinear import is_channels_last_layout

    return is_channels_last_layout(t)


def _new_map(like: torch.Tensor, shape: Sequence[int], channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(list(shape), dtype=like.dtype, device=like.device, memory_format=memory_format)


def _new_output(tensors: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """The concat, allocated in the first input's layout (channels_last in, channels_last out)."""
    first = tensors[0]
    shape = (first.shape[0], sum(t.shape[1] for t in tensors), size[0], size[1])
    return _new_map(first, shape, _channels_last(first))


@torch.library.custom_op("upernet_fast::upsample_concat", mutates_args=())
@on_input_device
def _upsample_concat_op(tensors: list[torch.Tensor], size: list[int]) -> torch.Tensor:
    from upernet_fast.kernels.upsample_concat import upsample_concat_forward

    return upsample_concat_forward(tensors, size, _new_output(tensors, size))


@_upsample_concat_op.register_fake
def _(tensors, size):
    return _new_output(tensors, size)


@torch.library.custom_op("upernet_fast::upsample_concat_backward", mutates_args=())
@on_input_device
def _upsample_concat_backward_op(
    grad: torch.Tensor, shapes: list[int], channel_offsets: list[int], channels_last: list[bool]
) -> list[torch.Tensor]:
    """Grads of the resized inputs: input k has shape (B, *shapes[3k:3k+3]) and occupies grad's channels
    from channel_offsets[k]; each grad is allocated channels_last when channels_last[k]."""
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward

    return upsample_concat_backward(grad, _new_grads(grad, shapes, channels_last), channel_offsets)


@_upsample_concat_backward_op.register_fake
def _(grad, shapes, channel_offsets, channels_last):
    return _new_grads(grad, shapes, channels_last)


def _new_grads(grad: torch.Tensor, shapes: list[int], channels_last: list[bool]) -> list[torch.Tensor]:
    return [
        _new_map(grad, (grad.shape[0], *shapes[3 * k : 3 * k + 3]), channels_last[k])
        for k in range(len(channels_last))
    ]


def _setup_context(ctx, inputs, output):
    tensors, size = inputs
    ctx.shapes = [tuple(t.shape[1:]) for t in tensors]
    ctx.channels_last = [_channels_last(t) for t in tensors]
    ctx.size = tuple(size)


def _backward(ctx, grad):
    grads: list[torch.Tensor | None] = [None] * len(ctx.shapes)
    resized, shapes, offsets, layouts = [], [], [], []
    offset = 0
    for k, (channels, height, width) in enumerate(ctx.shapes):
        if ctx.needs_input_grad[0][k]:  # one flag per tensor of the list
            if (height, width) == ctx.size:
                grads[k] = grad[:, offset : offset + channels]  # a view of the incoming grad, no copy
            else:
                resized.append(k)
                shapes += [channels, height, width]
                offsets.append(offset)
                layouts.append(ctx.channels_last[k])
        offset += channels
    if resized:
        for k, g in zip(resized, _upsample_concat_backward_op(grad, shapes, offsets, layouts)):
            grads[k] = g
    return grads, None


_upsample_concat_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_upsample_concat_backward_op, "upsample_concat")


def _triton_upsample_concat(tensors: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    return _upsample_concat_op(list(tensors), list(size))


def _triton_why_not(tensors: Sequence[torch.Tensor], size: Sequence[int]) -> str | None:
    return triton_why_not(*tensors)


_backend.register(
    OP, "triton", _triton_upsample_concat, why_unavailable=triton_unavailable, why_not=_triton_why_not
)
