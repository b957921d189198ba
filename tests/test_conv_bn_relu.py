"""ConvBNReLU / conv_bn_relu: the Triton backend against the eager reference block (``upernet_fast.reference``).

Tolerances:
* fp32 training: the statistics are summed in a different order than PyTorch's (two-level partials, Chan
  merges), so outputs and gradients differ by a few ulps of their magnitude: rtol = atol = 1e-5 (grads of
  the conv weight, which sum over the batch, get 1e-4 relative to their scale).
* fp16/bf16 (and a half conv + fp32 BN, as under AMP): error vs a float64 reference at most 2x PyTorch's
  own error in that dtype plus a few ulps of it (the conv runs in the half dtype on both sides).
* eval, fp32: folding BN into the conv reorders the arithmetic (w * scale summed over the kernel instead of
  the sum times scale), which moves each output by a few fp32 rounding errors of the conv's terms: 1e-5.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, TRITON_DEVICE
from layouts import in_layout
from torch import nn

import upernet_fast
from upernet_fast import reference
from upernet_fast.ops.conv_bn_relu import ConvBNReLU, conv_bn_relu

# The module itself (upernet_fast.ops re-exports a function of the same name).
op_module = importlib.import_module("upernet_fast.ops.conv_bn_relu")

DEV = TRITON_DEVICE


def _make_block(cin, cout, kernel, padding, bias=False, momentum=0.1, seed=0, device=None):
    """A ConvBNReLU with non-trivial BN parameters and running statistics, on ``device`` (default: the Triton
    tests' device, CUDA where there is one)."""
    torch.manual_seed(seed)
    block = ConvBNReLU(cin, cout, kernel, padding=padding, bias=bias)
    block.batch_norm.momentum = momentum
    with torch.no_grad():
        block.batch_norm.weight.uniform_(0.5, 1.5)
        block.batch_norm.bias.uniform_(-0.5, 0.5)
        block.batch_norm.running_mean.uniform_(-0.2, 0.2)
        block.batch_norm.running_var.uniform_(0.5, 2.0)
    return block.to(DEV if device is None else device)


def _step(block, x, g, backend):
    """One forward+backward; returns output and every gradient of interest (cloned)."""
    x = x.detach().requires_grad_(True)  # a leaf in the same layout (clone would make sliced inputs dense)
    y = conv_bn_relu(x, block.conv, block.batch_norm, backend=backend)
    y.backward(g)
    return y.detach(), x.grad, block.conv.weight.grad.clone(), block.batch_norm.weight.grad.clone(), \
        block.batch_norm.bias.grad.clone()


def _bn_state(bn):
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def _close(actual, expected, rtol, atol, what):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _fresh_cudnn_fused_state(monkeypatch):
    """A cuDNN refusal in one test must not turn the fused eval path off for the tests after it."""
    monkeypatch.setattr(op_module, "_cudnn_fused_refused", [])


# Labelled shapes: (N, C_in, H, W) -> C_out with kernel/padding.
TRAIN_CASES = {
    "odd_channels_and_map": ((2, 3, 7, 5), 5, 3, 1, False),  # the brief's 2x3x7x5 -> 5, 3x3 conv
    "1x1_conv_with_bias": ((3, 4, 5, 6), 7, 1, 0, True),  # conv bias present (cancelled by BN in training)
    "batch1_thin_map": ((1, 2, 1, 3), 3, 1, 0, False),  # 3 values per channel only
    "multi_part_reduction": ((2, 3, 24, 23), 6, 1, 0, False),  # several programs + Chan merges per channel
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_fp32_matches_reference(case, layout):
    shape, cout, kernel, padding, bias = TRAIN_CASES[case]
    ours = _make_block(shape[1], cout, kernel, padding, bias)
    ref = copy.deepcopy(ours)
    torch.manual_seed(1)
    for step in range(3):
        x = in_layout(torch.randn(shape, device=DEV) * 2 + 0.5, layout)
        with torch.no_grad():
            conv_out = ref.conv(x)
        # grad_output always NCHW-contiguous: for channels_last outputs the backward gets a layout mismatch.
        g = torch.randn(conv_out.shape, device=DEV)
        got = _step(ours, x, g, "triton")
        want = _step(ref, x, g, "eager")  # gradients accumulate over the steps on both sides alike
        names = ("output", "grad x", "grad conv.weight", "grad bn.weight", "grad bn.bias")
        for name, a, b in zip(names, got, want):
            scale = b.abs().max().clamp_min(1.0)
            _close(a, b, rtol=1e-5, atol=(1e-4 if "conv" in name else 1e-5) * scale, what=f"step {step} {name}")
        # The conv output's layout, except on the CPU where a spatial kernel's input is made NCHW in training
        # (cpu_training_conv_input): then the output is NCHW.
        expected = conv_out.contiguous() if DEV == "cpu" and kernel != 1 else conv_out
        assert got[0].stride() == expected.stride(), "output must keep the conv output's layout"
    for a, b, name in zip(_bn_state(ours.batch_norm), _bn_state(ref.batch_norm), ("mean", "var", "count")):
        _close(a.float(), b.float(), rtol=1e-5, atol=1e-6, what=f"running {name}")
    assert ours.batch_norm.num_batches_tracked.item() == 3


@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
def test_running_stats_after_three_steps(momentum):
    ours = _make_block(3, 5, 3, 1, momentum=momentum)
    ref = copy.deepcopy(ours)
    torch.manual_seed(2)
    for _ in range(3):
        x = torch.randn(2, 3, 7, 5, device=DEV) * 3 + 1
        conv_bn_relu(x, ours.conv, ours.batch_norm, backend="triton")
        reference.conv_bn_relu(x, ref.conv, ref.batch_norm)
    for a, b, name in zip(_bn_state(ours.batch_norm), _bn_state(ref.batch_norm), ("mean", "var", "count")):
        if name == "count":
            assert torch.equal(a, b) and a.item() == 3
        else:
            _close(a, b, rtol=1e-5, atol=1e-6, what=f"running {name}")


def _errors(ours_out, torch_half_out, ref64_out):
    return (ours_out.double() - ref64_out).abs().max().item(), (torch_half_out.double() - ref64_out).abs().max().item()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mixed", [False, True], ids=["half_model", "half_conv_fp32_bn"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_within_twice_torch_error(train, layout, mixed, dtype):
    base = _make_block(3, 5, 3, 1, seed=3)
    base.train(train)
    ref64 = copy.deepcopy(base).double()
    torch_half = copy.deepcopy(base)
    torch_half.conv.to(dtype)
    if not mixed:
        torch_half.batch_norm.to(dtype)
    ours = copy.deepcopy(torch_half)
    torch.manual_seed(4)
    x64 = in_layout(torch.randn(2, 3, 7, 5, device=DEV, dtype=torch.float64), layout)
    x_half = x64.to(dtype)
    g = torch.randn(2, 5, 7, 5, device=DEV, dtype=torch.float64)
    results = []
    for block, x, backend in ((ours, x_half, "triton"), (torch_half, x_half, "eager"), (ref64, x64, "eager")):
        results.append(_step(block, x, g.to(x.dtype), backend))
    names = ("output", "grad x", "grad conv.weight", "grad bn.weight", "grad bn.bias")
    for i, name in enumerate(names):
        ours_err, torch_err = _errors(results[0][i], results[1][i], results[2][i])
        scale = results[2][i].abs().max().item()
        ulps = 2e-3 if dtype == torch.float16 else 1.6e-2  # a few units of the last place of the dtype
        assert ours_err <= 2 * torch_err + ulps * max(scale, 1.0), f"{name}: ours {ours_err}, torch {torch_err}"
    if train:
        for a, b in zip(_bn_state(ours.batch_norm)[:2], _bn_state(ref64.batch_norm)[:2]):
            tol = 2e-3 if dtype == torch.float16 else 1.6e-2
            _close(a, b, rtol=tol, atol=tol, what="half running stats")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("bias", [False, True])
def test_eval_folding_exact_to_fp32_rounding(layout, bias):
    block = _make_block(4, 7, 3, 1, bias=bias, seed=5).eval()
    ref = copy.deepcopy(block)
    snapshot = {k: v.clone() for k, v in block.state_dict().items()}
    x = in_layout(torch.randn(2, 4, 9, 6, device=DEV), layout)
    with torch.no_grad():
        got = conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
        want = reference.conv_bn_relu(x, ref.conv, ref.batch_norm)
    _close(got, want, rtol=1e-5, atol=1e-5, what="eval output")
    for key, value in block.state_dict().items():  # the fold never mutates stored parameters or statistics
        assert torch.equal(value, snapshot[key]), key
    # Gradients still reach every parameter in eval mode (the fold is differentiable when they need it).
    g = torch.randn_like(want)
    got = _step(block, x, g, "triton")
    want = _step(ref, x, g, "eager")
    for name, a, b in zip(("output", "grad x", "grad conv.weight", "grad bn.weight", "grad bn.bias"), got, want):
        _close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().clamp_min(1.0), what=f"eval {name}")
    assert block.batch_norm.num_batches_tracked.item() == 0


def test_eval_refolds_after_parameter_or_statistic_change():
    block = _make_block(3, 5, 1, 0, bias=True, seed=6).eval()
    x = torch.randn(2, 3, 4, 5, device=DEV)

    def check(what):
        with torch.no_grad():
            got = conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
            want = reference.conv_bn_relu(x, block.conv, block.batch_norm)
        _close(got, want, rtol=1e-5, atol=1e-5, what=what)
        return got

    first = check("initial")
    check("unchanged")
    with torch.no_grad():
        block.batch_norm.running_mean.add_(0.3)
    assert not torch.equal(check("after running_mean change"), first)
    with torch.no_grad():
        block.batch_norm.running_var.mul_(2.0)
    check("after running_var change")
    with torch.no_grad():
        block.batch_norm.weight.mul_(-1.0)
        block.batch_norm.bias.add_(0.1)
    check("after BN affine change")
    with torch.no_grad():
        block.conv.weight.mul_(0.5)
        block.conv.bias.sub_(0.2)
    check("after conv change")
    block.load_state_dict({k: torch.randn_like(v.float()).abs().to(v.dtype) for k, v in block.state_dict().items()})
    check("after load_state_dict")
    block.train()  # a training step changes the running statistics; eval afterwards must see them
    conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
    block.eval()
    check("after a training step")
    # In-place writes through .data do not bump version counters (EMA updates, some loaders write this way).
    block.conv.weight.data.mul_(-1.0)
    block.batch_norm.running_mean.data.add_(0.5)
    check("after in-place writes through .data")


def test_eval_block_run_under_inference_mode_then_with_autograd():
    block = _make_block(3, 5, 1, 0, seed=20).eval().requires_grad_(False)  # a frozen block
    x = torch.randn(2, 3, 4, 5, device=DEV)
    with torch.inference_mode():
        conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
    xg = x.clone().requires_grad_(True)
    out = conv_bn_relu(xg, block.conv, block.batch_norm, backend="triton")  # the fold is saved for backward
    out.sum().backward()
    xr = x.clone().requires_grad_(True)
    reference.conv_bn_relu(xr, block.conv, block.batch_norm).sum().backward()
    _close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5, what="grad x")


def test_saved_tensors_are_conv_output_and_channel_stats_only():
    block = _make_block(3, 8, 1, 0, seed=7)
    ref = copy.deepcopy(block)
    x = torch.randn(2, 3, 10, 9, device=DEV, requires_grad=True)

    def saved_by(fn):
        saved = []

        def pack(t):
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, saved

    out, ours = saved_by(lambda: conv_bn_relu(x, block.conv, block.batch_norm, backend="triton"))
    _, eager = saved_by(lambda: conv_bn_relu(x, ref.conv, ref.batch_norm, backend="eager"))
    channels = block.conv.out_channels
    full = [t for t in ours if t.numel() == out.numel()]
    assert len(full) == 1, "only the conv output (pre-BN) is saved at the output's size"
    assert len([t for t in eager if t.numel() == out.numel()]) >= 2  # BN input and ReLU output at least
    others = [t for t in ours if t.numel() != out.numel()]
    # The rest: the block's input and conv weight (saved by the conv itself), then per-channel vectors.
    per_channel = [t for t in others if t.numel() == channels]
    assert len(others) - len(per_channel) == 2
    assert len(per_channel) == 4  # BN weight, BN bias, mean, invstd
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert nbytes(ours) < nbytes(eager)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_bitwise_repeatable(layout):
    block = _make_block(3, 6, 1, 0, seed=8)
    x = in_layout(torch.randn(2, 3, 24, 23, device=DEV), layout)
    g = torch.randn(2, 6, 24, 23, device=DEV)
    runs = []
    for _ in range(2):
        block.zero_grad()
        runs.append(_step(block, x, g, "triton"))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_batch1_single_value_per_channel_raises_like_reference():
    block = _make_block(3, 4, 1, 0, seed=9)
    x = torch.randn(1, 3, 1, 1, device=DEV)
    with pytest.raises(ValueError) as want:
        reference.conv_bn_relu(x, copy.deepcopy(block.conv), copy.deepcopy(block.batch_norm))
    with pytest.raises(ValueError) as got:
        conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
    assert str(got.value) == str(want.value)
    assert "Expected more than 1 value per channel when training" in str(got.value)
    assert block.batch_norm.num_batches_tracked.item() == 0  # nothing was updated
    block.eval()  # in eval mode a single value is fine
    conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")


@pytest.mark.parametrize("variant", ["affine_false", "no_running_stats_train", "no_running_stats_eval"])
def test_bn_variants_match_reference(variant):
    block = _make_block(3, 5, 3, 1, seed=10)
    affine = variant != "affine_false"
    track = variant == "affine_false"
    block.batch_norm = nn.BatchNorm2d(5, affine=affine, track_running_stats=track).to(DEV)
    block.train(variant != "no_running_stats_eval")
    ref = copy.deepcopy(block)
    torch.manual_seed(11)
    for _ in range(2):
        x = torch.randn(2, 3, 7, 5, device=DEV)
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        got = conv_bn_relu(xs[0], block.conv, block.batch_norm, backend="triton")
        want = reference.conv_bn_relu(xs[1], ref.conv, ref.batch_norm)
        g = torch.randn_like(want)
        got.backward(g)
        want.backward(g)
        _close(got, want, rtol=1e-5, atol=1e-5, what="output")
        _close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5, what="grad x")
        _close(block.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-4, what="grad conv.weight")
    for a, b in zip(block.batch_norm.buffers(), ref.batch_norm.buffers()):
        _close(a.float(), b.float(), rtol=1e-5, atol=1e-6, what="buffers")


def test_gradcheck_reference_float64():
    torch.manual_seed(12)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    bn = nn.BatchNorm2d(3).double()
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reference.conv_bn_relu(t, conv, bn), (x,))


def test_compile_fullgraph_aot_eager_train(triton_launches):
    block = _make_block(3, 5, 3, 1, seed=14)
    ref = copy.deepcopy(block)
    block.backend = "triton"
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(15)
    for step in range(2):
        x = torch.randn(2, 3, 7, 5, device=DEV)
        g = torch.randn(2, 5, 7, 5, device=DEV)
        got = compiled(x)
        got.backward(g)
        want = reference.conv_bn_relu(x, ref.conv, ref.batch_norm)
        want.backward(g)
        _close(got, want, rtol=1e-5, atol=1e-5, what=f"step {step} output")
        _close(block.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-4, what="grad conv.weight")
        _close(block.batch_norm.weight.grad, ref.batch_norm.weight.grad, rtol=1e-5, atol=1e-5, what="grad w")
    for a, b in zip(_bn_state(block.batch_norm), _bn_state(ref.batch_norm)):
        _close(a.float(), b.float(), rtol=1e-5, atol=1e-6, what="running stats")
    assert len(triton_launches) >= 4  # forward and backward of both steps ran the Triton kernels


def test_module_converted_by_class_assignment(triton_launches):
    """An instance whose __init__ never ran (transformers' UperNetConvModule with __class__ reassigned)."""
    from transformers.models.upernet.modeling_upernet import UperNetConvModule

    torch.manual_seed(16)
    hf = UperNetConvModule(3, 5, 3, padding=1).to(DEV)
    keys = list(hf.state_dict())
    ref = copy.deepcopy(hf)
    hf.__class__ = ConvBNReLU
    x = torch.randn(2, 3, 6, 5, device=DEV)
    _close(hf(x), ref(x), rtol=1e-5, atol=1e-5, what="no backend attribute")  # getattr default: auto
    # auto runs Triton on CUDA tensors; on CPU tensors it never does (cpp or eager, Triton only interprets there)
    assert bool(triton_launches) == (DEV == "cuda")
    triton_launches.clear()
    hf.backend = "triton"
    _close(hf(x), ref(x), rtol=1e-5, atol=1e-5, what="triton, train")
    assert triton_launches, "backend='triton' set by attribute must run the Triton kernels"
    hf.eval()
    ref.eval()
    with torch.no_grad():
        _close(hf(x), ref(x), rtol=1e-5, atol=1e-5, what="triton, eval")
    assert list(hf.state_dict()) == keys == list(ConvBNReLU(3, 5, 3, padding=1).state_dict())


def test_triton_refuses_with_reasons_and_auto_falls_back(triton_launches):
    block = _make_block(3, 5, 1, 0, seed=17).double()
    x = torch.randn(2, 3, 4, 4, device=DEV, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")

    class MyBatchNorm(nn.BatchNorm2d):
        pass

    block = _make_block(3, 5, 1, 0, seed=17)
    with pytest.raises(RuntimeError, match="MyBatchNorm"):
        conv_bn_relu(torch.randn(2, 3, 4, 4, device=DEV), block.conv, MyBatchNorm(5).to(DEV), backend="triton")
    with pytest.raises(RuntimeError, match="features"):
        conv_bn_relu(torch.randn(2, 3, 4, 4, device=DEV), block.conv, nn.BatchNorm2d(6).to(DEV), backend="triton")
    with pytest.raises(ValueError, match="in_channels"):
        conv_bn_relu(torch.randn(2, 4, 4, 4, device=DEV), block.conv, block.batch_norm, backend="triton")
    upernet_fast.set_backend("triton")  # the process-wide override reaches the module too
    out = block(torch.randn(2, 3, 4, 4, device=DEV))
    assert block.batch_norm.num_batches_tracked.item() == 1 and out.shape == (2, 5, 4, 4)
    assert triton_launches, "the process-wide override must run the Triton kernels"


# ------------------------------------------------------------------- eval inference: cuDNN conv+bias+ReLU


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten ops that run (below autograd), to see which kernels an eval block launches."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check; on CUDA the GPU tests below cover both paths")
def test_eval_on_cpu_takes_the_conv_then_relu_path():
    # The fused cuDNN call applies only to CUDA inputs with nothing needing gradients.
    block = _make_block(3, 5, 3, 1, seed=30).eval()
    x = torch.randn(2, 3, 6, 5, device=DEV)
    with torch.no_grad(), _AtenOps() as ops_seen:
        conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
    assert not any("cudnn_convolution_relu" in n for n in ops_seen.names)
    assert any("relu" in n for n in ops_seen.names)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eval_inference_on_gpu_is_one_fused_cudnn_call(autocast, layout):
    block = _make_block(8, 16, 3, 1, seed=31).eval()
    x = in_layout(torch.randn(2, 8, 9, 7, device=DEV), layout)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        with _AtenOps() as ops_seen:
            out = conv_bn_relu(x, block.conv, block.batch_norm, backend="triton")
        expected = reference.conv_bn_relu(x, block.conv, block.batch_norm)
    assert any("cudnn_convolution_relu" in n for n in ops_seen.names), ops_seen.names
    assert not any(n.startswith("relu") for n in ops_seen.names), ops_seen.names  # no separate ReLU pass
    # fp32: folding reorders the sums (see the eval folding test). bf16: both sides round to 8-bit mantissas.
    tol = 2e-2 if autocast else 1e-4
    _close(out, expected, rtol=tol, atol=tol, what="fused eval output")


class _RecordConvInputs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.inputs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.inputs.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpp", "eager"])
def test_cpu_training_hands_spatial_convolutions_nchw_inputs(backend):
    """oneDNN's channels_last convolution backward is 1.3-1.8x slower than NCHW on the CPU (see
    cpu_training_conv_input): a training block with a 3x3 kernel gives it an NCHW input (recorded at the
    convolution), with the same values; 1x1 blocks, no-grad calls and the eager backend keep the input's layout."""
    from op_testing import require_backend

    if backend == "cpp":
        require_backend("cpp")
    x = torch.randn(2, 6, 7, 5).to(memory_format=torch.channels_last).requires_grad_()
    for kernel, padding in ((3, 1), (1, 0)):
        block = _make_block(6, 4, kernel, padding, seed=3, device="cpu").train()  # a CPU-only rule
        ref = copy.deepcopy(block)
        with _RecordConvInputs() as recorded:
            out = conv_bn_relu(x, block.conv, block.batch_norm, backend=backend)
        expected = reference.conv_bn_relu(x, ref.conv, ref.batch_norm)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        (conv_input,) = recorded.inputs
        nchw = backend == "cpp" and kernel == 3
        assert conv_input.is_contiguous() == nchw, (backend, kernel)
        assert conv_input.is_contiguous(memory_format=torch.channels_last) == (not nchw), (backend, kernel)
    block = _make_block(6, 4, 3, 1, seed=3, device="cpu").train()
    with torch.no_grad(), _RecordConvInputs() as recorded:
        conv_bn_relu(x, block.conv, block.batch_norm, backend=backend)
    assert recorded.inputs[0].is_contiguous(memory_format=torch.channels_last)


def test_cpp_eval_keeps_bn_unfolded_where_the_weight_outnumbers_the_output():
    """Eval on the cpp backend: a block whose weight outnumbers its output (the PPM's 1x1 convs on 1x1-6x6 maps;
    here 24 -> 40 channels at 2x2) runs the conv, then the C++ relu(y * scale + shift) pass (no fold of the
    weight); a block whose output outnumbers its weight folds BN. Which one ran is recorded by the profiler.
    Both match the reference (fp32 rounding: the folded and unfolded forms round differently, 1e-5), with and
    without autograd, gradients included, and see in-place changes of the running statistics."""
    from op_testing import require_backend

    require_backend("cpp")
    for (cin, cout, size), unfolded in (((24, 40, 2), True), ((3, 5, 9), False)):
        block = _make_block(cin, cout, 1, 0, bias=True, seed=8, device="cpu").eval()
        ref = copy.deepcopy(block)
        x = torch.randn(2, cin, size, size)
        for change in (False, True):
            if change:  # through .data: no version bump; the next call must still see it
                for b in (block, ref):
                    b.batch_norm.running_mean.data.add_(0.25)
            with torch.no_grad(), torch.profiler.profile() as prof:
                got = conv_bn_relu(x, block.conv, block.batch_norm, backend="cpp")
            names = {event.name for event in prof.events()}
            # bn_relu_eval_from_buffers here (autograd-free); its differentiable twin bn_relu_eval in _step below
            assert any(n.startswith("upernet_fast_cpp::bn_relu_eval") for n in names) == unfolded, names
            with torch.no_grad():
                _close(got, reference.conv_bn_relu(x, ref.conv, ref.batch_norm), rtol=1e-5, atol=1e-5,
                       what=f"eval output, unfolded={unfolded}")
        g = torch.randn_like(got)
        for name, a, b in zip(("output", "grad x", "grad conv.weight", "grad bn.weight", "grad bn.bias"),
                              _step(block, x, g, "cpp"), _step(ref, x, g, "eager")):
            _close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().clamp_min(1.0), what=f"eval {name}")


def _allocation_sizes(prof) -> list[int]:
    from torch._C._profiler import _EventType

    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            sizes.append(node.extra_fields.alloc_size)
        stack.extend(node.children)
    return sizes


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_cpp_training_bottleneck_runs_by_input_slices(layout, monkeypatch):
    """forward_concat in training on the cpp backend (the FPN bottleneck): the concat's conv runs one input map at
    a time (conv_bn_relu._ConcatConv, recorded), no tensor of the concat's size is ever allocated, forward or
    backward (profiler allocation records), and the output and every gradient (each map, conv weight and bias,
    BN weight and bias) are as close to a float64 run of the unfused block as ATen's own float32 run is (4x its
    error, floor 1e-6 of the value's magnitude): the partial convs sum in another order than one conv."""
    from op_testing import require_backend

    from upernet_fast.ops.upsample_concat import upsample_concat

    require_backend("cpp")
    monkeypatch.setattr(op_module, "SLICED_MIN_BYTES", 0)  # small maps here (the size rule: the test below)
    shapes = [(2, 6, 9, 11), (2, 5, 5, 6), (2, 4, 3, 3), (2, 3, 1, 2)]  # odd sizes, every map resized up
    size = (9, 11)
    generator = torch.Generator().manual_seed(21)
    values = [torch.randn(s, generator=generator) for s in shapes]
    block = _make_block(18, 7, 3, 1, bias=True, seed=9, device="cpu").train()
    upstream = torch.randn(2, 7, *size, generator=generator)
    applied = []
    real_apply = op_module._ConcatConv.apply
    monkeypatch.setattr(op_module._ConcatConv, "apply", lambda *a: applied.append(1) or real_apply(*a))

    def run(module, dtype, sliced):
        maps = [in_layout(v.clone().to(dtype), layout).requires_grad_() for v in values]  # fresh leaves
        if sliced:
            with torch.profiler.profile(profile_memory=True) as prof:
                out = module.forward_concat(list(maps), size)
                out.backward(upstream.to(dtype))
            concat_bytes = 2 * 18 * size[0] * size[1] * 4
            assert concat_bytes not in _allocation_sizes(prof)
        else:
            concat = upsample_concat(maps, size, backend="eager")
            out = reference.conv_bn_relu(concat, module.conv, module.batch_norm)
            out.backward(upstream.to(dtype))
        params = (module.conv.weight, module.conv.bias, module.batch_norm.weight, module.batch_norm.bias)
        return [out.detach()] + [m.grad for m in maps] + [p.grad for p in params]

    aten_block, exact_block = copy.deepcopy(block), copy.deepcopy(block).double()
    ours = run(block, torch.float32, sliced=True)
    assert applied == [1]
    aten = run(aten_block, torch.float32, sliced=False)
    exact = run(exact_block, torch.float64, sliced=False)
    names = ["output"] + [f"grad map {i}" for i in range(len(shapes))] + ["conv.weight", "conv.bias", "bn.weight",
                                                                           "bn.bias"]
    for name, got, base, want in zip(names, ours, aten, exact):
        assert got is not None and base is not None and want is not None, name
        allowed = max(4 * (base.double() - want).abs().max().item(), 1e-6 * want.abs().max().item())
        assert (got.double() - want).abs().max().item() <= allowed, name


def test_cpp_training_bottleneck_slices_only_a_large_concat(monkeypatch):
    """The size rule of the sliced path: a concat of at least SLICED_MIN_BYTES (8 MiB: 2 images x 64 channels x
    128 x 128 float32) runs by input slices (its calls recorded); one a row smaller is built whole and convolved by
    the block (no sliced call), and gives the sliced path's output and gradients to float32 rounding (another
    summation order)."""
    from op_testing import require_backend

    require_backend("cpp")
    assert op_module.SLICED_MIN_BYTES == 2 * 64 * 128 * 128 * 4
    applied = []
    real_apply = op_module._ConcatConv.apply
    monkeypatch.setattr(op_module._ConcatConv, "apply", lambda *a: applied.append(1) or real_apply(*a))
    block = _make_block(64, 8, 3, 1, seed=12, device="cpu").train()
    generator = torch.Generator().manual_seed(22)
    outs = {}
    for size in ((128, 128), (127, 128)):
        maps = [torch.randn(2, 32, size[0] // k, size[1] // k, generator=generator).requires_grad_()
                for k in (1, 2)]
        applied.clear()
        out = block.forward_concat(list(maps), size)
        out.sum().backward()
        outs[size] = (len(applied), out.detach(), maps)
    assert outs[(128, 128)][0] == 1 and outs[(127, 128)][0] == 0, outs
    _, whole, whole_maps = outs[(127, 128)]
    whole_grad = whole_maps[0].grad
    monkeypatch.setattr(op_module, "SLICED_MIN_BYTES", 0)
    maps = [m.detach().clone().requires_grad_() for m in whole_maps]
    applied.clear()
    sliced = block.forward_concat(list(maps), (127, 128))
    sliced.sum().backward()
    assert applied == [1]
    _close(sliced.detach(), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item(), what="output")
    _close(maps[0].grad, whole_grad, rtol=1e-4, atol=1e-4 * whole_grad.abs().max().item(), what="grad map 0")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["train", "eval", "eval_no_grad", "eval_unfolded"])
def test_cpp_pointwise_convs_run_as_matrix_products(mode, bias):
    """The cpp backend's 1x1 convs of NCHW maps run as matrix products (op_module.pointwise_conv: aten.mm/addmm
    recorded, no aten.convolution), in training, in eval (folded, with and without autograd) and in the unfolded
    eval form (the PPM's: weight outnumbering the output); outputs and every gradient match the eager reference to
    float32 rounding (another summation order: 1e-5 of the largest value, gradients 1e-4). channels_last maps, a
    hooked conv and float64 gradcheck of the function itself are checked too."""
    from op_testing import OpsSeen, require_backend

    require_backend("cpp")
    cin, cout, size = (24, 40, 2) if mode == "eval_unfolded" else (6, 10, 9)
    block = _make_block(cin, cout, 1, 0, bias=bias, seed=15, device="cpu").train(mode == "train")
    ref = copy.deepcopy(block)
    generator = torch.Generator().manual_seed(16)
    x = torch.randn(2, cin, size, size + 1, generator=generator)
    g = torch.randn(2, cout, size, size + 1, generator=generator)
    if mode == "eval_no_grad":
        with torch.no_grad(), OpsSeen() as seen:
            got = conv_bn_relu(x, block.conv, block.batch_norm, backend="cpp")
        expected = reference.conv_bn_relu(x, ref.conv, ref.batch_norm).detach()
        _close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), what="output")
    else:
        with OpsSeen() as seen:
            ours = _step(block, x, g, "cpp")
        for name, a, b in zip(("output", "grad x", "grad conv.weight", "grad bn.weight", "grad bn.bias"), ours,
                              _step(ref, x, g, "eager")):
            tolerance = 1e-5 if name == "output" else 1e-4
            _close(a, b, rtol=tolerance, atol=tolerance * b.abs().max().item(), what=name)
    assert not any("convolution" in name for name in seen.names), seen.names
    if mode == "eval_no_grad":  # one C++ call, whose products are ATen's addmm (bits compared in the test below)
        assert "upernet_fast_cpp.conv_bn_relu_pointwise_eval.default" in seen.names, seen.names
    else:
        assert any(name.split(".")[1] in ("mm", "addmm") for name in seen.names), seen.names

    for other in ("channels_last", "hooked"):
        module = copy.deepcopy(block)
        xx = x.contiguous(memory_format=torch.channels_last) if other == "channels_last" else x
        if other == "hooked":
            module.conv.register_forward_hook(lambda *args: None)
        with OpsSeen() as seen:
            conv_bn_relu(xx.requires_grad_(mode != "eval_no_grad"), module.conv, module.batch_norm, backend="cpp")
        if other == "channels_last" or mode in ("train", "eval_unfolded"):  # the folded eval never calls conv
            assert any("convolution" in name for name in seen.names), (other, seen.names)


def test_pointwise_conv_gradcheck_float64():
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen).requires_grad_()
    weight = torch.randn(4, 3, 1, 1, dtype=torch.float64, generator=gen).requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()
    torch.autograd.gradcheck(op_module.pointwise_conv, (x, weight, bias))
    torch.testing.assert_close(op_module.pointwise_conv(x, weight, bias), F.conv2d(x, weight, bias))
    assert "channels_last" in op_module.pointwise_why_not(x.contiguous(memory_format=torch.channels_last),
                                                           nn.Conv2d(3, 4, 1).double())
    assert "1x1" in op_module.pointwise_why_not(x, nn.Conv2d(3, 4, 3, padding=1).double())


def _composed_eval(x, block):
    """The cpp backend's autograd-free eval block as it runs where the one-call op does not apply: the Python
    composition (fold + products + ReLU, or products + bn_relu_eval_from_buffers), forced by declaring the call
    not autograd-free while grad mode stays off."""
    real = op_module.needs_grad
    op_module.needs_grad = lambda *args: True
    try:
        with torch.no_grad():
            return op_module._cpp_conv_bn_relu(x, block.conv, block.batch_norm)
    finally:
        op_module.needs_grad = real


POINTWISE_EVAL = "upernet_fast_cpp::conv_bn_relu_pointwise_eval"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, "float32_with_float64_bn"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_cpp_pointwise_eval_is_one_call_with_the_composition_bits(dtype, bias, affine):
    """Autograd-free eval 1x1 blocks of NCHW maps on the cpp backend are one C++ call (conv_bn_relu_pointwise_eval,
    recorded by the profiler), folded or not (weight outnumbering the output, the PPM's), with exactly the bits of
    the Python composition it replaces (the same ATen products, the fold's arithmetic in the same order and
    dtype): odd sizes, 1x1 maps, batch 1 and 3, BN without affine parameters, BN statistics in another dtype. A
    call needing gradients, a channels_last map and a hooked conv in the unfolded form keep the composition."""
    from op_testing import require_backend

    require_backend("cpp")
    conv_dtype = torch.float32 if dtype == "float32_with_float64_bn" else dtype
    generator = torch.Generator().manual_seed(40)
    forms = set()
    for cin, cout, h, w in ((3, 5, 9, 7), (24, 40, 2, 2), (7, 3, 1, 1), (16, 33, 5, 6), (40, 24, 1, 1)):
        block = _make_block(cin, cout, 1, 0, bias=bias, seed=cin, device="cpu").eval()
        if not affine:
            block.batch_norm = nn.BatchNorm2d(cout, affine=False).eval()
            with torch.no_grad():
                block.batch_norm.running_mean.uniform_(-0.5, 0.5)
                block.batch_norm.running_var.uniform_(0.3, 2.0)
        block.conv.to(conv_dtype)
        block.batch_norm.to(torch.float64 if dtype == "float32_with_float64_bn" else conv_dtype)
        for batch in (1, 3):
            x = torch.randn(batch, cin, h, w, generator=generator).to(conv_dtype)
            unfolded = op_module._keeps_bn_unfolded(x, block.conv)
            forms.add(unfolded)
            with torch.no_grad(), torch.profiler.profile() as prof:
                got = conv_bn_relu(x, block.conv, block.batch_norm, backend="cpp")
            names = {event.name for event in prof.events()}
            assert POINTWISE_EVAL in names, names
            assert ("upernet_fast_cpp::bn_relu_eval_from_buffers" in names) == unfolded, names
            want = _composed_eval(x, block)
            assert torch.equal(got, want) and got.stride() == want.stride(), (cin, cout, h, w, batch)
            exact = copy.deepcopy(block).double()  # (PyTorch's own BatchNorm takes no float64 statistics for float32)
            with torch.no_grad():
                expected = reference.conv_bn_relu(x.double(), exact.conv, exact.batch_norm)
            tolerance = 1e-5 if conv_dtype == torch.float32 else 1e-12  # rounding of the fold (module docstring)
            _close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item(), what="vs reference")
    assert forms == {True, False}
    x = torch.randn(2, 40, 3, 1, generator=generator).to(conv_dtype)  # the last block (40 -> 24): unfolded
    assert op_module._keeps_bn_unfolded(x, block.conv)
    hooked = copy.deepcopy(block)
    hooked.conv.register_forward_hook(lambda *args: None)
    for what, run in (
        ("needs gradients", lambda: conv_bn_relu(x.clone().requires_grad_(), block.conv, block.batch_norm)),
        ("channels_last", lambda: conv_bn_relu(x.contiguous(memory_format=torch.channels_last), block.conv,
                                               block.batch_norm)),
        ("hooked unfolded conv", lambda: conv_bn_relu(x, hooked.conv, hooked.batch_norm)),
    ):
        with torch.profiler.profile() as prof:
            with torch.set_grad_enabled(what == "needs gradients"):
                run()
        assert POINTWISE_EVAL not in {event.name for event in prof.events()}, what


def test_cpp_pointwise_eval_opcheck_and_bad_arguments():
    from op_testing import require_backend

    require_backend("cpp")
    op = torch.ops.upernet_fast_cpp.conv_bn_relu_pointwise_eval
    block = _make_block(4, 6, 1, 0, bias=True, seed=41, device="cpu").eval().requires_grad_(False)
    conv, bn = block.conv, block.batch_norm
    x = torch.randn(2, 4, 3, 5)
    stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias, 1e-5)
    for fold in (True, False):
        for conv_bias in (conv.bias, None):
            torch.library.opcheck(op.default, (x, conv.weight, conv_bias, *stats, fold))
    torch.library.opcheck(op.default, (x, conv.weight, None, bn.running_mean, bn.running_var, None, None, 1e-3, True))
    bad = {
        "x must be a non-empty NCHW-contiguous map": (x.contiguous(memory_format=torch.channels_last), conv.weight),
        "x must be float32 or float64": (x.bfloat16(), conv.weight.bfloat16()),
        r"weight must be a CPU \(C_out, 4, 1, 1\) tensor": (x, torch.randn(6, 4, 3, 3)),
        "weight must have x's dtype": (x, conv.weight.double()),
    }
    for message, (xx, weight) in bad.items():
        with pytest.raises(RuntimeError, match=message):
            op(xx, weight, conv.bias, *stats, True)
    with pytest.raises(RuntimeError, match=r"running_var must have shape \(6,\)"):
        op(x, conv.weight, None, bn.running_mean, bn.running_var[:5], None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="conv_bias must have x's dtype"):
        op(x, conv.weight, conv.bias.double(), *stats, False)
    with pytest.raises(RuntimeError, match="inference-only"):
        op(x.clone().requires_grad_(), conv.weight, None, *stats, True)
