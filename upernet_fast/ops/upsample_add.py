"""Bilinear upsample-and-add (one FPN top-down step): entry point and backends."""

from __future__ import annotations

import torch

from upernet_fast import backend as _backend
from upernet_fast import recompute, reference
from upernet_fast._checks import (
    check_feature_map,
    check_same_placement,
    is_feature_map,
    promote_for_kernels,
    same_device,
)
from upernet_fast.kernels._utils import is_channels_last, memory_format
from upernet_fast.ops._kernel_op import KernelOp

OP = "upsample_add"


def upsample_add(low: torch.Tensor, lateral: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``lateral + interpolate(low, size=lateral.shape[-2:], mode="bilinear", align_corners=False)``.

    low: (B, C, h, w), lateral: (B, C, H, W), any size ratio; returns (B, C, H, W) in lateral's layout.
    Differentiable in both inputs.
    """
    # The common case in one test; the checks that name what is wrong run only when it fails.
    # (Both on the CPU is same_device's first test, made here without its call: this runs on every call.)
    if not (
        is_feature_map(low)
        and is_feature_map(lateral)
        and ((low.is_cpu and lateral.is_cpu) or same_device(low, lateral))
    ):
        check_feature_map("low", low)
        check_feature_map("lateral", lateral)
        check_same_placement(("lateral", "low"), (lateral, low), dtype=False)
    low_shape, lateral_shape = low.shape, lateral.shape
    if low_shape[0] != lateral_shape[0] or low_shape[1] != lateral_shape[1]:
        raise ValueError(
            f"low and lateral must have the same batch and channel sizes, got low {tuple(low.shape)} "
            f"and lateral {tuple(lateral.shape)}"
        )
    one_dtype = low.dtype is lateral.dtype  # (dtypes are singletons) then low's placement is the call's (checked)
    impl = _backend.select(OP, backend, low, lateral, like=low if one_dtype else None)
    if not one_dtype:  # mixed dtypes, under autocast
        low, lateral = promote_for_kernels(impl.backend, (low, lateral))
    out = impl.fn(low, lateral)
    # In the FPN both inputs are rebuilt in the backward anyway (BN+ReLU outputs, earlier sums), and the sum is
    # what fpn_convs' convolutions save: rebuilt from them instead of kept (upernet_fast.recompute).
    recompute.remember_from_recipes(out, impl.fn, (low, lateral))
    return out


# ---- kernel backends: one declaration (schemas, fakes, autograd) for the Triton and the C++ kernels --------


def _new_grad(like: torch.Tensor, shape: list[int], channels_last: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format(channels_last))


def _fake(low, lateral):
    return torch.empty_like(lateral)  # the launchers allocate their output the same way


def _backward_fake(grad, low_size, low_channels_last):
    return _new_grad(grad, low_size, low_channels_last)


def _setup_context(ctx, inputs, output):
    low, lateral = inputs
    ctx.low_size = list(low.shape)
    ctx.low_channels_last = is_channels_last(low)
    ctx.same_size = tuple(low.shape[-2:]) == tuple(lateral.shape[-2:])


def _backward(backward_op, ctx, grad):
    grad_low = None
    if ctx.needs_input_grad[0]:
        if ctx.same_size:
            grad_low = grad  # interpolate() at equal size is the identity
        else:
            grad_low = backward_op(grad, ctx.low_size, ctx.low_channels_last)
    return grad_low, grad  # lateral's grad is the incoming grad itself: no copy


KERNEL_OP = KernelOp(
    "upsample_add(Tensor low, Tensor lateral) -> Tensor",
    _fake,
    backward_schema="upsample_add_backward(Tensor grad, SymInt[] low_size, bool low_channels_last) -> Tensor",
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
)


def _triton_forward(low: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    from upernet_fast.kernels.upsample_add import upsample_add_forward

    return upsample_add_forward(low, lateral)


def _triton_backward(grad: torch.Tensor, low_size: list[int], low_channels_last: bool) -> torch.Tensor:
    """Grad of ``low`` (shape ``low_size``, channels_last or contiguous) for the output grad ``grad``."""
    from upernet_fast.kernels.upsample_concat import upsample_concat_backward

    return upsample_concat_backward(grad, [_new_grad(grad, low_size, low_channels_last)], [0])[0]


# The tensors whose device and dtype select the backend (given here, every backend's: no scan of the arguments).
_backend.register(OP, "eager", reference.upsample_add, tensors=lambda low, lateral: (low, lateral))
_backend.register(OP, "triton", KERNEL_OP.define("upernet_fast", _triton_forward, _triton_backward))
_backend.register(OP, "cpp", KERNEL_OP.in_extension(_backend.CPP_NAMESPACE))
