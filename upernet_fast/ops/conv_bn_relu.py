"""Conv -> BatchNorm -> ReLU block (transformers' ``UperNetConvModule``): module, entry point and backends.

Triton and C++ backends:

* BatchNorm using running statistics (eval mode): BN is folded into the convolution's weight and bias on the
  fly, every call (stored parameters are never touched, and any change of a parameter or running statistic
  is seen at once), then one conv call with bias and ReLU: on CUDA without autograd, cuDNN's fused
  conv+bias+ReLU (one kernel, the output written once); else conv with bias, then ReLU. The fold is differentiable, so gradients
  still reach the conv and BN parameters in eval mode.
* BatchNorm using batch statistics (training mode): the conv stays on PyTorch (cuDNN), then the BN+ReLU
  op of :mod:`upernet_fast.ops.bn_relu` (deterministic statistics, one normalise+affine+ReLU pass, a backward
  from the conv output and per-channel statistics only, SyncBatchNorm across processes).
* C++ backend only, eval, autograd-free, float32 CPU, 3x3 stride 1 padding 1 convolutions: Winograd F(4x4, 3x3)
  with BN folded in, bias and ReLU in its output transform, and the filter transform cached (recomputed
  whenever any input of the fold changes): :mod:`upernet_fast.ops.winograd_conv_bn_relu`.
* C++ backend only, eval, autograd-free, 1x1 convolutions of NCHW float32/float64 CPU maps: the whole block in one
  C++ call (``conv_bn_relu_pointwise_eval``, csrc/cpu/conv_bn_relu.cpp), BN folded or, where the weight outnumbers
  the output, applied after the products; bitwise the Python composition of the same steps.
* C++ backend only, training, the same convolutions on maps of at least ``TRAIN_MIN_PIXELS`` output pixels: the
  conv and its input gradient by Winograd (weight gradient ATen's), then the BN+ReLU op, the bottlenecks over a
  concat of at least ``SLICED_MIN_BYTES`` one input map at a time (:class:`_ConcatConv`):
  :func:`.winograd_conv_bn_relu.training_conv`.
"""

from __future__ import annotations

import functools
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from upernet_fast import backend as _backend
from upernet_fast import recompute, reference
from upernet_fast._checks import FLOAT_DTYPES, check_tensor, module_tensor, needs_grad, overridden_forward
from upernet_fast.ops.bn_relu import (
    batch_norm_why_not,
    batch_stats_path,
    bn_parameters,
    bn_relu_train,
    bn_relu_train_cpp,
    running_stats_path,
    shares_dtype,
)
from upernet_fast.ops import winograd_conv_bn_relu as winograd
from upernet_fast.ops._kernel_op import InferenceOp

OP = "conv_bn_relu"


def conv_bn_relu(
    x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, *, backend: str = "auto"
) -> torch.Tensor:
    """``relu(batch_norm(conv(x)))`` with ``batch_norm`` in its own mode (training updates running stats).

    x: (B, C_in, H, W); returns (B, C_out, H', W') in the conv output's layout and dtype.
    """
    if not (isinstance(x, torch.Tensor) and x.dim() == 4 and x.dtype in FLOAT_DTYPES):  # (no call when it passes)
        check_tensor("x", x, ndim=4, floating=True)
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"x must have {conv.in_channels} channels (conv.in_channels), got shape {tuple(x.shape)}")
    # (eager asked for by name reads no placement: the test is skipped there)
    like = x if backend != "eager" and _shares_dtype(x, conv, batch_norm) else None
    impl = _backend.select(OP, backend, x, conv, batch_norm, like=like)
    return impl.fn(x, conv, batch_norm)


class ConvBNReLU(nn.Module):
    """Drop-in for transformers' ``UperNetConvModule``: same constructor, attributes and state_dict keys.

    ``conv`` (Conv2d, stride 1, no bias by default) -> ``batch_norm`` (BatchNorm2d) -> ``activation`` (ReLU).
    ``backend`` picks the implementation (see upernet_fast.backend); it is plain Python state, not saved.
    """

    # Attributes that are runtime state of this class only; upernet_fast.revert deletes them.
    # (The Winograd blocks' eval cache is kept outside the instance, keyed weakly on its conv weight.)
    runtime_attributes = ("backend",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] | str = 0,
        bias: bool = False,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            padding=padding,
            bias=bias,
            dilation=dilation,
        )
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()
        self.backend = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv_bn_relu(input, self.conv, self.batch_norm, backend=getattr(self, "backend", "auto"))

    def train(self, mode: bool = True) -> ConvBNReLU:
        """nn.Module.train; training mode also drops the block's eval Winograd cache (its filter transform, four
        times the weight, and a snapshot): a training step transforms its filter itself and never reads it, and
        the weights it updates would make the next eval call refold anyway. A loop that evaluates between
        training steps would otherwise train with the last evaluation's transforms still held."""
        module = super().train(mode)  # (checks mode first)
        if mode:
            self.release_eval_cache()
        return module

    def release_eval_cache(self) -> None:
        """Drops this block's eval Winograd cache entry, if it has one (``train()`` and ``upernet_fast.revert``
        call it; the next eval call refolds)."""
        weight = getattr(self.conv, "weight", None)
        if isinstance(weight, torch.Tensor):
            winograd.forget(weight)

    def forward_concat(
        self,
        tensors: Sequence[torch.Tensor],
        size: Sequence[int],
        *,
        concat_backend: str = "auto",
        release: bool = False,
    ) -> torch.Tensor:
        """``self(upsample_concat(tensors, size, backend=concat_backend))``, the bottlenecks' input and block.

        Where both ops run on the C++ backend, autograd-free, in eval mode, on float32 CPU maps (the conditions
        of the Winograd block), one fused op computes it without building the concat: the Winograd input
        transform reads each tensor where it is and resizes it on the fly, bitwise the unfused result. In training
        on the C++ backend, a concat of at least ``SLICED_MIN_BYTES`` is convolved one input map at a time
        (:class:`_ConcatConv`, see :func:`_takes_sliced_backward`). Anywhere else, and whenever a hook on this module
        or its conv is there to see its input, exactly the two calls.

        ``release=True`` (``tensors`` must then be a list): the list is emptied once the concat is built, so
        that the maps only it still held are freed before the convolution runs instead of after it.
        """
        backend = getattr(self, "backend", "auto")
        if (
            not reference.uses_batch_stats(self.batch_norm)
            and not _has_forward_hooks(self)
            and winograd.concat_why_not(tensors, size, self.conv, self.batch_norm) is None
            and _backend.select(OP, backend, tensors[0], self.conv, self.batch_norm).backend == "cpp"
            and _backend.select("upsample_concat", concat_backend, tuple(tensors), tuple(size)).backend == "cpp"
        ):
            return winograd.winograd_upsample_concat_conv_bn_relu(tensors, size, self.conv, self.batch_norm)
        from upernet_fast.ops.upsample_concat import upsample_concat  # imports this module's package

        if _takes_sliced_backward(self, tensors, size, backend, concat_backend):
            conv = self.conv
            geometry = (conv.stride, conv.padding, conv.dilation)
            by_winograd = winograd.training_why_not(tensors, size, conv) is None
            out = _ConcatConv.apply((geometry, tuple(size), by_winograd), conv.weight, conv.bias, *tensors)
            if release:
                tensors.clear()
            return batch_stats_path(bn_relu_train_cpp, out, self.batch_norm)
        concat = upsample_concat(tensors, size, backend=concat_backend)
        if release:
            tensors.clear()
        return self(concat)


# ------------------------------------------- training: a bottleneck's conv over a concat, one input map at a time


# The smallest concat (bytes) whose training conv runs by input slices (_ConcatConv). The slices exist for the
# peak memory of a large concat; below this one building it costs little memory, and narrow slices cost time.
# Measured 2026-11-29, forward and backward of one block on 2 threads, the whole-concat path's speed over the
# sliced one's: a tiny model's PPM bottleneck (convnext-test: 48 + 4 x 32 channels at 2x2, batch 8; 0.02 MiB)
# 3.8x; its FPN bottleneck (4 x 32 channels, batch 8) at 16x16 (1 MiB) 1.00x-1.03x and at 32x32 (4 MiB) 1.13x;
# ConvNeXt-T's PPM bottleneck at 8x8, batch 2 (1.4 MiB) 0.98x; its FPN bottleneck (4 x 512 channels) at 32x32,
# batch 1 and 2 (8 and 16 MiB) 1.00x and 0.96x, at 64x64, batch 2 (64 MiB) 0.93x, where slicing also lowers the
# training step's peak.
SLICED_MIN_BYTES = 8 * 2**20


def _takes_sliced_backward(block: ConvBNReLU, tensors, size, backend: str, concat_backend: str) -> bool:
    """Whether a training call of ``block.forward_concat`` runs the concat and conv as :class:`_ConcatConv`: the
    C++ backend for both ops, CPU float32 maps, a concat of at least SLICED_MIN_BYTES, grad mode, no hook on the
    block or its conv (one would see the concat), not under torch.compile (Inductor plans its own memory)."""
    conv = block.conv
    return (
        reference.uses_batch_stats(block.batch_norm)
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not _has_forward_hooks(block)
        and not _has_forward_hooks(conv)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and len(tensors) > 1
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in tensors)
        and isinstance(size, (tuple, list)) and len(size) == 2  # (else upsample_concat's check names it)
        and tensors[0].element_size() * tensors[0].shape[0] * sum(t.shape[1] for t in tensors) * size[0] * size[1]
        >= SLICED_MIN_BYTES
        and conv.weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and _backend.select(OP, backend, tensors[0], conv, block.batch_norm).backend == "cpp"
        and _backend.select("upsample_concat", concat_backend, tuple(tensors), (1, 1)).backend == "cpp"
    )


class _ConcatConv(torch.autograd.Function):
    """``conv(upsample_concat(tensors, size))`` computed one concatenated input at a time, forward and backward.

    Why: the FPN bottleneck's conv reads a concat of four 512-channel maps (64 MiB at batch 2, 256x256). Built
    whole, that concat sets the CPU training step's peak twice: in the forward conv, and in ATen's backward of
    it, which holds the rebuilt concat, its 64 MiB gradient and the weight gradient at once. A convolution is
    linear in its input channels, so each map's slice is done alone: the map resized to ``size`` (16 MiB), its
    conv with that slice of the weight, added to the output in map order; in the backward, the gradient of that
    slice (resized back to the map's size at once) and that slice of the weight gradient, the quantities ATen's
    whole backward computes for those channels. No concat exists. The output sums the four partial convs: not
    the bits of one conv over the concat (another summation order), within float32 rounding of it
    (tests/test_conv_bn_relu.py judges both against float64). The maps are saved (under
    upernet_fast.recompute, as their recipes) and each is resized again in the backward.

    ``by_winograd`` (winograd_conv_bn_relu.training_why_not allows it: 3x3, stride 1, maps at least MIN_SIDE
    pixels a side and TRAIN_MIN_PIXELS output pixels in all): each slice's conv and its input gradient run by Winograd (the forward resizes the map on the fly,
    no resized copy), its weight gradient by ATen; else ATen's convolution and its backward.
    """

    @staticmethod
    def forward(ctx, how: tuple, weight, bias, *tensors: torch.Tensor) -> torch.Tensor:
        from upernet_fast.ops.upsample_concat import upsample_concat

        geometry, size, by_winograd = how
        ctx.geometry, ctx.size, ctx.by_winograd, ctx.has_bias = geometry, size, by_winograd, bias is not None
        ctx.save_for_backward(weight, *tensors)
        stride, padding, dilation = geometry
        out, start = None, 0
        for tensor in tensors:
            channels = tensor.shape[1]
            if by_winograd:
                part = winograd.training_slice_conv(tensor, size, weight[:, start:start + channels])
                if out is None and bias is not None:
                    part.add_(bias.view(1, -1, 1, 1))
            else:
                # NCHW, as cpu_training_conv_input makes a CPU 3x3 conv's input (oneDNN's faster backward).
                piece = upsample_concat([tensor], size, backend="cpp").contiguous()
                part = F.conv2d(piece, weight[:, start:start + channels], bias if out is None else None, stride,
                                padding, dilation)
                del piece
            out = part if out is None else out.add_(part)
            start += channels
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from upernet_fast.ops.upsample_concat import upsample_concat

        stride, padding, dilation = ctx.geometry
        weight, *tensors = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        weight_needed = ctx.needs_input_grad[1]
        grads, weight_grads, start = [], [], 0
        for index, tensor in enumerate(tensors):
            channels = tensor.shape[1]
            slice_weight = weight[:, start:start + channels]
            leaf = tensor.detach().requires_grad_(ctx.needs_input_grad[3 + index])
            if ctx.by_winograd:
                # The input gradient first, from grad_out alone: its transient buffers (the slice's adjoint
                # filter transform, the products' chunks) are freed before the resized map is rebuilt.
                grad_piece = winograd.winograd_conv(grad_out, winograd.adjoint_filter(slice_weight)) \
                    if leaf.requires_grad else None
                with torch.enable_grad():
                    piece = upsample_concat([leaf], ctx.size, backend="cpp")  # the concat's slice, bitwise
                grads.append(torch.autograd.grad(piece, leaf, grad_piece)[0] if leaf.requires_grad else None)
                del grad_piece
                grad_weight = winograd.weight_gradient(grad_out, piece.detach().contiguous(), slice_weight) \
                    if weight_needed else None
            else:
                with torch.enable_grad():
                    piece = upsample_concat([leaf], ctx.size, backend="cpp")  # the concat's slice, bitwise
                grad_piece, grad_weight, _ = torch.ops.aten.convolution_backward(
                    grad_out, piece.detach().contiguous(), slice_weight, None, stride, padding,
                    dilation, False, [0, 0], 1, [leaf.requires_grad, weight_needed, False],
                )
                grads.append(torch.autograd.grad(piece, leaf, grad_piece)[0] if leaf.requires_grad else None)
                del grad_piece
            weight_grads.append(grad_weight)
            del piece
            start += channels
        grad_weight = torch.cat(weight_grads, dim=1) if weight_needed else None
        grad_bias = grad_out.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return (None, grad_weight, grad_bias, *grads)


def _has_forward_hooks(module: nn.Module) -> bool:
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks or module._forward_pre_hooks
        or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
    )


# --------------------------------------------------------------------------------- eval: BN folded into conv

def _fold(conv: nn.Conv2d, batch_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """conv weight * scale and (conv bias - running mean) * scale + BN bias, scale = w / sqrt(var + eps).

    Computed in fp32 (at least) and returned in the conv weight's dtype.
    """
    weight = conv.weight
    acc = torch.promote_types(weight.dtype, torch.float32)
    scale = torch.rsqrt(batch_norm.running_var.to(acc) + batch_norm.eps)
    if batch_norm.weight is not None:
        scale = scale * batch_norm.weight.to(acc)
    shift = -batch_norm.running_mean.to(acc)
    if conv.bias is not None:
        shift = shift + conv.bias.to(acc)
    shift = shift * scale
    if batch_norm.bias is not None:
        shift = shift + batch_norm.bias.to(acc)
    folded_weight = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return folded_weight, shift.to(weight.dtype)


def conv_bn_relu_folded(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module, *, pointwise: bool = False
                        ) -> torch.Tensor:
    """Eval-mode block: one conv with BN folded into its weight and bias, then ReLU. ``pointwise``: the conv as a
    matrix product (:func:`pointwise_conv`; the caller checked :func:`pointwise_why_not`)."""
    # Folded on every call, never cached: one elementwise pass over the weight, small next to the conv, and it
    # can never go stale (a cache keyed on version counters misses in-place writes through `.data`, as EMA
    # updates and some checkpoint loaders do). Differentiable when autograd needs parameter gradients.
    weight, bias = _fold(conv, batch_norm)
    fused = _cudnn_conv_bias_relu(x, conv, weight, bias)
    if fused is not None:
        return fused
    out = pointwise_conv(x, weight, bias) if pointwise else conv._conv_forward(x, weight, bias)
    return torch.relu_(out) if not out.requires_grad else F.relu(out)


# ------------------------------------------------------------------ 1x1 convolutions as matrix products (cpp, CPU)


def pointwise_why_not(x: torch.Tensor, conv: nn.Module) -> str | None:
    """Why the cpp backend keeps ATen's convolution for this 1x1 conv of ``x`` rather than :func:`pointwise_conv`.

    Measured side by side on this project's CPU (2 threads, AVX-512, 2026-11-28): MKL's matrix products against
    oneDNN's convolution, forward / input and weight gradient, at the heads' 1x1 shapes: NCHW inputs 1.13x-4.7x /
    1.14x-2.9x faster (96 -> 512 at 128x128: 20 against 36 ms / 17.5 against 51 ms); channels_last inputs from
    0.76x to 2.3x, so those keep oneDNN's channels_last convolution.
    """
    if torch.compiler.is_compiling():
        return "under torch.compile or torch.export (the traced graph keeps ATen's convolution)"
    # (x.is_cpu and module_tensor: a device object and nn.Module.__getattr__ cost about 1 us each, every call)
    weight = module_tensor(conv, "weight")
    if not x.is_cpu or x.dtype not in (torch.float32, torch.float64) or weight is None or weight.dtype != x.dtype:
        return "x and the conv weight must be float32 or float64 CPU tensors of one dtype"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on"
    overridden = overridden_forward(conv, nn.Conv2d, "forward", "_conv_forward")
    if overridden is not None:
        return overridden
    geometry = (tuple(conv.kernel_size), tuple(conv.stride), conv.padding, tuple(conv.dilation), conv.groups,
                conv.padding_mode)
    if geometry not in (((1, 1), (1, 1), (0, 0), (1, 1), 1, "zeros"), ((1, 1), (1, 1), "valid", (1, 1), 1, "zeros")):
        return f"only 1x1 convolutions with stride 1, no padding, dilation 1, groups 1; got {geometry}"
    if x.dim() != 4 or not x.is_contiguous() or x.numel() == 0:
        return "x must be a non-empty NCHW-contiguous 4D tensor (channels_last keeps oneDNN's, measured on par)"
    return None


class _PointwiseConv(torch.autograd.Function):
    """A 1x1 convolution of an NCHW-contiguous map as matrix products, one per image written in place (torch.matmul
    of the 2D weight with the 3D map copied its result once more: 47 of 85 ms at 96 -> 512, 128x128): out[b] =
    W @ x[b] (C_out x C_in times C_in x HW), grad x[b] = W^T @ grad[b], grad W = the sum over b, in order, of
    grad[b] @ x[b]^T. Saves x itself, as the convolution would (upernet_fast.recompute sees the same tensor). Not
    bitwise ATen's convolution: another summation order, within float32 rounding of it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return _pointwise_products(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        b, c, h, w = x.shape
        matrix, x3 = weight.reshape(weight.shape[0], c), x.view(b, c, h * w)
        grad3 = grad.contiguous().view(b, -1, h * w)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = x.new_empty((b, c, h * w))
            for image in range(b):
                torch.mm(matrix.t(), grad3[image], out=grad_x[image])
            grad_x = grad_x.view(b, c, h, w)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad3[0], x3[0].t())
            for image in range(1, b):
                grad_weight.addmm_(grad3[image], x3[image].t())
            grad_weight = grad_weight.view_as(weight)
        grad_bias = grad3.sum((0, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def _pointwise_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """_PointwiseConv's forward: out[b] = W @ x[b] (+ bias), each product written in place."""
    b, c, h, w = x.shape
    matrix, x3 = weight.reshape(weight.shape[0], c), x.view(b, c, h * w)
    out = x.new_empty((b, matrix.shape[0], h * w))
    for image in range(b):
        if bias is None:
            torch.mm(matrix, x3[image], out=out[image])
        else:
            torch.addmm(bias.view(-1, 1), matrix, x3[image], out=out[image])
    return out.view(b, -1, h, w)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 weight where :func:`pointwise_why_not` allows it (differentiable).

    Where autograd records nothing (no grad mode, or no input requiring grad: eval), the products run without the
    autograd Function around them, whose set-up measured 10-40 us a call on this project's CPU: most of the gap
    between a PPM eval block's matrix product and the whole block."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _PointwiseConv.apply(x, weight, bias)
    return _pointwise_products(x, weight, bias)


# Set to the reason once cuDNN refuses the fused call on this machine; the two-kernel path is used from then on.
_cudnn_fused_refused: list[str] = []


def _cudnn_conv_bias_relu(x, conv: nn.Conv2d, weight, bias) -> torch.Tensor | None:
    """conv + bias + ReLU in one cuDNN call (inference on CUDA only), or None where it does not apply.

    ``aten::cudnn_convolution_relu`` has no autograd formula, so it is used only when nothing needs gradients;
    it is not autocast-aware, so under autocast the operands are cast to the autocast dtype as conv would be.
    A cuDNN refusal (an unsupported dtype/layout combination on some versions) is announced once, then the
    conv-then-in-place-ReLU path runs for the rest of the process.
    """
    if (
        _cudnn_fused_refused
        or x.device.type != "cuda"
        or not torch.backends.cudnn.enabled
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.compiler.is_compiling()
    ):
        return None
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    elif not (x.dtype == weight.dtype == bias.dtype):
        return None
    try:
        return torch.ops.aten.cudnn_convolution_relu(
            x, weight, bias, list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups
        )
    except RuntimeError as exc:
        _cudnn_fused_refused.append(str(exc).splitlines()[0])
        warnings.warn(
            f"upernet_fast: cuDNN refused the fused conv+bias+ReLU ({_cudnn_fused_refused[0]}); eval-mode blocks "
            "run conv then ReLU from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# ------------------------------------------------------------------------------------------------ backends


def _kernels_conv_bn_relu(train_op, x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    """Eval: BN folded into the conv (then one fused cuDNN call on CUDA). Training: conv, then ``train_op``."""
    if not reference.uses_batch_stats(batch_norm):
        return conv_bn_relu_folded(x, conv, batch_norm)
    return batch_stats_path(train_op, conv(cpu_training_conv_input(x, conv)), batch_norm)


def cpu_training_conv_input(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``x`` in NCHW where a CPU convolution with a spatial kernel will run its backward, else ``x`` itself.

    oneDNN's channels_last convolution backward measured 1.3x-1.8x slower than its NCHW one on this project's
    CPU (AVX2, fp32, 2 threads, batch 2: 3x3 512->512 at 64x64 1.07-1.22 s against 0.71 s; 2048->512 at 64x64
    5.1-5.4 s against 3.0 s) while their forwards are on par, and a ConvNeXt or Swin backbone hands the head
    channels_last features. One copy of ``x`` (and of its gradient) buys the faster backward; the block's output
    is then NCHW. 1x1 convolutions keep their input: there the copy is not repaid.
    """
    if (
        x.device.type == "cpu"
        and conv.kernel_size != (1, 1)
        and torch.is_grad_enabled()
        and (x.requires_grad or conv.weight.requires_grad)
        and not x.is_contiguous()
    ):
        copy = x.contiguous()
        if not torch.compiler.is_compiling():  # (recipes are not made under torch.compile)
            _remember_copy(copy, x)
        return copy
    return x


def _remember_copy(copy: torch.Tensor, x: torch.Tensor) -> None:
    """The copy is what the convolution saves for its backward; it is rebuilt there from ``x`` instead
    (upernet_fast.recompute) where keeping ``x`` costs nothing more: ``x`` rebuilt itself (the FPN sums), or ``x``
    dense, the copy's size, and usually kept anyway (the auxiliary head's input, which a lateral conv saves)."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        recompute.remember(copy, torch.Tensor.contiguous, (x,))
    else:  # a view into a larger storage: keeping x would keep all of it
        recompute.remember_from_recipes(copy, torch.Tensor.contiguous, (x,))


def _cpp_conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    """As the Triton backend's block, except in eval mode: autograd-free 3x3 stride-1 blocks on float32 CPU
    tensors run Winograd F(4x4, 3x3) with a cached filter transform (:mod:`.winograd_conv_bn_relu`), and blocks
    whose weight outnumbers their output (the pyramid pooling module's 1x1 convs on 1x1 to 6x6 maps) keep BN
    unfolded: the conv, then one C++ pass of relu(y * scale + shift) over its small output, instead of
    rewriting the whole weight on every call to fold BN into it. Autograd-free 1x1 blocks (folded or not) are
    one C++ call, :func:`_pointwise_eval_cpp`, with the bits of the composition it replaces."""
    if not reference.uses_batch_stats(batch_norm):
        if winograd.why_not(x, conv, batch_norm) is None:
            return winograd.winograd_conv_bn_relu(x, conv, batch_norm)
        unfolded = _keeps_bn_unfolded(x, conv)
        pointwise = pointwise_why_not(x, conv) is None
        # The unfolded form calls the conv itself: a hook on it must see that call (the fold never calls it).
        if pointwise and not (unfolded and _has_forward_hooks(conv)):
            # The op's tensors, read once: judged for autograd (statistics included), then passed.
            tensors = (module_tensor(conv, "weight"), module_tensor(conv, "bias"),
                       module_tensor(batch_norm, "running_mean"), module_tensor(batch_norm, "running_var"),
                       module_tensor(batch_norm, "weight"), module_tensor(batch_norm, "bias"))
            if not needs_grad(x, *tensors):  # autograd records nothing: a frozen, served model, or no_grad
                return _pointwise_eval_cpp(x, *tensors, float(batch_norm.eps), not unfolded)
        if unfolded:
            return running_stats_path(_cpp_plain_conv(x, conv), batch_norm)
        return conv_bn_relu_folded(x, conv, batch_norm, pointwise=pointwise)
    return batch_stats_path(bn_relu_train_cpp, _cpp_training_conv(x, conv), batch_norm)


# The eval 1x1 block without autograd in one C++ call (csrc/cpu/conv_bn_relu.cpp): fold=True folds BN into the
# weight (conv_bn_relu_folded's _fold, products and ReLU), fold=False runs the products with the conv's bias, then
# bn_relu_eval_from_buffers (running_stats_path's autograd-free form). The same ATen products and the same
# arithmetic as those Python paths, so the same bits; a dozen Python-to-ATen calls fewer (about 60 against 15 us
# on a tiny block here), which also leaves the interpreter's working set in cache for the code that follows.
POINTWISE_EVAL_OP = InferenceOp(
    "conv_bn_relu_pointwise_eval(Tensor x, Tensor weight, Tensor? conv_bias, Tensor running_mean, "
    "Tensor running_var, Tensor? bn_weight, Tensor? bn_bias, float eps, bool fold) -> Tensor",
    lambda x, weight, *_: x.new_empty((x.shape[0], weight.shape[0], x.shape[2], x.shape[3])),
    op_name=OP,
)
_pointwise_eval_cpp = POINTWISE_EVAL_OP.in_extension(_backend.CPP_NAMESPACE)


def _cpp_training_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` of a training block on the cpp backend: by Winograd, forward and input gradient
    (winograd_conv_bn_relu.training_conv), or a 1x1 conv as matrix products (:func:`pointwise_conv`), where their
    conditions hold and no hook on the conv is there to see the call; else the module's own call. The input is first made NCHW as for ATen (cpu_training_conv_input): the
    weight gradient stays ATen's, whose NCHW backward is the faster."""
    x = cpu_training_conv_input(x, conv)
    if not _has_forward_hooks(conv) and winograd.training_why_not((x,), x.shape[2:], conv) is None:
        return winograd.training_conv(x, conv)
    return _cpp_plain_conv(x, conv)


def _cpp_plain_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)``: a 1x1 conv as matrix products (:func:`pointwise_conv`) where :func:`pointwise_why_not` allows
    it and no hook on the conv is there to see the call, else the module's own call."""
    if not _has_forward_hooks(conv) and pointwise_why_not(x, conv) is None:
        return pointwise_conv(x, conv.weight, conv.bias)
    return conv(x)


def _keeps_bn_unfolded(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    """Whether the eval block runs the conv, then BN+ReLU in one C++ pass, rather than folding BN into the weight:
    where folding (one pass over the weight) costs more than a pass over the conv's output (sizes estimated from
    the strides: only the choice between two exact-semantics paths depends on it), and the conv's output is a
    dtype the C++ kernels take (not under autocast, which makes it float16 or bfloat16).

    Never under torch.compile (dynamo would guard, and recompile, on dynamic sizes; the fold is what it traced
    before), nor on symbolic sizes in torch.export (the comparison would specialise them); a static export makes
    the eager choice, so that its program is bitwise eager."""
    shape = x.shape
    if torch.compiler.is_compiling():  # (torch.export included; eager sizes are never symbolic)
        if not torch.compiler.is_exporting():
            return False
        if any(isinstance(d, torch.SymInt) for d in (shape[0], shape[-2], shape[-1])):
            return False
    if x.dtype not in _UNFOLDED_DTYPES or torch.is_autocast_enabled("cpu" if x.is_cpu else x.device.type):
        return False
    out_pixels = (shape[-2] // conv.stride[0]) * (shape[-1] // conv.stride[1])
    return module_tensor(conv, "weight").numel() > shape[0] * conv.out_channels * out_pixels


_UNFOLDED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _kernels_why_not(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}"
    if isinstance(batch_norm, _BatchNorm) and batch_norm.num_features != conv.out_channels:
        return f"batch_norm has {batch_norm.num_features} features but conv has {conv.out_channels} out_channels"
    return batch_norm_why_not(x, batch_norm)


def _cpp_why_not(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    reason = _kernels_why_not(x, conv, batch_norm)
    # (Only CPU tensors reach the cpp backend: no device object, about 1 us, built per call.)
    if reason is None and reference.uses_batch_stats(batch_norm) and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        taken = _backend.BACKENDS_DECLARED["cpp"].capabilities.dtypes
        if dtype not in taken:  # the conv output, which the BN+ReLU kernels read, comes out in this dtype
            return f"autocast runs the convolution in {dtype}; the C++ kernels take {taken}"
    return reason


def _judged_tensors(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> list[torch.Tensor]:
    tensors = bn_parameters(x, batch_norm) if isinstance(batch_norm, nn.Module) else [x]
    try:  # read from the module's dict, as module_tensor does, without its call: on every op call
        weight = conv._parameters["weight"]
    except (AttributeError, KeyError):
        weight = module_tensor(conv, "weight") if isinstance(conv, nn.Module) else None
    if isinstance(weight, torch.Tensor):
        tensors.append(weight)  # x stays first: its device is the call's
    return tensors


def _shares_dtype(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> bool:
    """Whether every tensor :func:`_judged_tensors` picks has ``x``'s dtype (then ``select(..., like=x)``)."""
    try:  # (the conv weight _judged_tensors reads; anything but a stock module takes the full reading)
        weight = conv._parameters["weight"]
    except (AttributeError, KeyError):
        return False
    return isinstance(batch_norm, nn.Module) and shares_dtype(x, batch_norm, weight)


_backend.register(OP, "eager", reference.conv_bn_relu)
_backend.register(
    OP, "triton", functools.partial(_kernels_conv_bn_relu, bn_relu_train), why_not=_kernels_why_not,
    tensors=_judged_tensors,
)
_backend.register(OP, "cpp", _cpp_conv_bn_relu, why_not=_cpp_why_not, tensors=_judged_tensors)
