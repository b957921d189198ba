"""Analytic bytes moved per op and mode: the least traffic any implementation must do.

Each op's bytes are its inputs read once plus its outputs written once (backward: the incoming gradients and
whatever the gradient formula must read, plus the gradients written). Intermediate tensors that a particular
implementation saves or re-reads are not counted, so GB/s from this model is an honest fraction of the copy
ceiling: 100% would mean the op ran at copy speed doing only unavoidable work.
``forward+backward`` is the sum of both; ``inference`` moves what ``forward`` moves. Each op's own model is
``bytes_moved`` in ``benchmarks/<op>.py``.
"""

from __future__ import annotations

import importlib

OPS = ("adaptive_avg_pool_multi", "upsample_add", "upsample_concat", "upsample_cross_entropy", "conv_bn_relu",
       "bn_relu")


def op_module(op: str):
    """``benchmarks.<op>``: the op's inputs, label, bytes and FLOPs (see benchmarks.op_bench)."""
    if op not in OPS:
        raise KeyError(f"no benchmark module for op {op!r}; known: {', '.join(OPS)}")
    return importlib.import_module(f"benchmarks.{op}")


def op_bytes(op: str, p: dict, mode: str, elem: int) -> int:
    """Bytes moved by ``op`` with shape parameters ``p`` (see benchmarks.shapes) for elements of ``elem`` bytes."""
    if mode == "forward+backward":
        return op_bytes(op, p, "forward", elem) + op_bytes(op, p, "backward", elem)
    if mode not in ("forward", "inference", "backward"):
        raise ValueError(mode)
    return op_module(op).bytes_moved(p, mode in ("forward", "inference"), elem)


def op_flops(op: str, p: dict, mode: str) -> int | None:
    """FLOPs of the compute-bound ops (the convolution blocks); None for the memory-bound ones."""
    return op_module(op).flops(p, mode)
