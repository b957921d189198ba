"""Saved-activation recomputation in the heads' training step: activations rebuilt in the backward, bitwise.

A BatchNorm+ReLU output is saved by the convolution that reads it (the conv's weight gradient needs its input),
while the BN+ReLU backward already saves that output's ingredients: the conv output it normalised and the
per-channel statistics. The FPN concat is saved by ``fpn_bottleneck``'s convolution, although it is only a
resize and a copy of four such BN+ReLU outputs. Saving both is what makes the head's training memory: at batch
2, 256x256 on ConvNeXt-T, the concat alone is 64 MiB, more than a tenth of the step's peak.

The same holds one step up the FPN: each top-down sum (``upsample_add`` of two such outputs) and the NCHW copy
of it that an ``fpn_convs`` convolution reads (``conv_bn_relu.cpu_training_conv_input``) are rebuilt from
recipes too (:func:`remember_from_recipes`), 21 MiB at that size.

While :func:`recomputing` is active (the heads wrap their training forward in it where :func:`pays_for` says
their largest saved map is large enough), the ops that make such
tensors record how to rebuild them (:func:`remember`: the same kernel on tensors autograd keeps anyway), and a
``saved_tensors_hooks`` pair saves that recipe instead of the tensor; the backward reruns it. The rebuilt tensor
is bitwise the original: same kernel, same inputs, same layout. A recipe is used only when the saved tensor was
not modified after it was made, and it refuses to run (RuntimeError, as autograd does for a saved tensor)
when one of its inputs was modified in place since.

Not used under ``torch.compile`` (Inductor chooses what to recompute itself), nor where the caller has
installed saved-tensor hooks of its own (offloading, activation checkpointing): those keep their semantics.
A rebuilt tensor has no autograd history, so a double backward through the head would miss terms; the
head's BN+ReLU ops refuse double backward, which stops such a backward before it returns.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary


class _ThreadState(threading.local):
    # Class-level defaults: a thread that never entered recomputing() reads these at the cost of an attribute
    # lookup (getattr(local, name, default) on a missing name raises and catches inside: 0.4 us each, on every
    # op call).
    depth = 0
    disabled = 0


_state = _ThreadState()
_recipes = WeakIdKeyDictionary()  # made tensor -> Recipe; an entry lives as long as its tensor
builds = [0]  # recipes rebuilt in this process (tests read it: a recomputation that never runs saves nothing)

# The heads recompute only when the largest map they would save is at least this big (UperNetHead: the FPN concat;
# UperNetFCNHead: a conv's output or conv_cat's concat). Below it the rebuilds cost more than the memory is worth:
# on the e2e suite's toy ConvNeXt model (hidden 16, batch 2, 64x64; FPN concat 0.5 MiB) recomputing made the CPU
# training step 1.13x slower (15.35 against 13.62 ms, 2026-11-29) to keep 0.3 MB less. ConvNeXt-T's FPN concat at
# batch 2, 256x256 is 64 MiB. The same bound as the sliced bottleneck's (conv_bn_relu.SLICED_MIN_BYTES), for the
# same trade.
MIN_BYTES = 8 * 2**20


def pays_for(like: torch.Tensor, values: int) -> bool:
    """Whether a head whose largest saved map has ``values`` values, made from input ``like``, should recompute:
    at least MIN_BYTES in the dtype the map will have (autocast's where it is on for ``like``'s device, else
    ``like``'s). False under torch.compile without reading the sizes (recomputing() stays out there anyway, and
    comparing symbolic sizes would only add a guard)."""
    if torch.compiler.is_compiling():
        return False
    device = like.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else like.dtype
    return values * dtype.itemsize >= MIN_BYTES


class Recipe:
    """How to rebuild one tensor: ``build(*inputs)`` under no_grad, inputs being tensors or other recipes."""

    __slots__ = ("build", "inputs", "input_versions", "version")

    def __init__(self, made: torch.Tensor, build: Callable[..., torch.Tensor], inputs: Sequence[object]) -> None:
        self.build = build
        # An input that has a recipe itself is kept as that recipe, never as the tensor: holding the tensor
        # would keep alive exactly what recomputation is meant to free.
        self.inputs = [(_recipe_of(t) or t) if isinstance(t, torch.Tensor) else t for t in inputs]
        self.input_versions = [t._version if isinstance(t, torch.Tensor) else None for t in self.inputs]
        self.version = made._version

    def rebuild(self) -> torch.Tensor:
        args = []
        for k, (value, version) in enumerate(zip(self.inputs, self.input_versions)):
            if isinstance(value, Recipe):
                value = value.rebuild()
            elif isinstance(value, torch.Tensor) and value._version != version:
                raise RuntimeError(
                    "upernet_fast: a tensor the backward recomputes from was modified in place after the forward "
                    f"(input {k} of a recomputed activation: version {value._version}, saved at {version}); "
                    "modify parameters and activations after backward(), or wrap the forward in "
                    "upernet_fast.recompute.disabled()"
                )
            args.append(value)
        with torch.no_grad():
            out = self.build(*args)
        builds[0] += 1
        return out


def _recipe_of(tensor: torch.Tensor) -> Recipe | None:
    """The tensor's recipe, unless the tensor was modified in place since it was made (the recipe would then
    rebuild the values it had before)."""
    recipe = _recipes.get(tensor)
    return recipe if recipe is not None and recipe.version == tensor._version else None


def remember(made: torch.Tensor, build: Callable[..., torch.Tensor], inputs: Sequence[object]) -> None:
    """Records that ``made`` equals ``build(*inputs)`` (run under no_grad), while :func:`recomputing` is active.

    ``inputs`` must be tensors that autograd saves anyway (or that have recipes), so that keeping them costs
    nothing; ``build`` must be the kernel that made ``made``, so that the rebuilt tensor has the same bits.
    """
    # is_compiling stays first (under torch.compile nothing else is looked at). ``made`` need not require grad
    # to be saved: with a frozen backbone, a convolution still saves its input for its weight's gradient.
    if torch.compiler.is_compiling() or not _state.depth or _state.disabled:  # outside recomputing(), or disabled
        return
    _recipes[made] = Recipe(made, build, inputs)


def remember_from_recipes(
    made: torch.Tensor, build: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]
) -> None:
    """:func:`remember`, but only when every input has a recipe itself (and is unmodified since it was made).

    For ops whose backward saves none of their inputs (``upsample_add``, a layout copy): a recipe holding such
    an input as a tensor would keep alive what autograd had let go, costing memory instead of saving it.
    """
    if torch.compiler.is_compiling() or not _state.depth or _state.disabled:  # outside recomputing(), or disabled
        return
    if not all(_recipe_of(t) for t in inputs):
        return
    _recipes[made] = Recipe(made, build, inputs)


def _pack(tensor: torch.Tensor):
    return _recipe_of(tensor) or tensor


def _unpack(saved):
    return saved.rebuild() if isinstance(saved, Recipe) else saved


def _caller_has_hooks() -> bool:
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
    except (AttributeError, TypeError, RuntimeError):  # no such private API in this torch: be safe, stay out
        return True


@contextlib.contextmanager
def recomputing(enabled: bool = True):
    """Saves recipes instead of the activations that have one, for the autograd graph built inside."""
    if (
        not enabled
        or torch.compiler.is_compiling()
        or not torch.is_grad_enabled()
        or _state.disabled
        or _caller_has_hooks()
    ):
        yield
        return
    _state.depth += 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _state.depth -= 1


@contextlib.contextmanager
def disabled():
    """Within this context the heads save their activations as PyTorch would (no recomputation)."""
    _state.disabled += 1
    try:
        yield
    finally:
        _state.disabled -= 1
