"""Time and peak-memory measurement shared by the demo and the benchmarks (CUDA and CPU)."""

from __future__ import annotations

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


def peak_memory_mb(fn: Callable[[], object], device: torch.device | str) -> float:
    """Peak bytes allocated by PyTorch while ``fn()`` runs, above what was allocated before, in MiB.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: PyTorch has no allocator statistics there, so
    the profiler's allocation events (each op's own allocations and frees, in time order) are summed; it counts
    tensors PyTorch allocates, not the process's resident memory.
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak / 2**20


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
