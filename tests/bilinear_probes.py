"""Probes of the bilinear kernels' index rule (kernels/_bilinear.py), for tests: the rule as the kernels compute it
on a device, exposed as plain tensors (tests/test_upsample_add.py builds its brute force from them)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from upernet_fast.kernels import _bilinear as bl
from upernet_fast.kernels import _utils as u


@triton.jit
def _gather_range_kernel(n_in_ptr, n_out_ptr, i_ptr, scale_ptr, inverse_ptr, lo_ptr, hi_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    n_in = tl.load(n_in_ptr + offs, mask=ok, other=1)
    n_out = tl.load(n_out_ptr + offs, mask=ok, other=1)
    i = tl.load(i_ptr + offs, mask=ok, other=0)
    scale = tl.load(scale_ptr + offs, mask=ok, other=1.0)
    inverse = tl.load(inverse_ptr + offs, mask=ok, other=1.0)
    lo, hi = bl.gather_range(i, scale, inverse, n_in, n_out)
    tl.store(lo_ptr + offs, lo, mask=ok)
    tl.store(hi_ptr + offs, hi, mask=ok)


@triton.jit
def _source_index_kernel(i0_ptr, n_in, n_out, scale, BLOCK: tl.constexpr):
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    i0, _, _, _ = bl.source_index(d, scale, n_in)
    tl.store(i0_ptr + d, i0, mask=d < n_out)


def source_indices(n_in: int, n_out: int, device: torch.device | str) -> torch.Tensor:
    """i0 of every output index of an axis resized n_in -> n_out, as the kernels compute it on ``device``.

    On a GPU the compiler contracts ``(d + 0.5) * scale - 0.5`` into one fused multiply-add
    (as nvcc does in PyTorch's own CUDA upsample kernels), which can move an output that sits exactly on an
    input boundary (3 -> 19: output 9) to the neighbouring input; the gather ranges must follow the rule of the
    device they run on, so tests build their brute force from this.
    """
    i0 = torch.empty(n_out, dtype=torch.int32, device=device)
    block = 1024
    _source_index_kernel[(triton.cdiv(n_out, block),)](i0, n_in, n_out, u.axis_scale(n_in, n_out), BLOCK=block)
    return i0


def gather_ranges(n_in: torch.Tensor, n_out: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' [lo, hi) output ranges for each (n_in, n_out, input index) triple (int32 1D tensors).

    Tests check ``gather_range`` against a brute force over the index rule.
    """
    scale = torch.tensor([u.axis_scale(a, b) for a, b in zip(n_in.tolist(), n_out.tolist())], dtype=torch.float32)
    inverse = torch.tensor(
        [u.axis_inverse_scale(a, b) for a, b in zip(n_in.tolist(), n_out.tolist())], dtype=torch.float32
    )
    scale, inverse = scale.to(n_in.device), inverse.to(n_in.device)
    lo = torch.empty_like(index)
    hi = torch.empty_like(index)
    block = 1024
    _gather_range_kernel[(triton.cdiv(index.numel(), block),)](
        n_in, n_out, index, scale, inverse, lo, hi, index.numel(), BLOCK=block
    )
    return lo, hi
