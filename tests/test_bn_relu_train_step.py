"""bn_relu's C++ training call in one op (``upernet_fast_cpp::bn_relu_train_step``, autograd in C++): the batch
statistics, y and the running-statistics update in one call, its backward the kernel ops.

It must give exactly the bits of the Python composite it replaces (``bn_relu_train_cpp`` + the update in
``reference.update_running_stats``), which test_cpp_kernels.py and test_bn_relu.py check against eager and the
Triton kernels: so every comparison here is bitwise, outputs, gradients and BatchNorm's buffers, over several
steps. Which path ran is recorded (the op's calls; the C++ backward's kernel ops in the profiler), so that a
silent fall back to the composite cannot pass.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from layouts import in_layout
from op_testing import require_backend
from torch import nn

from upernet_fast import ops

bn_module = importlib.import_module("upernet_fast.ops.bn_relu")  # the module (the package exports the function)
NS = "upernet_fast_cpp"


@pytest.fixture(scope="module", autouse=True)
def built():
    require_backend("cpp")  # builds and loads the extension, attaches the fakes; fails (not skips) without it


def _batch_norm(channels, dtype, momentum, affine=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine).to(torch.float64 if dtype == torch.float64
                                                                       else torch.float32)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
            bn.bias.copy_(torch.rand(channels, generator=generator) - 0.5)
    return bn


def _steps(bn, maps, one_call, monkeypatch):
    """Train-mode bn_relu over ``maps`` on the cpp backend: per step (y, grads of input, weight, bias) and the
    buffers at the end; the one-call op when ``one_call`` else the composite. Returns (results, one-call count)."""
    calls = []
    real = bn_module._bn_relu_train_step_cpp
    monkeypatch.setattr(bn_module, "_bn_relu_train_step_cpp", lambda *a: calls.append(1) or real(*a))
    if not one_call:
        monkeypatch.setattr(bn_module, "_takes_train_step", lambda *a: False)
    results = []
    for step, x in enumerate(maps):
        x = x.detach().requires_grad_()
        y = ops.bn_relu(x, bn, backend="cpp")
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(step)).to(y.dtype)
        leaves = [x] + ([bn.weight, bn.bias] if bn.affine else [])
        results.extend([y, *torch.autograd.grad(y, leaves, upstream)])
    results.extend([bn.running_mean, bn.running_var, bn.num_batches_tracked])
    monkeypatch.undo()
    return results, len(calls)


def _assert_same_bits(first, second):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a, b), f"result {i} differs"


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last", "sliced"))
@pytest.mark.parametrize("momentum", (0.1, None))
def test_one_call_gives_the_composites_bits(dtype, layout, momentum, monkeypatch):
    shape = (2, 5, 7, 3)
    maps = [in_layout(torch.randn(shape, generator=torch.Generator().manual_seed(10 + s)).to(dtype), layout)
            for s in range(3)]
    bn = _batch_norm(5, dtype, momentum)
    composite, none = _steps(copy.deepcopy(bn), maps, one_call=False, monkeypatch=monkeypatch)
    one_call, calls = _steps(bn, maps, one_call=True, monkeypatch=monkeypatch)
    assert none == 0 and calls == len(maps)
    _assert_same_bits(one_call, composite)
    assert int(bn.num_batches_tracked) == len(maps)


@pytest.mark.parametrize("shape", [(1, 512, 6, 6), (2, 3, 50, 47), (1, 4, 1, 2), (3, 16, 33, 65)])
def test_one_call_gives_the_composites_bits_at_every_size(shape, monkeypatch):
    """The PPM's 6x6 maps, several 2048-pixel chunks per channel (2 x 50 x 47), two values per channel, and a
    batch whose chunks cross images; without affine parameters too (BatchNorm2d(affine=False))."""
    maps = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) * 3 + 1 for s in range(2)]
    for affine in (True, False):
        bn = _batch_norm(shape[1], torch.float32, 0.1, affine=affine)
        composite, _ = _steps(copy.deepcopy(bn), maps, one_call=False, monkeypatch=monkeypatch)
        one_call, calls = _steps(bn, maps, one_call=True, monkeypatch=monkeypatch)
        assert calls == len(maps)
        _assert_same_bits(one_call, composite)


def test_same_bits_on_1_2_and_3_threads(monkeypatch):
    maps = [torch.randn(2, 24, 40, 60, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(_steps(_batch_norm(24, torch.float32, None), maps, one_call=True,
                                  monkeypatch=monkeypatch)[0])
    finally:
        torch.set_num_threads(saved)
    _assert_same_bits(results[1], results[0])
    _assert_same_bits(results[2], results[0])


@pytest.mark.parametrize("fmt, held, kernels", [
    # y.sum()'s gradient is an expanded scalar: the node makes it contiguous, a tensor of its own, and writes over it.
    (torch.contiguous_format, False, {"bn_relu_backward_fused_"}),
    (torch.contiguous_format, True, {"bn_relu_backward_fused"}),  # the caller's gradient: never written over
    (torch.channels_last, False, {"bn_relu_backward_reduce", "bn_relu_backward_input"}),
])
def test_the_cpp_backward_runs_the_kernel_ops(fmt, held, kernels):
    """The C++ autograd node runs (recorded by the profiler: its forward op and its backward's kernel ops) and
    the Python composite does not."""
    bn = _batch_norm(6, torch.float32, 0.1)
    x = torch.randn(2, 6, 9, 7).contiguous(memory_format=fmt).requires_grad_()
    with torch.profiler.profile() as prof:
        y = ops.bn_relu(x, bn, backend="cpp")
        if held:
            y.backward(torch.randn_like(y))
        else:
            y.sum().backward()
    names = {event.name for event in prof.events()}
    assert "BnReluTrainStep" in type(y.grad_fn).__name__ or "BnReluTrainStep" in y.grad_fn.name()
    assert f"{NS}::bn_relu_train_step" in names
    assert {f"{NS}::{k}" for k in kernels} <= names, names
    others = {"bn_relu_backward_fused", "bn_relu_backward_fused_", "bn_relu_backward_reduce",
              "bn_relu_backward_input"} - kernels
    assert not {f"{NS}::{k}" for k in others} & names
    assert not any("bn_relu_train_cpp" in name for name in names)


def test_the_cpp_backward_writes_over_only_a_gradient_nothing_else_holds():
    """In a chain of two BN+ReLU, the outer node's incoming gradient is the caller's (left unchanged: the copying
    op runs) and the inner node's is the outer node's output, written over by the in-place op; with a hook keeping
    that gradient, the inner node copies too and the hook's tensor keeps its values. The same bits either way."""
    x = torch.randn(2, 6, 9, 7, requires_grad=True)
    bns = [_batch_norm(6, torch.float32, 0.1, seed=s) for s in range(2)]
    grad = torch.randn(2, 6, 9, 7)
    grad_before = grad.clone()
    leaves = [x, *bns[0].parameters(), *bns[1].parameters()]

    def run(hook):
        kept = []
        inner = ops.bn_relu(x, bns[0], backend="cpp")
        if hook:
            inner.register_hook(kept.append)  # returns None: the gradient flows on unchanged, and stays referenced
        outer = ops.bn_relu(inner, bns[1], backend="cpp")
        expected_inner_grad = torch.autograd.grad(outer, inner, grad, retain_graph=True)[0].clone()
        kept.clear()
        with torch.profiler.profile() as prof:
            grads = torch.autograd.grad(outer, leaves, grad)
        names = [event.name for event in prof.events()]
        return grads, names, kept, expected_inner_grad

    plain, names, _, _ = run(hook=False)
    assert names.count(f"{NS}::bn_relu_backward_fused_") == 1, names
    assert names.count(f"{NS}::bn_relu_backward_fused") == 1, names
    hooked, names, kept, expected_inner_grad = run(hook=True)
    assert f"{NS}::bn_relu_backward_fused_" not in names, names
    assert names.count(f"{NS}::bn_relu_backward_fused") == 2, names
    assert len(kept) == 1 and torch.equal(kept[0], expected_inner_grad)
    _assert_same_bits(plain, hooked)
    assert torch.equal(grad, grad_before)


def test_composite_where_the_buffers_are_not_the_statistics_dtype(monkeypatch):
    """bf16 running statistics (a module cast to bf16), or none tracked: the composite, with the same results
    as before; the one-call op is not called."""
    for bn in (_batch_norm(4, torch.float32, 0.1).to(torch.bfloat16), nn.BatchNorm2d(4, track_running_stats=False)):
        x = torch.randn(2, 4, 5, 5, dtype=bn.weight.dtype)
        _, calls = _steps(bn, [x], one_call=True, monkeypatch=monkeypatch)
        assert calls == 0


def test_buffers_change_in_place_with_their_version_counters():
    bn = _batch_norm(3, torch.float32, 0.1)
    buffers = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    versions = [t._version for t in buffers]
    ops.bn_relu(torch.randn(2, 3, 4, 4, requires_grad=True), bn, backend="cpp")
    assert all(t._version > v for t, v in zip(buffers, versions))
    assert bn.running_mean is buffers[0] and int(bn.num_batches_tracked) == 1


def test_double_backward_is_refused_with_what_to_do():
    bn = _batch_norm(3, torch.float32, 0.1)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = ops.bn_relu(x, bn, backend="cpp")
    with pytest.raises(RuntimeError, match="double backward.*backend='eager'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_gradcheck_float64():
    bn = _batch_norm(3, torch.float64, 0.1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    op = getattr(torch.ops, NS).bn_relu_train_step

    def y_of(x, weight, bias):
        return op(x, weight, bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, 0.1, 1e-5)[0]

    assert torch.autograd.gradcheck(y_of, (x, bn.weight, bn.bias))


def _op_args(layout):
    bn = _batch_norm(5, torch.float32, 0.1)
    x = in_layout(torch.randn(2, 5, 6, 7), layout).requires_grad_()
    return (x, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone(),
            bn.num_batches_tracked.clone(), 0.1, 1e-5)


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_opcheck(layout):
    """Schema (mutation declared), fake kernel, C++ autograd registration and AOT tracing, forward and the
    kernel ops its backward calls."""
    namespace = getattr(torch.ops, NS)
    args = _op_args(layout)
    torch.library.opcheck(namespace.bn_relu_train_step.default, args)
    x = args[0].detach()
    with torch.no_grad():
        _, mean, invstd = namespace.bn_relu_train_step(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                         for a in args])
    grad = torch.randn_like(x)
    params = (mean, invstd, args[1].detach(), args[2].detach())
    kernel_args = [("bn_relu_backward_reduce", (grad, x, *params))]
    kernel_args.append(("bn_relu_backward_input", (grad, x, *params, *namespace.bn_relu_backward_reduce(grad, x, *params), 84.0)))
    if layout == "contiguous":
        kernel_args.append(("bn_relu_backward_fused", (grad, x, *params)))
        kernel_args.append(("bn_relu_backward_fused_", (grad.clone(), x, *params)))
    for name, call_args in kernel_args:
        torch.library.opcheck(getattr(namespace, name).default, call_args)


def test_compiled_training_steps_match_eager_bitwise():
    """Under torch.compile(fullgraph=True) the composite is traced (see bn_relu._takes_train_step), and eager
    runs the one-call op: outputs, gradients and BatchNorm's buffers after two steps are still bitwise equal."""
    maps = [torch.randn(2, 6, 8, 5, generator=torch.Generator().manual_seed(s)) for s in range(2)]

    def step(x, bn):
        return ops.bn_relu(x, bn, backend="cpp")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        torch._dynamo.reset()
        bn = _batch_norm(6, torch.float32, None)
        got = []
        for x in maps:
            x = x.clone().requires_grad_()
            y = fn(x, bn)
            got.extend([y, *torch.autograd.grad(y.square().sum(), (x, bn.weight, bn.bias))])
        results.append(got + [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()])
    _assert_same_bits(results[1], results[0])


@pytest.mark.parametrize("change, match", [
    (lambda a: {3: a[3].double()}, "running_mean must be a contiguous Float tensor"),
    (lambda a: {4: a[4][:4]}, r"running_var must have shape \(5,\)"),
    (lambda a: {5: a[5].float()}, "num_batches_tracked must be a one-element int64"),
    (lambda a: {1: a[1][:3]}, r"weight must have shape \(5,\)"),
    (lambda a: {0: a[0][0]}, "x must be a 4D"),
    (lambda a: {7: -1.0}, "eps must be non-negative"),
])
def test_bad_arguments_name_themselves(change, match):
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args("contiguous")]
    for index, value in change(args).items():
        args[index] = value
    with pytest.raises(RuntimeError, match=match):
        getattr(torch.ops, NS).bn_relu_train_step(*args)
