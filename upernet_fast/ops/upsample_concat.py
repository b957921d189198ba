"""Upsample-into-concat (the FPN and PPM concats): entry point and backends."""

from __future__ import annotations

from typing import Sequence

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_same_placement, check_size

OP = "upsample_concat"


def upsample_concat(tensors: Sequence[torch.Tensor], size: Sequence[int], *, backend: str = "auto") -> torch.Tensor:
    """``cat([t if t.shape[-2:] == size else interpolate(t, size, bilinear) for t in tensors], dim=1)``.

    tensors: (B, C_i, h_i, w_i) with the same batch, dtype and device; returns (B, sum C_i, *size).
    Differentiable in every input.
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise TypeError("tensors must be a non-empty list or tuple of 4D tensors")
    tensors = tuple(tensors)
    names = [f"tensors[{i}]" for i in range(len(tensors))]
    for name, t in zip(names, tensors):
        check_feature_map(name, t)
    check_same_placement(names, tensors)
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != tensors[0].shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but tensors[0] has {tensors[0].shape[0]}")
    size = check_size("size", size)
    impl = _backend.select(OP, backend, tensors, size)
    return impl.fn(tensors, size)


_backend.register(OP, "eager", reference.upsample_concat)
