"""When the Triton backend can run: shared ``why_unavailable`` / ``why_not`` pieces for every Triton op."""

from __future__ import annotations

import os

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_import_result: list[str | None] = []  # filled once; a plain list, not lru_cache, so torch.compile traces it


def _import_error() -> str | None:
    if not _import_result:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _import_result.append(None)
        except Exception as exc:  # ImportError, or a broken install raising something else
            _import_result.append(f"triton is not importable ({type(exc).__name__}: {exc})")
    return _import_result[0]


def triton_unavailable() -> str | None:
    """Process-wide reason the Triton backend cannot run at all, or None."""
    error = _import_error()
    if error:
        return error
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on CPU tensors)"
    return None


def triton_why_not(*tensors: torch.Tensor) -> str | None:
    """Why Triton cannot take these tensors (device and dtype), or None."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu":
            if not interpreting():
                return "CPU tensors run on Triton only under TRITON_INTERPRET=1"
            continue
        return f"Triton kernels take CUDA tensors, got a {t.device.type} tensor"
    for t in tensors:
        if t.is_floating_point() and t.dtype not in TRITON_DTYPES:
            return f"Triton kernels take float32/float16/bfloat16, got {t.dtype}"
    return None
