"""Segmentation metrics from a confusion matrix: mIoU, pixel accuracy, per-class IoU.

A confusion matrix is additive, so each process (or each image) accumulates its own and one all-reduce sums
them: the scores of a sharded evaluation are exactly those of evaluating everything in one place.
"""

from __future__ import annotations

import math

import torch

from upernet_fast.train.data import IGNORE_INDEX
from upernet_fast.train.errors import UsageError


class ConfusionMatrix:
    def __init__(self, num_labels: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.num_labels, self.ignore_index = num_labels, ignore_index
        self.matrix = torch.zeros(num_labels, num_labels, dtype=torch.int64)  # [true, predicted]

    def update(self, predicted: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch of predicted class maps and labels of the same shape (ignored pixels skipped)."""
        if predicted.shape != labels.shape:
            raise UsageError(f"predictions {tuple(predicted.shape)} and labels {tuple(labels.shape)} differ in shape")
        keep = labels != self.ignore_index
        truth, guess = labels[keep].long().cpu(), predicted[keep].long().cpu()
        if truth.numel() and (truth.min() < 0 or truth.max() >= self.num_labels):
            raise UsageError(f"labels hold classes outside [0, {self.num_labels}) other than {self.ignore_index}")
        n = self.num_labels
        self.matrix += torch.bincount(truth * n + guess, minlength=n * n).view(n, n)

    def all_reduce(self) -> None:
        """Sum the matrices of every process (no-op outside torch.distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            # int64 sums exactly; NCCL only reduces GPU tensors, gloo CPU ones.
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
            matrix = self.matrix.to(device)
            dist.all_reduce(matrix)
            self.matrix = matrix.cpu()

    def scores(self) -> dict:
        """``mIoU`` (mean over classes present in labels or predictions), ``pixel_accuracy``, ``per_class_iou``
        (None for a class absent from both), and the number of labelled ``pixels``."""
        m = self.matrix.double()
        true_positive = m.diag()
        union = m.sum(0) + m.sum(1) - true_positive
        iou = [None if u == 0 else (tp / u).item() for tp, u in zip(true_positive, union)]
        present = [x for x in iou if x is not None]
        total = m.sum().item()
        return {
            "mIoU": sum(present) / len(present) if present else math.nan,
            "pixel_accuracy": true_positive.sum().item() / total if total else math.nan,
            "per_class_iou": iou,
            "pixels": int(total),
        }


def format_scores(scores: dict, class_names: list[str] | None = None) -> str:
    """A small text table: per-class IoU, then mIoU and pixel accuracy."""
    lines = [f"{'class':<24}{'IoU':>8}"]
    for i, iou in enumerate(scores["per_class_iou"]):
        name = class_names[i] if class_names else str(i)
        lines.append(f"{name:<24}{'-' if iou is None else f'{iou * 100:.2f}':>8}")
    lines.append(f"{'mIoU':<24}{scores['mIoU'] * 100:>8.2f}")
    lines.append(f"{'pixel accuracy':<24}{scores['pixel_accuracy'] * 100:>8.2f}")
    return "\n".join(lines)
