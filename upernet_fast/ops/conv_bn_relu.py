"""Conv -> BatchNorm -> ReLU block (transformers' ``UperNetConvModule``): module, entry point and backends.

Triton backend:

* BatchNorm using running statistics (eval mode): BN is folded into the convolution's weight and bias on the
  fly, every call (stored parameters are never touched, and any change of a parameter or running statistic
  is seen at once), then one conv call with bias and ReLU: on CUDA without autograd, cuDNN's fused
  conv+bias+ReLU (one kernel, the output written once); else conv with bias, then ReLU. The fold is differentiable, so gradients
  still reach the conv and BN parameters in eval mode.
* BatchNorm using batch statistics (training mode): the conv stays on PyTorch (cuDNN), then the custom op
  ``upernet_fast::bn_relu_train`` (Triton: deterministic per-channel statistics, one normalise+affine+ReLU
  pass). Its backward, ``upernet_fast::bn_relu_train_backward``, needs only the conv output and per-channel
  statistics: one fused reduction pass plus one elementwise pass. Running statistics are updated outside
  the op, exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum=None`` = cumulative average).
* SyncBatchNorm in training with a process group of more than one process: per-process (count, mean,
  variance) are all-gathered and combined in rank order (torch's SyncBatchNorm does the same with counts, so
  unequal batch sizes are right); the backward all-reduces the two per-channel sums. Weight and bias
  gradients stay per-process, as in torch's SyncBatchNorm (DDP averages them).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from upernet_fast import backend as _backend
from upernet_fast._checks import check_tensor
from upernet_fast.ops._triton_support import (
    TRITON_DTYPES,
    forbid_double_backward,
    on_input_device,
    triton_unavailable,
    triton_why_not,
)

OP = "conv_bn_relu"
BN_RELU_OP = "bn_relu"


def conv_bn_relu(
    x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, *, backend: str = "auto"
) -> torch.Tensor:
    """``relu(batch_norm(conv(x)))`` with ``batch_norm`` in its own mode (training updates running stats).

    x: (B, C_in, H, W); returns (B, C_out, H', W') in the conv output's layout and dtype.
    """
    check_tensor("x", x, ndim=4, floating=True)
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"x must have {conv.in_channels} channels (conv.in_channels), got shape {tuple(x.shape)}")
    impl = _backend.select(OP, backend, x, conv, batch_norm)
    return impl.fn(x, conv, batch_norm)


def bn_relu(y: torch.Tensor, batch_norm: nn.Module, *, backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(y))``: the BatchNorm+ReLU half of the block, after any convolution.

    ``batch_norm`` (BatchNorm2d or SyncBatchNorm) runs in its own mode; in training it normalises with the batch
    statistics and updates its running statistics. The Triton backend covers training (batch statistics); in
    eval, folding BN into the convolution (:func:`conv_bn_relu`) removes the pass altogether.
    """
    check_tensor("y", y, ndim=4, floating=True)
    if not isinstance(batch_norm, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"batch_norm must be a torch.nn BatchNorm module, got {type(batch_norm).__name__}")
    if y.shape[1] != batch_norm.num_features:
        raise ValueError(
            f"y must have {batch_norm.num_features} channels (batch_norm.num_features), got shape {tuple(y.shape)}"
        )
    impl = _backend.select(BN_RELU_OP, backend, y, batch_norm)
    return impl.fn(y, batch_norm)


class ConvBNReLU(nn.Module):
    """Drop-in for transformers' ``UperNetConvModule``: same constructor, attributes and state_dict keys.

    ``conv`` (Conv2d, stride 1, no bias by default) -> ``batch_norm`` (BatchNorm2d) -> ``activation`` (ReLU).
    ``backend`` picks the implementation (see upernet_fast.backend); it is plain Python state, not saved.
    """

    # Attributes that are runtime state of this class only; upernet_fast.revert deletes them.
    # (The eval-mode folding cache is kept outside the instance, keyed weakly on its batch_norm.)
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


# ------------------------------------------------------------------------------------------ shared pieces


def uses_batch_stats(batch_norm: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether BN normalises with the batch's statistics (as ``_BatchNorm.forward`` decides)."""
    return batch_norm.training or (batch_norm.running_mean is None and batch_norm.running_var is None)


def sync_group(batch_norm: nn.Module):
    """The process group a SyncBatchNorm reduces over in this call, or None (same rule as torch's forward)."""
    if not isinstance(batch_norm, nn.SyncBatchNorm) or not batch_norm.training:
        return None
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    group = batch_norm.process_group or torch.distributed.group.WORLD
    return group if torch.distributed.get_world_size(group) > 1 else None


def _check_values_per_channel(y: torch.Tensor) -> None:
    # Same test and message as F.batch_norm's in training (torch.nn.functional._verify_batch_size).
    if y.shape[0] * y.shape[2] * y.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def update_running_stats(batch_norm: nn.Module, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
    """running = (1 - f) * running + f * batch statistic, f = momentum or 1 / num_batches_tracked."""
    if not (batch_norm.training and batch_norm.track_running_stats) or batch_norm.running_mean is None:
        return
    with torch.no_grad():
        batch_norm.num_batches_tracked.add_(1)
        if batch_norm.momentum is None:  # cumulative moving average; a tensor factor avoids a host sync
            factor = 1.0 / batch_norm.num_batches_tracked.to(torch.float64)
            keep = 1.0 - factor
            factor, keep = factor.to(torch.float32), keep.to(torch.float32)
        else:
            factor, keep = batch_norm.momentum, 1.0 - batch_norm.momentum
        rm, rv = batch_norm.running_mean, batch_norm.running_var
        rm.copy_((mean * factor + rm.float() * keep).to(rm.dtype))
        rv.copy_((var_unbiased * factor + rv.float() * keep).to(rv.dtype))


def _affine_params(batch_norm: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if batch_norm.weight is not None:
        return batch_norm.weight, batch_norm.bias
    channels = batch_norm.num_features  # affine=False: identity affine
    return like.new_ones(channels, dtype=torch.float32), like.new_zeros(channels, dtype=torch.float32)


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


def conv_bn_relu_folded(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    """Eval-mode block: one conv with BN folded into its weight and bias, then ReLU."""
    # Folded on every call, never cached: one elementwise pass over the weight, small next to the conv, and it
    # can never go stale (a cache keyed on version counters misses in-place writes through `.data`, as EMA
    # updates and some checkpoint loaders do). Differentiable when autograd needs parameter gradients.
    weight, bias = _fold(conv, batch_norm)
    fused = _cudnn_conv_bias_relu(x, conv, weight, bias)
    if fused is not None:
        return fused
    out = conv._conv_forward(x, weight, bias)
    return torch.relu_(out) if not out.requires_grad else F.relu(out)


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


# ------------------------------------------------------------------------ training: Triton custom ops

# Process groups handed to the custom ops by index (an op schema cannot carry a ProcessGroup); -1 = none.
_GROUPS: list = []


def _group_index(group) -> int:
    if group is None:
        return -1
    for i, known in enumerate(_GROUPS):
        if known is group:
            return i
    _GROUPS.append(group)
    return len(_GROUPS) - 1


def _all_gather_stats(mean: torch.Tensor, var: torch.Tensor, count: int, group):
    """Global (mean, biased var, count) from every process's, combined in rank order (Chan, two-pass)."""
    world = torch.distributed.get_world_size(group)
    local = torch.cat([mean, var, mean.new_full((1,), float(count))])
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local, group=group)
    rows = torch.stack(gathered).double()  # (world, 2C + 1); float64 makes the tiny combination exact enough
    channels = mean.numel()
    means, variances, counts = rows[:, :channels], rows[:, channels:2 * channels], rows[:, 2 * channels:]
    total = counts.sum()
    global_mean = (counts * means).sum(0) / total
    m2 = (counts * variances + counts * (means - global_mean) ** 2).sum(0)
    return global_mean.float(), (m2 / total).float(), int(total.item())


def _kernels():
    from upernet_fast.kernels import conv_bn_relu as kernels

    return kernels


def _dense(x: torch.Tensor) -> torch.Tensor:
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


@torch.library.custom_op("upernet_fast::bn_relu_train", mutates_args=())
@on_input_device
def bn_relu_train(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """relu(batch_norm(x)) with batch statistics. x: (N, C, H, W) dense (NCHW or channels_last).

    Returns (y in x's dtype and layout, mean, invstd, unbiased variance), the statistics fp32 (C,) and
    reduced over process group ``group`` (an index into this module's registry; -1 = this process only).
    The statistics are outputs for the running-average update: they carry no gradient.
    """
    kernels = _kernels()
    x = _dense(x)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count > 0:
        mean, var = kernels.channel_stats(x)
    else:
        mean = x.new_zeros(channels, dtype=torch.float32)
        var = torch.zeros_like(mean)
    if group >= 0:
        mean, var, count = _all_gather_stats(mean, var, count, _GROUPS[group])
    invstd = torch.rsqrt(var + eps)
    var_unbiased = var * (count / max(count - 1, 1))
    y = kernels.bn_relu_apply(x, mean, invstd, weight, bias) if x.numel() else torch.empty_like(x)
    return y, mean, invstd, var_unbiased


@bn_relu_train.register_fake
def _bn_relu_train_fake(x, weight, bias, eps, group):
    channels = x.shape[1]
    stats = [x.new_empty((channels,), dtype=torch.float32) for _ in range(3)]
    return (torch.empty_like(x), *stats)


@torch.library.custom_op("upernet_fast::bn_relu_train_backward", mutates_args=())
@on_input_device
def bn_relu_train_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of x, grad of weight, grad of bias) of ``bn_relu_train``'s y, from x and the statistics only."""
    kernels = _kernels()
    x = _dense(x)
    fmt = torch.channels_last if kernels.is_channels_last(x) and not x.is_contiguous() else torch.contiguous_format
    grad = grad.contiguous(memory_format=fmt)
    if x.numel():
        sum_g, sum_gxhat = kernels.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
    else:
        sum_g = mean.new_zeros(mean.shape)
        sum_gxhat = torch.zeros_like(sum_g)
    # Weight and bias gradients of this process's batch only, as torch's SyncBatchNorm returns them.
    grad_weight = sum_gxhat.to(weight.dtype, copy=True)
    grad_bias = sum_g.to(bias.dtype, copy=True)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if group >= 0:
        sums = torch.cat([sum_g, sum_gxhat, sum_g.new_full((1,), float(count))])
        torch.distributed.all_reduce(sums, group=_GROUPS[group])
        channels = sum_g.numel()
        sum_g, sum_gxhat, count = sums[:channels], sums[channels:2 * channels], float(sums[-1].item())
    if x.numel():
        grad_x = kernels.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, count)
    else:
        grad_x = torch.empty_like(x)
    return grad_x, grad_weight, grad_bias


@bn_relu_train_backward.register_fake
def _bn_relu_train_backward_fake(grad, x, weight, bias, mean, invstd, group):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, group = inputs
    _y, mean, invstd, _var = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.group = group


def _backward(ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = bn_relu_train_backward(grad_y, x, weight, bias, mean, invstd, ctx.group)
    return grad_x, grad_weight, grad_bias, None, None


bn_relu_train.register_autograd(_backward, setup_context=_setup_context)
forbid_double_backward(bn_relu_train_backward, "bn_relu")


def bn_relu_batch_stats(y: torch.Tensor, batch_norm: nn.Module) -> torch.Tensor:
    """relu(batch_norm(y)) normalising with y's batch statistics; updates running statistics in training."""
    group = sync_group(batch_norm)
    if group is None:
        _check_values_per_channel(y)
    weight, bias = _affine_params(batch_norm, y)
    out, mean, _invstd, var_unbiased = bn_relu_train(_dense(y), weight, bias, float(batch_norm.eps),
                                                      _group_index(group))
    update_running_stats(batch_norm, mean, var_unbiased)
    return out


def _triton_conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    if not uses_batch_stats(batch_norm):
        return conv_bn_relu_folded(x, conv, batch_norm)
    return bn_relu_batch_stats(conv(x), batch_norm)


def _batch_norm_why_not(y: torch.Tensor, batch_norm: nn.Module) -> str | None:
    """Why the Triton BN+ReLU path cannot normalise ``y`` with ``batch_norm`` (module type, dtypes), or None."""
    if type(batch_norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        # A subclass may override forward; only the stock modules' semantics are reproduced.
        return f"batch_norm must be a torch.nn.BatchNorm2d or SyncBatchNorm, got {type(batch_norm).__name__}"
    for name, t in (("batch_norm.weight", batch_norm.weight), ("batch_norm.running_var", batch_norm.running_var)):
        if t is not None and t.dtype not in TRITON_DTYPES:
            return f"{name} must be float32/float16/bfloat16, got {t.dtype}"
    if y.numel() == 0:
        return "empty input"
    return None


def _triton_why_not(x: torch.Tensor, conv: nn.Module, batch_norm: nn.Module) -> str | None:
    if not isinstance(conv, nn.Conv2d):
        return f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}"
    if isinstance(batch_norm, nn.modules.batchnorm._BatchNorm) and batch_norm.num_features != conv.out_channels:
        return f"batch_norm has {batch_norm.num_features} features but conv has {conv.out_channels} out_channels"
    return triton_why_not(x, conv.weight) or _batch_norm_why_not(x, batch_norm)


def _triton_bn_relu_why_not(y: torch.Tensor, batch_norm: nn.Module) -> str | None:
    reason = triton_why_not(y) or _batch_norm_why_not(y, batch_norm)
    if reason is None and not uses_batch_stats(batch_norm):
        return ("batch_norm uses running statistics (eval mode); the Triton path normalises with batch statistics "
                "(in eval, conv_bn_relu folds BN into the convolution instead)")
    return reason


# ------------------------------------------------------------- eager: the reference, plus CPU SyncBatchNorm


def _cpu_sync_batch_norm_relu(y: torch.Tensor, batch_norm: nn.Module, group) -> torch.Tensor:
    """SyncBatchNorm + ReLU on CPU (torch's SyncBatchNorm refuses CPU tensors): all-reduce the sums, then
    normalise with the global statistics. Autograd-aware collectives make the backward all-reduce too."""
    from torch.distributed.nn.functional import all_reduce

    channels = y.shape[1]
    yf = y.float()
    count = yf.new_full((1,), float(y.numel() // channels))
    totals = all_reduce(torch.cat([yf.sum((0, 2, 3)), count]), group=group)
    total_count = totals[-1]
    mean = totals[:channels] / total_count
    centered = yf - mean.view(1, -1, 1, 1)
    var = all_reduce((centered * centered).sum((0, 2, 3)), group=group) / total_count
    out = centered * torch.rsqrt(var + batch_norm.eps).view(1, -1, 1, 1)
    if batch_norm.weight is not None:
        out = out * batch_norm.weight.view(1, -1, 1, 1) + batch_norm.bias.view(1, -1, 1, 1)
    n = float(total_count.item())
    update_running_stats(batch_norm, mean.detach(), var.detach() * (n / max(n - 1.0, 1.0)))
    return F.relu(out).to(y.dtype)


def _eager_bn_relu(y: torch.Tensor, batch_norm: nn.Module) -> torch.Tensor:
    group = sync_group(batch_norm)
    if group is not None and y.device.type == "cpu":
        return _cpu_sync_batch_norm_relu(y, batch_norm, group)
    return F.relu(batch_norm(y))  # the second half of reference.conv_bn_relu


def _eager_conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.Module) -> torch.Tensor:
    return _eager_bn_relu(conv(x), batch_norm)


_backend.register(OP, "eager", _eager_conv_bn_relu)
_backend.register(OP, "triton", _triton_conv_bn_relu, why_unavailable=triton_unavailable, why_not=_triton_why_not)
_backend.register(BN_RELU_OP, "eager", _eager_bn_relu)
_backend.register(
    BN_RELU_OP, "triton", bn_relu_batch_stats, why_unavailable=triton_unavailable, why_not=_triton_bn_relu_why_not
)
