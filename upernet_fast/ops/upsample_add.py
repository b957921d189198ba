"""Bilinear upsample-and-add (one FPN top-down step): entry point and backends."""

from __future__ import annotations

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_same_placement

OP = "upsample_add"


def upsample_add(low: torch.Tensor, lateral: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``lateral + interpolate(low, size=lateral.shape[-2:], mode="bilinear", align_corners=False)``.

    low: (B, C, h, w), lateral: (B, C, H, W), any size ratio; returns (B, C, H, W) in lateral's layout.
    Differentiable in both inputs.
    """
    check_feature_map("low", low)
    check_feature_map("lateral", lateral)
    check_same_placement(("lateral", "low"), (lateral, low))
    if low.shape[:2] != lateral.shape[:2]:
        raise ValueError(
            f"low and lateral must have the same batch and channel sizes, got low {tuple(low.shape)} "
            f"and lateral {tuple(lateral.shape)}"
        )
    impl = _backend.select(OP, backend, low, lateral)
    return impl.fn(low, lateral)


_backend.register(OP, "eager", reference.upsample_add)
