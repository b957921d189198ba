"""The GPU session's dry run: ``UPERNET_FAST_GPU_DRY_RUN=1 bash .ci/gpu-session`` runs every stage of the real
GPU check (same commands, flags, test selection, bench arguments, packing) on the CPU with Triton under its
interpreter and toy sizes. Whatever would make the one GPU call fail for a trivial reason (an import, a path, a
flag, a missing package, the file count) fails here first.

One dry run (about two minutes on a busy 2-core machine) feeds every test below."""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not installed (as in test_benchmarks.py)
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.results import CEILING_OPS  # noqa: E402

SCRIPT = REPO_ROOT / ".ci" / "gpu-session"
STAGES = ("env", "selfcheck", "memcheck", "tests", "bench-ops", "bench-e2e", "pack")
OUT_FILES = {"status.txt", "log.txt", "gpu-session.tgz"}
MAX_OUT_FILES = 8  # what the device tool brings back
MAX_FILE_BYTES = 16 * 2**20
COMMIT = "0123456789ab"


def _session_limit(dry: bool) -> int:
    """SESSION_LIMIT_S of the script: 480 on the GPU, the dry run's own below it (read, not copied)."""
    text = SCRIPT.read_text()
    values = re.findall(r"^\s*SESSION_LIMIT_S=(\d+)", text, re.M)
    assert len(values) == 2, values
    return int(values[1] if dry else values[0])


DRY_RUN_BUDGET_S = _session_limit(dry=True)
TEST_SHARDS = int(re.findall(r"TEST_SHARDS=(\d+)", SCRIPT.read_text())[0])  # the dry run's, set first


def run_session(out: Path, **extra_env) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OUT=str(out), UPERNET_FAST_GPU_DRY_RUN="1", PYTHON=sys.executable,
               UPERNET_FAST_GIT_COMMIT=COMMIT, **extra_env)
    env.pop("TRITON_INTERPRET", None)  # the script sets what each run needs
    start = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=DRY_RUN_BUDGET_S + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the stages run in their own process groups under timeout
        output, _ = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, output), time.monotonic() - start


def parse_status(text: str) -> dict[str, dict]:
    stages = {}
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(passed|failed|timed out|skipped|not run)\s+(\S+)\s+([\d.]+)\s+(\d+)\s*(.*)$", line)
        if m:
            stages[m[1]] = dict(verdict=m[2], rc=m[3], seconds=float(m[4]), limit=int(m[5]), note=m[6])
    return stages


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_out")
    proc, elapsed = run_session(out)
    return proc, elapsed, out


def test_every_stage_ran_and_passed(dry_run):
    proc, _, out = dry_run
    status = (out / "status.txt").read_text()
    stages = parse_status(status)
    assert tuple(stages) == STAGES, status
    for name, s in stages.items():
        # No compute-sanitizer on a CPU machine: the only stage a dry run may skip.
        expected = "skipped" if name == "memcheck" else "passed"
        assert s["verdict"] == expected, (name, s, proc.stdout[-3000:])
    assert "ALL PASSED" in status.splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"commit: {COMMIT}" in status


def test_out_holds_few_nonempty_files(dry_run):
    _, _, out = dry_run
    files = sorted(p for p in out.rglob("*"))
    assert {p.name for p in files} == OUT_FILES
    assert len(files) <= MAX_OUT_FILES
    for p in files:
        assert p.is_file() and 0 < p.stat().st_size <= MAX_FILE_BYTES, p


def test_dry_run_stays_within_its_budget(dry_run):
    _, elapsed, out = dry_run
    assert elapsed < DRY_RUN_BUDGET_S, f"dry run took {elapsed:.0f}s, budget {DRY_RUN_BUDGET_S}s"
    stages = parse_status((out / "status.txt").read_text())
    for name, s in stages.items():
        assert s["seconds"] <= s["limit"], (name, s)


def test_real_session_limits_fit_eight_minutes():
    """The GPU run's stage limits add up to at most its 8-minute session limit (and the command line of a
    device call to far less than 2,000 characters)."""
    assert _session_limit(dry=False) == 480
    # The stage limits are set twice, dry run first: "L_ENV=... L_E2E=... E2E_BUDGET=..." then "L_PACK=...".
    blocks = re.findall(r"^\s*(L_ENV=[^\n]*\n[^\n]*L_PACK=\d+)", SCRIPT.read_text(), re.M)
    assert len(blocks) == 2, blocks
    limits = {k: int(v) for k, v in re.findall(r"\b(L_[A-Z0-9]+)=(\d+)", blocks[1])}
    assert set(limits) == {"L_ENV", "L_SELFCHECK", "L_MEMCHECK", "L_TESTS", "L_OPS", "L_E2E", "L_PACK"}, limits
    assert sum(limits.values()) <= 480, limits
    assert len("UPERNET_FAST_GIT_COMMIT=0123456789ab-dirty bash .ci/gpu-session") < 2000


def _tar(out: Path) -> tarfile.TarFile:
    return tarfile.open(out / "gpu-session.tgz")


def test_tarball_has_rows_plots_logs_and_junit(dry_run):
    _, _, out = dry_run
    with _tar(out) as tar:
        names = set(tar.getnames())
        for suite in ("ops", "e2e"):
            for suffix in (".csv", ".md", "_speedup.png", "_roofline.png", "_memory.png"):
                assert f"benchmarks/results/{suite}_cpu{suffix}" in names, (suite, suffix, sorted(names))
        for stage in STAGES:
            if stage != "memcheck":
                assert f"gpu-session/logs/{stage}.log" in names, stage
        assert "gpu-session/status.txt" in names
        rows = {suite: list(csv.DictReader(io.TextIOWrapper(tar.extractfile(f"benchmarks/results/{suite}_cpu.csv"))))
                for suite in ("ops", "e2e")}
    for suite, suite_rows in rows.items():
        assert suite_rows, suite
        for r in suite_rows:
            assert r["git_commit"] == COMMIT, r
            assert not r["note"].startswith("failed: "), r
            assert r["p50_ms"] or r["note"].startswith("skipped: "), r
    ops = [r for r in rows["ops"] if r["op"] not in CEILING_OPS]
    # The headline selection at toy sizes: one case per op, bf16 channels_last.
    assert {r["op"] for r in ops} == {"adaptive_avg_pool_multi", "upsample_add", "upsample_concat",
                                      "upsample_cross_entropy", "conv_bn_relu", "bn_relu"}
    assert all("dry run" in r["shape"] and r["dtype"] == "bf16" and r["layout"] == "channels_last" for r in ops)
    assert {r["provider"] for r in ops} == {"eager", "compile", "triton", "cpp"}
    measured = {r["provider"] for r in ops if r["p50_ms"]}
    assert {"eager", "triton"} <= measured, measured  # Triton timed under the interpreter: the GPU path ran
    e2e_measured = {(r["op"], r["provider"]) for r in rows["e2e"] if r["p50_ms"]}
    assert ("head convnext_t", "reference") in e2e_measured, e2e_measured


def test_env_stage_ran_from_the_staged_checkout(dry_run):
    """No install: the stages import upernet_fast (and kernels/ as upernet_fast.kernels) through the staging
    folder, as on the GPU machine, not through this venv's editable install."""
    _, _, out = dry_run
    log = (out / "log.txt").read_text()
    assert "imported from the staged checkout" in log
    assert "triton" in log and "upsample_add" in log  # `upernet-fast info` printed its table


def test_selfcheck_covered_every_op_dtype_and_layout(dry_run):
    _, _, out = dry_run
    log = (out / "log.txt").read_text()
    checked = re.findall(r"^(\S+(?: \(eval\))?)\s+(fp32|bf16)\s+(nchw|channels_last)\s+triton vs eager on cpu: ok", log,
                         re.M)
    assert len(checked) == 7 * 2 * 2, checked
    assert "selfcheck: 0 failure(s)" in log


def test_tests_stage_selected_gpu_and_kernel_tests_only(dry_run):
    """The test stage's selection collects here: kernel test files and GPU-marked tests, nothing from the slow or
    CPU-only files; tests ran until the stage's budget and the rest were skipped with that reason."""
    _, _, out = dry_run
    with _tar(out) as tar:
        reports = [m for m in tar.getnames() if re.fullmatch(r"gpu-session/junit-\d+\.xml", m)]
        assert len(reports) == TEST_SHARDS, reports
        cases = [c for m in reports for c in ET.parse(tar.extractfile(m)).getroot().iter("testcase")]

    def test_file(case):  # classname "tests.test_upsample_add" or "tests.test_x.TestClass"
        return next((part for part in case.get("classname").split(".") if part.startswith("test_")), "")

    files = {test_file(c) for c in cases}
    assert {"test_upsample_add", "test_conv_bn_relu", "test_model_triton", "test_benchmarks"} <= files, files
    assert not files & {"test_model", "test_kernels_compile_sm90", "test_cli", "test_model_compile",
                        "test_conv_bn_relu_sync", "test_gpu_session", "test_reference"}, files
    bench = [c for c in cases if test_file(c) == "test_benchmarks"]
    assert [c.get("name") for c in bench] == ["test_cuda_quick_ops_run"]  # GPU-marked only
    ran = [c for c in cases if c.find("skipped") is None and c.find("failure") is None and c.find("error") is None]
    assert ran, "no test ran inside the stage's budget"
    assert not [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
