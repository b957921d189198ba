"""The checks every fused op gets, generated from a small per-op description (after torchvision's
``test/test_ops.py``, whose op testers inherit the generic tests and describe only their op).

An op's test file declares an :class:`OpSpec` and a ``class TestShared(OpTests)`` holding it; pytest then runs,
for every kernel backend of the op:

* ``opcheck`` of the backend's forward and backward ops (schema, fake kernel, autograd registration);
* a ``torch.compile(fullgraph=True)`` forward + backward, equal to the same backend run eagerly;
* bitwise-repeatable outputs and gradients (the kernels are deterministic by construction);
* agreement with the eager reference, outputs and gradients, for inputs in every layout of ``layouts.py``
  (sliced views live in NaN-filled storage, so an out-of-bounds read shows up as NaN), and output layouts
  equal to the reference's;
and, once per op, that bad arguments raise errors naming the argument.

Tolerances: fp32 against the reference, ``OpSpec.rtol``/``atol`` (the kernels sum in another order than
PyTorch; each op states its reason next to its numbers).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pytest
import torch
from conftest import TRITON_DEVICE
from layouts import LAYOUTS, in_layout

from upernet_fast import backend as _backend
from upernet_fast.kernels._utils import is_channels_last

# Kernel backends, the namespace of their ops, and the device their tests run on. The C++ backend is tested
# wherever its loader ships; an extension that fails to build fails these tests (CI builds it), never skips.
KERNEL_BACKENDS = {"triton": ("upernet_fast", TRITON_DEVICE)}
if importlib.util.find_spec("upernet_fast.cpp_extension") is not None:
    KERNEL_BACKENDS["cpp"] = (_backend.CPP_NAMESPACE, "cpu")


class OpsSeen(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op the dispatcher runs below autograd (ATen and upernet_fast_cpp alike), forward and backward:
    the proof of which kernels computed a result."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def kaiming_block(cin: int, cout: int, *, bias: bool = False, seed: int = 0):
    """A 3x3 ConvBNReLU (eval mode; .train() for training), kaiming-normal conv weight, non-trivial BN parameters
    and running statistics: the blocks the Winograd accuracy tests judge."""
    from upernet_fast.ops.conv_bn_relu import ConvBNReLU

    gen = torch.Generator().manual_seed(seed)
    block = ConvBNReLU(cin, cout, 3, padding=1, bias=bias).eval()
    with torch.no_grad():
        block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=gen) * (2.0 / (9 * cin)) ** 0.5)
        if bias:
            block.conv.bias.copy_(torch.randn(cout, generator=gen) * 0.1)
        bn = block.batch_norm
        bn.weight.copy_(torch.rand(cout, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(cout, generator=gen) * 0.2)
        bn.running_mean.copy_(torch.randn(cout, generator=gen) * 0.2)
        bn.running_var.copy_(torch.rand(cout, generator=gen) * 1.5 + 0.5)
    return block


def require_backend(backend: str) -> None:
    """Fail (not skip) with the reason when a kernel backend cannot run here; loads and attaches C++ ops."""
    reason = _backend.BACKENDS_DECLARED[backend].why_unavailable()
    assert reason is None, f"the {backend} backend cannot run here: {reason}"


@dataclass
class OpSpec:
    """What the shared checks need to know of one op.

    ``make_inputs(device, layout, seed)``: small, odd-shaped inputs for ``run`` (tensors to differentiate have
    ``requires_grad``); ``run(inputs, backend)``: the op's outputs as a tuple; ``kernel_calls(device)``: the
    (op name, arguments) pairs ``opcheck`` checks in each kernel namespace, forward and backward ops;
    ``bad_calls``: (callable, exception type, message pattern) triples for the argument checks;
    ``layout_like_reference``: whether 4D outputs must have the reference's memory layout;
    ``kernel_names``: per backend, the qualified op that a ``kernel_calls`` name stands for where it is not
    ``<namespace>::<name>`` (a Python composite over that backend's kernels).
    """

    name: str
    make_inputs: Callable[[str, str, int], tuple]
    run: Callable[[tuple, str], tuple]
    kernel_calls: Callable[[str], list[tuple[str, tuple]]]
    bad_calls: Sequence[tuple[Callable[[], object], type, str]] = field(default_factory=list)
    rtol: float = 1e-5
    atol: float = 1e-6
    layout_like_reference: bool = True
    kernel_names: dict[str, dict[str, str]] = field(default_factory=dict)


def _leaves(inputs: tuple) -> list[torch.Tensor]:
    found = []
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(t for t in value if isinstance(t, torch.Tensor) and t.requires_grad)
    return found


def outputs_and_grads(run: Callable[[tuple, str], tuple], inputs: tuple, backend: str, seed: int = 99):
    """The op's outputs, and the gradients of its differentiable inputs for fixed random upstream gradients."""
    outputs = tuple(run(inputs, backend))
    generator = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(o.shape, generator=generator).to(o.dtype).to(o.device) for o in outputs]
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(outputs, leaves, upstream, allow_unused=True) if leaves else ()
    return outputs, grads


def _assert_all_equal(first, second, what: str) -> None:
    for i, (a, b) in enumerate(zip(first, second)):
        assert (a is None) == (b is None), f"{what}[{i}]: one is None"
        if a is not None:
            assert torch.equal(a, b), f"{what}[{i}] differs"


@pytest.mark.parametrize("backend", list(KERNEL_BACKENDS))
class OpTests:
    spec: OpSpec

    def test_opcheck(self, backend):
        require_backend(backend)
        namespace, device = KERNEL_BACKENDS[backend]
        calls = self.spec.kernel_calls(device)
        assert calls, "no kernel op to check"
        for name, args in calls:
            qualified = self.spec.kernel_names.get(backend, {}).get(name, f"{namespace}::{name}")
            op_namespace, op_name = qualified.split("::")
            torch.library.opcheck(getattr(getattr(torch.ops, op_namespace), op_name).default, args)

    def test_compile_fullgraph_equals_eager_mode(self, backend):
        require_backend(backend)
        _, device = KERNEL_BACKENDS[backend]
        inputs = self.spec.make_inputs(device, "contiguous", 1)
        torch._dynamo.reset()  # every op's test compiles this same lambda: start from no cached graphs
        compiled = torch.compile(lambda ins: self.spec.run(ins, backend), fullgraph=True, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dynamo's notes on the backend checks
            got = outputs_and_grads(lambda ins, _: compiled(ins), inputs, backend)
        want = outputs_and_grads(self.spec.run, inputs, backend)
        _assert_all_equal(got[0], want[0], "compiled outputs")
        _assert_all_equal(got[1], want[1], "compiled gradients")
        for out, ref in zip(got[0], want[0]):
            assert out.dim() != 4 or is_channels_last(out) == is_channels_last(ref)

    def test_outputs_and_gradients_are_bitwise_repeatable(self, backend):
        require_backend(backend)
        _, device = KERNEL_BACKENDS[backend]
        inputs = self.spec.make_inputs(device, "contiguous", 2)
        first = outputs_and_grads(self.spec.run, inputs, backend)
        second = outputs_and_grads(self.spec.run, inputs, backend)
        _assert_all_equal(first[0], second[0], "outputs")
        _assert_all_equal(first[1], second[1], "gradients")

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_every_layout_agrees_with_eager(self, backend, layout):
        require_backend(backend)
        _, device = KERNEL_BACKENDS[backend]
        inputs = self.spec.make_inputs(device, layout, 3)
        got_out, got_grads = outputs_and_grads(self.spec.run, inputs, backend)
        want_out, want_grads = outputs_and_grads(self.spec.run, inputs, "eager")
        for got, want in zip((*got_out, *got_grads), (*want_out, *want_grads)):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=self.spec.rtol, atol=self.spec.atol)
        for got, want in zip(got_out, want_out if self.spec.layout_like_reference else ()):
            assert got.dim() != 4 or is_channels_last(got) == is_channels_last(want), "output layout differs"

    def test_auto_picks_the_fastest_kernel_backend_for_the_device(self, backend, monkeypatch):
        """Which implementation ``auto`` ran, recorded at the selection: CPU tensors go to cpp (Triton only
        interprets there), CUDA tensors to triton. A silent fallback to eager fails here."""
        require_backend(backend)
        _, device = KERNEL_BACKENDS[backend]
        expected = "cpp" if device == "cpu" else "triton"
        require_backend(expected)
        chosen, real_select = [], _backend.select

        def recording(op, requested, *args, **kwargs):
            impl = real_select(op, requested, *args, **kwargs)
            chosen.append((op, impl.backend))
            return impl

        monkeypatch.setattr(_backend, "select", recording)
        self.spec.run(self.spec.make_inputs(device, "contiguous", 4), "auto")
        assert (self.spec.name, expected) in chosen, chosen

    def test_bad_arguments_name_themselves(self, backend):
        assert self.spec.bad_calls, "no bad-argument case declared"
        for call, error, match in self.spec.bad_calls:
            with pytest.raises(error, match=match):
                call()


def layout_inputs(shapes: Sequence[Sequence[int]], device: str, layout: str, seed: int) -> list[torch.Tensor]:
    """One random leaf per shape, fp32, in ``layout`` (see layouts.py), requiring grad."""
    generator = torch.Generator().manual_seed(seed)
    return [
        in_layout(torch.randn(*shape, generator=generator).to(device), layout).requires_grad_()
        for shape in shapes
    ]
