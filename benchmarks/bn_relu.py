"""bn_relu in the ops suite (BatchNorm + ReLU after a conv block's convolution: training, and on the CPU also eval,
the ``inference`` rows): ``python -m benchmarks.bn_relu`` runs it alone (see benchmarks.op_bench)."""

from __future__ import annotations

import sys
from math import prod

import torch

from benchmarks.op_bench import Built, dims, main_for, tensor

OP = "bn_relu"


def describe(p: dict) -> str:
    return f"{dims(p['y'])} ({p['block']} output)"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops

    # The conv output in the benchmark dtype and a training-mode BatchNorm with fp32 parameters, as under AMP.
    bn = torch.nn.BatchNorm2d(p["y"][1]).to(device)
    y = tensor(p["y"], dtype, device, layout)
    return Built((y,), [y, *bn.parameters()], lambda y, backend: ops.bn_relu(y, bn, backend=backend),
                 lambda y: torch.nn.functional.relu(bn(y)), (y, bn), module=bn)


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read y, write the output (the statistics need a second read of y unless it stays in cache:
    # counted as extra work, not as necessary bytes). backward: read grad_out and y, write grad_y
    # (per-channel parameters and statistics are negligible).
    y = prod(p["y"])
    return elem * 2 * y if forward else elem * 3 * y


def flops(p: dict, mode: str) -> None:
    return None  # memory-bound


if __name__ == "__main__":
    sys.exit(main_for(OP))
