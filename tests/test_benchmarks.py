"""The benchmark harness itself, on CPU with toy shapes: rows written and complete, reasons recorded for every
provider not run, plots produced, and the bytes model checked by hand. (No timing is asserted: these machines
are shared and CPU timings say nothing about the GPU kernels.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not installed; the CLI adds the root the same way
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import run  # noqa: E402
from benchmarks.bytes_model import op_bytes, op_flops  # noqa: E402
from benchmarks.measure import quantiles  # noqa: E402
from benchmarks.results import ALWAYS_REQUIRED, CEILING_OPS, COLUMNS, append_rows, make_row, read_rows  # noqa: E402
from benchmarks.shapes import conv_blocks, ops_plan, workload  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One run of the quick CPU path (tiny shapes) of both suites into a fresh results directory. The budget is
    lifted: on a busy shared machine the default 60 s let later e2e rows be skipped (the budget itself is tested
    by test_time_budget_records_skips)."""
    results = tmp_path_factory.mktemp("bench_results")
    rc = run.main(["--suite", "all", "--device", "cpu", "--quick", "--shapes", "tiny", "--budget-s", "3600",
                   "--results-dir", str(results)])
    return rc, results


def _rows(results: Path, suite: str) -> list[dict]:
    return read_rows(results / f"{suite}_cpu.csv")


def test_quick_cpu_run_succeeds_and_writes_both_suites(quick_run):
    rc, results = quick_run
    assert rc == 0
    for suite in ("ops", "e2e"):
        rows = _rows(results, suite)
        assert rows, suite
        assert {r["suite"] for r in rows} == {suite}
        assert len({r["date"] for r in rows}) == 1  # one run, one stamp


def test_every_column_present_and_required_ones_filled(quick_run):
    _, results = quick_run
    for suite in ("ops", "e2e"):
        path = results / f"{suite}_cpu.csv"
        assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
        for row in _rows(results, suite):
            assert tuple(row) == COLUMNS
            for col in ALWAYS_REQUIRED:
                assert row[col], (col, row)
            assert not row["note"].startswith("failed: "), row
            if row["p50_ms"]:
                p20, p50, p80 = float(row["p20_ms"]), float(row["p50_ms"]), float(row["p80_ms"])
                assert 0 < p20 <= p50 <= p80, row
                # No peak memory is invented on CPU (PyTorch keeps no CPU allocator statistics).
                assert row["peak_mb"] == ""
            else:
                assert row["note"].startswith("skipped: ") and len(row["note"]) > 20, row
                assert row["p20_ms"] == row["p80_ms"] == row["gbps"] == ""


def test_ops_rows_have_bandwidth_and_conv_rows_have_flops(quick_run):
    _, results = quick_run
    rows = _rows(results, "ops")
    ceilings = {r["op"]: r for r in rows if r["op"] in CEILING_OPS}
    assert float(ceilings["copy_bandwidth"]["gbps"]) > 0
    assert float(ceilings["matmul_peak"]["tflops"]) > 0
    assert float(ceilings["autograd_floor"]["p50_ms"]) > 0 and ceilings["autograd_floor"]["mode"] == "autograd.grad"
    measured = [r for r in rows if r["p50_ms"] and r["op"] not in CEILING_OPS]
    assert {r["op"] for r in measured} == {"adaptive_avg_pool_multi", "upsample_add", "upsample_concat",
                                           "upsample_cross_entropy", "conv_bn_relu", "bn_relu"}
    for r in measured:
        assert float(r["gbps"]) > 0 and float(r["pct_roofline"]) > 0, r
        if r["op"] == "conv_bn_relu":
            assert float(r["tflops"]) > 0 and float(r["pct_matmul"]) > 0, r
        else:
            assert r["tflops"] == "" and r["pct_matmul"] == "", r
    modes = {r["mode"] for r in measured}
    assert modes == {"inference", "forward", "backward", "forward+backward"}
    assert {r["layout"] for r in measured} == {"nchw", "channels_last"}


def test_every_provider_has_a_row_per_case_and_mode(quick_run):
    """No provider disappears silently: each (case, mode) has one row per provider, measured or with a reason."""
    _, results = quick_run
    rows = [r for r in _rows(results, "ops") if r["op"] not in CEILING_OPS]
    cases: dict[tuple, set] = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"], r["dtype"], r["layout"], r["mode"]), set()).add(r["provider"])
    assert cases
    for key, providers in cases.items():
        assert providers == {"eager", "compile", "triton", "cpp"}, key
    for r in rows:
        if r["provider"] == "eager":
            assert r["p50_ms"], r


def test_triton_is_never_timed_on_cpu_and_says_why(quick_run):
    """tests/conftest.py sets TRITON_INTERPRET=1 here: interpreter timings would be meaningless, so the triton
    provider is refused with a reason (the interpreter, or no triton implementation registered yet)."""
    _, results = quick_run
    triton_rows = [r for r in _rows(results, "ops") if r["provider"] == "triton"]
    assert triton_rows
    for r in triton_rows:
        assert r["p50_ms"] == ""
        assert ("interpreter" in r["note"] or "no triton implementation" in r["note"]
                or "triton backend unavailable" in r["note"]), r
    for r in _rows(results, "ops"):
        if r["provider"] == "compile":
            assert r["note"].startswith("skipped: torch.compile not run on CPU"), r


def test_triton_refused_on_cpu_even_when_registered_and_available(monkeypatch):
    """A Triton implementation that the registry calls available must still not be timed on CPU tensors."""
    from benchmarks.ops_suite import build, provider_skip_reason
    from benchmarks.shapes import TINY, head_op_cases
    from upernet_fast import backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = next(c for c in head_op_cases(TINY, primary=True, all_instances=False, conv="none")
                if c.op == "upsample_add")
    built = build(case, torch.float32, "nchw", "cpu")
    original = backend._REGISTRY[case.op].get("triton")
    backend.register(case.op, "triton", lambda low, lateral: lateral)
    try:
        reason = provider_skip_reason(case.op, "triton", "cpu", built)
    finally:
        if original is None:
            del backend._REGISTRY[case.op]["triton"]
        else:
            backend._REGISTRY[case.op]["triton"] = original
    assert reason is not None and "interpreter" in reason


def test_cpu_providers_are_timed_in_interleaved_rounds(monkeypatch):
    """On the CPU at real sizes, run_case times every provider's modes in turn, CPU_ROUNDS times with the order
    rotated (a VM's slow phase then falls on every provider alike), and each row pools its rounds' samples."""
    from benchmarks import measure as bench_measure
    from benchmarks import ops_suite
    from benchmarks.shapes import TINY, head_op_cases

    assert ops_suite._interleaves("cpu", "full", ("eager", "cpp"))
    assert not ops_suite._interleaves("cpu", "full", ("compile",))  # (the compile pass runs alone)
    assert not ops_suite._interleaves("cuda", "full", ("eager", "cpp"))
    assert not ops_suite._interleaves("cpu", "tiny", ("eager", "cpp"))

    timer = ops_suite._timer("cpu", "full", rounds=3)
    counts = [timer(lambda: None, None, [], key=("eager", "forward")).samples for _ in range(3)]
    assert 2 <= counts[0] < counts[1] < counts[2]  # each round adds its samples to the row's
    other = timer(lambda: None, None, [], key=("cpp", "forward"))  # another row: its own samples only
    assert other.samples < counts[2] and len(other.values) == other.samples and "interleaved in 3 rounds" in other.method

    case = next(c for c in head_op_cases(TINY, primary=True, all_instances=False, conv="none")
                if c.op == "upsample_add")
    order = []
    monkeypatch.setattr(ops_suite, "_interleaves", lambda *args: True)
    monkeypatch.setattr(ops_suite, "_timer", lambda device, shape_set, rounds=1: (
        lambda fn, setup, leaves, key=None: order.append(key) or bench_measure.Timing(1.0, 1.0, 1.0, rounds, "t")))
    opts = ops_suite.Options(device="cpu", shape_set="tiny", log=lambda line: None)
    ceilings = bench_measure.Ceilings(1.0, 1, None, 1.0, 1, "fp32", None, None)
    rows = ops_suite.run_case(case, "fp32", "nchw", ("forward", "backward"), ("eager", "cpp"), opts, ceilings, {})
    rotations = [("eager", "cpp"), ("cpp", "eager")]
    assert order == [(provider, mode) for r in range(ops_suite.CPU_ROUNDS) for provider in rotations[r % 2]
                     for mode in ("forward", "backward")]
    assert [(r["provider"], r["mode"]) for r in rows] == [("eager", "forward"), ("eager", "backward"),
                                                          ("cpp", "forward"), ("cpp", "backward")]
    assert all(r["p50_ms"] and not r["note"].startswith(("failed", "skipped")) for r in rows), rows


def test_e2e_cpu_providers_are_timed_in_interleaved_rounds(monkeypatch):
    """On the CPU at real sizes, the e2e suite builds a target's uncompiled providers together and times them
    CPU_ROUNDS times in rotated order, each row pooling its rounds' samples (a VM's slow phase then falls on both
    models alike); elsewhere one provider after another, each timed once."""
    from benchmarks import e2e_suite
    from benchmarks import measure as bench_measure
    from benchmarks.shapes import e2e_plans

    cpu_real = e2e_suite.Options(device="cpu", shape_set="cpu-inference")
    assert e2e_suite._interleaves(cpu_real, compiled=False)
    assert not e2e_suite._interleaves(cpu_real, compiled=True)  # (each compiled provider keeps its own pass)
    assert not e2e_suite._interleaves(e2e_suite.Options(device="cuda", shape_set="full"), compiled=False)
    assert not e2e_suite._interleaves(e2e_suite.Options(device="cpu", shape_set="tiny"), compiled=False)

    plan = e2e_plans("tiny", "cpu")[0]
    opts = e2e_suite.Options(device="cpu", shape_set="tiny", log=lambda line: None)
    calls = []

    def fake_time(target, mode, opts, rounds=1):
        calls.append(("converted" if target.converted else "reference", rounds))
        return bench_measure.Timing(1.0, 1.0, 1.0, 2, "t", (1.0, 3.0))

    def row_of(provider, compiled, kind, backbone, mode, **fields):
        return dict(provider=provider, **fields)

    monkeypatch.setattr(e2e_suite, "_time", fake_time)
    for interleaved in (True, False):
        calls.clear()
        monkeypatch.setattr(e2e_suite, "_interleaves", lambda opts, compiled: interleaved)
        rows = e2e_suite._run_group(plan, opts, "head", plan.backbones[0], "inference", False, None, row_of)
        assert [r["provider"] for r in rows] == ["reference", "converted"]
        assert all(r["p50_ms"] and not r["note"].startswith(("failed", "skipped")) for r in rows), rows
        if interleaved:
            rotations = [("reference", "converted"), ("converted", "reference")]
            assert calls == [(p, e2e_suite.CPU_ROUNDS) for r in range(e2e_suite.CPU_ROUNDS) for p in rotations[r % 2]]
            n = 2 * e2e_suite.CPU_ROUNDS  # every round's samples pooled into the row
            assert all(f"interleaved in {e2e_suite.CPU_ROUNDS} rounds n={n}" in r["note"] for r in rows), rows
            assert all(r["p50_ms"] == 2.0 for r in rows)  # the median of the pooled (1, 3, 1, 3, 1, 3)
        else:
            assert calls == [("reference", 1), ("converted", 1)]
            assert all(r["p50_ms"] == 1.0 for r in rows)


def test_backward_chain_interleaves_its_cases_and_stores_rows(tmp_path, monkeypatch):
    """benchmarks.backward_chain: every case (eager, cpp and the two probes, one op and a chain, the floor) timed
    once per round, the order rotated each round; a real run (the cpp extension and the probes built) stores the floor
    and three rows per provider; each probe is one node, straight above the three leaves; the read-once probe's
    grad_x is x + grad."""
    import csv
    import itertools

    from benchmarks import backward_chain

    real_graph, real_floor = backward_chain._graph, backward_chain.measure.autograd_floor_call
    order = []
    monkeypatch.setattr(backward_chain, "_graph", lambda p, shape, ops: (lambda: order.append((p, ops))))
    monkeypatch.setattr(backward_chain.measure, "autograd_floor_call",
                        lambda device: (lambda: order.append(("torch", 0))))
    samples = backward_chain.measure_shape((1, 4, 2, 2), chain=3, rounds=2, calls=3)
    keys = [("eager", 1), ("eager", 3), ("cpp", 1), ("cpp", 3), ("one-node probe", 1), ("one-node probe", 3),
            ("read-once probe", 1), ("read-once probe", 3), ("torch", 0)]
    assert [k for k, _ in itertools.groupby(order)] == keys + keys[1:] + keys[:1]
    assert {k: len(v) for k, v in samples.items()} == {k: 2 for k in keys}

    monkeypatch.setattr(backward_chain, "_graph", real_graph)
    monkeypatch.setattr(backward_chain.measure, "autograd_floor_call", real_floor)
    assert backward_chain.main(["--shapes", "1x8x2x3", "--rounds", "2", "--chain", "2", "--calls", "4",
                                "--results-dir", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "backward_chain_cpu.csv").open()))
    assert [(r["provider"], r["mode"]) for r in rows] == [("torch", "autograd.grad")] + [
        (p, m) for p in ("eager", "cpp", "one-node probe", "read-once probe")
        for m in ("backward", "bwd net of floor", "bwd chain of 2")]
    assert all(r["shape"] == "1x8x2x3" and r["p50_ms"] for r in rows)
    single = {r["provider"]: float(r["p50_ms"]) for r in rows if r["mode"] == "backward"}
    net = {r["provider"]: float(r["p50_ms"]) for r in rows if r["mode"] == "bwd net of floor"}
    floor = float(rows[0]["p50_ms"])
    # (rows keep 4 significant digits)
    assert all(abs(single[p] - floor - net[p]) <= 1e-3 * single[p] for p in single) and len(single) == 4
    leaves = [torch.randn(1, 4, 2, 2, requires_grad=True), torch.ones(4, requires_grad=True),
              torch.zeros(4, requires_grad=True)]
    for op in (torch.ops.upernet_fast_probe.one_node, torch.ops.upernet_fast_probe.read_once):
        probe = op(*leaves)
        assert [type(fn).__name__ for fn, _ in probe.grad_fn.next_functions] == ["AccumulateGrad"] * 3
        assert all(fn.variable is leaf for (fn, _), leaf in zip(probe.grad_fn.next_functions, leaves))
        grads = torch.autograd.grad(probe, leaves, torch.full_like(probe, 3.0))
        assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert torch.equal(grads[0], leaves[0].detach() + 3.0)  # read_once's grad_x: x + grad, computed
    # In a chain it writes over an incoming gradient nothing else holds (as the cpp backend does): the inner node's
    # add is in place, the outer one's (whose gradient the caller holds) is not.
    inner = torch.ops.upernet_fast_probe.read_once(*leaves)
    outer = torch.ops.upernet_fast_probe.read_once(inner, *leaves[1:])
    with torch.profiler.profile() as prof:
        torch.autograd.grad(outer, leaves[:1], torch.ones_like(outer))
    names = [event.name for event in prof.events()]
    assert (names.count("aten::add_"), names.count("aten::add")) == (1, 1), names
    from benchmarks.plots import plot_file  # a speed-up chart only: these rows have no bytes, FLOPs or peak memory

    assert [p.name for p in plot_file(tmp_path / "backward_chain_cpu.csv")] == ["backward_chain_cpu_speedup.png"]


def test_e2e_rows(quick_run):
    _, results = quick_run
    rows = _rows(results, "e2e")
    ref = [r for r in rows if r["provider"] == "reference"]
    assert {r["mode"] for r in ref} == {"inference", "train_step"}
    assert {r["op"] for r in ref} == {"head convnext_t", "model convnext_t"}
    for r in ref:
        assert r["p50_ms"] and "images/s" in r["note"], r
    for r in rows:
        if r["provider"] == "converted":
            assert r["p50_ms"] and "images/s" in r["note"], r
        if r["provider"].endswith("+compile"):
            assert r["note"].startswith("skipped: torch.compile not run on CPU"), r


def test_plots_and_markdown_regenerated(quick_run):
    _, results = quick_run
    for suite in ("ops", "e2e"):
        for kind in ("speedup", "roofline", "memory"):
            png = results / f"{suite}_cpu_{kind}.png"
            data = png.read_bytes()
            assert len(data) > 1000 and data.startswith(PNG_MAGIC), png
        md = (results / f"{suite}_cpu.md").read_text()
        assert "Device: **CPU" in md and "| op |" in md


def test_time_budget_records_skips(tmp_path):
    rc = run.main(["--suite", "ops", "--device", "cpu", "--shapes", "tiny", "--ops", "upsample_add", "--budget-s", "0",
                   "--no-plots", "--results-dir", str(tmp_path)])
    assert rc == 0
    rows = [r for r in read_rows(tmp_path / "ops_cpu.csv") if r["op"] == "upsample_add"]
    assert rows and all(r["note"].startswith("skipped: ") and not r["p50_ms"] for r in rows)
    # Providers that could have run say the budget stopped them; the others keep their own reason.
    assert all("time budget" in r["note"] for r in rows if r["provider"] == "eager")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_an_error(tmp_path):
    assert run.main(["--device", "cuda", "--results-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_unknown_filters_are_an_error(tmp_path):
    assert run.main(["--device", "cpu", "--providers", "eager,tritn", "--results-dir", str(tmp_path)]) == 2
    assert run.main(["--device", "cpu", "--ops", "upsample", "--results-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_cpu_inference_set_is_the_real_model_at_512_for_e2e_on_cpu_only(tmp_path):
    from benchmarks.shapes import e2e_plans

    plans = e2e_plans("cpu-inference", "cpu")
    assert [p.batch for p in plans] == [1, 2]
    for p in plans:
        assert (p.crop, p.hidden, p.num_classes, p.backbones, p.head, p.modes) == (
            512, 512, 150, ("convnext_t",), False, ("inference",))
        assert p.models["convnext_t"]["hidden_sizes"] == [96, 192, 384, 768]
    for argv in (["--suite", "ops"], ["--suite", "all"]):
        assert run.main([*argv, "--device", "cpu", "--shapes", "cpu-inference", "--results-dir", str(tmp_path)]) == 2
    assert not list(tmp_path.iterdir())


def test_winograd_bench_writes_rows_with_flop_rates_and_plots(tmp_path):
    from benchmarks import winograd_conv_bn_relu

    assert winograd_conv_bn_relu.main(["--blocks", "fpn_convs.2", "--repeats", "1", "--results-dir", str(tmp_path)]) == 0
    rows = read_rows(tmp_path / "winograd_cpu.csv")
    by_provider = {(r["op"], r["provider"]): r for r in rows}
    assert set(by_provider) == {("matmul_peak", "torch"), ("matmul_peak", "cpp"), ("fpn_convs.2", "eager"),
                                ("fpn_convs.2", "cpp")}
    # sgemm ceiling, and the block's chunk of products by MKL's bmm and by the packed kernel (32x32: 64 tiles)
    assert len([r for r in rows if r["op"] == "matmul_peak"]) == 3
    assert by_provider[("matmul_peak", "cpp")]["shape"] == "packed products 36x[64,512]x[512,512] (fpn_convs.2)"
    for r in rows:
        assert all(r[c] for c in ALWAYS_REQUIRED) and float(r["p50_ms"]) > 0
        assert float(r["tflops"]) > 0 and float(r["pct_matmul"]) > 0
    assert "first call" in by_provider[("fpn_convs.2", "cpp")]["note"]
    assert (tmp_path / "winograd_cpu.md").read_text().count("| fpn_convs.2 |") == 2
    for chart in ("speedup", "matmul", "memory", "roofline"):
        assert (tmp_path / f"winograd_cpu_{chart}.png").stat().st_size > 0


def test_every_op_has_its_benchmark_module_under_its_name():
    # One op, one name in every folder: benchmarks/<op>.py next to upernet_fast/ops/<op>.py and tests/test_<op>.py.
    from benchmarks.bytes_model import OPS, op_module

    for op in OPS:
        module = op_module(op)
        assert module.OP == op and all(callable(getattr(module, f)) for f in ("describe", "build", "bytes_moved", "flops"))
        assert (REPO_ROOT / "upernet_fast" / "ops" / f"{op}.py").exists() and (REPO_ROOT / "tests" / f"test_{op}.py").exists()
    out = subprocess.run([sys.executable, "-m", "benchmarks.upsample_add", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--shapes" in out.stdout


def test_module_entry_point_runs_from_repo_root():
    out = subprocess.run([sys.executable, "-m", "benchmarks.run", "--help"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--suite" in out.stdout


def test_append_keeps_one_header_and_refuses_other_columns(tmp_path):
    stamp = dict(device_name="d", torch_version="t", triton_version="x", git_commit="c", date="2026-01-01T00:00:00Z")
    row = make_row(stamp, suite="ops", op="o", provider="eager", mode="forward", shape="s", dtype="fp32",
                   layout="nchw", p20_ms=1.0, p50_ms=2.0, p80_ms=3.0)
    path = tmp_path / "ops_cpu.csv"
    append_rows(path, [row])
    append_rows(path, [row])
    assert len(read_rows(path)) == 2 and path.read_text().count("suite,op,") == 1
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(RuntimeError, match="columns"):
        append_rows(other, [row])


def test_commit_stamp_can_be_given_where_there_is_no_git(monkeypatch):
    from benchmarks import measure

    monkeypatch.delenv(measure.GIT_COMMIT_ENV, raising=False)
    from_git = measure.git_commit()
    assert from_git == "unknown" or len(from_git.removesuffix("-dirty")) == 12, from_git
    monkeypatch.setenv(measure.GIT_COMMIT_ENV, "0123456789ab")
    assert measure.run_stamp("cpu")["git_commit"] == "0123456789ab"


def test_latest_run_keeps_each_ops_latest_rows():
    """A run of some ops (``--ops``) replaces those ops' rows in the tables and plots and leaves the others' latest
    in view; an op's rows always come from one run, so that its speed-ups compare providers measured together."""
    from benchmarks.results import latest_run

    def row(op, provider, date):
        return {"op": op, "provider": provider, "date": date}

    rows = [row("pool", "eager", "1"), row("pool", "cpp", "1"), row("bn", "eager", "1"), row("bn", "cpp", "1"),
            row("bn", "eager", "2"), row("bn", "cpp", "2"), row("pool", "cpp", "0")]
    assert latest_run(rows) == [rows[0], rows[1], rows[4], rows[5]]
    assert latest_run([]) == []


def test_quantiles_interpolate_linearly():
    assert quantiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx([1.8, 3.0, 4.2])
    assert quantiles([7.0]) == [7.0, 7.0, 7.0]


def test_cpu_peak_memory_is_the_true_peak_of_live_tensors():
    """The CPU peak follows each allocation and free as it happens (not each op's net amount at its start), above
    what was live before, and a second profiler session in the same process gives the same answer."""
    from upernet_fast.measure import peak_memory_mb

    mib = 2**20 // 4  # float32 elements in one MiB

    def sequence():
        a = torch.empty(4 * mib)
        b = torch.empty(2 * mib)  # 6 MiB live: the peak
        del a
        c = torch.empty(1 * mib)
        del b, c

    x = torch.randn(8 * mib, requires_grad=True)

    def exp_backward():
        # exp's output (8 MiB, saved for the backward) and then the incoming gradient times it (8 MiB, stolen as
        # x.grad) are live together: 16 MiB, inside the backward.
        x.exp().sum().backward()

    for fn, expected in ((sequence, 6.0), (exp_backward, 16.0)):
        for _ in range(2):
            x.grad = None
            peak, base = peak_memory_mb(fn, "cpu")
            assert base is None
            assert peak == pytest.approx(expected, abs=0.01), (fn.__name__, peak)
    assert peak_memory_mb(sequence, "cpu", cpu=False) == (None, None)


# --------------------------------------------------------------------------------------- bytes model by hand
def test_bytes_model_hand_computed():
    f32, bf16 = 4, 2
    # Pool x (2,3,8,8), scales 1,2: read 384 elements, write 2*3*(1+4) = 30.
    p = dict(x=(2, 3, 8, 8), scales=(1, 2))
    assert op_bytes("adaptive_avg_pool_multi", p, "forward", f32) == 4 * (384 + 30)
    assert op_bytes("adaptive_avg_pool_multi", p, "backward", f32) == 4 * (30 + 384)
    # Upsample-add low (2,16,4,4)=512, lateral (2,16,8,8)=2048: forward 512 + 2048 + 2048; backward 2048 + 512.
    p = dict(low=(2, 16, 4, 4), lateral=(2, 16, 8, 8))
    assert op_bytes("upsample_add", p, "forward", f32) == 4 * 4608 == 18432
    assert op_bytes("upsample_add", p, "backward", f32) == 4 * 2560
    assert op_bytes("upsample_add", p, "forward+backward", f32) == 4 * (4608 + 2560)
    # Concat [(1,2,4,4)=32, (1,3,2,2)=12] -> 4x4: output 1*5*16 = 80.
    p = dict(tensors=[(1, 2, 4, 4), (1, 3, 2, 2)], size=(4, 4))
    assert op_bytes("upsample_concat", p, "forward", bf16) == 2 * (32 + 12 + 80)
    # Cross-entropy logits (1,5,2,2)=20 bf16, labels (1,8,8)=64 int64, scalar 4 bytes.
    p = dict(logits=(1, 5, 2, 2), labels=(1, 8, 8))
    assert op_bytes("upsample_cross_entropy", p, "forward", bf16) == 40 + 512 + 4
    assert op_bytes("upsample_cross_entropy", p, "backward", bf16) == 80 + 512 + 4
    # Conv 3x3 4->8 at 1x5x5: x 100, weight 288, y 200; backward y + 2x + 2w.
    p = dict(in_channels=4, out_channels=8, kernel=3, padding=1, batch=1, height=5, width=5)
    assert op_bytes("conv_bn_relu", p, "inference", f32) == 4 * (100 + 288 + 200)
    assert op_bytes("conv_bn_relu", p, "backward", f32) == 4 * (200 + 200 + 576)
    assert op_flops("conv_bn_relu", p, "forward") == 2 * 25 * 4 * 8 * 9 == 14400
    assert op_bytes("bn_relu", dict(y=(2, 8, 5, 5)), "forward", f32) == 4 * 2 * 400
    assert op_bytes("bn_relu", dict(y=(2, 8, 5, 5)), "backward", f32) == 4 * 3 * 400
    assert op_flops("conv_bn_relu", p, "forward+backward") == 3 * 14400
    assert op_flops("upsample_add", dict(low=(1,), lateral=(1,)), "forward") is None


def test_real_workload_shapes_match_the_cost_model():
    """shared/reference/cost-model.md: ConvNeXt-T, 512^2, batch 16: f0 16x96x128x128 ... f3 16x768x16x16."""
    w = workload("convnext_t", 512, 16)
    assert [w.feature_shape(i) for i in range(4)] == [(16, 96, 128, 128), (16, 192, 64, 64), (16, 384, 32, 32),
                                                      (16, 768, 16, 16)]
    assert "swin_t" in w.name and "convnext_s" in w.name  # same channels, same head shapes
    cases = {(c.op, c.name): c for c, *_ in ops_plan("full", "cuda").entries if c.workload == w}
    add = cases[("upsample_add", "topdown 1/8->1/4")].params
    # Read 67 + 268 MB, write 268 MB (bf16), as the cost model's floor states.
    assert op_bytes("upsample_add", add, "forward", 2) == 2 * (16 * 512 * 64 * 64 + 2 * 16 * 512 * 128 * 128)
    assert cases[("upsample_cross_entropy", "decode loss")].params == dict(logits=(16, 150, 128, 128),
                                                                           labels=(16, 512, 512))
    fpn_bottleneck = next(p for p in conv_blocks(w) if p["block"] == "fpn_bottleneck")
    assert op_flops("conv_bn_relu", fpn_bottleneck, "forward") == pytest.approx(4948e9, rel=1e-3)
    bottleneck = next(p for p in conv_blocks(w) if p["block"] == "bottleneck")
    assert bottleneck["in_channels"] == 768 + 4 * 512


@pytest.mark.gpu
def test_cuda_quick_ops_run(tmp_path):
    """On the GPU: the quick path measures with do_bench, records peak memory, and times the Triton kernels."""
    rc = run.main(["--suite", "ops", "--device", "cuda", "--quick", "--ops", "upsample_add", "--no-plots",
                   "--results-dir", str(tmp_path)])
    assert rc == 0
    rows = [r for r in read_rows(tmp_path / "ops_cuda.csv") if r["op"] == "upsample_add"]
    eager = [r for r in rows if r["provider"] == "eager"]
    assert eager and all(r["p50_ms"] and r["peak_mb"] and "do_bench" in r["note"] for r in eager)
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["p50_ms"] and r["gbps"] for r in triton), triton


def test_dispatch_overhead_measures_every_op_and_reads_callgrind_dumps(tmp_path):
    """The dispatch benchmark: a row per op and backend with finite times (no timing asserted), and its callgrind
    mode's reading of the dumps (valgrind itself takes minutes: here the dumps are written by hand, in the order
    the measured process makes them, public then bare per row)."""
    import json
    import math
    from types import SimpleNamespace

    from benchmarks import dispatch_overhead

    rows = dispatch_overhead.measure(calls=2, repeats=1, pairs=4)
    ops = ("adaptive_avg_pool_multi", "upsample_add", "upsample_concat", "upsample_cross_entropy", "bn_relu",
           "conv_bn_relu")
    assert {row["op"] for row in rows if row["backend"] == "eager"} == set(ops)
    assert all(math.isfinite(row[key]) for row in rows for key in ("public_us", "bare_us", "overhead_us"))

    listed = [{"op": "upsample_add", "backend": "auto->cpp", "bare": "bare add"},
              {"op": "bn_relu", "backend": "auto->cpp", "bare": "bare bn"}]
    for dump, count in enumerate((5000, 3000, 9000, 8000), start=1):
        (tmp_path / f"cg.42.{dump}").write_text(f"events: Ir\nsummary: {count}\n")
    (tmp_path / "cg.42").write_text("events: Ir\nsummary: 1\n")  # the dump at exit: not a measurement
    process = SimpleNamespace(
        communicate=lambda: ("noise\n" + json.dumps(listed) + "\n", ""), returncode=0, out_dir=tmp_path, calls=10
    )
    measured = dispatch_overhead._callgrind_result(process)
    assert [(row["public_instructions"], row["bare_instructions"]) for row in measured] == [(500, 300), (900, 800)]
    table = dispatch_overhead.instruction_table(measured, measured)
    assert table[2].startswith("| upsample_add | auto->cpp | 300 | 500 | 200 | 300 | 500 | 200 | bare add |")
