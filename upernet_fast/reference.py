"""Pure-PyTorch references of every op that upernet_fast's kernels replace.

Each function here is, at once, the ``"eager"`` backend (always available, any device and dtype, autograd by
PyTorch) and the oracle that the Triton and C++ kernels are tested against. They are written to match
transformers' ``UperNetForSemanticSegmentation`` operation for operation: same calls, same order, so that
fp32 results are bitwise those of the reference model.

Semantics (the exact rules of transformers' model and of PyTorch's kernels):

* bilinear interpolation is always ``align_corners=False`` and size-based;
* adaptive average pooling uses PyTorch's bins ``[floor(o*in/out), ceil((o+1)*in/out))``;
* cross-entropy ``"mean"`` divides by the (weighted) count of non-ignored pixels, as ``F.cross_entropy``;
  ``"mean_all"`` divides by every pixel, as mmsegmentation's ``avg_non_ignore=False``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from upernet_fast._checks import module_tensor

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
    reference model, a map already at ``size`` is not resampled (interpolating it would copy it unchanged).
    """
    size = tuple(size)  # not int(): symbolic sizes (torch.export with dynamic shapes) must stay symbolic
    parts = [t if _same_size(t.shape[-2:], size) else resize_bilinear(t, size) for t in tensors]
    return torch.cat(parts, dim=1)


def _same_size(a: Sequence, b: Sequence) -> bool:
    """Whether two sizes are equal, asking a tracer only what it already knows: under torch.export a pooled 2x2
    branch next to an (H/32)x(W/32) map would otherwise add the guard H/32 == 2 and pin the exported height.
    When equality is not known the map is interpolated, which at equal size copies it: the same values."""
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def conv_bn_relu(
    x: torch.Tensor,
    conv: torch.nn.Conv2d,
    batch_norm: torch.nn.BatchNorm2d,
) -> torch.Tensor:
    """``relu(batch_norm(conv(x)))`` exactly as transformers' ``UperNetConvModule`` runs it.

    Uses the modules themselves so that training-mode BatchNorm updates the running statistics the same way
    (including ``momentum=None`` and SyncBatchNorm).
    """
    return bn_relu(conv(x), batch_norm)


def bn_relu(y: torch.Tensor, batch_norm: torch.nn.Module) -> torch.Tensor:
    """``relu(batch_norm(y))`` with the module itself; SyncBatchNorm on CPU tensors too (see below)."""
    group = sync_group(batch_norm)
    if group is not None and y.device.type == "cpu":
        return _cpu_sync_batch_norm_relu(y, batch_norm, group)
    return F.relu(batch_norm(y))


# ---- BatchNorm semantics shared by every backend: which statistics, which process group, running averages


def uses_batch_stats(batch_norm: torch.nn.Module) -> bool:
    """Whether BN normalises with the batch's statistics (as ``_BatchNorm.forward`` decides)."""
    if batch_norm.training:
        return True
    # The buffers read from the module's dict: this runs on every op call, where Module.__getattr__ is slow.
    try:
        buffers = batch_norm._buffers
        return buffers["running_mean"] is None and buffers["running_var"] is None
    except (AttributeError, KeyError):  # not a stock BatchNorm module
        return module_tensor(batch_norm, "running_mean") is None and module_tensor(batch_norm, "running_var") is None


def sync_group(batch_norm: torch.nn.Module):
    """The process group a SyncBatchNorm reduces over in this call, or None (same rule as torch's forward)."""
    if not isinstance(batch_norm, torch.nn.SyncBatchNorm) or not batch_norm.training:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = batch_norm.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def update_running_stats(batch_norm: torch.nn.Module, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """running = (1 - f) * running + f * batch statistic, f = momentum or 1 / num_batches_tracked."""
    if not (batch_norm.training and batch_norm.track_running_stats) or batch_norm.running_mean is None:
        return
    with torch.no_grad():
        batch_norm.num_batches_tracked.add_(1)
        if batch_norm.momentum is None:  # cumulative moving average; a tensor factor avoids a host sync
            factor = 1.0 / batch_norm.num_batches_tracked.to(torch.float64)
            keep = 1.0 - factor
            factor, keep = factor.to(mean.dtype), keep.to(mean.dtype)
        else:
            factor, keep = batch_norm.momentum, 1.0 - batch_norm.momentum
        # In the statistics' dtype (float32; float64 for float64 maps, as nn.BatchNorm2d updates float64 buffers).
        rm, rv = batch_norm.running_mean, batch_norm.running_var
        rm.copy_((mean * factor + rm.to(mean.dtype) * keep).to(rm.dtype))
        rv.copy_((var_unbiased * factor + rv.to(mean.dtype) * keep).to(rv.dtype))


def _cpu_sync_batch_norm_relu(y: torch.Tensor, batch_norm: torch.nn.Module, group) -> torch.Tensor:
    """SyncBatchNorm + ReLU on CPU (torch's SyncBatchNorm refuses CPU tensors): all-reduce the sums, then
    normalise with the global statistics. Autograd-aware collectives make the backward all-reduce too."""
    from torch.distributed.nn.functional import all_reduce

    channels = y.shape[1]
    yf = y.float()
    count = yf.new_full((1,), float(y.numel() // channels))
    totals = all_reduce(torch.cat([yf.sum((0, 2, 3)), count]), group=group)
    total_count = totals[-1]
    mean = totals[:channels] / total_count
    centered = yf - mean.view(1, -1, 1, 1)
    var = all_reduce((centered * centered).sum((0, 2, 3)), group=group) / total_count
    out = centered * torch.rsqrt(var + batch_norm.eps).view(1, -1, 1, 1)
    if batch_norm.weight is not None:
        out = out * batch_norm.weight.view(1, -1, 1, 1) + batch_norm.bias.view(1, -1, 1, 1)
    n = float(total_count.item())
    update_running_stats(batch_norm, mean.detach(), var.detach() * (n / max(n - 1.0, 1.0)))
    return F.relu(out).to(y.dtype)


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
