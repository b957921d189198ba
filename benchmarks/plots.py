"""PNG plots regenerated from the stored rows (the latest run in each results CSV), matplotlib Agg backend.

For each ``<suite>_<device>.csv``: ``<suite>_<device>_speedup.png`` (p50 of the baseline / p50 of each
provider: eager for ops, the reference model for e2e), ``..._roofline.png`` (percent of the measured copy
bandwidth, ops only) and ``..._memory.png`` (peak MB; CPU rows have none, and the plot says so).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.results import CEILING_OPS, baseline_provider, eager_time, is_measured, latest_run, read_rows

PROVIDER_COLORS = {"eager": "#888888", "compile": "#1f77b4", "triton": "#d62728", "cpp": "#2ca02c",
                   "reference": "#888888", "converted": "#d62728", "reference+compile": "#1f77b4",
                   "converted+compile": "#ff7f0e"}


def _label(row: dict) -> str:
    shape = row["shape"]
    if " | " in shape:  # ops: "<workload> | <instance>: <dims>" -> keep the instance name
        shape = shape.split(" | ", 1)[1].split(":", 1)[0]
    return f"{row['op']} | {shape} | {row['mode']} | {row['dtype']} {row['layout']}"


def _grouped_barh(ax, groups: dict, providers: list[str], xlabel: str, ref_line: float | None):
    import numpy as np

    names = list(groups)
    y = np.arange(len(names))
    height = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        vals = [groups[n].get(prov, 0.0) for n in names]
        ax.barh(y + i * height, vals, height, label=prov, color=PROVIDER_COLORS.get(prov))
    ax.set_yticks(y + height * (len(providers) - 1) / 2)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if ref_line is not None:
        ax.axvline(ref_line, color="black", linewidth=0.8, linestyle="--")
    ax.legend(fontsize=7, loc="lower right")


def _figure(n_groups: int):
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(11, max(2.5, 0.32 * n_groups + 1.5)))


def _save(fig, ax, title: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _empty(path: Path, title: str, message: str) -> Path:
    fig, ax = _figure(1)
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10, wrap=True)
    return _save(fig, ax, title, path)


def _by_label(rows: list[dict], value) -> dict[str, dict[str, float]]:
    """{row label: {provider: value(row)}} over the rows whose value is not None."""
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        v = value(r)
        if v is not None:
            groups.setdefault(_label(r), {})[r["provider"]] = v
    return groups


def _chart(path: Path, title: str, groups: dict, providers: list[str], xlabel: str, ref_line: float | None,
           empty_message: str) -> Path:
    """A grouped bar chart of ``groups``, or a page saying why there is nothing to plot."""
    if not groups:
        return _empty(path, title, empty_message)
    fig, ax = _figure(len(groups))
    _grouped_barh(ax, groups, providers, xlabel, ref_line)
    return _save(fig, ax, title, path)


# Suites whose rows have no bytes model, FLOPs or peak memory (latencies through autograd only): speed-up chart only.
SPEEDUP_ONLY_SUITES = ("backward_chain",)


def plot_file(csv_file: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    rows = [r for r in latest_run(read_rows(csv_file)) if r["op"] not in CEILING_OPS]
    measured = [r for r in rows if is_measured(r)]
    stem = csv_file.with_suffix("")
    title = (f"{csv_file.stem}: {rows[0]['device_name']}, {rows[0]['date']}, commit {rows[0]['git_commit']}"
             if rows else csv_file.stem)
    providers = sorted({r["provider"] for r in measured}, key=lambda p: list(PROVIDER_COLORS).index(p)
                       if p in PROVIDER_COLORS else 99)
    out = []

    def speedup(r):
        base = eager_time(r, rows)
        return None if base is None or r["provider"] == baseline_provider(r) else base / float(r["p50_ms"])

    def column(name):
        return lambda r: float(r[name]) if r.get(name) else None

    others = [p for p in providers if not measured or p != baseline_provider(measured[0])]
    out.append(_chart(Path(f"{stem}_speedup.png"), title, _by_label(measured, speedup), others,
                      "speed-up over the baseline (p50 / p50; > 1 is faster)", 1.0,
                      "no provider besides the baseline was measured in the latest run\n"
                      "(see the CSV notes for why each was skipped)"))
    if rows and rows[0]["suite"] in SPEEDUP_ONLY_SUITES:
        return out
    out.append(_chart(Path(f"{stem}_roofline.png"), title, _by_label(measured, column("pct_roofline")), providers,
                      "percent of measured copy bandwidth (bytes model / p50)", 100.0,
                      "no bandwidth figures in the latest run (end-to-end rows have none)"))
    if any(r.get("pct_matmul") for r in measured):  # compute-bound rows (conv blocks): against the matmul peak
        out.append(_chart(Path(f"{stem}_matmul.png"), title, _by_label(measured, column("pct_matmul")), providers,
                          "percent of measured matmul peak (direct-convolution FLOPs / p50)", 100.0, ""))
    out.append(_chart(Path(f"{stem}_memory.png"), title, _by_label(measured, column("peak_mb")), providers,
                      "peak MB above the memory allocated before the call", None,
                      "no peak memory recorded: PyTorch keeps no allocator statistics on CPU"))
    return out


def plot_all(results_dir: Path) -> list[Path]:
    paths = []
    for csv_file in sorted(Path(results_dir).glob("*.csv")):
        paths += plot_file(csv_file)
    return paths
