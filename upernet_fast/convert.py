"""Drop-in conversion of transformers' UperNet models, and mmsegmentation checkpoint import.

``convert`` swaps the heads of a transformers ``UperNetForSemanticSegmentation`` for upernet_fast's, in
place, by assigning ``__class__`` on each module: every Parameter and buffer stays the very same object
(optimizers built before the conversion keep working), and the state_dict keys do not change.
``revert`` does the inverse. Both classes of each pair have the same attributes (see modeling.py).
"""

from __future__ import annotations

import re
import warnings
from typing import Mapping, NamedTuple

import torch
from torch import nn
from transformers.models.upernet import modeling_upernet as hf

from upernet_fast import modeling
from upernet_fast.backend import AUTO, BACKENDS
from upernet_fast.ops.conv_bn_relu import ConvBNReLU

# (transformers class, upernet_fast class) pairs with the same attributes and children.
_CLASS_PAIRS = (
    (hf.UperNetConvModule, ConvBNReLU),
    (hf.UperNetPyramidPoolingBlock, modeling.UperNetPyramidPoolingBlock),
    (hf.UperNetPyramidPoolingModule, modeling.UperNetPyramidPoolingModule),
    (hf.UperNetHead, modeling.UperNetHead),
    (hf.UperNetFCNHead, modeling.UperNetFCNHead),
)
_TO_OURS = dict(_CLASS_PAIRS)
_TO_THEIRS = {ours: theirs for theirs, ours in _CLASS_PAIRS}
# Modules of ours that carry a `backend` attribute.
_WITH_BACKEND = (ConvBNReLU, modeling.UperNetHead, modeling.UperNetFCNHead)


def _heads(model: nn.Module) -> list[nn.Module]:
    return [m for m in (model.decode_head, model.auxiliary_head) if m is not None]


def _check_model(model) -> None:
    if not isinstance(model, hf.UperNetForSemanticSegmentation):
        raise TypeError(
            "model must be a transformers UperNetForSemanticSegmentation (or upernet_fast's), "
            f"got {type(model).__name__}"
        )


def convert(
    model: nn.Module,
    backend: str = "auto",
    *,
    full_resolution_logits: bool = True,
    loss_reduction: str = "mean",
    sync_bn: bool = False,
) -> nn.Module:
    """Make a transformers ``UperNetForSemanticSegmentation`` run on upernet_fast, in place; returns it.

    Args:
        model: a transformers ``UperNetForSemanticSegmentation`` with any backbone (an already converted model
            or an ``upernet_fast.UperNetForSemanticSegmentation`` is accepted: its options are updated).
        backend: ``"auto"`` (fastest available per call), ``"eager"``, ``"triton"`` or ``"cpp"``.
        full_resolution_logits: True (default) returns logits upsampled to the input size, exactly as
            transformers; False returns the head's 1/4-resolution logits in training mode (the loss is the same),
            which saves the (B, num_labels, H, W) logits tensor and its gradient.
        loss_reduction: ``"mean"`` (transformers: mean over non-ignored pixels) or ``"mean_all"``
            (mmsegmentation's default: divide by every pixel, ignored ones included).
        sync_bn: convert the heads' BatchNorm2d layers to ``torch.nn.SyncBatchNorm`` (same parameters and
            buffers), for data-parallel training that reduces batch statistics across processes.
    """
    _check_model(model)
    if backend not in (AUTO,) + BACKENDS:
        raise ValueError(f"backend must be one of {(AUTO,) + BACKENDS}, got {backend!r}")
    if loss_reduction not in ("mean", "mean_all"):
        raise ValueError(f"loss_reduction must be 'mean' or 'mean_all', got {loss_reduction!r}")
    if full_resolution_logits not in (True, False):
        raise TypeError(f"full_resolution_logits must be a bool, got {full_resolution_logits!r}")
    for head in _heads(model):
        for module in head.modules():
            ours = _TO_OURS.get(type(module))
            if ours is not None:
                module.__class__ = ours
            if isinstance(module, _WITH_BACKEND):
                module.backend = backend
        if sync_bn:
            _convert_sync_bn(head)
    model.__class__ = modeling.UperNetForSemanticSegmentation
    model.full_resolution_logits = full_resolution_logits
    model.loss_reduction = loss_reduction
    return model


def _convert_sync_bn(head: nn.Module) -> None:
    # Swap each BatchNorm2d for a SyncBatchNorm that shares its Parameters and buffers (no copies).
    for block in head.modules():
        if isinstance(block, ConvBNReLU) and type(block.batch_norm) is nn.BatchNorm2d:
            bn = block.batch_norm
            sync = nn.SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            sync.weight, sync.bias = bn.weight, bn.bias
            sync.running_mean, sync.running_var = bn.running_mean, bn.running_var
            sync.num_batches_tracked = bn.num_batches_tracked
            sync.train(bn.training)
            block.batch_norm = sync


def revert(model: nn.Module) -> nn.Module:
    """Put transformers' own classes back on a model converted by :func:`convert`, in place; returns it.

    A model constructed as ``upernet_fast.UperNetForSemanticSegmentation`` becomes a plain transformers one.
    """
    _check_model(model)
    for head in _heads(model):
        for module in head.modules():
            if isinstance(module, ConvBNReLU):  # its eval Winograd cache would outlive the class that frees it
                module.release_eval_cache()
            for name in getattr(type(module), "runtime_attributes", ()) + ("backend",):
                module.__dict__.pop(name, None)
            theirs = _TO_THEIRS.get(type(module))
            if theirs is not None:
                module.__class__ = theirs
    for name in modeling.UperNetForSemanticSegmentation.runtime_attributes:
        model.__dict__.pop(name, None)
    model.__class__ = hf.UperNetForSemanticSegmentation
    return model


def set_backend_of(model: nn.Module, backend: str) -> None:
    """Set the backend of every upernet_fast module inside ``model`` (heads and conv blocks)."""
    if backend not in (AUTO,) + BACKENDS:
        raise ValueError(f"backend must be one of {(AUTO,) + BACKENDS}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, _WITH_BACKEND):
            module.backend = backend


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]
    renamed: dict[str, str]


# mmsegmentation names -> transformers names, applied to keys of the decode and auxiliary heads only.
_MMSEG_RENAMES = ((re.compile(r"\.bn\."), ".batch_norm."), (re.compile(r"\.conv_seg\."), ".classifier."))


def mmseg_key_to_hf(key: str) -> str:
    """``decode_head.bottleneck.bn.weight`` -> ``decode_head.bottleneck.batch_norm.weight``, and so on."""
    if not key.startswith(("decode_head.", "auxiliary_head.")):
        return key
    for pattern, replacement in _MMSEG_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def load_mmseg_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = False) -> LoadResult:
    """Load an mmsegmentation UPerHead checkpoint (``bn`` -> ``batch_norm``, ``conv_seg`` -> ``classifier``).

    Accepts the raw checkpoint dict too (``{"state_dict": ..., "meta": ...}``). Returns the missing and
    unexpected keys (after renaming) and the renames applied; warns when either list is non-empty, raises when
    ``strict``. Backbone keys are passed through unchanged: mmsegmentation's backbones use other names than
    transformers', so expect them among the missing/unexpected keys unless the checkpoint was converted.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(state_dict, Mapping) and "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    renamed = {}
    mapped = {}
    for key, value in state_dict.items():
        new_key = mmseg_key_to_hf(key)
        if new_key != key:
            renamed[key] = new_key
        mapped[new_key] = value
    result = model.load_state_dict(mapped, strict=False)
    out = LoadResult(list(result.missing_keys), list(result.unexpected_keys), renamed)
    if out.missing_keys or out.unexpected_keys:
        message = (
            f"load_mmseg_state_dict: {len(out.missing_keys)} missing keys {out.missing_keys[:5]}..., "
            f"{len(out.unexpected_keys)} unexpected keys {out.unexpected_keys[:5]}..."
        )
        if strict:
            raise KeyError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    return out
