"""Result rows: the column set, appending to ``<results-dir>/<suite>_<device>.csv``, the printed table and a
markdown summary of the latest run."""

from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = (
    "suite", "op", "provider", "mode", "shape", "dtype", "layout",
    "p20_ms", "p50_ms", "p80_ms", "gbps", "pct_roofline", "tflops", "pct_matmul", "peak_mb",
    "device_name", "torch_version", "triton_version", "git_commit", "date", "note",
)
# Non-empty in every row.
ALWAYS_REQUIRED = ("suite", "op", "provider", "mode", "shape", "dtype", "layout", "device_name", "torch_version",
                   "triton_version", "git_commit", "date")
SKIPPED_PREFIX = "skipped: "
FAILED_PREFIX = "failed: "
# The ops suite's rows of the ceilings it measures first (no op of ours: plots and per-op checks leave them out).
CEILING_OPS = ("copy_bandwidth", "matmul_peak", "autograd_floor")

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def make_row(stamp: dict, **fields) -> dict[str, str]:
    unknown = set(fields) - set(COLUMNS)
    if unknown:
        raise KeyError(f"unknown columns {sorted(unknown)}")
    row = {c: "" for c in COLUMNS}
    row.update(stamp)
    row.update({k: fmt(v) for k, v in fields.items()})
    return row


def is_measured(row: dict) -> bool:
    return bool(row.get("p50_ms"))


def csv_path(results_dir: Path, suite: str, device: str) -> Path:
    return Path(results_dir) / f"{suite}_{device}.csv"


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append; a new file gets the header. An existing file with other columns is an error, not a silent mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != COLUMNS:
            raise RuntimeError(f"{path} has columns {header}, expected {list(COLUMNS)}: move it aside first")
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def latest_run(rows: list[dict]) -> list[dict]:
    """Each op's rows from its most recent run in a file (a run's rows share its ``date``): a run of some ops
    (``--ops``) updates theirs and leaves the other ops' latest rows in view. Per op, not per provider, so that a
    speed-up is always read between providers measured side by side in one run."""
    last: dict[str, str] = {}
    for r in rows:
        if r["date"] > last.get(r["op"], ""):
            last[r["op"]] = r["date"]
    return [r for r in rows if r["date"] == last[r["op"]]]


def _speedup(row: dict, rows: list[dict]) -> str:
    base = eager_time(row, rows)
    if base is None or not is_measured(row):
        return ""
    return f"{base / float(row['p50_ms']):.3g}x"


def baseline_provider(row: dict) -> str:
    return "eager" if row["suite"] in ("ops", "winograd", "backward_chain") else "reference"


def eager_time(row: dict, rows: list[dict]) -> float | None:
    """p50 of the baseline (ops, winograd and backward_chain: eager; e2e: the reference model) for the same case, mode, dtype and
    layout."""
    key = ("suite", "op", "mode", "shape", "dtype", "layout")
    base = baseline_provider(row)
    for r in rows:
        if r["provider"] == base and is_measured(r) and all(r[k] == row[k] for k in key):
            return float(r["p50_ms"])
    return None


TABLE_COLUMNS = (("op", 22), ("provider", 17), ("mode", 16), ("shape", 64), ("dtype", 8), ("layout", 13),
                 ("p50_ms", 9), ("p20-p80", 17), ("x base", 7), ("GB/s", 7), ("%copy", 6), ("TFLOP/s", 7),
                 ("%mm", 5), ("peak MB", 8), ("note", 0))


def _cell(row: dict, name: str, rows: list[dict]) -> str:
    if name == "p20-p80":
        return f"{row['p20_ms']}-{row['p80_ms']}" if is_measured(row) else ""
    if name == "x base":
        return _speedup(row, rows)
    mapping = {"GB/s": "gbps", "%copy": "pct_roofline", "TFLOP/s": "tflops", "%mm": "pct_matmul", "peak MB": "peak_mb"}
    return row.get(mapping.get(name, name), "")


def format_table(rows: list[dict]) -> str:
    """Measured rows as a table, then each distinct reason a provider was not measured, with its row count."""
    lines = []
    measured = [r for r in rows if is_measured(r)]
    header = "  ".join(name.ljust(width) if width else name for name, width in TABLE_COLUMNS)
    lines.append(header)
    lines.append("-" * len(header))
    for row in measured:
        cells = []
        for name, width in TABLE_COLUMNS:
            text = _cell(row, name, rows)
            if width and len(text) > width:
                text = text[: width - 1] + "~"
            cells.append(text.ljust(width) if width else text)
        lines.append("  ".join(cells).rstrip())
    lines += _not_measured(rows)
    return "\n".join(lines)


def _not_measured(rows: list[dict]) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        if not is_measured(r):
            key = (r["provider"], r["note"])
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return []
    lines = ["", "not measured (provider, rows, why):"]
    for (provider, note), n in sorted(counts.items()):
        lines.append(f"  {provider:<18} {n:>4}  {note}")
    return lines


PROVIDER_RANK = {"torch": 0, "eager": 1, "compile": 2, "triton": 3, "cpp": 4,
                 "reference": 1, "converted": 2, "reference+compile": 3, "converted+compile": 4}


def case_order(rows: list[dict]) -> list[dict]:
    """Rows grouped by case and mode in the order the cases first ran, providers in a fixed order within each
    (rows are saved as they are measured, so a run's compiled providers sit after all uncompiled ones)."""
    def case(r):
        return tuple(r[k] for k in ("suite", "op", "shape", "dtype", "layout", "mode"))

    first: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(case(r), i)
    return sorted(rows, key=lambda r: (first[case(r)], PROVIDER_RANK.get(r["provider"], 99)))


def format_markdown(rows: list[dict]) -> str:
    """Rows of one or more runs of one results file (see latest_run) as a markdown table, each run's stamp above it
    (for the README and the GPU evidence)."""
    if not rows:
        return "_no rows_\n"
    rows = case_order(rows)
    runs: dict[str, list[dict]] = {}
    for row in rows:
        runs.setdefault(row["date"], []).append(row)

    def stamp(r: dict) -> str:
        return (f"Device: **{r['device_name']}**; date {r['date']}; torch {r['torch_version']}, "
                f"triton {r['triton_version']}, commit {r['git_commit']}")

    if len(runs) == 1:
        head = stamp(rows[0]) + ".\n\n"
    else:  # each op's latest run: say which run each op's rows come from
        head = "Runs (each op's rows come from one of them):\n\n" + "".join(
            f"- {stamp(run[0])}: {', '.join(dict.fromkeys(r['op'] for r in run))}.\n"
            for _, run in sorted(runs.items())) + "\n"
    cols = ["op", "provider", "mode", "shape", "dtype", "layout", "p50_ms", "p20-p80", "x base", "GB/s", "%copy",
            "TFLOP/s", "%mm", "peak MB", "note"]
    out = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        if is_measured(row):
            out.append("| " + " | ".join(_cell(row, c, rows).replace("|", "/") for c in cols) + " |")
    skipped = _not_measured(rows)
    if skipped:
        out += ["", "Not measured (provider, rows, why):", ""]
        out += [f"- `{line.split()[0]}` ({line.split()[1]} rows): {line.split(None, 2)[2]}" for line in skipped[2:]]
    return "\n".join(out) + "\n"
