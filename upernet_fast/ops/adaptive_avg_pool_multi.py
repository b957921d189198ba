"""Multi-scale adaptive average pooling (the pyramid pooling module's pools): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_scales
from upernet_fast.ops._triton_support import (
    forbid_double_backward,
    on_input_device,
    triton_unavailable,
    triton_why_not,
)

OP = "adaptive_avg_pool_multi"


def adaptive_avg_pool_multi(
    x: torch.Tensor, scales: Sequence[int], *, backend: str = "auto"
) -> tuple[torch.Tensor, ...]:
    """Pool ``x`` (B, C, H, W) to every ``s x s`` in ``scales``; returns one (B, C, s, s) tensor per scale.

    Same bins as ``F.adaptive_avg_pool2d`` (overlapping windows when H % s != 0, s > H allowed).
    Differentiable. ``backend``: ``"auto"``, ``"eager"``, ``"triton"`` or ``"cpp"`` (see upernet_fast.backend).
    """
    check_feature_map("x", x)
    scales = check_scales("scales", scales)
    impl = _backend.select(OP, backend, x, scales)
    return tuple(impl.fn(x, scales))


_backend.register(OP, "eager", reference.adaptive_avg_pool_multi)


# --- Triton backend: custom ops (so torch.compile sees no graph break), fake kernels, autograd. -----------
# The kernels module imports triton, so it is imported only when an op runs (this file imports without it).


def _kernels():
    from upernet_fast.kernels import adaptive_avg_pool_multi as kernels

    return kernels


@torch.library.custom_op("upernet_fast::adaptive_avg_pool_multi", mutates_args=())
@on_input_device
def _pool(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    """One (B, C, s, s) map per scale, dense in x's memory format; one Triton launch for up to 8 scales."""
    return _kernels().pool_forward(x, scales)


@_pool.register_fake
def _pool_fake(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    B, C = x.shape[:2]
    kernels = _kernels()
    fmt = kernels.memory_format(kernels.output_channels_last(x))
    return [torch.empty((B, C, s, s), dtype=x.dtype, device=x.device, memory_format=fmt) for s in scales]


@torch.library.custom_op("upernet_fast::adaptive_avg_pool_multi_backward", mutates_args=())
@on_input_device
def _pool_backward(grads: list[torch.Tensor], input_shape: list[int], channels_last: bool) -> torch.Tensor:
    """grad_input (input_shape) from one gradient per scale (the scale is each gradient's size), gather form."""
    scales = [g.shape[-1] for g in grads]
    return _kernels().pool_backward(grads, input_shape, scales, channels_last)


@_pool_backward.register_fake
def _pool_backward_fake(grads: list[torch.Tensor], input_shape: list[int], channels_last: bool) -> torch.Tensor:
    fmt = _kernels().memory_format(channels_last)
    return torch.empty(input_shape, dtype=grads[0].dtype, device=grads[0].device, memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    x, _ = inputs
    ctx.input_shape = list(x.shape)
    ctx.channels_last = _kernels().output_channels_last(x)


def _pool_autograd_backward(ctx, grads):
    # Autograd materialises the gradient of an output that took no part in the loss as zeros.
    grad_x = torch.ops.upernet_fast.adaptive_avg_pool_multi_backward(list(grads), ctx.input_shape, ctx.channels_last)
    return grad_x, None


_pool.register_autograd(_pool_autograd_backward, setup_context=_setup_context)
forbid_double_backward(_pool_backward, "adaptive_avg_pool_multi")


def _triton_pool(x: torch.Tensor, scales: Sequence[int]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.ops.upernet_fast.adaptive_avg_pool_multi(x, list(scales)))


def _triton_why_not(x: torch.Tensor, scales: Sequence[int]) -> str | None:
    return triton_why_not(x)


_backend.register(OP, "triton", _triton_pool, why_unavailable=triton_unavailable, why_not=_triton_why_not)
