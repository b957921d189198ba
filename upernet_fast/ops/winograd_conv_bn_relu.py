"""Conv-BN-ReLU by Winograd F(4x4, 3x3) on the C++ core: op declarations, applicability, filter cache, training.

CPU, float32, 3x3 convolutions with stride 1, padding 1, dilation 1, groups 1
(``csrc/cpu/winograd_conv_bn_relu.cpp``). :mod:`upernet_fast.ops.conv_bn_relu` routes the cpp backend's
autograd-free eval calls here (:func:`why_not` says why any other call keeps the folded ATen convolution), and
its training calls' convolutions on large enough maps (:func:`training_why_not`; the training section at the end).

BatchNorm is folded into the conv weight and bias (``_fold``, the same fold as the ATen path) and the folded
weight is transformed once (U = G g G^T, (36, C_out, C_in), its values stored in the order the C++ products
read them), then reused. The cache must never serve a
stale transform: it is keyed on the conv weight tensor, and every call compares the current values of every
input of the fold (conv weight and bias, BN weight, bias, running mean and variance, eps) bit for bit with a
snapshot taken when the transform was made; any difference recomputes it. Version counters or data pointers
would not do: writes through ``.data`` (EMA updates, some checkpoint loaders) change values without bumping
``_version`` or moving storage (tests/test_winograd_conv_bn_relu.py shows both). The comparison reads the
weight twice (weight and snapshot), small next to the convolution it saves a transform for (measured by
benchmarks/winograd_conv_bn_relu.py on a loaded 2-core machine: 9.5 ms against a 727 ms block for 512->512 at
128x128, 20 ms against 2.4 s for 2048->512; the fold, snapshot and transform it saves took 0.3 s and 1.0 s
there, before the transform's stores were blocked, which cut the transform alone ~2.7x); the
snapshot costs one more copy of each cached weight in memory, the transform four, and the folded weight, kept
only by a block whose inputs the low-resolution split (:func:`lowres_first`) has used, one more. ConvNeXt-T's
converted head in eval at batch 2, 256x256 (the demo's model, measured 2026-11-29): 351 MiB of cache over its four
Winograd blocks' 63 MiB of weights (transforms 252, snapshots 63, the FPN bottleneck's folded weight 36; 378
before the folded weight was made on demand: the three FPN convs never use it). A block drops its
entry when it is put in training mode (:meth:`ConvBNReLU.train <upernet_fast.ops.conv_bn_relu.ConvBNReLU.train>`:
training transforms its filter every step and never reads this cache, and the next eval call would have to
refold anyway, the weights having changed); :func:`forget` drops one by its conv weight.

Under ``torch.compile`` each block is one opaque custom op (end of module) that does the same lookup when it
runs, so a compiled model keeps Winograd and still sees in-place parameter updates; ``torch.export`` keeps
ATen's convolution (an exported program cannot carry this process's cache).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from upernet_fast import backend as _backend
from upernet_fast._checks import module_tensor, needs_grad, overridden_forward
from upernet_fast.kernels._utils import is_channels_last, memory_format
from upernet_fast.ops._kernel_op import InferenceOp

OP = "conv_bn_relu"
TRANSFORM_POINTS = 36  # (4 + 3 - 1)^2 positions of the transform domain
# Maps narrower than this in height or width keep ATen's convolution. There every 4x4 tile touches the zero
# border, where Winograd's error relative to the output is largest: measured at 256-2048 input channels, 2-9x
# ATen's float32 error on maps of 1x1 to 8x8 (against 0.4-2.3x from 9x9 up), above the 4x the accuracy policy
# allows. Speed loses nothing: such maps are at most two tile rows, and below 3x3 Winograd even does more
# multiplications than the direct convolution (36 per tile against 9 per output).
MIN_SIDE = 9


def _filter_fake(weight):
    return weight.new_empty((TRANSFORM_POINTS, weight.shape[0], weight.shape[1]))


def _output_fake(x, out_channels):
    """The block's output for input x: out_channels channels at x's size, in x's layout."""
    b, _, h, w = x.shape
    return x.new_empty((b, out_channels, h, w)).contiguous(memory_format=memory_format(is_channels_last(x)))


def _concat_output_fake(tensors, size, out_channels):
    from upernet_fast.ops.upsample_concat import _new_output  # the concat's layout rule (circular import)

    return _output_fake(_new_output(tensors, size), out_channels)


def _conv_fake(x, filter, bias):
    return _output_fake(x, filter.shape[1])  # filter: (36, C_out, C_in)


def _concat_conv_fake(tensors, size, filter, bias):
    return _concat_output_fake(tensors, size, filter.shape[1])


FILTER_TRANSFORM_OP = InferenceOp("winograd_filter_transform(Tensor weight) -> Tensor", _filter_fake, op_name=OP)
# The conv's 36 transform-domain products alone (tests and benchmark rows of the products).
PRODUCTS_OP = InferenceOp(
    "winograd_transform_domain_products(Tensor v, Tensor filter) -> Tensor",
    lambda v, filter: v.new_empty((TRANSFORM_POINTS, v.shape[1], filter.shape[1])),
    op_name=OP,
)
CONV_OP = InferenceOp("winograd_conv_bias_relu(Tensor x, Tensor filter, Tensor bias) -> Tensor", _conv_fake, op_name=OP)
CONCAT_CONV_OP = InferenceOp(
    "winograd_upsample_concat_conv_bias_relu(Tensor[] tensors, SymInt[] size, Tensor filter, Tensor bias) -> Tensor",
    _concat_conv_fake,
    op_name=OP,
)
# The same block with tensors[first_lowres:] convolved at their own resolution by the folded weight, then
# upsampled (csrc/cpu/winograd_lowres.h): the same output shape and layout as the fused op.
LOWRES_CONCAT_CONV_OP = InferenceOp(
    "winograd_upsample_concat_conv_bias_relu_lowres(Tensor[] tensors, SymInt[] size, Tensor filter, Tensor bias, "
    "Tensor weight, SymInt first_lowres) -> Tensor",
    lambda tensors, size, filter, bias, weight, first_lowres: _concat_conv_fake(tensors, size, filter, bias),
    op_name=OP,
)
# The plain convolutions (no bias, no ReLU) of the training path (_TrainingConv below).
PLAIN_CONV_OP = InferenceOp(
    "winograd_conv(Tensor x, Tensor filter) -> Tensor", lambda x, filter: _conv_fake(x, filter, None), op_name=OP
)
PLAIN_CONCAT_CONV_OP = InferenceOp(
    "winograd_upsample_concat_conv(Tensor[] tensors, SymInt[] size, Tensor filter) -> Tensor",
    lambda tensors, size, filter: _concat_conv_fake(tensors, size, filter, None),
    op_name=OP,
)
winograd_filter_transform = FILTER_TRANSFORM_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_transform_domain_products = PRODUCTS_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_conv_bias_relu = CONV_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_upsample_concat_conv_bias_relu = CONCAT_CONV_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_upsample_concat_conv_bias_relu_lowres = LOWRES_CONCAT_CONV_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_conv = PLAIN_CONV_OP.in_extension(_backend.CPP_NAMESPACE)
winograd_upsample_concat_conv = PLAIN_CONCAT_CONV_OP.in_extension(_backend.CPP_NAMESPACE)


def _fold_inputs(conv: nn.Conv2d, batch_norm: nn.Module) -> list[torch.Tensor | None]:
    # module_tensor, not attribute reads: nn.Module.__getattr__ costs about 1.3 us a read here (8 us a block call).
    return [module_tensor(conv, "weight"), module_tensor(conv, "bias"), module_tensor(batch_norm, "weight"),
            module_tensor(batch_norm, "bias"), module_tensor(batch_norm, "running_mean"),
            module_tensor(batch_norm, "running_var")]


_EXPORTING = ("under torch.export (an exported program keeps ATen's convolution: the Winograd block's filter "
              "cache lives in this process)")


def _tracing_why_not() -> str | None:
    # torch.compile traces the block as one opaque op (the custom ops at the end of this module, whose filter
    # cache is looked up when they run); torch.export (which sets is_exporting in strict and non-strict mode)
    # keeps ATen's convolution.
    return _EXPORTING if torch.compiler.is_exporting() else None


def why_not(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    """Why the Winograd kernel cannot run this eval-mode block call (None when it can).

    The caller has already chosen the cpp backend and seen BN use running statistics.
    """
    reason = _tracing_why_not()
    if reason is not None:
        return reason
    return _input_why_not("x", x) or _block_why_not((x.shape[2], x.shape[3]), [x], conv, batch_norm)


def concat_why_not(tensors, size, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    """Why the fused upsample-concat + Winograd block cannot run ``block(upsample_concat(tensors, size))``.

    Beyond :func:`why_not`'s conditions, the inputs must be consistent (same batch, channels adding up to
    ``conv.in_channels``): an inconsistent call is left to the unfused path, which raises the op's own error.
    """
    reason = _tracing_why_not()
    if reason is not None:
        return reason
    if not isinstance(tensors, (list, tuple)) or not tensors:
        return "tensors must be a non-empty list or tuple"
    for i, t in enumerate(tensors):
        reason = _input_why_not(f"tensors[{i}]", t)
        if reason is not None:
            return reason
        if t.dim() != 4 or t.shape[0] != tensors[0].shape[0]:
            return f"tensors[{i}] must be 4D with tensors[0]'s batch size"
    if not isinstance(conv, nn.Conv2d) or sum(t.shape[1] for t in tensors) != conv.in_channels:
        return "the tensors' channels must add up to conv.in_channels"
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(type(n) is int and n > 0 for n in size)):  # SymInts (export) keep the unfused path
        return "size must be two positive ints"
    return _block_why_not(tuple(size), tensors, conv, batch_norm)


def _input_why_not(name: str, x) -> str | None:
    if type(x) is not torch.Tensor or not x.is_cpu or x.dtype != torch.float32:  # (is_cpu: no device object)
        return f"{name} must be a plain float32 CPU tensor, got {type(x).__name__} {getattr(x, 'dtype', '')} on {getattr(x, 'device', '')}"
    if x.numel() == 0:
        return f"{name} is empty"
    return None


def _block_why_not(size, inputs, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    """The conditions on the block and the call, for an input map of ``size`` read from ``inputs``."""
    reason = _conv_why_not(size, conv)
    if reason is not None:
        return reason
    fold = [t for t in _fold_inputs(conv, batch_norm) if t is not None]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in fold):
        return "conv and BN parameters and running statistics must be float32 CPU tensors"
    if needs_grad(*inputs, *fold):
        return "autograd needs gradients of this call (the eval block's Winograd has no backward)"
    return None


def _conv_why_not(size, conv: nn.Module) -> str | None:
    """The conditions on the convolution, eval and training alike, for an input map of ``size``."""
    if min(size) < MIN_SIDE:
        return f"maps under {MIN_SIDE} pixels high or wide keep ATen (Winograd's border error; no speed gain)"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast is on (the convolution would run in the autocast dtype)"
    if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
        return "conv must be a torch.nn.Conv2d with zero padding"
    overridden = overridden_forward(conv, nn.Conv2d, "forward", "_conv_forward")
    if overridden is not None:
        return overridden
    geometry = (tuple(conv.kernel_size), tuple(conv.stride), conv.padding, tuple(conv.dilation), conv.groups)
    if geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1):
        return f"only 3x3, stride 1, padding 1, dilation 1, groups 1 convolutions; got {geometry}"
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # float32 only (why_not): exact comparison, -0.0 and NaN payloads included


def _same(current: list[torch.Tensor | None], snapshot: list[torch.Tensor | None]) -> bool:
    for now, then in zip(current, snapshot):
        if (now is None) != (then is None):
            return False
        if now is not None and (now.shape != then.shape or not torch.equal(_bits(now.detach()), _bits(then))):
            return False
    return True


class _CachedFilter:
    __slots__ = ("eps", "snapshot", "filter", "bias", "weight")

    def lowres_weight(self) -> torch.Tensor:
        """The folded weight for the low-resolution sources, (C_out, C_in, 3, 3) over (C_in, 3, 3, C_out)
        storage: the C++ op reads it as a (C_in, 9 C_out) matrix without a copy (winograd_lowres.h). Made on the
        first call that needs it, from the snapshot (bitwise the current inputs whenever the entry is served, so
        the same fold as the transform's): a block whose inputs never take the split keeps no copy."""
        if self.weight is None:
            weight, bias, bn_weight, bn_bias, running_mean, running_var = self.snapshot
            folded, _ = _fold_values(weight, bias, bn_weight, bn_bias, running_mean, running_var, self.eps)
            self.weight = folded.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)
        return self.weight


# conv weight -> its block's cached transform (weak, by identity: dropping the model drops the cache). Keyed on
# the weight tensor rather than the module so that the custom ops below, which see tensors only, share it. A
# weight used with another BN (or none) cannot be served the wrong transform: every input of the fold is
# compared bit for bit with the snapshot, whatever tensor or module it now comes from.
_CACHE: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def transformed_filter(conv: nn.Conv2d, batch_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, folded bias) for this block's current parameters: from the cache when every input of the fold is
    bitwise what it was when U was computed, else recomputed (and cached)."""
    entry = _cached(conv, batch_norm)
    return entry.filter, entry.bias


def _cached(conv: nn.Conv2d, batch_norm: nn.Module) -> _CachedFilter:
    return _cached_fold(*_fold_inputs(conv, batch_norm), batch_norm.eps)


def forget(weight: torch.Tensor) -> None:
    """Drops the eval cache entry of the block whose conv weight this is, if it has one (its memory is freed
    unless a running call still holds it); the next eval call refolds and transforms again."""
    if _CACHE:  # (every model.train() call lands here: a training loop's empty cache costs no weak-reference lookup)
        _CACHE.pop(weight, None)


def cache_nbytes(module: nn.Module) -> int:
    """Bytes the eval cache holds for the blocks of ``module`` (every conv weight in it that has an entry):
    transforms, snapshots, folded biases and any folded weight made for the low-resolution split."""
    entries = {}  # by identity: convs sharing one weight share its entry
    for conv in module.modules():
        entry = _CACHE.get(conv.weight) if isinstance(conv, nn.Conv2d) and _CACHE else None
        if entry is not None:
            entries[id(entry)] = entry
    return sum(t.untyped_storage().nbytes() for entry in entries.values()
               for t in (entry.filter, entry.bias, entry.weight, *entry.snapshot) if t is not None)


def _fold_values(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps: float):
    from upernet_fast.ops.conv_bn_relu import _fold  # the one fold of the eval path (circular import otherwise)

    with torch.no_grad():
        return _fold(
            SimpleNamespace(weight=weight, bias=bias),
            SimpleNamespace(weight=bn_weight, bias=bn_bias, running_mean=running_mean, running_var=running_var,
                            eps=eps),
        )


def _cached_fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps: float) -> _CachedFilter:
    current = [weight, bias, bn_weight, bn_bias, running_mean, running_var]
    entry = _CACHE.get(weight)
    if entry is not None and entry.eps == eps and _same(current, entry.snapshot):
        return entry
    with torch.no_grad():
        snapshot = [None if t is None else t.detach().clone() for t in current]
        folded, folded_bias = _fold_values(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        entry = _CachedFilter()
        entry.eps, entry.snapshot, entry.weight = eps, snapshot, None  # weight: lowres_weight(), on demand
        entry.filter, entry.bias = winograd_filter_transform(folded.contiguous()), folded_bias.contiguous()
    _CACHE[weight] = entry
    return entry


def winograd_conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    """relu(batch_norm(conv(x))) in eval mode by Winograd F(4x4, 3x3); the caller checked :func:`why_not`.

    x: (B, C_in, H, W) float32 CPU, any strides; returns (B, C_out, H, W) in x's layout (channels_last when x
    is, by PyTorch's suggest_memory_format rule, else NCHW).
    """
    if torch.compiler.is_compiling():  # one opaque op in the graph; the cache is looked up when it runs
        return compiled_block(x, *_fold_inputs(conv, batch_norm), float(batch_norm.eps))
    filter, bias = transformed_filter(conv, batch_norm)
    return winograd_conv_bias_relu(x, filter, bias)


def winograd_upsample_concat_conv_bn_relu(tensors, size, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    """relu(batch_norm(conv(upsample_concat(tensors, size)))) in eval mode, the concat never built: the input
    transform reads each tensor where it is, resizing on the fly (bitwise the unfused result); the caller
    checked :func:`concat_why_not`. Where :func:`lowres_first` splits the inputs, the trailing low-resolution
    ones are convolved at their own size and upsampled after (exact in real arithmetic, not bitwise the
    unfused result: judged against float64 by tests/test_winograd_conv_bn_relu.py)."""
    if torch.compiler.is_compiling():
        return compiled_concat_block(list(tensors), list(size), *_fold_inputs(conv, batch_norm),
                                     float(batch_norm.eps))
    return _concat_block(tensors, size, _cached(conv, batch_norm))


def _concat_block(tensors, size, entry: _CachedFilter) -> torch.Tensor:
    first = lowres_first(tensors, size)
    if first is None:
        return winograd_upsample_concat_conv_bias_relu(list(tensors), list(size), entry.filter, entry.bias)
    return winograd_upsample_concat_conv_bias_relu_lowres(
        list(tensors), list(size), entry.filter, entry.bias, entry.lowres_weight(), first)


def lowres_first(tensors, size) -> int | None:
    """The first of the trailing tensors that the fused op convolves at their own resolution (then upsamples),
    or None where none is worth it or the split does not apply.

    Worth it: a tensor strictly smaller than ``size`` in both dimensions with 9 h w < 2.25 H W, i.e. 4 h w < H W
    (its 3x3 products at its resolution against Winograd's 2.25 per output pixel): the FPN's 32x32 and 16x16
    levels at 128x128 and every PPM branch; the 64x64 level (equal products, plus the gather) stays in
    Winograd. The split needs at least one tensor left for Winograd and a channels_last concat (the
    low-resolution gather is vectorised over channels; NCHW keeps the plain fused op).
    """
    from upernet_fast.ops.upsample_concat import concat_channels_last  # circular import otherwise

    height, width = size
    first = len(tensors)
    while first > 1:
        h, w = tensors[first - 1].shape[2:]
        if not (h < height and w < width and 4 * h * w < height * width):
            break
        first -= 1
    if first == len(tensors) or not concat_channels_last(tensors):
        return None
    return first


# ------------------------------------------------------------------------------ the blocks under torch.compile
# Dynamo cannot trace the filter cache (it compares tensor values, then keeps tensors across calls), so under
# torch.compile each Winograd block is one opaque custom op taking the block's parameters as tensors: the
# compiled graph calls it, and it looks up (or refreshes) the cache when it runs, as the eager path does, so
# an in-place parameter update is seen by a compiled model too. torch.export keeps ATen (see _tracing_why_not).


@torch.library.custom_op("upernet_fast::winograd_conv_bn_relu_eval", mutates_args=())
def compiled_block(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float,
) -> torch.Tensor:
    entry = _cached_fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return winograd_conv_bias_relu(x, entry.filter, entry.bias)


@compiled_block.register_fake
def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return _output_fake(x, weight.shape[0])  # weight: (C_out, C_in, 3, 3)


@torch.library.custom_op("upernet_fast::winograd_upsample_concat_conv_bn_relu_eval", mutates_args=())
def compiled_concat_block(
    tensors: list[torch.Tensor], size: list[int], weight: torch.Tensor, bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None, bn_bias: torch.Tensor | None, running_mean: torch.Tensor,
    running_var: torch.Tensor, eps: float,
) -> torch.Tensor:
    entry = _cached_fold(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return _concat_block(tensors, size, entry)


@compiled_concat_block.register_fake
def _(tensors, size, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return _concat_output_fake(tensors, size, weight.shape[0])


# ------------------------------------------------------------------ training: the convolution and its gradients
# In training the block's BatchNorm normalises with batch statistics, so nothing folds into the weight and the
# weight changes every step: the filter transform is made on every call (15 ms for 512 -> 512, against a
# 100-200 ms convolution at the FPN's 64x64 maps, batch 2) and never cached. The convolution runs by Winograd
# forward and again for the input gradient; the weight gradient stays ATen's (a reduction over every pixel, its
# own algorithm). Measured here (2 threads, 512 -> 512 at 64x64, batch 2): ATen forward 196 ms, input and weight
# gradient in one call 589 ms, alone 268 and 242 ms; Winograd 106 ms plus the transform (26 ms then, scalar;
# 14.5 ms since it is vectorised).


# Training maps with fewer output pixels (batch x height x width) than this keep ATen's convolution. Why: the two
# filter transforms made per step (forward and adjoint, ~15 ms each for 512 -> 512 on 2 threads) are repaid only by
# enough pixels. Measured side by side (benchmarks/winograd_conv_bn_relu.py --train, 2 threads, AVX-512 Xeon,
# 2026-11-28), the training step against ATen's: 1.27x faster at 64x64 (4096 pixels), 1.18x at 128x128, but 0.73x
# at 32x32 (1024) and 0.40x for the PPM bottleneck at 16x16 (2816 input channels: five slices' transforms).
# Re-measured once the transform was vectorised (an interleaved in-process A/B of one 512 -> 512 block's training
# step, 6 rounds, medians): 0.46x at 512 pixels, 0.69x at 1024, 0.75x at 1152, 0.90x at 2048, then 1.24x at 3072
# (rounds 0.76x-1.29x), 1.17x at 4096, 1.18x at 4608. The crossover lies between 2048 and 3072; no head map of the
# usual training shapes falls there (at 256x256 crops, batch 2: 8192, 2048, 512 and 128 pixels), so the bound stays.
TRAIN_MIN_PIXELS = 4096


def training_why_not(inputs, size, conv: nn.Module) -> str | None:
    """Why a training block's convolution of ``inputs`` (one map, or maps that :class:`upsample_concat
    <upernet_fast.ops.upsample_concat>` resizes to ``size`` and concatenates) keeps ATen's, or None where
    :func:`training_conv` (or, per map, :func:`training_slice_conv`) runs it. The caller chose the cpp backend."""
    if torch.compiler.is_compiling():
        return "under torch.compile or torch.export (the traced graph keeps ATen's convolution)"
    for i, t in enumerate(inputs):
        reason = _input_why_not(f"inputs[{i}]", t)
        if reason is not None:
            return reason
    reason = _conv_why_not(size, conv)
    if reason is not None:
        return reason
    if inputs[0].shape[0] * size[0] * size[1] < TRAIN_MIN_PIXELS:
        return f"fewer than {TRAIN_MIN_PIXELS} output pixels (batch x height x width): the filter transforms cost more"
    if any(t is not None and (t.dtype != torch.float32 or t.device.type != "cpu") for t in (conv.weight, conv.bias)):
        return "conv weight and bias must be float32 CPU tensors"
    return None


def adjoint_filter(weight: torch.Tensor) -> torch.Tensor:
    """The transform of the weight whose convolution is this one's input gradient: (C_in, C_out) swapped and
    each 3x3 kernel rotated by 180 degrees (a stride-1, padding-1 convolution's transpose is such a
    convolution)."""
    return winograd_filter_transform(weight.detach().flip(2, 3).transpose(0, 1).contiguous())


def weight_gradient(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ATen's weight gradient alone (one call that also made the input gradient measured slower than the two)."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


class _TrainingConv(torch.autograd.Function):
    """``conv2d(x, weight, bias, padding=1)`` of a 3x3 stride-1 convolution, forward and input gradient by
    Winograd F(4x4, 3x3), weight gradient by ATen. Not bitwise ATen's convolution (another algorithm): judged
    against float64 relative to ATen's own float32 error (tests/test_winograd_conv_bn_relu_train.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        out = winograd_conv(x, winograd_filter_transform(weight.detach().contiguous()))
        return out if bias is None else out.add_(bias.view(1, -1, 1, 1))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = winograd_conv(grad, adjoint_filter(weight)) if ctx.needs_input_grad[0] else None
        grad_weight = weight_gradient(grad, x, weight) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def training_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)`` for a training block where :func:`training_why_not` allows it (differentiable)."""
    return _TrainingConv.apply(x, conv.weight, conv.bias)


def training_slice_conv(tensor: torch.Tensor, size, weight: torch.Tensor) -> torch.Tensor:
    """``conv2d(upsample_concat([tensor], size), weight, padding=1)`` by Winograd, the resize done on the fly
    (no resized copy is built): one input map's share of a bottleneck's convolution (conv_bn_relu._ConcatConv).
    Not differentiable by itself: its caller's backward uses :func:`adjoint_filter` and :func:`weight_gradient`."""
    return winograd_upsample_concat_conv([tensor], list(size), winograd_filter_transform(weight.contiguous()))
