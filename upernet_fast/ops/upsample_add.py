"""Bilinear upsample-and-add (one FPN top-down step): entry point and backends."""

from __future__ import annotations

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_same_placement, promote_for_kernels
from upernet_fast.ops._triton_support import (
    forbid_double_backward,
    on_input_device,
    triton_unavailable,
    triton_why_not,
)

OP = "upsample_add"


def upsample_add(low: torch.Tensor, lateral: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``lateral + interpolate(low, size=lateral.shape[-2:], mode="bilinear", align_corners=False)``.

    low: (B, C, h, w), lateral: (B, C, H, W), any size ratio; returns (B, C, H, W) in lateral's layout.
    Differentiable in both inputs.
    """
    check_feature_map("low", low)
    check_feature_map("lateral", lateral)
    check_same_placement(("lateral", "low"), (lateral, low), dtype=False)
    if low.shape[:2] != lateral.shape[:2]:
        raise ValueError(
            f"low and lateral must have the same batch and channel sizes, got low {tuple(low.shape)} "
            f"and lateral {tuple(lateral.shape)}"
        )
    impl = _backend.select(OP, backend, low, lateral)
    low, lateral = promote_for_kernels(impl.backend, (low, lateral))
    return impl.fn(low, lateral)


_backend.register(OP, "eager", reference.upsample_add)


# ---- Triton backend: custom ops (opaque to torch.compile, no graph break), fake kernels, autograd ----------


@torch.library.custom_op("upernet_fast::upsample_add", mutates_args=())
@on_input_device
def _upsample_add_op(low: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    from upernet_fast.kernels.upsample_add import upsample_add_forward

    return upsample_add_forward(low, lateral)


@_upsample_add_op.register_fake
def _(low, lateral):
    return torch.empty_like(lateral)  # the launcher allocates its output the same way


@torch.library.custom_op("upernet_fast::upsample_add_backward", mutates_args=())
@on_input_device
def _upsample_add_backward_op(grad: torch.Tensor, low_size: list[int], low_channels_last: bool) -> torch.Tensor:
    """Grad of ``low`` (shape ``low_size``, channels_last or contiguous) for the output grad ``grad``."""
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward

    grad_low = _new_grad(grad, low_size, low_channels_last)
    return upsample_concat_backward(grad, [grad_low], [0])[0]


@_upsample_add_backward_op.register_fake
def _(grad, low_size, low_channels_last):
    return _new_grad(grad, low_size, low_channels_last)


def _new_grad(like: torch.Tensor, shape: list[int], channels_last: bool) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


def _setup_context(ctx, inputs, output):
    from upernet_fast.kernels._bilinear import is_channels_last_layout

    low, lateral = inputs
    ctx.low_size = list(low.shape)
    ctx.low_channels_last = is_channels_last_layout(low)
    ctx.same_size = tuple(low.shape[-2:]) == tuple(lateral.shape[-2:])


def _backward(ctx, grad):
    grad_low = None
    if ctx.needs_input_grad[0]:
        if ctx.same_size:
            grad_low = grad  # interpolate() at equal size is the identity
        else:
            grad_low = _upsample_add_backward_op(grad, ctx.low_size, ctx.low_channels_last)
    return grad_low, grad  # lateral's grad is the incoming grad itself: no copy


_upsample_add_op.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(_upsample_add_backward_op, "upsample_add")


def _triton_upsample_add(low: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    return _upsample_add_op(low, lateral)


def _triton_why_not(low: torch.Tensor, lateral: torch.Tensor) -> str | None:
    return triton_why_not(low, lateral)


_backend.register(OP, "triton", _triton_upsample_add, why_unavailable=triton_unavailable, why_not=_triton_why_not)
