"""Pure-PyTorch references of every op that upernet_fast's kernels replace.

Each function here is, at once, the ``"eager"`` backend (always available, any device and dtype, autograd by
PyTorch) and the oracle that the Triton and C++ kernels are tested against. They are written to match
transformers' ``UperNetForSemanticSegmentation`` operation for operation: same calls, same order, so that
fp32 results are bitwise those of the reference model.

Semantics (see shared/reference/upernet-spec.md):

* bilinear interpolation is always ``align_corners=False`` and size-based;
* adaptive average pooling uses PyTorch's bins ``[floor(o*in/out), ceil((o+1)*in/out))``;
* cross-entropy ``"mean"`` divides by the (weighted) count of non-ignored pixels, as ``F.cross_entropy``;
  ``"mean_all"`` divides by every pixel, as mmsegmentation's ``avg_non_ignore=False``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none", "mean_all")


def resize_bilinear(x: torch.Tensor, size: Sequence[int], align_corners: bool = False) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear")``; always called, even at equal size, as the reference does."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def adaptive_avg_pool_multi(x: torch.Tensor, scales: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """``tuple(F.adaptive_avg_pool2d(x, s) for s in scales)``: the pyramid pooling of PSPNet/UperNet."""
    return tuple(F.adaptive_avg_pool2d(x, int(s)) for s in scales)


def upsample_add(low: torch.Tensor, lateral: torch.Tensor) -> torch.Tensor:
    """``lateral + interpolate(low, size=lateral.shape[-2:])``: one step of the FPN top-down path."""
    return lateral + resize_bilinear(low, lateral.shape[-2:])


def upsample_concat(tensors: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """``cat([t if t is already size else interpolate(t, size) for t in tensors], dim=1)``.

    Used for the FPN concat before ``fpn_bottleneck`` and the PPM concat before ``bottleneck``. Like the
    reference model, a map already at ``size`` is not resampled.
    """
    size = tuple(int(s) for s in size)
    parts = [t if tuple(t.shape[-2:]) == size else resize_bilinear(t, size) for t in tensors]
    return torch.cat(parts, dim=1)


def conv_bn_relu(
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    batch_norm: torch.nn.BatchNorm2d,
) -> torch.Tensor:
    """``relu(batch_norm(conv(x)))`` exactly as transformers' ``UperNetConvModule`` runs it.

    Uses the modules themselves so that training-mode BatchNorm updates the running statistics the same way
    (including ``momentum=None`` and SyncBatchNorm).
    """
    return F.relu(batch_norm(conv(x)))


def upsample_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    """Cross-entropy of ``interpolate(logits, size=labels.shape[-2:])`` against ``labels``.

    ``reduction``: ``"mean"`` (over non-ignored pixels, class-weighted when ``weight`` is given, exactly
    ``F.cross_entropy``), ``"sum"``, ``"none"`` (per pixel, shape of ``labels``), ``"mean_all"`` (the sum
    divided by every pixel, ignored ones included, as mmsegmentation's default).
    """
    full = resize_bilinear(logits, labels.shape[-2:], align_corners=align_corners)
    return cross_entropy(full, labels, ignore_index, reduction, weight)


def cross_entropy(
    full: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of :func:`upsample_cross_entropy` once the logits are at the labels' size (same reductions)."""
    if reduction == "mean_all":
        summed = F.cross_entropy(full, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
        return summed / labels.numel()
    return F.cross_entropy(full, labels, weight=weight, ignore_index=ignore_index, reduction=reduction)
