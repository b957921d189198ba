"""Benchmark entry point: ``python -m benchmarks.run [--suite ops|e2e|all] [--device cuda|cpu] [--quick]``.

Runs the suites, prints a table, appends rows to ``<results-dir>/<suite>_<device>.csv``, then regenerates from
the stored rows the PNG plots and a markdown table of each file's latest run of each op. ``upernet-fast bench`` calls
:func:`main` with the same arguments.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.results import (DEFAULT_RESULTS_DIR, FAILED_PREFIX, append_rows, csv_path, format_markdown,
                                format_table, latest_run, read_rows)
from benchmarks.shapes import E2E_ONLY_SETS, SHAPE_SETS

FULL_BUDGET_S = 480  # a full GPU run fits in 8 minutes
QUICK_BUDGET_S = 60  # --quick in one
OPS_SHARE = 0.6  # with --suite all, the ops suite may use this share of the budget, e2e the rest


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="upernet-fast bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=("ops", "e2e", "all"), default="all")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--quick", action="store_true", help="the short case list (about one minute)")
    parser.add_argument("--shapes", choices=SHAPE_SETS, default=None,
                        help="case list: full, quick (the --quick default), headline (the GPU session's: the "
                             "headline workload only), tiny (toy shapes, for tests) or cpu-inference (e2e on the "
                             "CPU: ConvNeXt-T UperNet eval at 512x512, batch 1 and 2, with torch.compile)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-clock budget; cases after it are recorded as skipped "
                             f"(default {FULL_BUDGET_S}, {QUICK_BUDGET_S} with --quick)")
    parser.add_argument("--cpu-compile", action="store_true", help="also run torch.compile providers on CPU")
    parser.add_argument("--ops", default=None, help="comma-separated op names (ops suite): run only these")
    parser.add_argument("--providers", default=None, help="comma-separated providers (ops suite): run only these")
    parser.add_argument("--no-plots", action="store_true", help="do not regenerate plots and markdown tables")
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device == "cuda" and measure.interpreting():
        print("error: TRITON_INTERPRET is set: Triton would run in its interpreter; unset it to benchmark",
              file=sys.stderr)
        return 2
    from benchmarks.ops_suite import OPS, PROVIDERS

    for flag, value, known in (("--providers", args.providers, PROVIDERS), ("--ops", args.ops, OPS)):
        unknown = set(value.split(",")) - set(known) if value else set()
        if unknown:
            print(f"error: {flag}: unknown {sorted(unknown)}; known: {', '.join(known)}", file=sys.stderr)
            return 2
    shape_set = args.shapes or ("quick" if args.quick else "full")
    if shape_set in E2E_ONLY_SETS and (args.suite != "e2e" or device != "cpu"):
        print(f"error: --shapes {shape_set} is for --suite e2e --device cpu", file=sys.stderr)
        return 2
    quick_budget = shape_set != "full" and shape_set not in E2E_ONLY_SETS
    budget = args.budget_s if args.budget_s is not None else (QUICK_BUDGET_S if quick_budget else FULL_BUDGET_S)
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # as training scripts run; every provider gets the same setting
    start = time.monotonic()
    stamp = measure.run_stamp(device)
    suites = ("ops", "e2e") if args.suite == "all" else (args.suite,)
    _log(f"[bench] {', '.join(suites)} on {stamp['device_name']}, shapes {shape_set}, budget {budget:.0f}s")

    failures = 0
    for suite in suites:
        path = csv_path(args.results_dir, suite, device)
        save = functools.partial(append_rows, path)  # rows reach the file as each case ends: a killed run keeps them

        if suite == "ops":
            from benchmarks.ops_suite import Options, run_ops

            share = OPS_SHARE if len(suites) > 1 else 1.0
            opts = Options(device=device, shape_set=shape_set, cpu_compile=args.cpu_compile,
                           deadline=start + share * budget, log=_log,
                           providers=tuple(args.providers.split(",")) if args.providers else PROVIDERS,
                           ops=tuple(args.ops.split(",")) if args.ops else None, emit=save)
            rows = run_ops(opts, stamp)
        else:
            from benchmarks.e2e_suite import Options as E2EOptions
            from benchmarks.e2e_suite import run_e2e

            # With --suite all, e2e keeps at least its share of the budget even when the ops suite overran.
            deadline = max(start + budget, time.monotonic() + (1 - OPS_SHARE) * budget) if len(suites) > 1 \
                else start + budget
            rows = run_e2e(E2EOptions(device=device, shape_set=shape_set, cpu_compile=args.cpu_compile,
                                      deadline=deadline, log=_log, emit=save), stamp)
        print(f"\n== {suite} on {stamp['device_name']} ({stamp['date']}) -> {path}")
        print(format_table(rows))
        failures += sum(r["note"].startswith(FAILED_PREFIX) for r in rows)

    if not args.no_plots:
        written = regenerate(args.results_dir)
        print("\nregenerated: " + ", ".join(str(p) for p in written))
    print(f"\n[bench] done in {time.monotonic() - start:.0f}s")
    if failures:
        print(f"[bench] {failures} case(s) failed; their rows say why", file=sys.stderr)
        return 1
    return 0


def regenerate(results_dir: Path) -> list[Path]:
    """Plots and markdown tables of each op's latest run in every results CSV (from the stored rows only)."""
    from benchmarks.plots import plot_all

    written = plot_all(results_dir)
    for csv_file in sorted(Path(results_dir).glob("*.csv")):
        md = csv_file.with_suffix(".md")
        md.write_text(f"# {csv_file.stem}: each op's latest run\n\n" + format_markdown(latest_run(read_rows(csv_file))))
        written.append(md)
    return written


if __name__ == "__main__":
    sys.exit(main())
