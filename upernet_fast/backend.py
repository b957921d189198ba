"""The one place that decides which implementation of an op runs.

Every op (``adaptive_avg_pool_multi``, ``upsample_add``, ...) has an ``"eager"`` implementation (the pure
PyTorch reference, always available) and may have ``"triton"`` and ``"cpp"`` ones. What a backend can take is
declared once, as data (:class:`Capabilities`: devices, dtypes, determinism, double backward), in
:data:`BACKENDS_DECLARED`; an op's implementation inherits its backend's capabilities, may narrow them, and may
add an op-specific ``why_not`` for what data cannot say (a module type, an index-width limit). One shared check
reads the declarations, so each refusal has the same wording whatever the op:

* ``why_unavailable()``: process-wide (triton not importable, extension not built, ...);
* capabilities: the call's device and floating dtypes;
* the op's own ``why_not(*args)``, when it has one.

Selection for one call, in this order:

1. the call's own ``backend=`` argument when it is not ``"auto"``;
2. else the process-wide override: :func:`set_backend` or the environment variable ``UPERNET_FAST_BACKEND``;
3. else ``"auto"``: the fastest implementation that can take the inputs. CUDA inputs prefer triton, then
   cpp, then eager; CPU inputs prefer cpp, then eager (Triton on CPU only runs under the interpreter, which
   is a correctness tool, not a fast path, so ``auto`` never picks it there).

The part of the decision that depends only on (op, backend asked for, device, dtypes, interpreter switch) is
resolved once and cached (a backend asked for that takes every call, eager, once per op, without reading the
inputs at all); only op-specific ``why_not`` checks run per call. A backend that was asked for by
name and cannot run raises with its reasons. ``auto`` falling back from a preferred backend that should have
applied (for example triton refusing a CUDA float64 input) warns once per (op, backend, reason).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from upernet_fast._checks import tensors_in
from upernet_fast.kernels._utils import interpreting

BACKENDS = ("eager", "triton", "cpp")
AUTO = "auto"
ENV_VAR = "UPERNET_FAST_BACKEND"
CPP_NAMESPACE = "upernet_fast_cpp"  # the ops of the compiled core (csrc/), see upernet_fast/ops/_kernel_op.py

# Preference of "auto" by the device type of the inputs.
_AUTO_ORDER = {"cuda": ("triton", "cpp", "eager"), "cpu": ("cpp", "eager")}
_AUTO_ORDER_OTHER = ("eager",)
_AUTO_TRIES_TRITON = frozenset(device for device, order in _AUTO_ORDER.items() if "triton" in order)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


@dataclass(frozen=True)
class Capabilities:
    """What a backend's kernels accept, as data.

    ``devices``: device types taken (None: any); ``interpreted_devices``: device types taken only under
    ``TRITON_INTERPRET=1``; ``dtypes``: floating dtypes of the tensor inputs (None: any); ``deterministic``:
    bitwise repeatable run to run (and, for cpp, for any thread count); ``double_backward``: whether the
    backward is itself differentiable; ``layouts``: a description, every backend takes any strides.
    """

    devices: tuple[str, ...] | None = None
    interpreted_devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] | None = None
    deterministic: bool = True
    double_backward: bool = False
    layouts: str = "NCHW, channels_last and sliced views"

    def why_not(self, display: str, device: str, dtypes: Sequence[torch.dtype]) -> str | None:
        """Why tensors on ``device`` with these floating ``dtypes`` cannot go to these kernels, or None."""
        if self.devices is not None and device not in self.devices:
            if device in self.interpreted_devices:
                if not interpreting():
                    return f"{device.upper()} tensors run on {display} only under TRITON_INTERPRET=1"
            else:
                taken = "/".join(d.upper() for d in self.devices)
                return f"{display} kernels take {taken} tensors, got a {device} tensor"
        if self.dtypes is not None:
            for dtype in dtypes:
                if dtype not in self.dtypes:
                    taken = "/".join(_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)
                    return f"{display} kernels take {taken}, got {dtype}"
        return None

    def summary(self) -> str:
        devices = "any device" if self.devices is None else "/".join(self.devices)
        if self.interpreted_devices:
            devices += " (" + "/".join(self.interpreted_devices) + " under TRITON_INTERPRET=1)"
        dtypes = "any dtype" if self.dtypes is None else "/".join(_DTYPE_NAMES.get(d, str(d)) for d in self.dtypes)
        flags = ("deterministic" if self.deterministic else "not deterministic on CUDA") + (
            ", double backward" if self.double_backward else ", first-order backward only"
        )
        return f"{devices}; {dtypes}; {flags}"


def _triton_unavailable() -> str | None:
    from upernet_fast.ops._triton_support import triton_unavailable

    return triton_unavailable()


_cpp_attached: list[bool] = []


def _cpp_unavailable() -> str | None:
    """Loads (building once, announced) the C++ extension; None once its ops are loaded and attached."""
    try:
        from upernet_fast import cpp_extension
    except ImportError:
        return "the C++ extension is not part of this installation"
    reason = cpp_extension.why_unavailable()
    if reason is None and not _cpp_attached:
        from upernet_fast.ops._kernel_op import attach_extension_ops

        _load_ops()
        attach_extension_ops(CPP_NAMESPACE)
        _cpp_attached.append(True)
    return reason


@dataclass(frozen=True)
class BackendDeclaration:
    """A backend as a whole: its display name, its process-wide availability check and default capabilities."""

    name: str
    display: str
    why_unavailable: Callable[[], str | None]
    capabilities: Capabilities


BACKENDS_DECLARED: dict[str, BackendDeclaration] = {
    "eager": BackendDeclaration(
        "eager",
        "PyTorch",
        lambda: None,
        # PyTorch's own CUDA bilinear and adaptive-pool backwards use atomics (see README, determinism).
        Capabilities(deterministic=False, double_backward=True, layouts="anything PyTorch takes"),
    ),
    "triton": BackendDeclaration(
        "triton",
        "Triton",
        _triton_unavailable,
        Capabilities(
            devices=("cuda",),
            interpreted_devices=("cpu",),
            dtypes=(torch.float32, torch.float16, torch.bfloat16),
        ),
    ),
    "cpp": BackendDeclaration(
        "cpp",
        "C++",
        _cpp_unavailable,
        Capabilities(devices=("cpu",), dtypes=(torch.float32, torch.bfloat16, torch.float64)),
    ),
}


@torch.compiler.assume_constant_result
def backend_unavailable(name: str) -> str | None:
    """Process-wide reason ``name`` cannot run, or None. Under torch.compile it is called once, outside the
    traced code, and its answer taken as a constant: loading (or building) the C++ extension touches files,
    which a traced graph cannot hold."""
    return BACKENDS_DECLARED[name].why_unavailable()


def _never(*args, **kwargs) -> str | None:
    return None


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op. ``fn`` takes the op's arguments, without ``backend``.

    ``capabilities`` are the backend's, narrowed by the op where it declared so; ``why_not`` is the op's own
    check, for what the data cannot express.
    """

    op: str
    backend: str
    fn: Callable
    why_not: Callable[..., str | None] = _never
    capabilities: Capabilities = Capabilities()

    def why_unavailable(self) -> str | None:
        return backend_unavailable(self.backend)

    def why_not_capable(self, device: str, dtypes: Sequence[torch.dtype]) -> str | None:
        return self.capabilities.why_not(BACKENDS_DECLARED[self.backend].display, device, dtypes)

    def reason(self, *args, **kwargs) -> str | None:
        """Why this implementation cannot take these inputs, or None when it can (uncached, for diagnostics)."""
        reason = self.why_unavailable()
        if reason is None:
            reason = self.why_not_capable(*_placement(self.op, args, kwargs))
        return reason or self.why_not(*args, **kwargs)


_REGISTRY: dict[str, dict[str, Implementation]] = {}
_override: str | None = None
_warned: set[tuple[str, str, str]] = set()
# (op, backend asked for, device type, floating dtypes, interpreting or None where triton is no candidate) ->
# [(implementation, static reason)], in order of preference. Cleared whenever an implementation is registered.
_static_cache: dict[tuple, list[tuple[Implementation, str | None, bool]]] = {}
# The same key -> the implementation chosen when every candidate preferred to it was refused whatever the
# call (statically): on a hit only its own op-specific check, if any, runs; should that refuse, the full
# selection runs. Cleared with the other.
_chosen_cache: dict[tuple, Implementation] = {}
# (op, backend asked for by name or through the process-wide setting) -> the implementation where nothing of the
# call can change the answer (a backend that is always available, takes any device and dtype and has no
# op-specific check: eager), else None. Such calls skip reading the inputs' device and dtypes altogether; for
# every name, its validity is checked once. "auto" is never a key.
_fixed_choice: dict[tuple[str, str], Implementation | None] = {}
_UNDECIDED = object()
# op -> fn(*args) giving the tensors whose device and dtypes are judged (default: every tensor argument).
_judged_tensors: dict[str, Callable[..., Sequence[torch.Tensor]]] = {}


def register(
    op: str,
    backend: str,
    fn: Callable,
    *,
    why_not: Callable[..., str | None] | None = None,
    tensors: Callable[..., Sequence[torch.Tensor]] | None = None,
    **narrowed_capabilities,
) -> Implementation:
    """Declare ``fn`` as ``backend``'s implementation of ``op`` (re-registering replaces).

    ``narrowed_capabilities`` (``dtypes=...``, ``devices=...``, ...) replace fields of the backend's defaults.
    ``tensors(*args)``: the tensors of a call whose device and dtypes are judged, for every backend of ``op``
    (default: the tensor arguments, one level into lists; an op taking modules names their parameters here).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    capabilities = dataclasses.replace(BACKENDS_DECLARED[backend].capabilities, **narrowed_capabilities)
    impl = Implementation(op, backend, fn, why_not or _never, capabilities)
    if tensors is not None:
        _judged_tensors[op] = tensors
    _REGISTRY.setdefault(op, {})[backend] = impl
    clear_cache()
    return impl


def clear_cache() -> None:
    """Forget resolved selections (after changing what a backend's availability depends on, e.g. in tests)."""
    _static_cache.clear()
    _chosen_cache.clear()
    _fixed_choice.clear()


def ops() -> list[str]:
    """Names of the registered ops."""
    _load_ops()
    return sorted(_REGISTRY)


def _check_name(name: str, what: str) -> str:
    if name in _VALID_NAMES:
        return name
    raise ValueError(f"{what} must be one of {(AUTO,) + BACKENDS}, got {name!r}")


_VALID_NAMES = frozenset((AUTO,) + BACKENDS)


def set_backend(name: str | None) -> None:
    """Force one backend for every op in this process; ``None`` or ``"auto"`` restores automatic choice.

    Takes precedence over ``UPERNET_FAST_BACKEND``; a call's own ``backend=`` argument takes precedence over it.
    """
    global _override
    _override = None if name is None else _check_name(name, "set_backend(name)")


def _getenv(name: str) -> str:
    """``os.environ.get(name, "")``, read on every call (tests and users may change it at any time), but fast.

    ``os.environ.get`` of an unset variable costs about 1.2 us on this project's CPU (Mapping.get raises and
    catches a KeyError inside), a sixth of the whole dispatch budget of an op call; the dict behind
    ``os.environ`` (CPython's ``_Environ._data``, which every ``os.environ`` write updates, monkeypatch.setenv
    included) answers in 0.07 us. Any other mapping in ``os.environ``'s place is read the ordinary way.
    """
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None:
        return environ.get(name, "")
    key = _ENCODED_NAMES.get(name)
    if key is None:
        key = _ENCODED_NAMES[name] = environ.encodekey(name)
    value = data.get(key)
    return "" if value is None else environ.decodevalue(value)


_ENCODED_NAMES: dict[str, object] = {}  # name -> os.environ's key for it (encodekey is a Python call)


def get_backend() -> str:
    """The process-wide choice in force: the :func:`set_backend` value, else the env var, else ``"auto"``."""
    if _override is not None:
        return _override
    environ = os.environ
    if environ is _ENVIRON and _ENV_KEY not in _ENVIRON_DATA:  # unset, the usual case: one dict lookup
        return AUTO
    env = _getenv(ENV_VAR).strip()
    return _check_name(env, f"environment variable {ENV_VAR}") if env else AUTO


# os.environ as imported, the dict behind it and ENV_VAR's key there (see _getenv); read on every op call.
# Where os.environ is not CPython's _Environ, _ENVIRON is None: the fast path never applies.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENVIRON = os.environ if _ENVIRON_DATA is not None else None
_ENV_KEY = os.environ.encodekey(ENV_VAR) if _ENVIRON is not None else None


def _device_kind(t: torch.Tensor) -> str:
    # Tensor.is_cuda / is_cpu are plain flags; Tensor.device builds a torch.device object on every call.
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def _device_type(args, kwargs) -> str:
    for value in args:
        if isinstance(value, torch.Tensor):
            return _device_kind(value)
        if isinstance(value, (list, tuple)):
            for item in value:
                if isinstance(item, torch.Tensor):
                    return _device_kind(item)
    return _device_type(tuple(kwargs.values()), {}) if kwargs else "cpu"


def _placement(op: str, args, kwargs) -> tuple[str, tuple[torch.dtype, ...]]:
    """(device type, floating dtypes) of a call: the key of the cached part of the selection. On the hot path of
    every op call, so one pass, no allocation beyond the key, and in the common case (one dtype) one dict lookup
    per tensor (``isinstance`` of a non-tensor against ``torch.Tensor`` and ``dtype.is_floating_point`` cost
    0.2 us each here)."""
    pick = _judged_tensors.get(op)
    if pick is not None:
        tensors = pick(*args, **kwargs)
    else:
        tensors = tensors_in(args + tuple(kwargs.values()) if kwargs else args)
    if not tensors:
        return _device_type(args, kwargs), ()
    # The device of the first judged tensor: the first tensor argument, as every op's picker lists it first.
    first = tensors[0]
    device = _device_kind(first)
    dtype = first.dtype
    for t in tensors:
        if t.dtype != dtype:
            break
    else:  # one dtype, the common case
        dtypes = _ONE_DTYPE.get(dtype)
        if dtypes is None:
            dtypes = _ONE_DTYPE[dtype] = (dtype,) if _floating(dtype) else ()
        return device, dtypes
    dtypes = ()
    for t in tensors:
        dtype = t.dtype
        if _floating(dtype) and dtype not in dtypes:
            dtypes += (dtype,)
    if len(dtypes) > 1:
        dtypes = tuple(sorted(dtypes, key=str))
    return device, dtypes


# dtype -> the floating dtypes of a call whose judged tensors all have it: (dtype,), or () for an integer dtype.
_ONE_DTYPE: dict[torch.dtype, tuple[torch.dtype, ...]] = {}
_FLOATING: dict[torch.dtype, bool] = {}


def _floating(dtype: torch.dtype) -> bool:
    floating = _FLOATING.get(dtype)
    if floating is None:
        floating = _FLOATING[dtype] = dtype.is_floating_point
    return floating


def _warn_once(op: str, backend: str, reason: str, chosen: str) -> None:
    key = (op, backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"upernet_fast: {op} falls back from {backend} to {chosen}: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )


def _candidates(key: tuple, impls: dict[str, Implementation]):
    """[(implementation, reason it cannot run whatever the op's own check says or None, unavailable?)] in order
    of preference, for ``key`` = (op, backend asked for, device, dtypes, interpreter switch); cached."""
    cached = _static_cache.get(key)
    if cached is None:
        _op, requested, device, dtypes, _interpreting = key
        names = (requested,) if requested != AUTO else _AUTO_ORDER.get(device, _AUTO_ORDER_OTHER)
        cached = []
        for impl in (impls[name] for name in names if name in impls):
            unavailable = impl.why_unavailable()
            if unavailable is not None:
                cached.append((impl, unavailable, True))
            else:
                cached.append((impl, impl.why_not_capable(device, dtypes), False))
        _static_cache[key] = cached
    return cached


def select(op: str, backend: str, *args, like: torch.Tensor | None = None, **kwargs) -> Implementation:
    """The implementation of ``op`` that runs for these inputs (see the module docstring for the rules).

    ``like``: the first tensor the op judges (see :func:`register`), where the entry point has just seen that every
    judged tensor has its floating dtype; the call's placement (the first judged tensor's device type, the judged
    tensors' floating dtypes) is then read from it alone instead of from every judged tensor (tests/test_backend.py
    checks each entry point's against the full reading). The full reading was 60% of a cached selection's
    instructions (6K of 10.6K for ``upsample_add``); asked for by name, eager reads neither.
    """
    requested = get_backend() if backend == AUTO else backend
    if requested != AUTO:  # "auto" is never fixed: its answer depends on the inputs' device and dtypes
        fixed = _fixed_choice.get((op, requested), _UNDECIDED)
        if fixed is _UNDECIDED:  # once per (op, name): is the name valid, is the choice fixed?
            _check_name(backend, "backend")
            impls = _implementations(op)
            if requested not in impls:
                raise RuntimeError(
                    f"backend={requested!r} was asked for, but {op} has no {requested} implementation "
                    f"(it has: {sorted(impls)})"
                )
            fixed = _fixed_choice[(op, requested)] = impls[requested] if _unconditional(impls[requested]) else None
        if fixed is not None:
            return fixed
    if like is None:
        device, dtypes = _placement(op, args, kwargs)
    else:  # _placement's result for one dtype, inline (a call costs more than the lookups)
        dtype = like.dtype
        dtypes = _ONE_DTYPE.get(dtype)
        if dtypes is None:
            dtypes = _ONE_DTYPE[dtype] = (dtype,) if _floating(dtype) else ()
        device = "cpu" if like.is_cpu else _device_kind(like)
    # The interpreter switch changes only triton's answer (its availability, and the devices it takes), so it is
    # read, an environment lookup, only where triton is a candidate: asked for by name, or auto on a device
    # whose auto order has it. Elsewhere the key holds None.
    candidate = requested == "triton" if requested != AUTO else device in _AUTO_TRIES_TRITON
    key = (op, requested, device, dtypes, interpreting() if candidate else None)
    chosen = _chosen_cache.get(key)
    if chosen is not None and (chosen.why_not is _never or chosen.why_not(*args, **kwargs) is None):
        return chosen
    impls = _implementations(op)  # (a name asked for was checked on its first call, above)
    skipped: list[tuple[str, str]] = []
    refused_for_this_call = False
    for impl, static_reason, unavailable in _candidates(key, impls):
        reason = static_reason
        if reason is None and impl.why_not is not _never:
            reason = impl.why_not(*args, **kwargs)
            if reason is not None:  # a preferred backend refused this call: another call may be taken by it
                refused_for_this_call = True
        if reason is None:
            for skipped_name, skipped_reason in skipped:
                _warn_once(op, skipped_name, skipped_reason, impl.backend)
            if not refused_for_this_call:
                _chosen_cache[key] = impl
            return impl
        if requested != AUTO:
            raise RuntimeError(f"backend={requested!r} was asked for, but it cannot run {op} here: {reason}")
        # A backend that is simply not installed or built is expected on many machines: auto skips it
        # silently. A backend that is present but refuses these inputs is a fallback worth a warning.
        if not unavailable:
            skipped.append((impl.backend, reason))
    raise RuntimeError(f"no backend can run {op} on these inputs")  # unreachable: eager takes everything


def _implementations(op: str) -> dict[str, Implementation]:
    impls = _REGISTRY.get(op)
    if impls is None:
        _load_ops()
        impls = _REGISTRY.get(op)
        if impls is None:
            raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_REGISTRY)}")
    return impls


def _unconditional(impl: Implementation) -> bool:
    """Whether ``impl`` takes every call: no device or dtype limit, no op-specific check, always available."""
    capabilities = impl.capabilities
    return (
        capabilities.devices is None
        and capabilities.dtypes is None
        and impl.why_not is _never
        and impl.why_unavailable() is None
    )


def describe() -> list[dict[str, str]]:
    """One row per (op, backend): whether it is available in this process, why not, and what it takes."""
    _load_ops()
    rows = []
    for op in sorted(_REGISTRY):
        for name in BACKENDS:
            impl = _REGISTRY[op].get(name)
            if impl is None:
                status, why, takes = "absent", "not implemented in this version", ""
            else:
                status, why = _availability(impl)
                takes = impl.capabilities.summary()
            rows.append({"op": op, "backend": name, "status": status, "why": why, "takes": takes})
    return rows


def _availability(impl: Implementation) -> tuple[str, str]:
    """("available" | "unavailable", why) without building anything: info must not start a C++ build."""
    if impl.backend == "cpp":
        try:
            from upernet_fast import cpp_extension
        except ImportError:
            return "unavailable", "the C++ extension is not part of this installation"
        state = cpp_extension.status()
        if state["status"].startswith("built"):
            return "available", ""
        return "unavailable", state.get("reason") or state["status"]
    why = impl.why_unavailable()
    return ("available", "") if why is None else ("unavailable", why)


def _load_ops() -> None:
    # Importing upernet_fast.ops registers every op; done lazily so that backend.py has no import cycle.
    import upernet_fast.ops  # noqa: F401
