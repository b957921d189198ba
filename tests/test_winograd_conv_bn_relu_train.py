"""Training-mode conv-BN-ReLU on the cpp backend with its 3x3 convolution by Winograd F(4x4, 3x3): forward and
input gradient by Winograd, weight gradient by ATen (upernet_fast/ops/winograd_conv_bn_relu.py, training section).

Accuracy policy: as for the eval block (tests/test_winograd_conv_bn_relu.py), a different algorithm is judged
against a float64 run of the same block, relative to ATen's own float32 error: the output and every gradient
(input, conv weight and bias, BN weight and bias) within 4x ATen's maximum error, relative to the float64
value's maximum, with a floor of 4e-6 of it (about 30 float32 ulps of the maximum: at these small channel counts
ATen's error can be a rounding or two of a short sum, where 4x of it would judge noise while the transforms' own
rounding stays; a wrong tap or tile is off by the order of the values). The running mean's scale is the conv output's spread (the square root of the
running variance), not its own maximum: it is a batch mean, much smaller than the values it averages when they
cancel. Every test records which ops ran: a silent fallback to ATen would pass
every accuracy check.

The path runs only on maps of at least winograd.TRAIN_MIN_PIXELS output pixels (a speed rule: below it the filter
transforms made per step cost more than they save). The tests here judge the algorithm on small maps, so they
lower that bound (fixture below); test_maps_under_the_pixel_bound_keep_atens_convolution checks the rule itself.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from layouts import in_layout
from op_testing import OpsSeen as _OpsSeen
from op_testing import kaiming_block

from upernet_fast import cpp_extension, reference
from upernet_fast.ops import winograd_conv_bn_relu as winograd
from upernet_fast.ops.conv_bn_relu import conv_bn_relu

op_module = importlib.import_module("upernet_fast.ops.conv_bn_relu")  # the package exports the function by this name
WINOGRAD = "upernet_fast_cpp.winograd_conv.default"
FLOOR = 4e-6  # of the float64 value's maximum (see the module docstring)
WINOGRAD_TRANSFORM = "upernet_fast_cpp.winograd_filter_transform.default"
CONCAT_WINOGRAD = "upernet_fast_cpp.winograd_upsample_concat_conv.default"
ATEN_CONV = "aten.convolution.default"
ATEN_CONV_BACKWARD = "aten.convolution_backward.default"


@pytest.fixture(scope="module", autouse=True)
def ops():
    cpp_extension.load()  # builds on first use; a build failure is a test error, never a skip
    from upernet_fast import backend

    backend.BACKENDS_DECLARED["cpp"].why_unavailable()  # attaches the Python fakes to the C++ ops
    return torch.ops.upernet_fast_cpp


@pytest.fixture(autouse=True)
def small_maps_take_winograd(monkeypatch):
    monkeypatch.setattr(winograd, "TRAIN_MIN_PIXELS", 1)
    monkeypatch.setattr(op_module, "SLICED_MIN_BYTES", 0)  # and small concats the sliced bottleneck path


def _block(cin, cout, *, bias=False, seed=0):
    return kaiming_block(cin, cout, bias=bias, seed=seed).train()


def _step(block, x, upstream, backend, dtype=torch.float32, layout="contiguous"):
    """(output, grad x, grad conv.weight, grad conv.bias or None, grad bn.weight, grad bn.bias, running mean, running
    var) of one training call and backward on a copy of ``block``, with the ops that ran."""
    block = copy.deepcopy(block).to(dtype)
    leaf = x.to(dtype).clone().requires_grad_()
    with _OpsSeen() as seen:
        out = conv_bn_relu(in_layout(leaf, layout), block.conv, block.batch_norm, backend=backend)
        out.backward(upstream.to(dtype))
    conv, bn = block.conv, block.batch_norm
    values = [out.detach(), leaf.grad, conv.weight.grad, None if conv.bias is None else conv.bias.grad, bn.weight.grad,
              bn.bias.grad, bn.running_mean, bn.running_var]
    return values, seen.names


NAMES = ["output", "grad x", "grad conv.weight", "grad conv.bias", "grad bn.weight", "grad bn.bias", "running_mean",
         "running_var"]


def _judge(ours, aten, exact):
    for name, got, base, want in zip(NAMES, ours, aten, exact):
        if want is None:
            assert got is None and base is None, name
            continue
        scale = want.abs().max().item()
        if name == "running_mean":
            scale = max(scale, exact[NAMES.index("running_var")].max().sqrt().item())
        allowed = max(4 * (base.double() - want).abs().max().item(), FLOOR * scale)
        error = (got.double() - want).abs().max().item()
        assert error <= allowed, (name, error, allowed, scale)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", [(2, 32, 24, 9, 11, False), (1, 64, 48, 17, 13, True), (2, 256, 128, 12, 12, False)],
                         ids=["9x11", "17x13-bias", "256->128"])
def test_training_block_runs_winograd_within_4x_aten_error(case, layout):
    """The training block on the cpp backend: its conv forward and input gradient are Winograd ops (two calls
    of winograd_conv), the weight gradient is ATen's backward asked for the weight alone, and ATen's convolution
    forward never runs; output, gradients and running statistics within the accuracy policy."""
    b, cin, cout, h, w, bias = case
    block = _block(cin, cout, bias=bias, seed=cin + h)
    gen = torch.Generator().manual_seed(h * w)
    x = torch.randn(b, cin, h, w, generator=gen)
    upstream = torch.randn(b, cout, h, w, generator=gen)
    ours, names = _step(block, x, upstream, "cpp", layout=layout)
    assert names.count(WINOGRAD) == 2, names
    assert ATEN_CONV not in names and names.count(ATEN_CONV_BACKWARD) == 1, names
    aten, aten_names = _step(block, x, upstream, "eager", layout=layout)
    assert WINOGRAD not in aten_names and ATEN_CONV in aten_names
    exact, _ = _step(block, x, upstream, "eager", dtype=torch.float64, layout=layout)
    _judge(ours, aten, exact)


def test_training_block_is_bitwise_repeatable_and_its_winograd_parts_thread_count_invariant():
    """Repeat: every value the same bits. 1 and 2 threads: the output, the input gradient and the BN gradients
    the same bits (Winograd's summation order is fixed by the shapes); the conv weight gradient is ATen's, as
    before this path existed (not compared across thread counts)."""
    block = _block(64, 32, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, 20, 18, generator=gen)
    upstream = torch.randn(2, 32, 20, 18, generator=gen)
    first, names = _step(block, x, upstream, "cpp")
    assert names.count(WINOGRAD) == 2
    again, _ = _step(block, x, upstream, "cpp")
    for name, a, b in zip(NAMES, first, again):
        assert (a is None and b is None) or torch.equal(a, b), name
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = _step(block, x, upstream, "cpp")
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(NAMES, first, single):
        if name in ("output", "grad x", "grad bn.weight", "grad bn.bias", "running_mean", "running_var"):
            assert torch.equal(a, b), name


def test_calls_outside_the_winograd_conditions_keep_atens_convolution():
    """Maps under MIN_SIDE, float64, a forward hook on the conv (it must see the call), another geometry, and
    torch.compile's tracing (checked through training_why_not) keep ATen's convolution; torch.no_grad in training
    mode runs the Winograd forward alone."""
    gen = torch.Generator().manual_seed(7)
    small = torch.randn(2, 16, winograd.MIN_SIDE - 1, 12, generator=gen)
    large = torch.randn(2, 16, 12, 12, generator=gen)
    block = _block(16, 8, seed=8)

    def ran(x, module=block, dtype=torch.float32, grad=True):
        module = copy.deepcopy(module).to(dtype)
        with torch.set_grad_enabled(grad), _OpsSeen() as seen:
            conv_bn_relu(x.to(dtype).requires_grad_(grad), module.conv, module.batch_norm, backend="cpp")
        return seen.names

    assert WINOGRAD not in ran(small) and ATEN_CONV in ran(small)
    assert WINOGRAD not in ran(large, dtype=torch.float64)
    names = ran(large, grad=False)
    assert names.count(WINOGRAD) == 1 and ATEN_CONV not in names
    hooked = copy.deepcopy(block)
    seen_by_hook = []
    hooked.conv.register_forward_hook(lambda module, args, out: seen_by_hook.append(out.shape))
    assert WINOGRAD not in ran(large, module=hooked)
    dilated = copy.deepcopy(block)
    dilated.conv.dilation, dilated.conv.padding = (2, 2), (2, 2)
    assert WINOGRAD not in ran(large, module=dilated)
    assert winograd.training_why_not([large], (12, 12), block.conv) is None
    assert "maps under" in winograd.training_why_not([small], small.shape[2:], block.conv)


def test_maps_under_the_pixel_bound_keep_atens_convolution(monkeypatch):
    """The speed rule: training maps with fewer than TRAIN_MIN_PIXELS output pixels (batch x height x width) keep
    ATen's convolution; at the bound, Winograd runs (the plain block and a bottleneck's slices alike)."""
    monkeypatch.setattr(winograd, "TRAIN_MIN_PIXELS", 2 * 12 * 12)
    block = _block(16, 8, seed=13)
    gen = torch.Generator().manual_seed(14)
    for height, expected in ((11, False), (12, True)):
        x = torch.randn(2, 16, height, 12, generator=gen)
        reason = winograd.training_why_not([x], x.shape[2:], block.conv)
        assert (reason is None) == expected, reason
        with _OpsSeen() as seen:
            conv_bn_relu(x.requires_grad_(), block.conv, block.batch_norm, backend="cpp").sum().backward()
        assert (WINOGRAD in seen.names) == expected and (ATEN_CONV in seen.names) != expected, seen.names
    assert winograd.TRAIN_MIN_PIXELS == 2 * 12 * 12
    assert "output pixels" in winograd.training_why_not([torch.randn(1, 16, 12, 12)], (12, 12), block.conv)


def test_double_backward_raises_a_clear_error():
    """The training conv's backward is first-order only: a second backward through it raises (the block's BN+ReLU
    refuses create_graph itself, so the conv is called alone here)."""
    conv = _block(8, 8, seed=9).conv
    x = torch.randn(2, 8, 10, 10).requires_grad_()
    with _OpsSeen() as seen:
        out = winograd.training_conv(x, conv)
    assert seen.names.count(WINOGRAD_TRANSFORM) == 1 and seen.names.count(WINOGRAD) == 1, seen.names
    assert ATEN_CONV not in seen.names
    (grad,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bottleneck_slices_run_by_winograd_within_4x_aten_error(layout, monkeypatch):
    """forward_concat in training (the FPN bottleneck): each input map's slice of the conv runs as one
    winograd_upsample_concat_conv (the map resized on the fly), each slice's input gradient as one winograd_conv,
    each weight gradient as one ATen backward for the weight alone, no ATen convolution forward; output and
    every gradient within the accuracy policy against a float64 run of the unfused block."""
    from upernet_fast.ops.upsample_concat import upsample_concat

    shapes = [(2, 24, 12, 10), (2, 16, 6, 5), (2, 16, 3, 3), (2, 8, 1, 2)]
    size = (12, 10)
    gen = torch.Generator().manual_seed(10)
    values = [torch.randn(s, generator=gen) for s in shapes]
    block = _block(64, 32, bias=True, seed=11)
    upstream = torch.randn(2, 32, *size, generator=gen)
    applied = []
    real_apply = op_module._ConcatConv.apply
    monkeypatch.setattr(op_module._ConcatConv, "apply", lambda *a: applied.append(a[0]) or real_apply(*a))

    def run(module, dtype, fused):
        module = copy.deepcopy(module).to(dtype)
        maps = [in_layout(v.clone().to(dtype), layout).requires_grad_() for v in values]
        with _OpsSeen() as seen:
            if fused:
                out = module.forward_concat(list(maps), size)
            else:
                out = reference.conv_bn_relu(upsample_concat(maps, size, backend="eager"), module.conv,
                                             module.batch_norm)
            out.backward(upstream.to(dtype))
        conv, bn = module.conv, module.batch_norm
        grads = [m.grad for m in maps]
        return [out.detach(), *grads, conv.weight.grad, conv.bias.grad, bn.weight.grad, bn.bias.grad], seen.names

    ours, names = run(block, torch.float32, fused=True)
    assert len(applied) == 1 and applied[0][2] is True  # (geometry, size, by_winograd)
    assert names.count(CONCAT_WINOGRAD) == 4 and names.count(WINOGRAD) == 4, names
    assert names.count(ATEN_CONV_BACKWARD) == 4 and ATEN_CONV not in names, names
    aten, _ = run(block, torch.float32, fused=False)
    exact, _ = run(block, torch.float64, fused=False)
    labels = ["output"] + [f"grad map {i}" for i in range(len(shapes))] + ["conv.weight", "conv.bias", "bn.weight",
                                                                            "bn.bias"]
    for name, got, base, want in zip(labels, ours, aten, exact):
        allowed = max(4 * (base.double() - want).abs().max().item(), FLOOR * want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= allowed, name


def test_adjoint_filter_gives_the_convolutions_input_gradient():
    """The input gradient's transform: conv of the gradient with it equals ATen's input gradient (float64
    judge, same policy), for a non-square channel count (C_in != C_out: the transpose is taken)."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2, 24, 13, 9, generator=gen)
    weight = torch.randn(40, 24, 3, 3, generator=gen) * (2.0 / (9 * 24)) ** 0.5
    grad = torch.randn(2, 40, 13, 9, generator=gen)

    def input_grad(g, w, xx):
        return torch.ops.aten.convolution_backward(g, xx, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                   [True, False, False])[0]

    ours = winograd.winograd_conv(grad, winograd.adjoint_filter(weight))
    aten = input_grad(grad, weight, x)
    exact = input_grad(grad.double(), weight.double(), x.double())
    assert ours.shape == exact.shape
    allowed = max(4 * (aten.double() - exact).abs().max().item(), FLOOR * exact.abs().max().item())
    assert (ours.double() - exact).abs().max().item() <= allowed


def test_a_conv_subclass_overriding_forward_keeps_atens_convolution():
    """A Conv2d subclass with its own forward (or _conv_forward) is not the stock convolution our kernels reproduce:
    the training Winograd path, the eval Winograd block and the 1x1 matrix-product path all refuse it, naming it."""

    class Scaled(torch.nn.Conv2d):
        def forward(self, input):
            return 2 * super().forward(input)

    x = torch.randn(2, 8, 12, 12)
    for kernel, padding in ((3, 1), (1, 0)):
        conv = Scaled(8, 8, kernel, padding=padding, bias=False)
        reasons = [op_module.pointwise_why_not(x, conv)]
        if kernel == 3:
            reasons += [winograd.training_why_not([x], (12, 12), conv),
                        winograd.why_not(x, conv, torch.nn.BatchNorm2d(8).eval())]
        assert all(reason is not None and "Scaled overrides Conv2d.forward" in reason for reason in reasons), reasons
