"""What every per-op benchmark module (``benchmarks/<op>.py``, the op's name as in ``kernels/``,
``upernet_fast/ops/``, ``csrc/cpu/`` and ``tests/``) provides to the ops suite, and what it uses.

A module declares, for its op:

* ``describe(p) -> str``: the case's shape parameters ``p`` (see :mod:`benchmarks.shapes`) as a row label;
* ``build(p, dtype, layout, device) -> Built``: the inputs and the ways to call the op on them;
* ``bytes_moved(p, forward, elem) -> int``: the least traffic any implementation must do (forward or backward;
  :mod:`benchmarks.bytes_model` adds the modes up);
* ``flops(p, mode) -> int | None``: arithmetic for compute-bound ops, None for memory-bound ones;

and runs as ``python -m benchmarks.<op> [run.py options]``: the ops suite on that op alone.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

IGNORE_INDEX = 255


@dataclass
class Built:
    """One case's inputs and the ways to run it."""

    args: tuple  # tensors handed to both the public op and the reference
    leaves: list  # the tensors a backward differentiates (its gradients are returned, see ops_suite)
    public: Callable  # public(*args, backend=name)
    reference: Callable  # reference(*args), compiled for the "compile" provider
    select_args: tuple  # the arguments upernet_fast.backend.select gets for this call
    autocast: torch.dtype | None = None  # conv blocks run under AMP, as in training
    module: torch.nn.Module | None = None


def tensor(shape, dtype, device, layout, grad=True) -> torch.Tensor:
    t = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def main_for(op: str, argv=None) -> int:
    """``python -m benchmarks.<op>``: the ops suite restricted to ``op`` (other run.py options pass through)."""
    from benchmarks import run

    args = list(sys.argv[1:] if argv is None else argv)
    return run.main(["--suite", "ops", "--ops", op, *args])
