"""Input validation shared by the ops and modules: every error names the argument and what was expected."""

from __future__ import annotations

import functools
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensors_in(values) -> list[torch.Tensor]:
    """The tensors among ``values``, one level into lists and tuples (an op's tensor-list arguments)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:  # a plain loop: on every op call, where a generator's set-up costs more
                if isinstance(item, torch.Tensor):
                    found.append(item)
    return found


def module_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """``getattr(module, name, None)`` for a parameter or buffer, read from the module's own dicts first: the
    selection reads BatchNorm's and the conv's tensors on every op call, and ``nn.Module.__getattr__`` (reached
    only after the normal lookup fails) costs about 0.9 us a read on this project's CPU, against 0.15 us."""
    try:
        value = module._parameters.get(name, _MISSING)
        if value is _MISSING:
            value = module._buffers.get(name, _MISSING)
    except AttributeError:  # not an nn.Module
        return getattr(module, name, None)
    return getattr(module, name, None) if value is _MISSING else value


_MISSING = object()


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these tensors (None entries skipped): grad mode on and one of them
    requiring grad. Where it does not, the inference-only kernels may run."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:  # (a loop, not any() over a generator: on every eval block call)
        if t is not None and t.requires_grad:
            return True
    return False


def overridden_forward(module: torch.nn.Module, base: type, *methods: str) -> str | None:
    """Why ``module`` cannot be computed as a stock ``base`` by a kernel of our own (it overrides one of
    ``methods``, which the kernel would silently skip), or None."""
    for method in methods:
        if getattr(type(module), method) is not getattr(base, method):
            return f"{type(module).__name__} overrides {base.__name__}.{method} (only the stock module is reproduced)"
    return None


def check_tensor(name: str, value, ndim: int | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}D tensor, got {value.dim()}D with shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {value.dtype}")
    return value


def is_feature_map(value) -> bool:
    """Whether :func:`check_feature_map` accepts ``value``: the ops' fast test, one expression and no message built.
    ``numel() == 0`` is the same comparison the check makes (under torch.export, the same guard)."""
    return (
        isinstance(value, torch.Tensor)
        and value.dim() == 4
        and value.dtype in FLOAT_DTYPES
        and not value.numel() == 0
    )


def same_device(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a.device == b.device``; Tensor.is_cpu is a plain flag, Tensor.device builds two torch.device objects."""
    return (a.is_cpu and b.is_cpu) or a.device == b.device


def check_feature_map(name: str, value) -> torch.Tensor:
    """A (B, C, H, W) floating-point map with no empty dimension."""
    if is_feature_map(value):
        return value
    check_tensor(name, value, ndim=4, floating=True)
    if value.numel() == 0:
        raise ValueError(f"{name} must have no empty dimension, got shape {tuple(value.shape)}")
    return value


def check_same_placement(names: Sequence[str], tensors: Sequence[torch.Tensor], dtype: bool = True) -> None:
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; they must match")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match")


def promote_for_kernels(impl_backend: str, tensors):
    """Mixed floating dtypes (fp32 features next to bf16 maps under autocast) promote as ``torch.cat`` and ``+``
    do. The eager reference gets the tensors as they are (PyTorch promotes inside, bitwise as transformers);
    kernel backends take one dtype, so they get every tensor cast to the promoted one."""
    if impl_backend == "eager":
        return tensors if type(tensors) is tuple else tuple(tensors)
    first = tensors[0].dtype
    for t in tensors:
        if t.dtype is not first:  # dtypes are singletons
            break
    else:  # one dtype: nothing to cast (the common case, tested without building a set)
        return tensors if type(tensors) is tuple else tuple(tensors)
    dtypes = {t.dtype for t in tensors}
    dtype = functools.reduce(torch.promote_types, dtypes)
    return tuple(t.to(dtype) for t in tensors)


def _is_size(value) -> bool:
    """A positive int, or a symbolic size (torch.export / dynamic shapes): its value is the tracer's to guard."""
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_size(name: str, size) -> tuple:
    """(height, width) as given: plain ints stay ints, symbolic sizes stay symbolic (``int()`` would pin them)."""
    if isinstance(size, (tuple, list)) and len(size) == 2:
        height, width = size
        if type(height) is int and type(width) is int and height >= 1 and width >= 1:  # the common case, fast
            return tuple(size)
    if isinstance(size, torch.Size):
        size = tuple(size)
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(_is_size(s) for s in size):
        raise ValueError(f"{name} must be two positive ints (height, width), got {size!r}")
    return tuple(size)


def check_scales(name: str, scales) -> tuple[int, ...]:
    if isinstance(scales, (tuple, list)) and scales:
        for s in scales:
            if type(s) is not int or s < 1:
                break
        else:  # positive plain ints (bool is not int by type): the common case, without the generators below
            return tuple(scales)
    if isinstance(scales, int) and not isinstance(scales, bool):
        scales = (scales,)
    if (
        not isinstance(scales, (tuple, list))
        or len(scales) == 0
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in scales)
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {scales!r}")
    return tuple(int(s) for s in scales)
