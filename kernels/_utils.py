"""Host-side helpers shared by every Triton launcher: the layout rule, the int64-offset rule, the bilinear scale,
launch-size helpers and the interpreter switch.

This module imports no Triton, so the ops layer can ask ``interpreting()`` and the layout rule on a machine
without Triton. Kernel modules import from here and from each other, never from the ``upernet_fast`` ops layer above them, so
that ``kernels/`` can be read, compiled (tests/test_kernels_compile_sm90.py) and reused on its own.
"""

from __future__ import annotations

import os

import numpy as np
import torch

INT32_MAX = 2**31 - 1
MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid axis 0


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` (B, C, H, W) is stored channels-last: PyTorch's ``suggest_memory_format`` rule.

    Strides must not decrease in the order C, W, H, N (each step at least the previous stride times that
    dimension's size), with PyTorch's tie-break towards NCHW when the batch stride equals the channel
    stride's span (ambiguous size-1 cases). Sliced views keep their layout: a channels_last tensor sliced
    in any dimension is still channels-last, an NCHW one sliced every other column is not. Outputs and
    gradients made for ``t`` are allocated in this layout, which is the layout PyTorch's own
    ``interpolate``, ``adaptive_avg_pool2d`` and ``batch_norm`` give them, and tiles run along the layout's
    innermost dimension (C when channels-last, W otherwise).
    """
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    floor = 0
    for d in (1, 3, 2, 0):
        if strides[d] < floor:
            return False
        if d == 0 and floor == strides[1]:
            return False
        floor = strides[d] * max(sizes[d], 1)
    return True


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset of any tensor (strided views included) can reach int32's limit: then the
    kernels compute offsets in int64."""
    for t in tensors:
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        if span >= INT32_MAX or t.numel() >= INT32_MAX:
            return True
    return False


def axis_scale(n_in: int, n_out: int) -> float:
    """``(float)n_in / n_out`` in float32, as PyTorch's ``area_pixel_compute_scale`` (exact as a Python float)."""
    return float(np.float32(n_in) / np.float32(n_out))


def axis_inverse_scale(n_in: int, n_out: int) -> float:
    """``n_out / n_in``: only used to estimate the gather ranges, which are then corrected exactly."""
    return float(np.float32(n_out) / np.float32(n_in))


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as ``triton.next_power_of_2``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def pow2_at_most(n: int, cap: int) -> int:
    """The next power of two of ``n`` (at least 1), capped at ``cap``: a block size for a dimension of size n."""
    return min(next_power_of_2(n), cap)


def checked_grid(programs: int, op: str) -> int:
    """``programs`` as a grid size, or a clear error when one launch cannot hold that many programs."""
    if programs > MAX_PROGRAMS:
        raise ValueError(f"{op}: {programs} programs exceed one launch's grid (2**31 - 1)")
    return programs


def elementwise_block(numel: int) -> int:
    """Elements per program of a flat elementwise pass (smaller under the interpreter, which pays per element
    of a block in Python)."""
    return min(1024 if interpreting() else 2048, max(16, next_power_of_2(numel)))
