"""Training throughput and peak memory: the same `upernet-fast train` command with transformers' own model
(``--backend transformers``), the converted model on PyTorch ops (``--backend eager``) and the converted model
as it runs by default (``--backend auto``).

Each run is one fresh process (so one's peak memory is not another's): it trains ``--steps`` steps on the
synthetic data; the first ``--warmup-steps`` are left out, the rest give the step time quantiles (from the
trainer's per-step images/s in ``metrics.jsonl``) and the peak memory (CUDA: peak allocated tensors; CPU: the
process's peak resident set). ``--rounds`` repeats every provider, in rotated order, and pools the timed
steps: on a shared machine, load that comes and goes then falls on every provider alike. Rows are appended to ``benchmarks/results/train_<device>.csv``.

    python -m benchmarks.train_bench --device cpu --backbone convnext-test --crop 64 --batch-size 8 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.results import DEFAULT_RESULTS_DIR, append_rows, csv_path, format_table, make_row
from upernet_fast.measure import rotated

PROVIDERS = {"reference": "transformers", "converted eager": "eager", "converted": "auto"}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="convnext-tiny")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="runs per provider, interleaved (default 2)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="default: bf16 on CUDA")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run (CPU)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.warmup_steps >= args.steps:
        parser.error(f"--warmup-steps ({args.warmup_steps}) must be below --steps ({args.steps})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.amp = args.amp or ("bf16" if args.device == "cuda" else "none")
    return args


def _run(args, backend: str, out: Path) -> list[dict]:
    command = [sys.executable, "-m", "upernet_fast.cli", "train", "--out", str(out), "--backend", backend,
               "--backbone", args.backbone, "--crop", str(args.crop), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--amp", args.amp, "--workers", "2", "--log-every", "1",
               "--eval-images", "1", "--scale-range", "1,1"]
    command += ["--channels-last"] if args.channels_last else []
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{backend}: exit {result.returncode}\n{result.stderr[-2000:]}")
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in entries if e.get("split") == "train"]


def main(argv=None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)  # so the stamp's device name reports the threads the runs used
    stamp = measure.run_stamp(args.device)
    shape = f"{args.backbone}, b{args.batch_size}, crop {args.crop}, synthetic"
    rows = []
    names = list(PROVIDERS)
    timed = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name in rotated(names, round_):
                out = Path(tmp) / f"{PROVIDERS[name]}-{round_}"
                timed[name] += _run(args, PROVIDERS[name], out)[args.warmup_steps:]
    for provider, steps in timed.items():
        backend = PROVIDERS[provider]
        step_ms = [args.batch_size / e["images_per_s"] * 1e3 for e in steps]
        p20, p50, p80 = measure.quantiles(step_ms)
        rows.append(make_row(stamp, suite="train", op=args.backbone, provider=provider, mode="train_step",
                             shape=shape, dtype=args.amp if args.amp != "none" else "fp32",
                             layout="channels_last" if args.channels_last else "nchw", p20_ms=p20, p50_ms=p50,
                             p80_ms=p80, peak_mb=max(e["peak_memory_mb"] for e in steps),
                             note=f"images/s {args.batch_size / p50 * 1e3:.1f}; --backend {backend}; "
                                  f"{len(steps)} timed steps ({args.rounds} runs, {args.warmup_steps} warm-up "
                                  f"steps each left out); AdamW and data loading (2 workers) included"))
    path = csv_path(args.results_dir, "train", args.device)
    append_rows(path, rows)
    print(format_table(rows))
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
