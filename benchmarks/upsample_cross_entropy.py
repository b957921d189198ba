"""upsample_cross_entropy in the ops suite (the loss on head-resolution logits; reduction mean, 5% ignored
pixels as in ADE20K): ``python -m benchmarks.upsample_cross_entropy`` runs it alone (see benchmarks.op_bench)."""

from __future__ import annotations

import sys
from math import prod

import torch

from benchmarks.op_bench import IGNORE_INDEX, Built, dims, main_for, tensor

OP = "upsample_cross_entropy"
LABEL_BYTES = 8  # int64 labels, as F.cross_entropy takes them
SCALAR_BYTES = 4  # a reduced loss value (or its incoming gradient)


def describe(p: dict) -> str:
    return f"logits {dims(p['logits'])} -> labels {dims(p['labels'])}"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops
    from upernet_fast import reference

    logits = tensor(p["logits"], dtype, device, layout)
    labels = torch.randint(0, p["logits"][1], p["labels"], device=device)
    labels[torch.rand(p["labels"], device=device) < 0.05] = IGNORE_INDEX
    return Built((logits, labels), [logits],
                 lambda lg, lb, backend: ops.upsample_cross_entropy(lg, lb, IGNORE_INDEX, "mean", backend=backend),
                 lambda lg, lb: reference.upsample_cross_entropy(lg, lb, IGNORE_INDEX, "mean"),
                 (logits, labels, IGNORE_INDEX, "mean", None, False))


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read low-resolution logits and full-resolution labels, write the reduced loss.
    # backward: read the logits and labels again (the gradient needs softmax at every label pixel), read the
    # scalar grad, write grad_logits (low resolution). Per-pixel statistics an implementation saves are extra.
    logits, labels = prod(p["logits"]), prod(p["labels"])
    if forward:
        return elem * logits + LABEL_BYTES * labels + SCALAR_BYTES
    return 2 * elem * logits + LABEL_BYTES * labels + SCALAR_BYTES


def flops(p: dict, mode: str) -> None:
    return None  # memory-bound


if __name__ == "__main__":
    sys.exit(main_for(OP))
