"""Time and peak-memory measurement shared by the demo and the benchmarks (CUDA and CPU)."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device | str, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` for each of ``repeats`` runs after ``warmup`` runs, synchronised."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def rotated(items, round_: int) -> list:
    """``items`` in round ``round_``'s order when several things are timed in interleaved rounds: rotated by one each
    round, so that each takes every position in turn and a shared machine's slow phase falls on all alike."""
    items = list(items)
    shift = round_ % len(items) if items else 0
    return items[shift:] + items[:shift]


QUANTILES = (0.2, 0.5, 0.8)


def quantiles(samples: list[float], qs=QUANTILES) -> list[float]:
    """Linear-interpolation quantiles (numpy's default), so p20 <= p50 <= p80 by construction."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("no samples")
    out = []
    for q in qs:
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return out


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device | str, setup: Callable[[], object] | None = None, cpu: bool = True
) -> tuple[float | None, float | None]:
    """(peak MiB PyTorch allocates while ``fn()`` runs above what was allocated before, that baseline in MiB).

    ``setup()`` runs first, outside the measurement. CUDA: the caching allocator's ``max_memory_allocated``.
    CPU: PyTorch keeps no allocator statistics there; with ``cpu=True`` the profiler records every allocation
    and free with the running total of CPU tensor bytes after it (``_cpu_allocation_peak``), and the peak is the
    largest total over what it was when ``fn`` started: tensors PyTorch allocates, not the process's resident
    memory; the baseline is None. With ``cpu=False`` both are None (the benchmarks invent no CPU number).
    """
    device = torch.device(device)
    if setup is not None:
        setup()
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        del out
        return (peak - base) / 2**20, base / 2**20
    if not cpu:
        return None, None
    from torch.profiler import ProfilerActivity, profile

    with _without_profiler_banners(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _cpu_allocation_peak(prof) / 2**20, None


def _cpu_allocation_peak(prof) -> int:
    """Peak bytes of CPU tensors allocated during a profiler session, above what was allocated at its start.

    Each allocation record carries the allocator's running total after it, so the peak is exact: a free inside
    an op counts where it happens. (Summing each op's net allocation at the op's start, as this function once
    did, credits a backward node's frees before its allocations and undercounted the demo's training peak by
    about a quarter: 445 against a true 584 MiB.) The records come from the profiler's event tree
    (``torch.profiler._memory_profiler`` reads the same). Frees of blocks allocated before any profiling have no
    known size and count as nothing, so the peak can only be overstated by them, never understated.
    """
    from torch._C._profiler import _EventType

    records = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            records.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    if not records:
        return 0
    records.sort(key=lambda r: r[0])
    _, first_size, first_total = records[0]
    start = first_total - first_size  # the running total just before the session's first allocation or free
    return max(0, max(total for _, _, total in records) - start)


def peak_memory_so_far_mb(device: torch.device) -> float:
    """Peak memory of the process so far: CUDA, the caching allocator's peak of allocated tensors; CPU, the
    process's peak resident set (tensors plus everything else the process holds: the only peak the CPU offers)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux reports KiB


@contextlib.contextmanager
def _without_profiler_banners():
    """The CPU profiler's C++ side prints ``USDT: ... profiler_start`` / ``profiler_stop`` lines (and others, see
    ``_profiler_banner``) straight to file descriptor 2 on every session, with no switch to turn them off:
    capture fd 2 while it runs and pass on every other line."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _profiler_banner(line):
                    sys.stderr.write(line)


def _profiler_banner(line: str) -> bool:
    # "USDT: ... profiler_start", "STAGE: ... Warm Up", and the allocator's note on blocks allocated before the
    # session ("[W... CPUAllocator.cpp] Memory block of unknown size was allocated before the profiling started").
    return line.startswith(("USDT:", "STAGE:")) or (line.startswith("[W") and "before the profiling started" in line)



def saved_activation_mb(fn: Callable[[], object]) -> float:
    """MiB of distinct storages that autograd saves for backward while ``fn()`` runs.

    Leaves that require grad (parameters, the inputs being differentiated) are not activations and are not
    counted; a storage saved by several ops (a block's output that the next conv also saves) counts once.
    Device-independent: what is saved does not depend on the machine, only on the code path and dtypes.
    """
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.requires_grad and t.grad_fn is None):
            storage = t.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values()) / 2**20
