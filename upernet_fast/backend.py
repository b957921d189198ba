"""The one place that decides which implementation of an op runs.

Every op (``adaptive_avg_pool_multi``, ``upsample_add``, ...) has an ``"eager"`` implementation (the pure
PyTorch reference, always available) and may have ``"triton"`` and ``"cpp"`` ones. Each implementation says
*why* it cannot run, at two levels:

* ``why_unavailable()``: process-wide (triton not importable, extension not built, ...);
* ``why_not(*args, **kwargs)``: for one call's inputs (device, dtype, layout, ...).

Selection for one call, in this order:

1. the call's own ``backend=`` argument when it is not ``"auto"``;
2. else the process-wide override: :func:`set_backend` or the environment variable ``UPERNET_FAST_BACKEND``;
3. else ``"auto"``: the fastest implementation that can take the inputs. CUDA inputs prefer triton, then
   cpp, then eager; CPU inputs prefer cpp, then eager (Triton on CPU only runs under the interpreter, which
   is a correctness tool, not a fast path, so ``auto`` never picks it there).

A backend that was asked for by name and cannot run raises with its reasons. ``auto`` falling back from a
preferred backend that should have applied (for example triton refusing a CUDA float64 input) warns once per
(op, backend, reason).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("eager", "triton", "cpp")
AUTO = "auto"
ENV_VAR = "UPERNET_FAST_BACKEND"

# Preference of "auto" by the device type of the inputs.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "eager"), "cpu": ("cpp", "eager")}
_AUTO_ORDER_OTHER = ("eager",)


def _never(*args, **kwargs) -> str | None:
    return None


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op. ``fn`` takes the op's arguments, without ``backend``."""

    op: str
    backend: str
    fn: Callable
    why_unavailable: Callable[[], str | None] = _never
    why_not: Callable[..., str | None] = _never

    def reason(self, *args, **kwargs) -> str | None:
        """Why this implementation cannot take these inputs, or None when it can."""
        return self.why_unavailable() or self.why_not(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_override: str | None = None
_warned: set[tuple[str, str, str]] = set()


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    why_unavailable: Callable[[], str | None] | None = None,
    why_not: Callable[..., str | None] | None = None,
) -> Implementation:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (re-registering replaces)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = Implementation(op, backend, fn, why_unavailable or _never, why_not or _never)
    _REGISTRY.setdefault(op, {})[backend] = impl
    return impl


def ops() -> list[str]:
    """Names of the registered ops."""
    _load_ops()
    return sorted(_REGISTRY)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name not in (AUTO,) + BACKENDS:
        raise ValueError(f"{what} must be one of {(AUTO,) + BACKENDS}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force one backend for every op in this process; ``None`` or ``"auto"`` restores automatic choice.

    Takes precedence over ``UPERNET_FAST_BACKEND``; a call's own ``backend=`` argument takes precedence over it.
    """
    global _override
    _override = None if name is None else _check_name(name, "set_backend(name)")


def get_backend() -> str:
    """The process-wide choice in force: the :func:`set_backend` value, else the env var, else ``"auto"``."""
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, f"environment variable {ENV_VAR}") if env else AUTO


def _device_type(args, kwargs) -> str:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return item.device.type
    return "cpu"


def _warn_once(op: str, backend: str, reason: str, chosen: str) -> None:
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"upernet_fast: {op} falls back from {backend} to {chosen}: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def select(op: str, backend: str, *args, **kwargs) -> Implementation:
    """The implementation of ``op`` that runs for these inputs (see the module docstring for the rules)."""
    _load_ops()
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    requested = _check_name(backend, "backend")
    if requested == AUTO:
        requested = get_backend()
    if requested != AUTO:
        impl = impls.get(requested)
        if impl is None:
            raise RuntimeError(
                f"backend={requested!r} was asked for, but {op} has no {requested} implementation "
                f"(it has: {sorted(impls)})"
            )
        reason = impl.reason(*args, **kwargs)
        if reason is not None:
            raise RuntimeError(f"backend={requested!r} was asked for, but it cannot run {op} here: {reason}")
        return impl
    device = _device_type(args, kwargs)
    skipped: list[tuple[str, str]] = []
    for name in _AUTO_ORDER.get(device, _AUTO_ORDER_OTHER):
        impl = impls.get(name)
        if impl is None:
            continue
        reason = impl.reason(*args, **kwargs)
        if reason is None:
            for skipped_name, skipped_reason in skipped:
                _warn_once(op, skipped_name, skipped_reason, name)
            return impl
        # A backend that is simply not installed or built is expected on many machines: not a fallback
        # worth a warning. A backend that is present but refuses these inputs is.
        if impl.why_unavailable() is None:
            skipped.append((name, reason))
    raise RuntimeError(f"no backend can run {op} on these inputs")  # unreachable: eager takes everything


def describe() -> list[dict[str, str]]:
    """One row per (op, backend): whether it is available in this process, and why not."""
    _load_ops()
    rows = []
    for op in sorted(_REGISTRY):
        for name in BACKENDS:
            impl = _REGISTRY[op].get(name)
            if impl is None:
                status, why = "absent", "not implemented in this version"
            else:
                why = impl.why_unavailable()
                status = "available" if why is None else "unavailable"
                why = why or ""
            rows.append({"op": op, "backend": name, "status": status, "why": why})
    return rows


def _load_ops() -> None:
    # Importing upernet_fast.ops registers every op; done lazily so that backend.py has no import cycle.
    import upernet_fast.ops  # noqa: F401
