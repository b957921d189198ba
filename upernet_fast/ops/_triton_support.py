"""The Triton backend's process-wide availability, and the device guard its kernels run under.

What Triton kernels take (devices, dtypes) is declared as data in ``upernet_fast.backend``."""

from __future__ import annotations

import functools

import torch

from upernet_fast._checks import tensors_in
from upernet_fast.kernels._utils import interpreting

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


def on_input_device(fn):
    """Run a custom op's body with its first tensor argument's CUDA device current.

    Triton launches on the current device and its current stream, and a Python ``torch.library.custom_op``
    (or ``Library.impl``) adds no device guard: without this, tensors on ``cuda:1`` while ``cuda:0`` is
    current would be handed to a kernel running on device 0 (an illegal address, or a race with device 1's stream).
    """

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        first = next((a for a in tensors_in(args) if a.device.type == "cuda"), None)
        if first is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)

    return guarded
