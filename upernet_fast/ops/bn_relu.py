"""BatchNorm + ReLU after a convolution, normalising with the batch's statistics: entry point and backends.

Kernel backends (training mode, batch statistics): the op ``bn_relu_train`` computes deterministic per-channel
statistics and one normalise+affine+ReLU pass. Its backward, ``bn_relu_train_backward``, needs only the input
and per-channel statistics: one fused reduction pass plus one elementwise pass. Running statistics are updated
outside the op, exactly as ``nn.BatchNorm2d`` does (unbiased variance, ``momentum=None`` = cumulative average).

SyncBatchNorm in training with a process group of more than one process: per-process (count, mean, variance)
are all-gathered and combined in rank order (torch's SyncBatchNorm does the same with counts, so unequal batch
sizes are right); the backward all-reduces the two per-channel sums. Weight and bias gradients stay
per-process, as in torch's SyncBatchNorm (DDP averages them). The process group reaches the op by name
(``ProcessGroup.group_name``, "" for none) and is resolved inside it, so the op schema carries only a string.

The ops compose kernel-level functions (statistics, apply, backward reduce, backward apply) around the
collectives; :func:`composite_kernel_op` declares them once, instantiated over the Triton launchers
(``bn_relu_train``) and over the C++ extension's kernel ops (``bn_relu_train_cpp``). In eval mode the C++
backend also runs BN+ReLU with the running statistics in one pass (``bn_relu_eval``).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from upernet_fast import backend as _backend
from upernet_fast import recompute, reference
from upernet_fast._checks import check_tensor, module_tensor, needs_grad
from upernet_fast.kernels._utils import is_channels_last, memory_format
from upernet_fast.ops._kernel_op import ExtensionOp, InferenceOp, KernelOp, stats_dtype
from upernet_fast.ops._triton_support import on_input_device

OP = "bn_relu"


def bn_relu(y: torch.Tensor, batch_norm: nn.Module, *, backend: str = "auto") -> torch.Tensor:
    """``relu(batch_norm(y))``: the BatchNorm+ReLU half of the block, after any convolution.

    ``batch_norm`` (BatchNorm2d or SyncBatchNorm) runs in its own mode; in training it normalises with the batch
    statistics and updates its running statistics. The Triton backend covers training (batch statistics); in
    eval, folding BN into the convolution (:func:`conv_bn_relu`) removes the pass altogether.
    """
    check_tensor("y", y, ndim=4, floating=True)
    if not isinstance(batch_norm, _BatchNorm):
        raise TypeError(f"batch_norm must be a torch.nn BatchNorm module, got {type(batch_norm).__name__}")
    if y.shape[1] != batch_norm.num_features:
        raise ValueError(
            f"y must have {batch_norm.num_features} channels (batch_norm.num_features), got shape {tuple(y.shape)}"
        )
    # (eager asked for by name reads no placement: the test is skipped there)
    like = y if backend != "eager" and shares_dtype(y, batch_norm) else None
    impl = _backend.select(OP, backend, y, batch_norm, like=like)
    return impl.fn(y, batch_norm)


def check_values_per_channel(y: torch.Tensor) -> None:
    # Same test and message as F.batch_norm's in training (torch.nn.functional._verify_batch_size).
    if y.shape[0] * y.shape[2] * y.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.size()}")


def affine_params(batch_norm: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = module_tensor(batch_norm, "weight")  # (the module's dicts: Module.__getattr__ costs ~1 us a read)
    if weight is not None:
        return weight, module_tensor(batch_norm, "bias")
    channels = batch_norm.num_features  # affine=False: identity affine
    return like.new_ones(channels, dtype=torch.float32), like.new_zeros(channels, dtype=torch.float32)


def _resolve_group(group_name: str):
    return torch.distributed.distributed_c10d._resolve_process_group(group_name)


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


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense; else a dense copy in its own layout (a sliced channels-last view stays channels-last,
    so the output has the layout PyTorch's batch_norm gives it)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous(memory_format=memory_format(is_channels_last(x)))


def _forward(kernels, x, weight, bias, eps, group_name):
    """relu(batch_norm(x)) with batch statistics; (y, mean, invstd, unbiased var), statistics fp32 (C,)."""
    kernels = kernels()
    x = _dense(x)
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count > 0:
        mean, var = kernels.channel_stats(x)
    else:
        mean = x.new_zeros(channels, dtype=torch.float32)
        var = torch.zeros_like(mean)
    if group_name:
        mean, var, count = _all_gather_stats(mean, var, count, _resolve_group(group_name))
    invstd = torch.rsqrt(var + eps)
    var_unbiased = var * (count / max(count - 1, 1))
    y = kernels.bn_relu_apply(x, mean, invstd, weight, bias) if x.numel() else torch.empty_like(x)
    return y, mean, invstd, var_unbiased


def _backward_kernel(kernels, grad, x, weight, bias, mean, invstd, group_name):
    """(grad of x, grad of weight, grad of bias) of the forward's y, from x and the statistics only."""
    kernels = kernels()
    x = _dense(x)
    fmt = torch.channels_last if is_channels_last(x) and not x.is_contiguous() else torch.contiguous_format
    grad = grad.contiguous(memory_format=fmt)
    fused = getattr(kernels, "bn_relu_backward_fused", None)
    if fused is not None and not group_name and x.numel() and x.is_contiguous():
        # One pass per channel instead of a reduction pass and an elementwise pass: the same bits.
        grad_x, sum_g, sum_gxhat = fused(grad, x, mean, invstd, weight, bias)
        return grad_x, sum_gxhat.to(weight.dtype, copy=True), sum_g.to(bias.dtype, copy=True)
    if x.numel():
        sum_g, sum_gxhat = kernels.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
    else:
        sum_g = mean.new_zeros(mean.shape)
        sum_gxhat = torch.zeros_like(sum_g)
    # Weight and bias gradients of this process's batch only, as torch's SyncBatchNorm returns them.
    grad_weight = sum_gxhat.to(weight.dtype, copy=True)
    grad_bias = sum_g.to(bias.dtype, copy=True)
    count = x.numel() // x.shape[1] if x.shape[1] else 0
    if group_name:
        sums = torch.cat([sum_g, sum_gxhat, sum_g.new_full((1,), float(count))])
        torch.distributed.all_reduce(sums, group=_resolve_group(group_name))
        channels = sum_g.numel()
        sum_g, sum_gxhat, count = sums[:channels], sums[channels:2 * channels], float(sums[-1].item())
    if x.numel():
        grad_x = kernels.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, count)
    else:
        grad_x = torch.empty_like(x)
    return grad_x, grad_weight, grad_bias


def _fake(x, weight, bias, eps, group_name):
    stats = [x.new_empty((x.shape[1],), dtype=stats_dtype(x)) for _ in range(3)]
    return (torch.empty_like(x), *stats)


def _backward_fake(grad, x, weight, bias, mean, invstd, group_name):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, group_name = inputs
    _y, mean, invstd, _var = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.group_name = group_name


def _backward(backward_op, ctx, grad_y, _grad_mean, _grad_invstd, _grad_var):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = backward_op(grad_y, x, weight, bias, mean, invstd, ctx.group_name)
    return grad_x, grad_weight, grad_bias, None, None


def composite_kernel_op(name: str) -> KernelOp:
    """The training op pair named ``name`` / ``name_backward``: same schema, fakes and autograd for every backend."""
    return KernelOp(
        f"{name}(Tensor x, Tensor weight, Tensor bias, float eps, str group_name) -> (Tensor, Tensor, Tensor, Tensor)",
        _fake,
        backward_schema=(
            f"{name}_backward(Tensor grad, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd, "
            "str group_name) -> (Tensor, Tensor, Tensor)"
        ),
        backward_fake=_backward_fake,
        setup_context=_setup_context,
        backward=_backward,
        op_name=OP,
    )


def _kernels():
    from upernet_fast.kernels import bn_relu as kernels  # imports triton: only when running

    return kernels


KERNEL_OP = composite_kernel_op("bn_relu_train")
bn_relu_train = KERNEL_OP.define(
    "upernet_fast",
    functools.partial(_forward, lambda: _kernels()),
    functools.partial(_backward_kernel, lambda: _kernels()),
)
bn_relu_train_backward = torch.ops.upernet_fast.bn_relu_train_backward


def _cpp_kernels():
    """The C++ extension's kernel-level ops under the Triton launchers' names (same arguments)."""
    ops = getattr(torch.ops, _backend.CPP_NAMESPACE)
    return SimpleNamespace(
        channel_stats=ops.bn_relu_channel_stats,
        bn_relu_apply=ops.bn_relu_apply,
        bn_relu_backward_reduce=ops.bn_relu_backward_reduce,
        bn_relu_backward_input=ops.bn_relu_backward_input,
        bn_relu_backward_fused=ops.bn_relu_backward_fused,
    )


# The same composite over the C++ kernels, defined here (it calls the extension's kernel ops, loaded lazily).
bn_relu_train_cpp = composite_kernel_op("bn_relu_train_cpp").define(
    "upernet_fast",
    functools.partial(_forward, lambda: _cpp_kernels()),
    functools.partial(_backward_kernel, lambda: _cpp_kernels()),  # looked up per call (tests record the calls)
    display="C++",
)


# The normalise+affine+ReLU kernel each training op's forward ran: what rebuilds its output bitwise.
_APPLY_KERNEL = {
    bn_relu_train: on_input_device(lambda *args: _kernels().bn_relu_apply(*args)),  # Triton: the input's GPU
    bn_relu_train_cpp: lambda *args: _cpp_kernels().bn_relu_apply(*args),
}


# ---- eval mode (running statistics) on the C++ kernels: relu(y * scale + shift), one pass -----------------


def _eval_setup_context(ctx, inputs, output):
    x, scale, _shift = inputs
    ctx.save_for_backward(output, x, scale)


def _eval_backward(backward_op, ctx, grad):
    y, x, scale = ctx.saved_tensors
    grad_x, grad_scale, grad_shift = backward_op(grad.contiguous(memory_format=memory_format(is_channels_last(x))),
                                                 y, x, scale)
    return grad_x, grad_scale, grad_shift


EVAL_KERNEL_OP = KernelOp(
    "bn_relu_eval(Tensor x, Tensor scale, Tensor shift) -> Tensor",
    lambda x, scale, shift: torch.empty_like(x, memory_format=memory_format(is_channels_last(x))),
    backward_schema="bn_relu_eval_backward(Tensor grad, Tensor y, Tensor x, Tensor scale) -> (Tensor, Tensor, Tensor)",
    backward_fake=lambda grad, y, x, scale: (torch.empty_like(y), torch.empty_like(scale), torch.empty_like(scale)),
    setup_context=_eval_setup_context,
    backward=_eval_backward,
    op_name=OP,
)
_bn_relu_eval_cpp = EVAL_KERNEL_OP.in_extension(_backend.CPP_NAMESPACE)


EVAL_FROM_BUFFERS_OP = InferenceOp(
    "bn_relu_eval_from_buffers(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, "
    "float eps) -> Tensor",
    lambda x, *_: torch.empty_like(x, memory_format=memory_format(is_channels_last(x))),
    op_name=OP,
)
_bn_relu_eval_from_buffers_cpp = EVAL_FROM_BUFFERS_OP.in_extension(_backend.CPP_NAMESPACE)


def running_stats_path(y: torch.Tensor, batch_norm: nn.Module) -> torch.Tensor:
    """relu(batch_norm(y)) with the running statistics (eval mode), one C++ pass over y. The per-channel scale
    and shift are computed in fp32 (at least) from BN's parameters, differentiably; where nothing needs a
    gradient, by the C++ op itself, with the same bits (no tensor ops in Python)."""
    try:  # read from the module's dicts, as module_tensor does, without its calls (~3 us a call saved at 1x1)
        parameters, buffers = batch_norm._parameters, batch_norm._buffers
        weight, bias = parameters["weight"], parameters["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    except (AttributeError, KeyError):  # not a stock BatchNorm module
        weight, bias, running_mean, running_var = (
            module_tensor(batch_norm, name) for name in ("weight", "bias", "running_mean", "running_var")
        )
    if not needs_grad(y, weight, bias):
        return _bn_relu_eval_from_buffers_cpp(y, running_mean, running_var, weight, bias, float(batch_norm.eps))
    acc = torch.promote_types(y.dtype, torch.float32)
    scale = torch.rsqrt(running_var.to(acc) + batch_norm.eps)
    shift = -running_mean.to(acc) * scale
    if weight is not None:
        scale = scale * weight.to(acc)
        shift = shift * weight.to(acc) + bias.to(acc)
    return _bn_relu_eval_cpp(y, scale, shift)


# ---- training in one C++ call: statistics, y and the running-statistics update, autograd in C++ --------------


def _map_like(x: torch.Tensor) -> torch.Tensor:
    """The C++ kernels' output for map x (csrc/cpu/reduce.h dense_map): channels_last where x is channels_last
    and not also NCHW-contiguous, else NCHW."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(channels_last))


def _per_channel(x: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[1],), dtype=stats_dtype(x)) for _ in range(count)]


TRAIN_STEP_OP = ExtensionOp(
    "bn_relu_train_step(Tensor x, Tensor weight, Tensor bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
    "Tensor(c!) num_batches_tracked, float? momentum, float eps) -> (Tensor, Tensor, Tensor)",
    lambda x, *_: (_map_like(x), *_per_channel(x, 2)),
)
_bn_relu_train_step_cpp = TRAIN_STEP_OP.in_extension(_backend.CPP_NAMESPACE)
# The kernel ops its C++ backward calls (through the dispatcher, so that tracing sees them): their fakes.
for _schema, _fake_kernel in (
    ("bn_relu_backward_fused(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
     "-> (Tensor, Tensor, Tensor)", lambda grad, x, *_: (_map_like(x), *_per_channel(x, 2))),
    ("bn_relu_backward_fused_(Tensor(a!) grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
     "-> (Tensor, Tensor)", lambda grad, x, *_: tuple(_per_channel(x, 2))),
    ("bn_relu_backward_reduce(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias) "
     "-> (Tensor, Tensor)", lambda grad, x, *_: tuple(_per_channel(x, 2))),
    ("bn_relu_backward_input(Tensor grad, Tensor x, Tensor mean, Tensor invstd, Tensor weight, Tensor bias, "
     "Tensor sum_g, Tensor sum_gxhat, float count) -> Tensor", lambda grad, x, *_: _map_like(x)),
):
    ExtensionOp(_schema, _fake_kernel).in_extension(_backend.CPP_NAMESPACE)


_CPP_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _takes_train_step(train_op, group, batch_norm: nn.Module, dense: torch.Tensor) -> bool:
    """Whether the C++ backend's training call can be the one-call op (the same bits as its composite): no
    process group, and running statistics to update, in the statistics' dtype (float32; float64 for float64).

    Not under torch.compile: there the composite is traced, as before this op existed (Inductor fuses its small
    ops itself). The op traces (``opcheck`` with dynamic shapes, an aot_eager training step: both in
    tests/test_bn_relu_train_step.py), but it has not been through Inductor's code generation here."""
    if torch.compiler.is_compiling():
        return False
    if train_op is not bn_relu_train_cpp or group is not None or dense.dtype not in _CPP_DTYPES:
        return False
    if not (batch_norm.training and batch_norm.track_running_stats):
        return False
    if module_tensor(batch_norm, "num_batches_tracked") is None:
        return False
    running_mean, running_var = module_tensor(batch_norm, "running_mean"), module_tensor(batch_norm, "running_var")
    return running_mean is not None and running_mean.dtype == running_var.dtype == stats_dtype(dense)


def batch_stats_path(train_op, y: torch.Tensor, batch_norm: nn.Module) -> torch.Tensor:
    """relu(batch_norm(y)) normalising with y's batch statistics through ``train_op``; updates running stats.

    On the C++ backend without a process group this is one op call, ``bn_relu_train_step`` (its autograd in
    C++), wherever the running statistics have the statistics' dtype; elsewhere the composite ``train_op`` and
    the update in Python. Both give the same bits (tests/test_bn_relu.py)."""
    group = reference.sync_group(batch_norm)
    if group is None:
        check_values_per_channel(y)
    weight, bias = affine_params(batch_norm, y)
    dense = _dense(y)
    if _takes_train_step(train_op, group, batch_norm, dense):
        out, mean, invstd = _bn_relu_train_step_cpp(
            dense, weight, bias, module_tensor(batch_norm, "running_mean"), module_tensor(batch_norm, "running_var"),
            module_tensor(batch_norm, "num_batches_tracked"), batch_norm.momentum, float(batch_norm.eps),
        )
    else:
        group_name = "" if group is None else group.group_name
        out, mean, invstd, var_unbiased = train_op(dense, weight, bias, float(batch_norm.eps), group_name)
        reference.update_running_stats(batch_norm, mean, var_unbiased)
    # The backward saves dense, mean and invstd: the next conv need not save out too (upernet_fast.recompute).
    recompute.remember(out, _APPLY_KERNEL[train_op], (dense, mean, invstd, weight, bias))
    return out


_STOCK_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def batch_norm_why_not(y: torch.Tensor, batch_norm: nn.Module) -> str | None:
    """Why the kernels' BN+ReLU cannot normalise ``y`` with ``batch_norm`` (module type, empty input), or None."""
    if type(batch_norm) not in _STOCK_BATCH_NORMS:
        # A subclass may override forward; only the stock modules' semantics are reproduced.
        return f"batch_norm must be a torch.nn.BatchNorm2d or SyncBatchNorm, got {type(batch_norm).__name__}"
    if y.numel() == 0:
        return "empty input"
    return None


def _train_why_not(y: torch.Tensor, batch_norm: nn.Module) -> str | None:
    reason = batch_norm_why_not(y, batch_norm)
    if reason is None and not reference.uses_batch_stats(batch_norm):
        return ("batch_norm uses running statistics (eval mode); the kernels normalise with batch statistics "
                "(in eval, conv_bn_relu folds BN into the convolution instead)")
    return reason


def shares_dtype(y: torch.Tensor, batch_norm: nn.Module, conv_weight: torch.Tensor | None = None) -> bool:
    """Whether every tensor :func:`bn_parameters` judges (and ``conv_weight``, when given) has ``y``'s dtype: then
    ``y``'s device and dtype are the call's placement (``select(..., like=y)``; the placement's device is the first
    judged tensor's), read without building the list (5K instructions less a call). False (the full reading) for
    anything but a stock module."""
    try:
        weight, running_var = batch_norm._parameters["weight"], batch_norm._buffers["running_var"]
    except (AttributeError, KeyError):
        return False
    dtype = y.dtype  # (dtypes are singletons)
    return ((weight is None or weight.dtype is dtype) and (running_var is None or running_var.dtype is dtype)
            and (conv_weight is None or conv_weight.dtype is dtype))


def bn_parameters(y: torch.Tensor, batch_norm: nn.Module) -> list[torch.Tensor]:
    """The tensors whose device and dtype a backend must take: the map and BatchNorm's parameters and buffers."""
    try:  # read from the module's dicts, as module_tensor does, without its call: on every op call
        weight, running_var = batch_norm._parameters["weight"], batch_norm._buffers["running_var"]
    except (AttributeError, KeyError):  # not a stock BatchNorm module
        weight, running_var = module_tensor(batch_norm, "weight"), module_tensor(batch_norm, "running_var")
    if weight is None or running_var is None:  # affine=False, track_running_stats=False
        return [t for t in (y, weight, running_var) if t is not None]
    return [y, weight, running_var]


def _cpp_bn_relu(y: torch.Tensor, batch_norm: nn.Module) -> torch.Tensor:
    if reference.uses_batch_stats(batch_norm):
        return batch_stats_path(bn_relu_train_cpp, y, batch_norm)
    return running_stats_path(y, batch_norm)


_backend.register(OP, "eager", reference.bn_relu)
_backend.register(
    OP, "triton", functools.partial(batch_stats_path, bn_relu_train), why_not=_train_why_not, tensors=bn_parameters
)
_backend.register(OP, "cpp", _cpp_bn_relu, why_not=batch_norm_why_not, tensors=bn_parameters)