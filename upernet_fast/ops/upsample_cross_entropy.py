"""Bilinear-upsample + cross-entropy (the segmentation loss): entry point and backends."""

from __future__ import annotations

import functools

import torch

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_feature_map, check_tensor, is_feature_map, same_device
from upernet_fast.ops._kernel_op import KernelOp, stats_dtype

OP = "upsample_cross_entropy"
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


def upsample_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
    align_corners: bool = False,
    *,
    backend: str = "auto",
    resized: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, C, h, w) bilinearly resized to ``labels`` (B, H, W, integer).

    Equals ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear"), labels, ...)``.
    ``reduction``: ``"mean"`` (over non-ignored pixels, class-weighted when ``weight`` is given), ``"sum"``,
    ``"none"`` (returns (B, H, W)) or ``"mean_all"`` (sum / every pixel, as mmsegmentation). Labels outside
    ``[0, C)`` that are not ``ignore_index`` raise.

    ``resized``: optional, ``interpolate(logits, labels.shape[-2:], mode="bilinear", align_corners=...)`` when the
    caller already has it (a model returning full-resolution logits). The eager backend then takes the loss of
    it instead of resizing again: the same numbers, one resize fewer, and the graph transformers' model gives
    torch.compile (with a second resize of the same logits next to an auxiliary loss, torch 2.13's Inductor on
    CPU returned all-zero gradients; see tests/test_model_compile.py). The fused backends ignore it.
    """
    # The common case in one test; the checks that name what is wrong run only when it fails.
    if not (
        is_feature_map(logits)
        and isinstance(labels, torch.Tensor)
        and labels.dim() == 3
        and labels.dtype in _LABEL_DTYPES
        and same_device(labels, logits)
    ):
        check_feature_map("logits", logits)
        check_tensor("labels", labels, ndim=3)
        if labels.dtype not in _LABEL_DTYPES:
            raise TypeError(f"labels must be an integer tensor (int64 preferred), got {labels.dtype}")
        if labels.device != logits.device:
            raise ValueError(f"labels is on {labels.device} but logits is on {logits.device}; they must match")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape (B, H, W) with B = logits.shape[0] = {logits.shape[0]}, "
            f"got {tuple(labels.shape)}"
        )
    if reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if align_corners not in (False, True):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    num_classes = logits.shape[1]
    if weight is not None:
        check_tensor("weight", weight, ndim=1, floating=True)
        if weight.shape[0] != num_classes or weight.device != logits.device:
            raise ValueError(
                f"weight must be a ({num_classes},) tensor on {logits.device}, "
                f"got {tuple(weight.shape)} on {weight.device}"
            )
    # Decided in Python: int64 labels (the usual case) add no conversion node to a torch.compile graph.
    labels = labels if labels.dtype == torch.int64 else labels.long()
    if resized is not None:
        resized_shape = (*logits.shape[:2], *labels.shape[-2:])
        if tuple(resized.shape) != resized_shape or resized.device != logits.device:
            raise ValueError(
                f"resized must be logits resized to the labels' size, shape {resized_shape} on {logits.device}, "
                f"got {tuple(resized.shape)} on {resized.device}"
            )
    # The judged tensors (_judged_tensors: logits, weight) share a device (checked); with one dtype, logits'
    # placement is the call's.
    like = logits if weight is None or weight.dtype is logits.dtype else None
    impl = _backend.select(OP, backend, logits, labels, ignore_index, reduction, weight, align_corners, like=like)
    if impl.backend == "cpp":  # checks the labels itself, in its pass over them (see below)
        return impl.fn(logits, labels, ignore_index, reduction, weight, align_corners)
    compiling = torch.compiler.is_compiling()
    # Labels are checked where they are read, when that is possible: by the C++ kernel in its pass over them, and by
    # PyTorch's own CPU cross-entropy (its error translated below). Elsewhere (Triton, eager on a GPU) by a host
    # sync before anything runs. Under torch.compile, not in Python: the kernels' masking still prevents
    # out-of-bounds reads.
    if not compiling and not (impl.backend == "cpp" or (impl.backend == "eager" and labels.is_cpu)):
        _check_label_range(labels, num_classes, ignore_index)
    if impl.backend != "eager":
        return impl.fn(logits, labels, ignore_index, reduction, weight, align_corners)
    if compiling or not labels.is_cpu:
        return _eager_loss(impl, logits, labels, ignore_index, reduction, weight, align_corners, resized)
    try:
        return _eager_loss(impl, logits, labels, ignore_index, reduction, weight, align_corners, resized)
    except IndexError:  # "Target N is out of bounds."
        message = _first_bad_label(labels, num_classes, ignore_index)
        if message is None:
            raise
    raise ValueError(message)


def _eager_loss(impl, logits, labels, ignore_index, reduction, weight, align_corners, resized):
    if resized is not None:
        return reference.cross_entropy(resized, labels, ignore_index, reduction, weight)
    return impl.fn(logits, labels, ignore_index, reduction, weight, align_corners)


def _check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises unless every label lies in [0, num_classes) or equals ignore_index: avoids an out-of-bounds gather
    in any kernel. Runs on the labels' own device, one host sync in the common cases."""
    if labels.numel() == 0:
        return
    # The extremes first: one reduction (aminmax), on this CPU 15x cheaper than the masked test below at
    # 2x512x512 labels and 5x cheaper at a few pixels. When both lie in [0, C) every label does.
    low, high = (int(v) for v in torch.aminmax(labels))
    if low >= 0 and high < num_classes:
        return
    # Ignored pixels beyond one end (255 above the classes, -100 below): only that side needs the masked test.
    if low >= 0 and high == ignore_index:
        suspect = (labels >= num_classes) & (labels != ignore_index)
    elif high < num_classes and low == ignore_index:
        suspect = (labels < 0) & (labels != ignore_index)
    else:
        suspect = None  # an extreme is itself out of range: the test below finds the first bad label
    if suspect is None or bool(suspect.any()):
        message = _first_bad_label(labels, num_classes, ignore_index)
        if message is not None:
            raise ValueError(message)


def _first_bad_label(labels: torch.Tensor, num_classes: int, ignore_index: int) -> str | None:
    """The error naming the first label (in (b, y, x) order) neither in [0, C) nor ignore_index, or None. The C++
    kernel raises the same message (csrc/cpu/upsample_cross_entropy.cpp)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        value = int(labels[bad][0])
        return f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}; found {value}"
    return None


# ---- kernel backends: one declaration (schemas, fakes, autograd) for the Triton and the C++ kernels --------
# The forward returns (loss, lse, denominator); only the loss is differentiable, the other two are the
# statistics the backward needs: per-pixel log-sum-exp (B, H, W) fp32 and the 0-dim fp32 number the loss sum
# was divided by. Nothing of size (B, C, H, W) is allocated or saved. Under autocast the forward op's floating
# inputs are cast to fp32 by the dispatcher (register_autocast), as autocast runs cross-entropy in fp32: the
# loss is fp32 like the reference's, and only the low-resolution logits are cast.


def _fake(logits, labels, weight, ignore_index, reduction, align_corners):
    batch, out_h, out_w = labels.shape
    loss_shape = (batch, out_h, out_w) if reduction == "none" else ()
    loss = logits.new_empty(loss_shape)
    lse = logits.new_empty((batch, out_h, out_w), dtype=stats_dtype(logits))
    return loss, lse, logits.new_empty((), dtype=stats_dtype(logits))


def _backward_fake(grad_loss, logits, labels, weight, lse, denominator, ignore_index, align_corners):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)  # contiguous, like the kernels


def _setup_context(ctx, inputs, output):
    logits, labels, weight, ignore_index, reduction, align_corners = inputs
    _, lse, denominator = output
    ctx.save_for_backward(logits, labels, weight, lse, denominator)
    ctx.ignore_index = ignore_index
    ctx.align_corners = align_corners
    ctx.mark_non_differentiable(lse, denominator)


def _backward(backward_op, ctx, grad_loss, grad_lse, grad_denominator):
    logits, labels, weight, lse, denominator = ctx.saved_tensors
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = backward_op(
            grad_loss, logits, labels, weight, lse, denominator, ctx.ignore_index, ctx.align_corners
        )
    return grad_logits, None, None, None, None, None


KERNEL_OP = KernelOp(
    "upsample_cross_entropy(Tensor logits, Tensor labels, Tensor? weight, SymInt ignore_index, str reduction, "
    "bool align_corners) -> (Tensor, Tensor, Tensor)",
    _fake,
    backward_schema=(
        "upsample_cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor labels, Tensor? weight, "
        "Tensor lse, Tensor denominator, SymInt ignore_index, bool align_corners) -> Tensor"
    ),
    backward_fake=_backward_fake,
    setup_context=_setup_context,
    backward=_backward,
    autocast_to=torch.float32,
)


def _kernels():
    from upernet_fast.kernels import upsample_cross_entropy as kernels  # imports triton: only when running

    return kernels


def _triton_forward(logits, labels, weight, ignore_index, reduction, align_corners):
    return _kernels().forward(logits, labels, weight, ignore_index, reduction, align_corners)


def _triton_backward(grad_loss, logits, labels, weight, lse, denominator, ignore_index, align_corners):
    return _kernels().backward(grad_loss, logits, labels, weight, lse, denominator, ignore_index, align_corners)


def _run(kernel_op, logits, labels, ignore_index, reduction, weight, align_corners):
    loss, _, _ = kernel_op(logits, labels, weight, ignore_index, reduction, bool(align_corners))
    return loss


def _kernels_why_not(logits, labels, ignore_index, reduction, weight, align_corners) -> str | None:
    """Index widths of the kernels (every kernel backend: they index pixels in int32, labels in int64)."""
    if labels.numel() >= 2**31:
        return f"labels has {labels.numel()} pixels; the kernels index pixels with int32 (at most 2**31 - 1)"
    if ignore_index < -(2**63) or ignore_index >= 2**63:
        return f"ignore_index {ignore_index} does not fit in int64"
    return None


def _judged_tensors(logits, labels, ignore_index, reduction, weight, align_corners) -> tuple[torch.Tensor, ...]:
    return (logits,) if weight is None else (logits, weight)


# The tensors whose device and dtype select the backend (given here, every backend's: no scan of the arguments);
# the labels are integers, and the logits' device is theirs (checked by the entry point).
_backend.register(OP, "eager", reference.upsample_cross_entropy, tensors=_judged_tensors)
_backend.register(
    OP,
    "triton",
    functools.partial(_run, KERNEL_OP.define("upernet_fast", _triton_forward, _triton_backward)),
    why_not=_kernels_why_not,
)
_backend.register(
    OP, "cpp", functools.partial(_run, KERNEL_OP.in_extension(_backend.CPP_NAMESPACE)), why_not=_kernels_why_not
)
