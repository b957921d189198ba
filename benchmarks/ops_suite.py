"""Kernel microbenchmarks: every fused op, each provider, each mode, next to the measured ceilings.

Providers:
* ``eager``: the op's public entry point with ``backend="eager"`` (PyTorch reference; what users run today);
* ``compile``: ``torch.compile`` of the reference function (``upernet_fast.reference``), the strongest peer;
* ``triton`` / ``cpp``: the op with that backend, when ``upernet_fast.backend`` has it registered and says it
  can take these inputs. Triton on CPU tensors (the interpreter) is never timed.
A provider that is not run still gets a row, whose note says why.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable

import torch

from benchmarks import measure
from benchmarks.bytes_model import OPS, op_bytes, op_flops, op_module
from benchmarks.op_bench import Built
from benchmarks.results import FAILED_PREFIX, SKIPPED_PREFIX, make_row
from benchmarks.shapes import OpCase, gpu_dry_run, ops_plan, toy_sizes
from upernet_fast.measure import peak_memory_mb, rotated

PROVIDERS = ("eager", "compile", "triton", "cpp")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build(case: OpCase, dtype: torch.dtype, layout: str, device: str) -> Built:
    return op_module(case.op).build(case.params, dtype, layout, device)


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else list(out)


def provider_skip_reason(op: str, provider: str, device: str, built: Built) -> str | None:
    """Why ``provider`` cannot be timed on these inputs (from upernet_fast.backend), or None."""
    from upernet_fast import backend

    status = {(r["op"], r["backend"]): r for r in backend.describe()}.get((op, provider))
    if status is None or status["status"] == "absent":
        return f"no {provider} implementation of {op} is registered"
    if status["status"] != "available":
        return f"{provider} backend unavailable: {status['why']}"
    if provider == "triton" and device != "cuda" and not gpu_dry_run():
        return ("Triton on CPU tensors runs only in the interpreter (TRITON_INTERPRET=1), a correctness tool whose "
                "timings say nothing about kernel speed: not benchmarked")
    try:
        backend.select(op, provider, *built.select_args)
    except RuntimeError as exc:
        return str(exc)
    return None


@dataclass
class Options:
    device: str
    shape_set: str
    cpu_compile: bool = False
    deadline: float = float("inf")  # time.monotonic() after which remaining cases are recorded as skipped
    providers: tuple[str, ...] = PROVIDERS
    ops: tuple[str, ...] | None = None
    log: Callable[[str], None] = print
    emit: Callable[[list[dict]], None] | None = None  # gets each case's rows as soon as they exist (run.py saves them)


def compile_skip_reason(case: OpCase, opts: Options) -> str | None:
    if opts.device == "cpu" and not opts.cpu_compile and not gpu_dry_run():
        return ("torch.compile not run on CPU by default: Inductor's C++ build takes tens of seconds per graph on a "
                "2-core machine (--cpu-compile includes it)")
    if opts.shape_set == "quick":
        return "--quick: torch.compile not run (compiling alone exceeds the one-minute budget)"
    if not case.primary:
        return "sweep case: torch.compile is measured on the headline workload only (8-minute budget)"
    return None


# CPU runs time their providers in this many interleaved rounds (see run_case).
CPU_ROUNDS = 3


def _interleaves(device: str, shape_set: str, providers: tuple[str, ...]) -> bool:
    """Whether run_case times its providers in interleaved rounds: on the CPU (a shared VM, whose speed moves by
    phases of seconds: timed one after another, eager and cpp rows of the same code moved up to 2x apart between
    runs), with two providers or more, at real sizes."""
    return device == "cpu" and not toy_sizes(shape_set) and len(providers) > 1


def _timer(device: str, shape_set: str, rounds: int = 1):
    """The timer of one case. ``rounds`` > 1 (CPU): each call times for 1/rounds of the budget and pools its samples
    with the earlier calls' under the same key (provider, mode); the Timing returned covers every round so far."""
    quick = shape_set != "full"
    pool: dict = {}

    def run(fn, setup, leaves, key=None):
        if device == "cuda":
            return measure.time_do_bench(fn, grad_to_none=leaves, warmup_ms=10 if quick else 25,
                                         rep_ms=40 if quick else 100)
        if toy_sizes(shape_set):  # the harness's own tests, the GPU dry run: the fewest samples that still time
            return measure.time_cpu(fn, setup=setup, warmup=0 if gpu_dry_run() else 1, budget_s=0.01,
                                    min_repeats=1 if gpu_dry_run() else 3)
        budget = 0.05 if quick else 0.3
        if rounds == 1:
            return measure.time_cpu(fn, setup=setup, budget_s=budget, min_repeats=5)
        timing = measure.time_cpu(fn, setup=setup, budget_s=budget / rounds, min_repeats=2)
        samples = pool.setdefault(key, [])
        samples += timing.values
        p20, p50, p80 = measure.quantiles(samples)
        return measure.Timing(p20, p50, p80, len(samples), f"perf_counter, providers interleaved in {rounds} rounds",
                              tuple(samples))
    return run


def run_case(case: OpCase, dtype_name: str, layout: str, modes: tuple[str, ...], providers: tuple[str, ...],
             opts: Options, ceilings: measure.Ceilings, stamp: dict) -> list[dict]:
    dtype = DTYPES[dtype_name]
    base = dict(suite="ops", op=case.op, shape=case.shape, dtype=dtype_name, layout=layout)
    built = build(case, dtype, layout, opts.device)
    # Interleaved (CPU, several providers): every provider's modes in turn, CPU_ROUNDS times, the order rotated each
    # round; each row's timing pools its rounds' samples, and the last round's rows (peak memory, notes) are kept.
    reasons = {provider: _skip_reason(case, provider, opts, built) for provider in providers}  # once, not per round
    rounds = CPU_ROUNDS if _interleaves(opts.device, opts.shape_set, providers) else 1
    timer = _timer(opts.device, opts.shape_set, rounds)
    for r in range(rounds):
        rows = _run_providers(case, dtype_name, dtype, layout, modes, rotated(providers, r), reasons, opts, ceilings,
                              stamp, base, built, timer)
    return sorted(rows, key=lambda row: (providers.index(row["provider"]), modes.index(row["mode"])))


def _skip_reason(case: OpCase, provider: str, opts: Options, built: Built) -> str | None:
    if provider == "compile":
        reason = compile_skip_reason(case, opts)
    elif provider == "eager":
        reason = None
    else:
        reason = provider_skip_reason(case.op, provider, opts.device, built)
    if reason is None and time.monotonic() > opts.deadline:
        reason = "time budget used up before this case (see --budget-s)"
    return reason


def _run_providers(case, dtype_name, dtype, layout, modes, providers, reasons, opts, ceilings, stamp, base, built,
                   timer):
    rows = []
    for provider in providers:
        reason = reasons[provider]
        if reason is not None:
            rows += [make_row(stamp, **base, provider=provider, mode=m, note=SKIPPED_PREFIX + reason) for m in modes]
            continue
        try:
            call = _make_call(built, provider)
        except Exception as exc:  # a compile or kernel failure is a result too: record it
            rows += [make_row(stamp, **base, provider=provider, mode=m, note=FAILED_PREFIX + _short(exc)) for m in modes]
            continue
        grad_graph_compiled = False  # the first grad-mode call compiles the joint graph; later modes reuse it
        for mode in modes:
            opts.log(f"[ops] {case.op} {case.name} {dtype_name} {layout} {provider} {mode}")
            try:
                rows.append(_measure_mode(built, call, mode, case, dtype, opts.device, timer, ceilings, stamp, base,
                                          provider, mode == "inference" or not grad_graph_compiled))
            except Exception as exc:
                rows.append(make_row(stamp, **base, provider=provider, mode=mode, note=FAILED_PREFIX + _short(exc)))
            grad_graph_compiled = grad_graph_compiled or mode != "inference"
    return rows


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


def _make_call(built: Built, provider: str) -> Callable:
    if provider != "compile":
        return lambda: built.public(*built.args, backend=provider)
    measure.fresh_compile_cache()
    compiled = torch.compile(built.reference, dynamic=False, backend=measure.compile_backend())
    return lambda: compiled(*built.args)


def _measure_mode(built, call, mode, case, dtype, device, timer, ceilings, stamp, base, provider, report_compile):
    def amp():
        if built.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device, dtype=built.autocast)

    def forward():
        with amp():
            return call()

    def zero_grads():
        for t in built.leaves:
            t.grad = None

    if built.module is not None:
        built.module.train(mode != "inference")
    note = []
    if provider == "compile":
        # The first call compiles (a no-grad graph for inference, the joint forward/backward graph otherwise).
        t0 = time.perf_counter()
        with torch.no_grad() if mode == "inference" else contextlib.nullcontext():
            _outputs(forward())
        measure.sync(device)
        if report_compile:
            note.append(f"first call (compile) {time.perf_counter() - t0:.1f}s")

    if mode == "inference":
        def fn():
            with torch.no_grad():
                return forward()
    elif mode == "forward":
        fn = forward
    else:
        outs = _outputs(forward())
        grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs]
        # The gradients are returned (torch.autograd.grad), not accumulated into the leaves' .grad: in the model
        # every input of these ops is an activation whose gradient flows on into the next backward node, whereas
        # accumulating into a fresh .grad copies any gradient the backward passes through unchanged (upsample_add's
        # lateral, upsample_concat's first map, the views of a cat backward): a 32 MB copy, page faults included,
        # that both sides paid and that was most of upsample_add's backward row on the CPU.
        if mode == "backward":
            def fn():
                torch.autograd.grad(outs, built.leaves, grads, retain_graph=True, allow_unused=True)
        else:
            def fn():
                torch.autograd.grad(_outputs(forward()), built.leaves, grads, allow_unused=True)

    timing = timer(fn, zero_grads, built.leaves, key=(provider, mode))
    zero_grads()
    peak, base_mb = peak_memory_mb(fn, device, setup=zero_grads, cpu=False)
    zero_grads()
    if base_mb is not None:
        note.append(f"base {base_mb:.0f} MB")
    note.append(timing.method + (f" n={timing.samples}" if timing.samples else ""))

    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = op_bytes(case.op, case.params, mode, elem)
    gbps = nbytes / (timing.p50 * 1e-3) / 1e9
    flops = op_flops(case.op, case.params, mode)
    tflops = None if flops is None else flops / (timing.p50 * 1e-3) / 1e12
    return make_row(
        stamp, **base, provider=provider, mode=mode, p20_ms=timing.p20, p50_ms=timing.p50, p80_ms=timing.p80,
        gbps=gbps, pct_roofline=100 * gbps / ceilings.copy_gbps,
        tflops=tflops, pct_matmul=None if tflops is None else 100 * tflops / ceilings.matmul_tflops,
        peak_mb=peak, note="; ".join(note),
    )


def ceiling_rows(c: measure.Ceilings, stamp: dict) -> list[dict]:
    common = dict(suite="ops", provider="torch", layout="contiguous", note="ceiling measured in this run")
    return [
        make_row(stamp, **common, op="copy_bandwidth", mode="copy_", shape=f"2 x {c.copy_bytes // 2 // 2**20} MiB",
                 dtype="fp32", p20_ms=c.copy_timing.p20, p50_ms=c.copy_timing.p50, p80_ms=c.copy_timing.p80,
                 gbps=c.copy_gbps, pct_roofline=100.0),
        make_row(stamp, **common, op="matmul_peak", mode="mm", shape=f"{c.matmul_n}^3", dtype=c.matmul_dtype,
                 p20_ms=c.matmul_timing.p20, p50_ms=c.matmul_timing.p50, p80_ms=c.matmul_timing.p80,
                 tflops=c.matmul_tflops, pct_matmul=100.0),
        make_row(stamp, **{**common, "note": "floor measured in this run: every backward row pays it once per call"},
                 op="autograd_floor", mode="autograd.grad", shape="x * 2, one element (one node)", dtype="fp32",
                 p20_ms=c.autograd_timing.p20, p50_ms=c.autograd_timing.p50, p80_ms=c.autograd_timing.p80),
    ]


def run_ops(opts: Options, stamp: dict) -> list[dict]:
    """Ceilings, then every case with the uncompiled providers, then torch.compile (the slow part) case by case,
    so that a run cut short by its budget loses compile rows, not the cheap ones. Rows come back in case order."""
    opts.log("[ops] measuring ceilings (copy bandwidth, matmul)")
    ceilings = measure.measure_ceilings(opts.device, "small" if toy_sizes(opts.shape_set) else "normal")
    emit = opts.emit or (lambda rows: None)
    emit(ceiling_rows(ceilings, stamp))
    entries = [e for e in ops_plan(opts.shape_set, opts.device).entries if opts.ops is None or e[0].op in opts.ops]
    passes = [tuple(p for p in opts.providers if p != "compile")]
    if "compile" in opts.providers:
        passes.append(("compile",))
    per_entry: list[list[dict]] = [[] for _ in entries]
    for providers in passes:
        for i, (case, dtype_name, layout, modes) in enumerate(entries):
            case_rows = run_case(case, dtype_name, layout, modes, providers, opts, ceilings, stamp)
            emit(case_rows)
            per_entry[i] += case_rows
            if opts.device == "cuda":
                torch.cuda.empty_cache()
    order = {p: i for i, p in enumerate(PROVIDERS)}
    rows = ceiling_rows(ceilings, stamp)
    for (case, *_), entry_rows in zip(entries, per_entry):
        rows += sorted(entry_rows, key=lambda r: (case.modes.index(r["mode"]), order.get(r["provider"], 99)))
    return rows
