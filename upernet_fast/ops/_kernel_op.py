"""One declaration per fused op for every kernel backend: schema, fake kernel and autograd formula, written once.

An op with kernels (``upsample_add``, ...) is a forward op and a backward op. Their schemas, fake (meta)
kernels and the autograd formula that links them do not depend on who wrote the kernels, so each op file
declares them once as a :class:`KernelOp` and instantiates it per backend namespace:

* ``upernet_fast::<op>``: the Triton kernels. :meth:`KernelOp.define` defines the schemas here in Python and
  registers the Python launchers for CPU (the interpreter) and CUDA.
* ``upernet_fast_cpp::<op>``: the C++ kernels. The extension defines the same schemas in C++
  (``TORCH_LIBRARY``) with its CPU kernels; :meth:`KernelOp.attach` adds the fake kernel and the autograd
  formula once the extension is loaded (tests compare the two namespaces' schemas).

Why two namespaces rather than one op with a kernel per device: the Triton kernels must also run on CPU
tensors under ``TRITON_INTERPRET=1`` (that is how they are proven without a GPU), and a dispatcher op has one
CPU kernel. The backend layer (``upernet_fast.backend``) chooses between them.

Ops are defined with ``torch.library.Library`` + ``impl`` rather than ``torch.library.custom_op``: the same
machinery (fake kernels, ``register_autograd``, ``opcheck``, no graph break under ``torch.compile``) with
less Python per call.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from upernet_fast.ops._triton_support import on_input_device

# One Library object per namespace, kept alive for the process (dropping it would unregister the ops).
_LIBRARIES: dict[str, torch.library.Library] = {}
# namespace -> KernelOps whose ops a compiled extension defines there, attached when it is loaded.
_EXTENSION_OPS: dict[str, list["KernelOp"]] = {}


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")  # noqa: TOR901
    return _LIBRARIES[namespace]


def stats_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype of the kernels' statistics (log-sum-exp, BatchNorm means and sums): float32, or float64 for
    float64 inputs (the C++ kernels compute float64 in float64, so that gradcheck sees float64 arithmetic)."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _name(schema: str) -> str:
    return schema.split("(", 1)[0].strip()


def _check_extension_schema(namespace: str, schema: str) -> None:
    """Raises unless the op the extension defined in ``namespace`` has exactly this schema (spaces aside)."""
    name = _name(schema)
    theirs = str(getattr(getattr(torch.ops, namespace), name).default._schema).split("::", 1)[1]
    if schema.replace(" ", "") != theirs.replace(" ", ""):
        raise RuntimeError(f"{namespace}::{name} has schema {theirs!r}; expected {schema!r}")


class KernelOp:
    """A forward op, its backward op and the autograd formula between them, independent of the kernels.

    ``schema``/``fake``: the forward op's schema (without namespace) and fake kernel. ``backward_schema``/
    ``backward_fake``: the backward op's. ``setup_context(ctx, inputs, output)`` and
    ``backward(backward_op, ctx, *grads)`` form the autograd formula; ``backward_op`` is the backward op of the
    namespace being differentiated, so one formula serves every backend. ``op_name`` names the op in the
    double-backward refusal. ``autocast_to``: under autocast (CPU or CUDA), the forward op's floating inputs
    are cast to this dtype by the dispatcher (``register_autocast``), as autocast does for the ATen ops the
    op replaces.
    """

    def __init__(
        self,
        schema: str,
        fake: Callable,
        *,
        backward_schema: str,
        backward_fake: Callable,
        setup_context: Callable,
        backward: Callable,
        op_name: str | None = None,
        autocast_to: torch.dtype | None = None,
    ) -> None:
        self.schema, self.fake = schema, fake
        self.backward_schema, self.backward_fake = backward_schema, backward_fake
        self.setup_context, self.backward = setup_context, backward
        self.name, self.backward_name = _name(schema), _name(backward_schema)
        self.op_name = op_name or self.name
        self.autocast_to = autocast_to
        self._attached: set[str] = set()

    def define(self, namespace: str, kernel: Callable, backward_kernel: Callable, *, display: str = "Triton"):
        """Define both ops in ``namespace`` with Python kernels (Triton launchers) for CPU and CUDA tensors.

        Returns the forward op (an ``OpOverloadPacket``). Each kernel runs with its inputs' CUDA device current.
        """
        library = _library(namespace)
        for schema, fn in ((self.schema, kernel), (self.backward_schema, backward_kernel)):
            library.define(schema)
            guarded = on_input_device(fn)
            for dispatch_key in ("CPU", "CUDA"):
                library.impl(_name(schema), guarded, dispatch_key)
        self._register_fake_and_autograd(namespace, display)
        return getattr(getattr(torch.ops, namespace), self.name)

    def in_extension(self, namespace: str) -> Callable:
        """The forward op that a compiled extension defines in ``namespace``, as a callable.

        The extension is loaded lazily (``upernet_fast.cpp_extension``), and the backend layer calls
        :func:`attach_extension_ops` once it is, before any of these ops can be selected.
        """
        _EXTENSION_OPS.setdefault(namespace, []).append(self)
        forward = f"{namespace}::{self.name}"

        op = None

        def call(*args):
            nonlocal op
            if op is None:  # the first call comes after the extension was loaded (see above)
                op = _resolved(forward).default  # the overload itself: no per-call overload resolution
            return op(*args)

        return call

    def attach(self, namespace: str, *, display: str = "C++", fakes: bool = True) -> None:
        """Give ops already defined in ``namespace`` (by the C++ extension) this fake kernel and autograd formula.

        Idempotent. ``fakes=False`` where the extension registers its own Meta kernels.
        """
        if namespace in self._attached:
            return
        _check_extension_schema(namespace, self.schema)
        self._register_fake_and_autograd(namespace, display, fakes=fakes)

    def _register_fake_and_autograd(self, namespace: str, display: str, fakes: bool = True) -> None:
        forward, backward = f"{namespace}::{self.name}", f"{namespace}::{self.backward_name}"
        lib = _library(namespace)
        if fakes:
            torch.library.register_fake(forward, self.fake, lib=lib)
            torch.library.register_fake(backward, self.backward_fake, lib=lib)
        backward_op = getattr(getattr(torch.ops, namespace), self.backward_name)
        torch.library.register_autograd(
            forward, functools.partial(self.backward, backward_op), setup_context=self.setup_context, lib=lib
        )
        if self.autocast_to is not None:
            for device_type in ("cpu", "cuda"):
                torch.library.register_autocast(forward, device_type, self.autocast_to, lib=lib)
        refuse_double_backward(backward, self.op_name, display, lib)
        self._attached.add(namespace)


class ExtensionOp:
    """An op that a compiled extension defines, with its autograd (if any) in C++: only its fake kernel is
    registered here, so that ``torch.compile`` and ``opcheck`` can trace it (a C++ autograd formula's forward and
    backward call such ops through the dispatcher)."""

    def __init__(self, schema: str, fake: Callable) -> None:
        self.schema, self.fake, self.name = schema, fake, _name(schema)
        self._attached: set[str] = set()

    in_extension = KernelOp.in_extension

    def attach(self, namespace: str) -> None:
        if namespace in self._attached:
            return
        _check_extension_schema(namespace, self.schema)
        torch.library.register_fake(f"{namespace}::{self.name}", self.fake, lib=_library(namespace))
        self._register_autograd(f"{namespace}::{self.name}", _library(namespace))
        self._attached.add(namespace)

    def _register_autograd(self, qualified: str, lib: torch.library.Library) -> None:
        """Nothing here: the extension's own (C++) autograd, or none."""


class InferenceOp(ExtensionOp):
    """An inference-only op that a compiled extension defines: its schema and fake kernel, and no backward.

    :meth:`attach` registers the fake (so ``torch.compile`` and ``opcheck`` can trace it). Its autograd is the
    extension's (csrc/autograd/inference_only.cpp): any call where autograd would need its gradient is refused with
    the reason, a clear error at the call rather than a silent missing gradient or a generic one at ``backward()``;
    every other call goes on to the kernel without a Python autograd layer (which cost more than the kernel on small
    maps). ``op_name``, the op function that routes calls here, is the one the C++ refusal names.
    """

    def __init__(self, schema: str, fake: Callable, *, op_name: str) -> None:
        super().__init__(schema, fake)
        self.op_name = op_name


_RESOLVED: dict[str, Callable] = {}


def _resolved(qualified: str) -> Callable:
    op = _RESOLVED.get(qualified)
    if op is None:
        namespace, name = qualified.split("::")
        op = _RESOLVED[qualified] = getattr(getattr(torch.ops, namespace), name)
    return op


def attach_extension_ops(namespace: str) -> None:
    """Attach every KernelOp declared for ``namespace`` (fakes, autograd); call once its extension is loaded."""
    for kernel_op in _EXTENSION_OPS.get(namespace, ()):
        kernel_op.attach(namespace)


def refuse_double_backward(backward_op: str, op_name: str, display: str, lib=None) -> None:
    """Give a backward op an autograd formula that says plainly why it cannot be differentiated.

    The kernels' backwards are first-order only. Without this, ``create_graph=True`` followed by a second
    backward fails with PyTorch's generic "no autograd formula was registered".
    """

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"upernet_fast: {op_name}'s {display} backward has no backward of its own (double backward, e.g. a "
            f"gradient penalty, is not supported there); run {op_name} with backend='eager' for higher-order "
            "gradients"
        )

    torch.library.register_autograd(backward_op, refuse, setup_context=lambda ctx, inputs, output: None, lib=lib)
