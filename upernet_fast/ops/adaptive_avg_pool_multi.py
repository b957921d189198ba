"""Multi-scale adaptive average pooling (the pyramid pooling module's pools): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_scales

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
