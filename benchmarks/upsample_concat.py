"""upsample_concat in the ops suite (the FPN and PPM concats): ``python -m benchmarks.upsample_concat`` runs it
alone (see benchmarks.op_bench)."""

from __future__ import annotations

import sys
from math import prod

from benchmarks.op_bench import Built, dims, main_for, tensor

OP = "upsample_concat"


def describe(p: dict) -> str:
    return f"[{', '.join(dims(s) for s in p['tensors'])}] -> {dims(p['size'])}"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops
    from upernet_fast import reference

    ts = tuple(tensor(s, dtype, device, layout) for s in p["tensors"])
    size = tuple(p["size"])
    return Built(ts, list(ts), lambda *t, backend: ops.upsample_concat(t, size, backend=backend),
                 lambda *t: reference.upsample_concat(t, size), (ts, size))


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read each input, write the concatenated output. backward: read grad_out, write each grad.
    b = p["tensors"][0][0]
    out = b * sum(t[1] for t in p["tensors"]) * p["size"][0] * p["size"][1]
    return elem * (sum(prod(t) for t in p["tensors"]) + out)


def flops(p: dict, mode: str) -> None:
    return None  # memory-bound


if __name__ == "__main__":
    sys.exit(main_for(OP))
