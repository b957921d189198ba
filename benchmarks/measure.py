"""Timers, peak memory, the device's ceilings, and the environment stamp of a run.

CUDA: ``triton.testing.do_bench`` (it flushes L2 before every timed call and times with CUDA events) returns the
20th/50th/80th percentiles; peak memory comes from a separate, untimed call between
``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated``.
CPU: warm-up, then repeated ``time.perf_counter`` samples and the same percentiles. PyTorch's CPU allocator
keeps no peak statistic and ``tracemalloc`` does not see its allocations, so CPU rows record no peak memory.
"""

from __future__ import annotations

import datetime
import inspect
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from benchmarks.shapes import DRY_RUN_COMPILE_BACKEND, gpu_dry_run
from upernet_fast.measure import QUANTILES, quantiles, synchronize
from upernet_fast.kernels._utils import interpreting  # noqa: F401 (re-exported for run.py)

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Timing:
    p20: float
    p50: float
    p80: float
    samples: int
    method: str
    values: tuple = ()  # the CPU timer's samples (ms), for pooling several timings of one call


def sync(device: str) -> None:
    synchronize(device)


def time_cpu(fn: Callable, *, setup: Callable | None = None, warmup: int = 2, min_repeats: int = 5,
             max_repeats: int = 100, budget_s: float = 0.3) -> Timing:
    """Median-style CPU timer: ``setup`` runs before every call, outside the timed region."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() - start < budget_s):
        if setup:
            setup()
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    p20, p50, p80 = quantiles(samples)
    return Timing(p20, p50, p80, len(samples), "perf_counter", tuple(samples))


def time_cuda_events(fn: Callable, *, setup: Callable | None = None, warmup: int = 2, repeats: int = 10) -> Timing:
    """CUDA-event timer with a fixed number of calls, for long calls (a training step) where do_bench's
    time-based repeat count would give one or two samples. ``setup`` runs outside the timed region."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    p20, p50, p80 = quantiles(samples)
    return Timing(p20, p50, p80, len(samples), "cuda events")


def time_do_bench(fn: Callable, *, grad_to_none=None, warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """``triton.testing.do_bench`` percentiles. Its signature has been ``(fn, warmup, rep, grad_to_none,
    quantiles, return_mode)`` through triton 3.x (3.6 on the GPU machine, 3.9 here); only the keywords this
    version has are passed, and a version without ``quantiles`` falls back to ``return_mode="all"``."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    kwargs = {"warmup": warmup_ms, "rep": rep_ms}
    if grad_to_none is not None and "grad_to_none" in params:
        kwargs["grad_to_none"] = grad_to_none
    if "quantiles" in params:
        result = do_bench(fn, quantiles=list(QUANTILES), **kwargs)
        p20, p50, p80 = (float(v) for v in result)
        return Timing(p20, p50, p80, 0, "triton do_bench")
    if params.get("return_mode") is not None:
        samples = [float(v) for v in do_bench(fn, return_mode="all", **kwargs)]
        p20, p50, p80 = quantiles(samples)
        return Timing(p20, p50, p80, len(samples), "triton do_bench (all)")
    raise RuntimeError("this triton's do_bench has neither quantiles nor return_mode")


# ----------------------------------------------------------------------------------------------- ceilings
@dataclass
class Ceilings:
    copy_gbps: float  # from the median copy time
    copy_bytes: int  # bytes read + written by one copy
    copy_timing: Timing
    matmul_tflops: float  # from the median matmul time
    matmul_n: int
    matmul_dtype: str
    matmul_timing: Timing
    autograd_timing: Timing  # torch.autograd.grad through a one-element graph of one node (autograd_floor)


def autograd_floor_call(device: str) -> Callable[[], object]:
    """The call :func:`autograd_floor` times: ``torch.autograd.grad`` of a one-element ``x * 2`` (one multiply node,
    one element), for timers that interleave it with other calls (``benchmarks.backward_chain``)."""
    leaf = torch.ones(1, device=device, requires_grad=True)
    out = leaf * 2
    grad = torch.ones_like(out)
    return lambda: torch.autograd.grad(out, [leaf], grad, retain_graph=True)


def autograd_floor(device: str) -> Timing:
    """What ``torch.autograd.grad`` costs before any kernel of consequence runs (:func:`autograd_floor_call`). Every
    backward row pays it once per call, whatever the op: on the small maps' rows it is a large share of both sides'
    time, and it bounds the speed-up any kernel can show there."""
    call = autograd_floor_call(device)
    if device == "cuda":
        return time_do_bench(call, warmup_ms=25, rep_ms=100)
    return time_cpu(call, warmup=50, min_repeats=200, max_repeats=2000, budget_s=0.2)


def measure_ceilings(device: str, size: str) -> Ceilings:
    """Copy bandwidth (``dst.copy_(src)``, bytes read + written), dense matmul throughput and the fixed cost of
    ``torch.autograd.grad`` (:func:`autograd_floor`), measured now.

    CUDA: 1 GiB buffers and a bf16 8192^3 matmul. CPU: fp32, 64 MiB and 1024^3 (``size="small"``: 8 MiB and
    256^3, for the tests)."""
    if device == "cuda":
        nbytes, n, dtype = 2**30, 8192, torch.bfloat16
    elif size == "small":
        nbytes, n, dtype = 2**23, 256, torch.float32
    else:
        nbytes, n, dtype = 2**26, 1024, torch.float32
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    if device == "cuda":
        copy_t = time_do_bench(lambda: dst.copy_(src), warmup_ms=25, rep_ms=200)
        mm_t = time_do_bench(lambda: torch.mm(a, b), warmup_ms=25, rep_ms=200)
    else:
        copy_t = time_cpu(lambda: dst.copy_(src), budget_s=0.3)
        mm_t = time_cpu(lambda: torch.mm(a, b), budget_s=0.5)
    moved = 2 * nbytes
    flops = 2 * n**3
    return Ceilings(
        copy_gbps=moved / (copy_t.p50 * 1e-3) / 1e9, copy_bytes=moved, copy_timing=copy_t,
        matmul_tflops=flops / (mm_t.p50 * 1e-3) / 1e12, matmul_n=n,
        matmul_dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype], matmul_timing=mm_t,
        autograd_timing=autograd_floor(device),
    )


# ---------------------------------------------------------------------------------------------- environment
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return "absent"


GIT_COMMIT_ENV = "UPERNET_FAST_GIT_COMMIT"


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), or ``UPERNET_FAST_GIT_COMMIT`` where it is set:
    a copy of the working tree without ``.git`` (the lent GPU machine's) is told its commit that way."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def run_stamp(device: str) -> dict[str, str]:
    """Columns shared by every row of one run; ``date`` (UTC, to the second) also identifies the run."""
    return {
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "triton_version": triton_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def compile_backend() -> str:
    """``torch.compile``'s backend for the ``compile`` providers: Inductor, except in the GPU session's dry run
    (``shapes.gpu_dry_run``), where ``aot_eager`` traces the same graphs without Inductor's C++ build."""
    return DRY_RUN_COMPILE_BACKEND if gpu_dry_run() else "inductor"


def fresh_compile_cache() -> None:
    """Empty dynamo's cache and raise its recompile limit before compiling a new case: past the limit (8 by
    default, per code object) dynamo silently runs eager, which would make "compile" rows eager rows."""
    import torch._dynamo

    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
