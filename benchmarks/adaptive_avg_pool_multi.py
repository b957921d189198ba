"""adaptive_avg_pool_multi in the ops suite (the PPM's pooling, every scale in one op): ``python -m
benchmarks.adaptive_avg_pool_multi`` runs it alone (see benchmarks.op_bench)."""

from __future__ import annotations

import sys

from benchmarks.op_bench import Built, dims, main_for, tensor

OP = "adaptive_avg_pool_multi"


def describe(p: dict) -> str:
    return f"x {dims(p['x'])} scales {','.join(map(str, p['scales']))}"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops
    from upernet_fast import reference

    x = tensor(p["x"], dtype, device, layout)
    scales = tuple(p["scales"])
    return Built((x,), [x], lambda x, backend: ops.adaptive_avg_pool_multi(x, scales, backend=backend),
                 lambda x: reference.adaptive_avg_pool_multi(x, scales), (x, scales))


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read x, write every pooled map. backward: read every pooled grad, write grad_x.
    b, c, h, w = p["x"]
    return elem * (b * c * h * w + sum(b * c * s * s for s in p["scales"]))


def flops(p: dict, mode: str) -> None:
    return None  # memory-bound


if __name__ == "__main__":
    sys.exit(main_for(OP))
