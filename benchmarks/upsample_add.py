"""upsample_add in the ops suite (the FPN's top-down step): ``python -m benchmarks.upsample_add`` runs it alone
(see benchmarks.op_bench)."""

from __future__ import annotations

import sys
from math import prod

from benchmarks.op_bench import Built, dims, main_for, tensor

OP = "upsample_add"


def describe(p: dict) -> str:
    return f"low {dims(p['low'])} -> lateral {dims(p['lateral'])}"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops
    from upernet_fast import reference

    low, lat = tensor(p["low"], dtype, device, layout), tensor(p["lateral"], dtype, device, layout)
    return Built((low, lat), [low, lat], lambda a, b, backend: ops.upsample_add(a, b, backend=backend),
                 reference.upsample_add, (low, lat))


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read low and lateral, write out (lateral's size).
    # backward: grad_lateral is the incoming grad itself (no copy); read grad_out, write grad_low.
    low, lat = prod(p["low"]), prod(p["lateral"])
    return elem * (low + 2 * lat) if forward else elem * (lat + low)


def flops(p: dict, mode: str) -> None:
    return None  # memory-bound


if __name__ == "__main__":
    sys.exit(main_for(OP))
