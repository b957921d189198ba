"""When the Triton backend can run: shared ``why_unavailable`` / ``why_not`` pieces for every Triton op."""

from __future__ import annotations

import functools
import inspect
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


def on_input_device(fn):
    """Run a custom op's body with its first tensor argument's CUDA device current.

    Triton launches on the current device and its current stream, and a Python ``torch.library.custom_op``
    adds no device guard: without this, tensors on ``cuda:1`` while ``cuda:0`` is current would be handed to
    a kernel running on device 0 (an illegal address, or a race with device 1's stream).
    """

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        first = next((a for a in _tensors_in(args) if a.device.type == "cuda"), None)
        if first is None:
            return fn(*args, **kwargs)
        with torch.cuda.device(first.device):
            return fn(*args, **kwargs)

    # custom_op infers the op schema from the signature, evaluating string annotations (PEP 563) in the
    # function's module: give the wrapper the original's signature with its annotations already evaluated.
    guarded.__signature__ = inspect.signature(fn, eval_str=True)
    return guarded


def _tensors_in(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def forbid_double_backward(backward_op, op_name: str) -> None:
    """Give a Triton backward op an autograd formula that says plainly why it cannot be differentiated.

    The backward kernels are first-order only. Without this, ``create_graph=True`` followed by a second
    backward fails with PyTorch's generic "no autograd formula was registered".
    """

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"upernet_fast: {op_name}'s Triton backward has no backward of its own (double backward, e.g. a "
            f"gradient penalty, is not supported there); run {op_name} with backend='eager' for higher-order "
            "gradients"
        )

    backward_op.register_autograd(refuse, setup_context=lambda ctx, inputs, output: None)
