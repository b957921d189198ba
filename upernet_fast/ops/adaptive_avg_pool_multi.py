"""Multi-scale adaptive average pooling (the pyramid pooling module's pools): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_scales
from upernet_fast.kernels._utils import is_channels_last, memory_format
from upernet_fast.ops._kernel_op import KernelOp

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
    impl = _backend.select(OP, backend, x, scales, like=x)  # x: the one judged tensor
    return tuple(impl.fn(x, scales))


# ---- kernel backends: one declaration (schemas, fakes, autograd) for the Triton and the C++ kernels --------
# Outputs and gradients are dense in x's memory format (PyTorch's suggest_memory_format rule).


def _fake(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    B, C = x.shape[:2]
    fmt = memory_format(is_channels_last(x))
    return [torch.empty((B, C, s, s), dtype=x.dtype, device=x.device, memory_format=fmt) for s in scales]


def _backward_fake(grads: list[torch.Tensor], input_shape: list[int], channels_last: bool) -> torch.Tensor:
    fmt = memory_format(channels_last)
    return torch.empty(input_shape, dtype=grads[0].dtype, device=grads[0].device, memory_format=fmt)


def _setup_context(ctx, inputs, output) -> None:
    x, _ = inputs
    ctx.input_shape = list(x.shape)
    ctx.channels_last = is_channels_last(x)


def _backward(backward_op, ctx, grads):
    # Autograd materialises the gradient of an output that took no part in the loss as zeros.
    return backward_op(list(grads), ctx.input_shape, ctx.channels_last), None


KERNEL_OP = KernelOp(
    "adaptive_avg_pool_multi(Tensor x, SymInt[] scales) -> Tensor[]",
    _fake,
    backward_schema="adaptive_avg_pool_multi_backward(Tensor[] grads, SymInt[] input_shape, bool channels_last) -> Tensor",
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
)


def _triton_forward(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    """One (B, C, s, s) map per scale; one Triton launch for up to 8 scales."""
    from upernet_fast.kernels.adaptive_avg_pool_multi import pool_forward

    return pool_forward(x, scales)


def _triton_backward(grads: list[torch.Tensor], input_shape: list[int], channels_last: bool) -> torch.Tensor:
    """grad_input (input_shape) from one gradient per scale (the scale is each gradient's size), gather form."""
    from upernet_fast.kernels.adaptive_avg_pool_multi import pool_backward

    return pool_backward(grads, input_shape, [g.shape[-1] for g in grads], channels_last)


# The tensors whose device and dtype select the backend (given here, every backend's: no scan of the arguments).
_backend.register(OP, "eager", reference.adaptive_avg_pool_multi, tensors=lambda x, scales: (x,))
# The kernel ops themselves: they return a list, which the entry point makes a tuple; scales is the entry point's
# tuple, which their int[] argument takes.
_backend.register(OP, "triton", KERNEL_OP.define("upernet_fast", _triton_forward, _triton_backward))
_backend.register(OP, "cpp", KERNEL_OP.in_extension(_backend.CPP_NAMESPACE))
