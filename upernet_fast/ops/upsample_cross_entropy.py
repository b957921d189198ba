"""Bilinear-upsample + cross-entropy (the segmentation loss): entry point and backends."""

from __future__ import annotations

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_tensor

OP = "upsample_cross_entropy"


def upsample_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    align_corners: bool = False,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, C, h, w) bilinearly resized to ``labels`` (B, H, W, integer).

    Equals ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear"), labels, ...)``.
    ``reduction``: ``"mean"`` (over non-ignored pixels, class-weighted when ``weight`` is given), ``"sum"``,
    ``"none"`` (returns (B, H, W)) or ``"mean_all"`` (sum / every pixel, as mmsegmentation). Labels outside
    ``[0, C)`` that are not ``ignore_index`` raise.
    """
    check_feature_map("logits", logits)
    check_tensor("labels", labels, ndim=3)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor (int64 preferred), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}; they must match")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape (B, H, W) with B = logits.shape[0] = {logits.shape[0]}, "
            f"got {tuple(labels.shape)}"
        )
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if align_corners not in (False, True):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    num_classes = logits.shape[1]
    if weight is not None:
        check_tensor("weight", weight, ndim=1, floating=True)
        if weight.shape[0] != num_classes or weight.device != logits.device:
            raise ValueError(
                f"weight must be a ({num_classes},) tensor on {logits.device}, "
                f"got {tuple(weight.shape)} on {weight.device}"
            )
    labels = labels.long()
    if not torch.compiler.is_compiling():
        # Needs a host sync; under torch.compile the kernels' own masking still prevents out-of-bounds reads.
        _check_label_range(labels, num_classes, ignore_index)
    impl = _backend.select(OP, backend, logits, labels, ignore_index, reduction, weight, align_corners)
    return impl.fn(logits, labels, ignore_index, reduction, weight, align_corners)


def _check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    # One pass over the labels on their own device; avoids an out-of-bounds gather in any kernel.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {value}"
        )


_backend.register(OP, "eager", reference.upsample_cross_entropy)
