"""bn_relu's backward as a training step pays it, against the ops suite's one-call rows (CPU).

The ops suite times a backward as one ``torch.autograd.grad`` call through one op. On a small map that call's fixed
cost (Python, the engine's set-up; the ``autograd_floor`` row) is a third to a half of eager's whole row, paid alike
by both sides, so the row's ratio is capped well below the kernels' (the one-node probe below measures that cap:
1.87x-2.02x on the PPM's 6x6 map in this VM's stored runs of 2026-11-29). A training step makes one backward call
for the whole graph: there an op costs its node (the engine's per-node work) and its kernels. This benchmark times,
in one process, eager's BatchNorm2d + ReLU and the cpp ``bn_relu`` at the head's small-map shapes three ways:

- mode ``backward``: the ops suite's backward row (one ``autograd.grad`` call through one op);
- ``bwd net of floor``: that row less the floor measured in the same rounds (p50 only);
- ``bwd chain of K``: K ops in sequence (each with its own BatchNorm, as in a network), one ``autograd.grad``
  call through all of them, per op (the call's time divided by K).

Two more providers measure the ceiling of those ratios, one C++ autograd node each with the same inputs
(``benchmarks/one_node_probe.cpp``, built here with torch's extension machinery), timed the same three ways:

- ``one-node probe``: its backward only allocates the three gradients. Eager's time over this probe's is the most any
  one-node implementation can read in each mode, whatever its kernel.
- ``read-once probe``: its backward is ATen's ``x + grad`` for grad_x (each input map read once, grad_x written
  once: the least memory traffic of any BN+ReLU backward) and allocates the other two. Eager's time over this probe's
  is what a one-node backward reads when its whole kernel costs one ATen elementwise pass over the same maps.

Every case is timed in ``--rounds`` rounds, the cases' order rotated each round (this VM's speed moves by phases),
and the rounds' samples pooled. Rows go to ``benchmarks/results/backward_chain_cpu.csv``.

    python -m benchmarks.backward_chain                    # the head's 6x6 and 16x16 maps, 2 threads
    python -m benchmarks.backward_chain --shapes 1x16x2x2 --rounds 2 --chain 3 --calls 20   # a quick check
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.results import DEFAULT_RESULTS_DIR, append_rows, csv_path, format_table, make_row
from upernet_fast.measure import rotated

# The head's BN+ReLU maps below the large-map sizes: the PPM's 6x6 branch and its 16x16 bottleneck (ConvNeXt-T,
# 512x512, batch 1).
DEFAULT_SHAPES = ("1x512x6x6", "1x512x16x16")
PROVIDERS = ("eager", "cpp", "one-node probe", "read-once probe")
PROBE_OPS = {"one-node probe": "one_node", "read-once probe": "read_once"}
PROBE_SOURCE = Path(__file__).with_name("one_node_probe.cpp")


def load_probe() -> None:
    """Builds (once, cached by torch's extension machinery) and loads the probe ops ``upernet_fast_probe::one_node``
    and ``upernet_fast_probe::read_once``."""
    from torch.utils.cpp_extension import load

    if not hasattr(torch.ops.upernet_fast_probe, "read_once"):
        load(name="upernet_fast_probe", sources=[str(PROBE_SOURCE)], is_python_module=False,
             extra_cflags=["-O2"])


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backward_chain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated NxCxHxW maps")
    parser.add_argument("--chain", type=int, default=9, help="ops in the chained graph (default 9)")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (default 12)")
    parser.add_argument("--calls", type=int, default=1000,
                        help="ops per case and round (default 1000: 1000 calls of one op, 1000 / K of the chain)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must be NxCxHxW maps separated by commas, got {args.shapes!r}")
    if any(len(s) != 4 or min(s) < 1 for s in args.shapes):
        parser.error(f"--shapes must be NxCxHxW maps of positive sizes, got {args.shapes}")
    for name in ("chain", "rounds", "calls", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def _graph(provider: str, shape: tuple[int, ...], ops: int):
    """``ops`` BN+ReLU in sequence, each with its own training-mode BatchNorm2d; returns the backward call."""
    import upernet_fast.ops as fast

    bns = [torch.nn.BatchNorm2d(shape[1]) for _ in range(ops)]
    x = torch.randn(shape, requires_grad=True)
    leaves = [x] + [p for bn in bns for p in bn.parameters()]
    out = x
    for bn in bns:
        if provider == "eager":
            out = torch.relu(bn(out))
        elif provider == "cpp":
            out = fast.bn_relu(out, bn, backend="cpp")
        else:  # a probe: one node, no kernel or one ATen add (see the module's docstring)
            out = getattr(torch.ops.upernet_fast_probe, PROBE_OPS[provider])(out, bn.weight, bn.bias)
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


def measure_shape(shape, chain: int, rounds: int, calls: int) -> dict:
    """Per-op samples (ms) of every case at one shape: {(provider, ops per call): [ms per op, ...]}."""
    cases = {(p, k): _graph(p, shape, k) for p in PROVIDERS for k in (1, chain)}
    cases[("torch", 0)] = measure.autograd_floor_call("cpu")  # the ops suite's autograd_floor row
    samples: dict = {key: [] for key in cases}
    keys = list(cases)
    enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed loop would land on whichever case ran then
    try:
        for r in range(rounds):
            for key in rotated(keys, r):
                fn, per_op = cases[key], max(1, key[1])
                n = max(1, calls // per_op)
                for _ in range(max(1, n // 10)):
                    fn()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[key].append((time.perf_counter() - t0) / n / per_op * 1e3)
    finally:
        if enabled:
            gc.enable()
    return samples


def rows_for(shape, chain: int, rounds: int, samples: dict, stamp: dict) -> list[dict]:
    dims = "x".join(map(str, shape))
    note = f"perf_counter, cases interleaved in {rounds} rounds (order rotated), medians of the rounds' per-op means"
    base = dict(suite="backward_chain", op="bn_relu", shape=dims, dtype="fp32", layout="nchw")
    floor = measure.quantiles(samples[("torch", 0)])
    rows = [make_row(stamp, **{**base, "op": "autograd_floor"}, provider="torch", mode="autograd.grad",
                     p20_ms=floor[0], p50_ms=floor[1], p80_ms=floor[2],
                     note="x * 2, one element (one node): " + note)]
    for provider in PROVIDERS:
        single = measure.quantiles(samples[(provider, 1)])
        chained = measure.quantiles(samples[(provider, chain)])
        rows += [
            make_row(stamp, **base, provider=provider, mode="backward", p20_ms=single[0],
                     p50_ms=single[1], p80_ms=single[2], note=note),
            make_row(stamp, **base, provider=provider, mode="bwd net of floor",
                     p50_ms=single[1] - floor[1], note="p50 less the autograd_floor row's p50 (same rounds)"),
            make_row(stamp, **base, provider=provider, mode=f"bwd chain of {chain}", p20_ms=chained[0],
                     p50_ms=chained[1], p80_ms=chained[2], note=f"per op: one call's time / {chain}; " + note),
        ]
    return rows


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)
    from upernet_fast import cpp_extension

    cpp_extension.load()  # raises with the reason when the extension cannot be built: there is no cpp row without it
    load_probe()
    stamp = measure.run_stamp("cpu")
    rows = []
    for shape in args.shapes:
        samples = measure_shape(shape, args.chain, args.rounds, args.calls)
        rows += rows_for(shape, args.chain, args.rounds, samples, stamp)
    path = csv_path(args.results_dir, "backward_chain", "cpu")
    append_rows(path, rows)
    print(format_table(rows))
    for shape in args.shapes:
        dims = "x".join(map(str, shape))
        p50 = {(r["provider"], r["mode"]): float(r["p50_ms"]) for r in rows if r["shape"] == dims}
        for provider in PROVIDERS[1:]:
            ratios = [f"{mode}: {p50[('eager', mode)] / p50[(provider, mode)]:.2f}x"
                      for (p, mode) in p50 if p == "eager"]
            print(f"{dims}, {provider} against eager: " + "; ".join(ratios))
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
