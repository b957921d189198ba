"""Dispatch overhead of each public op over the bare function it dispatches to, on tiny CPU inputs:
``python -m benchmarks.dispatch_overhead``.

What one call of ``upernet_fast.ops.<op>`` costs on top of the work itself: argument checks, the backend
selection, dtype promotion and bookkeeping. Inputs are a few elements, so the work is as small as it gets and
the difference is all Python.

* ``eager`` rows: the public op with ``backend="eager"`` against the reference function of
  ``upernet_fast/reference.py`` called directly on the same inputs.
* ``auto`` rows (when the C++ extension is built, so that ``auto`` selects ``cpp`` on the CPU): the public op
  with ``backend="auto"`` against the extension's op (``torch.ops.upernet_fast_cpp.<op>``) called directly; for
  ``bn_relu`` and ``conv_bn_relu``, whose C++ path is a composite rather than one kernel, against the function
  the selection returns (the implementation's ``fn``).

Each side is timed over ``--calls`` calls, best of ``--repeats`` repeats, the two sides alternating within each
repeat so that both see the same machine load (the development machine is 2 shared cores). The overhead column is
not the difference of those two bests but the median, over ``--pairs`` adjacent pairs of one public and one bare
call (the order alternating pair by pair), of the difference of the two calls' times: each pair sees one moment of
the machine, so a difference of a few microseconds is measured even under a bare call of 80 us whose own
run-to-run noise is larger (``conv_bn_relu``'s eval block; two separate bests read 12-24 us there).

``--callgrind`` counts instructions instead of timing (valgrind's callgrind, collection switched on only around
the measured calls through ``torch._C._valgrind_toggle``): the public op's and the bare call's instructions per
call, and their difference. The count does not depend on the machine's load, so a change of a few hundred
instructions shows where timings on this VM move by microseconds from one process to the next; it does not see
cache misses (``conv_bn_relu``'s selection runs amid a convolution that evicts it, so it costs more time per
instruction than the others). Under valgrind the CPU has no AVX-512, so the extension is built once more for it
(cached like any build). With ``--against`` both trees run at once, one process each.

``--against DIR`` measures another checkout (say an older commit exported with ``git worktree add``) side by
side: both trees run in fresh subprocesses, alternating, ``--rounds`` times each, and the round with the
median overhead is kept per row. ``--write`` stores the table in ``benchmarks/results/dispatch_cpu.txt`` (with
``--callgrind``, in ``dispatch_cpu_callgrind.txt``). Runs as a module from
the repository root, or as a file (how ``--against`` runs it on the other tree: it imports no ``benchmarks``
module, only ``upernet_fast``).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results" / "dispatch_cpu.txt"
CALLGRIND_RESULTS = HERE.parent / "results" / "dispatch_cpu_callgrind.txt"


def _cases() -> list[tuple[str, str, object, object, str]]:
    """[(op, backend asked for, public call, bare call, what the bare call is)], on tiny fp32 CPU inputs."""
    import torch

    from upernet_fast import backend as _backend
    from upernet_fast import ops, reference

    torch.manual_seed(0)
    x = torch.randn(1, 2, 6, 6)
    scales = (1, 2, 3, 6)
    low, lateral = torch.randn(1, 2, 2, 2), torch.randn(1, 2, 4, 4)
    maps, size = [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)], (4, 4)
    logits, labels = torch.randn(1, 3, 2, 2), torch.randint(0, 3, (1, 4, 4))
    y = torch.randn(2, 2, 2, 2)
    # Frozen parameters, as in a served model: the eval block is then autograd-free (one C++ pass on the cpp
    # backend), so that the few microseconds of dispatch are not measured under the noise of a 120 us
    # differentiable path (the rows before 2026-11-28T12:50Z had trainable parameters here).
    bn = torch.nn.BatchNorm2d(2).eval().requires_grad_(False)
    conv = torch.nn.Conv2d(2, 2, 1, bias=False).requires_grad_(False)
    xc = torch.randn(1, 2, 4, 4)
    calls = {
        "adaptive_avg_pool_multi": (ops.adaptive_avg_pool_multi, (x, scales), reference.adaptive_avg_pool_multi),
        "upsample_add": (ops.upsample_add, (low, lateral), reference.upsample_add),
        "upsample_concat": (ops.upsample_concat, (maps, size), reference.upsample_concat),
        "upsample_cross_entropy": (
            ops.upsample_cross_entropy, (logits, labels, 255, "mean", None, False), reference.upsample_cross_entropy
        ),
        "bn_relu": (ops.bn_relu, (y, bn), reference.bn_relu),
        "conv_bn_relu": (ops.conv_bn_relu, (xc, conv, bn), reference.conv_bn_relu),
    }
    # The C++ ops called bare, with the argument forms their schemas take (lists, every argument positional).
    kernel = {
        "adaptive_avg_pool_multi": lambda op: (lambda: op(x, list(scales))),
        "upsample_add": lambda op: (lambda: op(low, lateral)),
        "upsample_concat": lambda op: (lambda: op(maps, list(size))),
        "upsample_cross_entropy": lambda op: (lambda: op(logits, labels, None, 255, "mean", False)),
    }
    cases = []
    for name, (public, args, bare) in calls.items():
        cases.append((name, "eager", _bind(public, args, "eager"), _bind(bare, args), "reference." + name))
    if _backend.backend_unavailable("cpp") is None:
        for name, (public, args, _) in calls.items():
            impl = _backend.select(name, "auto", *args)
            if name in kernel:
                op = getattr(getattr(torch.ops, _backend.CPP_NAMESPACE), name)
                bare, what = kernel[name](op), f"torch.ops.{_backend.CPP_NAMESPACE}.{name}"
            else:
                bare, what = _bind(impl.fn, args), f"the selected implementation's fn ({impl.backend})"
            cases.append((name, f"auto->{impl.backend}", _bind(public, args, "auto"), bare, what))
    return cases


def _bind(fn, args, backend: str | None = None):
    if backend is None:
        return lambda: fn(*args)
    return lambda: fn(*args, backend=backend)


def _us_per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in itertools.repeat(None, calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _paired_overhead_us(public, bare, pairs: int) -> float:
    """Median over ``pairs`` adjacent (public, bare) calls of the public call's time minus the bare call's, the
    order alternating pair by pair (so that neither side always runs second, on warm caches)."""
    clock = time.perf_counter
    diffs = []
    for i in range(pairs):
        public_first = i % 2 == 0
        first, second = (public, bare) if public_first else (bare, public)
        t0 = clock()
        first()
        t1 = clock()
        second()
        t2 = clock()
        diffs.append((t1 - t0) - (t2 - t1) if public_first else (t2 - t1) - (t1 - t0))
    return statistics.median(diffs) * 1e6


def measure(calls: int, repeats: int, pairs: int = 20000) -> list[dict]:
    """One row per case: best-of-``repeats`` microseconds per call of the public op and of the bare call."""
    import torch

    torch.set_num_threads(1)  # tiny inputs: no parallel region worth entering, and less noise on shared cores
    rows = []
    for op, backend, public, bare, what in _cases():
        public(), bare()  # warm-up: first-call selection, lazy imports, the extension's attachment
        best_public = best_bare = float("inf")
        for _ in range(repeats):
            best_public = min(best_public, _us_per_call(public, calls))
            best_bare = min(best_bare, _us_per_call(bare, calls))
        rows.append({"op": op, "backend": backend, "public_us": best_public, "bare_us": best_bare, "bare": what,
                     "overhead_us": _paired_overhead_us(public, bare, pairs)})
    return rows


def measure_instructions(calls: int) -> list[dict]:
    """Run under callgrind with collection off: counts each side's ``calls`` calls, one dump per side, in order.
    Returns the rows without counts (the parent reads them from the dumps)."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for op, backend, public, bare, what in _cases():
        for fn in (public, bare):
            for _ in range(20):  # warm-up: first-call selection, lazy imports, caches
                fn()
            torch._C._valgrind_toggle()
            for _ in itertools.repeat(None, calls):
                fn()
            torch._C._valgrind_toggle_and_dump_stats()
        rows.append({"op": op, "backend": backend, "bare": what})
    return rows


def _callgrind_rows(tree: Path, calls: int) -> subprocess.Popen:
    """Starts ``measure_instructions`` on ``tree`` under valgrind; :func:`_callgrind_result` collects it."""
    import tempfile

    out_dir = Path(tempfile.mkdtemp(prefix="dispatch_callgrind_"))
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = ["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out_dir}/cg.%p",
               sys.executable, str(HERE), "--json-callgrind", "--calls", str(calls)]
    process = subprocess.Popen(command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.out_dir, process.calls = out_dir, calls
    return process


def _callgrind_result(process: subprocess.Popen) -> list[dict]:
    import shutil

    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"valgrind run failed ({process.returncode}):\n{stderr[-3000:]}")
    rows = json.loads(stdout.strip().splitlines()[-1])
    dumps = sorted(process.out_dir.glob("cg.*.*"), key=lambda path: int(path.name.rsplit(".", 1)[1]))
    counts = []
    for path in dumps:
        for line in path.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                counts.append(int(line.split()[1]))
                break
    shutil.rmtree(process.out_dir, ignore_errors=True)
    if len(counts) != 2 * len(rows):
        raise RuntimeError(f"expected {2 * len(rows)} callgrind dumps, found {len(counts)}")
    for k, row in enumerate(rows):
        row["public_instructions"] = counts[2 * k] / process.calls
        row["bare_instructions"] = counts[2 * k + 1] / process.calls
    return rows


def instruction_table(now: list[dict], before: list[dict] | None) -> list[str]:
    head, rule = "| op | backend | bare instructions/call | public | overhead |", "|---|---|---|---|---|"
    if before is not None:
        head += " before: bare | before: public | before: overhead |"
        rule += "---|---|---|"
    old = {(row["op"], row["backend"]): row for row in before or ()}
    lines = [head + " bare call |", rule + "---|"]
    for row in now:
        line = "| {op} | {backend} | {bare_instructions:.0f} | {public_instructions:.0f} | ".format(**row)
        line += f"{row['public_instructions'] - row['bare_instructions']:.0f} |"
        if before is not None:
            prior = old.get((row["op"], row["backend"]))
            line += " - | - | - |" if prior is None else (
                f" {prior['bare_instructions']:.0f} | {prior['public_instructions']:.0f} | "
                f"{prior['public_instructions'] - prior['bare_instructions']:.0f} |"
            )
        lines.append(line + f" {row['bare']} |")
    return lines


def _subprocess_rows(tree: Path, calls: int, repeats: int, pairs: int) -> list[dict]:
    """``measure`` in a fresh process importing ``upernet_fast`` from ``tree`` (this file run as a script)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, str(HERE), "--json", "--calls", str(calls), "--repeats", str(repeats), "--pairs", str(pairs)],
        cwd=tree, env=env, capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def _median_round(runs: list[list[dict]]) -> dict[tuple[str, str], dict]:
    """Per (op, backend), the run whose overhead was the median of the runs: its public and bare times come from
    one measurement, so their difference is one measured difference, not two minima of different moments. Not
    the smallest difference: a difference of two noisy times has noise of both signs, and its minimum is biased
    low (a negative overhead was seen when the smallest was kept)."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for rows in runs:
        for row in rows:
            by_key.setdefault((row["op"], row["backend"]), []).append(row)
    return {key: sorted(rows, key=_overhead)[(len(rows) - 1) // 2] for key, rows in by_key.items()}


def _overhead(row: dict) -> float:
    """The row's paired overhead; rows stored before it was measured have only the two bests' difference."""
    return row["overhead_us"] if "overhead_us" in row else row["public_us"] - row["bare_us"]


def _git(tree: Path, *args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def _commit(tree: Path) -> str:
    """The tree's commit; a tree outside git (``git archive`` of an old commit) is named by its folder."""
    if not (tree / ".git").exists():
        return f"{tree.name} (not a git checkout)"
    sha = _git(tree, "rev-parse", "--short=12", "HEAD") or "unknown"
    return "commit " + sha + ("-dirty" if _git(tree, "status", "--porcelain", "--untracked-files=no") else "")


def table(now: dict[tuple[str, str], dict], before: dict[tuple[str, str], dict] | None) -> list[str]:
    head = "| op | backend | bare us/call | public us/call | overhead us |"
    rule = "|---|---|---|---|---|"
    if before is not None:
        head += " before: bare | before: public | before: overhead us |"
        rule += "---|---|---|"
    lines = [head + " bare call |", rule + "---|"]
    for key, row in now.items():
        line = f"| {key[0]} | {key[1]} | {row['bare_us']:.1f} | {row['public_us']:.1f} | "
        line += f"{_overhead(row):.1f} |"
        if before is not None:
            old = before.get(key)
            line += " - | - | - |" if old is None else (
                f" {old['bare_us']:.1f} | {old['public_us']:.1f} | {_overhead(old):.1f} |"
            )
        lines.append(line + f" {row['bare']} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Many short batches: this shared VM's bursts of noise outlast a long one, and the best batch is the measure.
    parser.add_argument("--calls", type=int, default=200, help="calls per timed repeat (default 200)")
    parser.add_argument("--repeats", type=int, default=60, help="repeats per side, best kept (default 60)")
    parser.add_argument("--pairs", type=int, default=20000,
                        help="adjacent (public, bare) call pairs whose median difference is the overhead (default 20000)")
    parser.add_argument("--against", type=Path, help="another checkout to measure side by side (the 'before')")
    parser.add_argument("--rounds", type=int, default=3, help="alternating subprocess rounds with --against")
    parser.add_argument("--write", action="store_true", help=f"store the table in {RESULTS.relative_to(HERE.parents[1])}")
    parser.add_argument("--callgrind", action="store_true",
                        help="count instructions per call under valgrind's callgrind instead of timing")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # the rows, for --against
    parser.add_argument("--json-callgrind", action="store_true", help=argparse.SUPPRESS)  # run under valgrind
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(measure(args.calls, args.repeats, args.pairs)))
        return
    if args.json_callgrind:
        print(json.dumps(measure_instructions(args.calls)))
        return
    tree = HERE.parents[1]
    if args.callgrind:
        _main_callgrind(args, argv, tree)
        return
    if args.against is None:
        now, before = _median_round([measure(args.calls, args.repeats, args.pairs)]), None
    else:
        runs_now, runs_before = [], []
        for _ in range(args.rounds):
            runs_before.append(_subprocess_rows(args.against.resolve(), args.calls, args.repeats, args.pairs))
            runs_now.append(_subprocess_rows(tree, args.calls, args.repeats, args.pairs))
        now, before = _median_round(runs_now), _median_round(runs_before)
    import torch

    header = [
        _command_line(argv, tree, args.against),
        f"# torch {torch.__version__}, 1 thread, {os.cpu_count()} CPUs ({platform.machine()}), tiny fp32 CPU inputs, "
        f"best of {args.repeats} x {args.calls} calls per side; overhead: median of {args.pairs} paired differences"
        + (f", median of {args.rounds} alternating rounds" if args.against else "")
        + f", load average {tuple(round(v, 2) for v in os.getloadavg())}",
    ]
    text = "\n".join(header + [""] + table(now, before)) + "\n"
    print(text, end="")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


def _command_line(argv: list[str] | None, tree: Path, against: Path | None) -> str:
    """The results file's first line: the command, when, and the commits measured."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    command = " ".join(["python -m benchmarks.dispatch_overhead", *(argv if argv is not None else sys.argv[1:])])
    return f"# {command}, {stamp}, {_commit(tree)}" + (f", before = {_commit(against)}" if against else "")


def _main_callgrind(args, argv, tree: Path) -> None:
    import torch

    runs = [_callgrind_rows(tree, args.calls)]
    if args.against is not None:
        runs.append(_callgrind_rows(args.against.resolve(), args.calls))
    now = _callgrind_result(runs[0])
    before = _callgrind_result(runs[1]) if args.against is not None else None
    header = [
        _command_line(argv, tree, args.against),
        f"# torch {torch.__version__}, 1 thread, tiny fp32 CPU inputs, valgrind callgrind: instructions per call over "
        f"{args.calls} calls per side (after 20 warm-up calls)",
    ]
    text = "\n".join(header + [""] + instruction_table(now, before)) + "\n"
    print(text, end="")
    if args.write:
        CALLGRIND_RESULTS.write_text(text)


if __name__ == "__main__":
    main()
