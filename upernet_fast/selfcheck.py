"""``python -m upernet_fast.selfcheck [--backend triton] [--device cuda] [--dtypes fp32,bf16]
[--layouts nchw,channels_last]``: every op of one backend against the eager reference, forward and backward,
on small odd shapes, in each dtype and memory layout asked for (default: all). Exits non-zero on any mismatch.

Meant for a new machine (does the Triton build work here?), as the second stage of ``.ci/gpu-session``, and as
the workload of compute-sanitizer memcheck, which then sees every kernel launch of every op once.

How each result is judged (outputs, and the gradients of the inputs and module parameters for one random
upstream gradient per output):

* fp32: against eager fp32 with rtol 1e-4, atol 1e-5. The kernels evaluate the same per-element formulas in
  another summation order (tiled partial sums, gather-form backward); at these sizes (sums of at most a few
  hundred terms) that moves results by a few fp32 ulps, far below what a wrong index or weight costs (1e-2 and
  up). TF32 is switched off while checking, so cuDNN's convolutions are true fp32 on both sides.
* bf16: against an fp32 reference computed from the same (bf16-rounded) inputs. PyTorch's own bf16 result
  has an error against that reference, rounding once or more per element; the backend's error may be at most
  twice PyTorch's, plus one bf16 epsilon (2^-7) of the reference's largest magnitude (a result rounded once to
  bf16 can sit one rounding away on elements where PyTorch happened to round luckily). Errors are the largest
  absolute difference over the whole tensor. The conv block runs under autocast (fp32 parameters, bf16
  activations), as an AMP training step does.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from upernet_fast import backend as _backend
from upernet_fast import ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last")
FP32_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
LOW_PRECISION_FACTOR = 2.0  # times PyTorch's own error in that dtype


class Maker:
    """Deterministic inputs for one run of one case: every run of a case sees the same values.

    ``dtype``: the dtype the op computes in; ``round_to``: the dtype the values are rounded to first (the fp32
    reference of a bf16 check reads bf16-rounded values in fp32)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, round_to: torch.dtype, layout: str):
        self.device, self.dtype, self.round_to, self.layout = device, dtype, round_to, layout
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.leaves: dict[str, torch.Tensor] = {}

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.layout == "channels_last" else t

    def tensor(self, name: str, *shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen).to(self.round_to).to(self.dtype)
        t = self._layout(t).to(self.device).requires_grad_()
        self.leaves[name] = t
        return t

    def labels(self, classes: int, *shape: int, ignored_rows: int = 2) -> torch.Tensor:
        labels = torch.randint(0, classes, shape, generator=self.gen)
        labels[0, :ignored_rows] = 255  # some ignored pixels
        return labels.to(self.device)

    def batch_norm(self, name: str, channels: int, training: bool = True) -> torch.nn.BatchNorm2d:
        bn = torch.nn.BatchNorm2d(channels)
        self._randomise(bn, running=not training)
        bn.train(training)
        return self._module(name, bn)

    def block(self, name: str, cin: int, cout: int, kernel: int, training: bool = True) -> ops.ConvBNReLU:
        block = ops.ConvBNReLU(cin, cout, kernel, padding=kernel // 2)
        with torch.no_grad():
            block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=self.gen) / (cin * kernel**2) ** 0.5)
        self._randomise(block.batch_norm, running=not training)
        block.train(training)
        return self._module(name, block)

    def _randomise(self, bn: torch.nn.BatchNorm2d, running: bool) -> None:
        with torch.no_grad():
            bn.weight.copy_(1 + 0.5 * torch.randn(bn.num_features, generator=self.gen))
            bn.bias.copy_(0.5 * torch.randn(bn.num_features, generator=self.gen))
            if running:  # eval mode folds these into the conv: make them matter
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=self.gen))
                bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=self.gen))

    def _module(self, name: str, module: torch.nn.Module):
        module = module.to(self.device)  # parameters stay fp32, as under AMP
        if self.layout == "channels_last":
            module = module.to(memory_format=torch.channels_last)
        for pname, p in module.named_parameters():
            self.leaves[f"{name}.{pname}"] = p
        return module

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def _conv_block(training: bool):
    def run(b, m):
        block = m.block("block", 3, 5, 3, training=training)
        block.backend = b
        with m.autocast():
            return (block(m.tensor("x", 2, 3, 13, 11)),)
    return run


# (op, fn(backend, maker) -> tuple of outputs). Odd, non-square shapes: non-divisible pooling bins and
# non-integer resize ratios.
CASES = [
    ("adaptive_avg_pool_multi", lambda b, m: ops.adaptive_avg_pool_multi(m.tensor("x", 2, 5, 7, 11), (1, 2, 3, 6),
                                                                         backend=b)),
    ("upsample_add", lambda b, m: (ops.upsample_add(m.tensor("low", 2, 3, 5, 4), m.tensor("lateral", 2, 3, 13, 11),
                                                    backend=b),)),
    ("upsample_concat", lambda b, m: (ops.upsample_concat(
        [m.tensor("a", 2, 3, 13, 11), m.tensor("b", 2, 3, 5, 4), m.tensor("c", 2, 4, 7, 11)[:, :2]], (13, 11),
        backend=b),)),
    ("upsample_cross_entropy", lambda b, m: (ops.upsample_cross_entropy(m.tensor("logits", 2, 3, 5, 4),
                                                                        m.labels(3, 2, 17, 13), backend=b),)),
    ("bn_relu", lambda b, m: (ops.bn_relu(m.tensor("y", 2, 5, 7, 11), m.batch_norm("bn", 5), backend=b),)),
    ("conv_bn_relu", _conv_block(training=True)),
    ("conv_bn_relu (eval)", _conv_block(training=False)),
]


def _run_case(fn, backend: str, maker: Maker):
    """Outputs and {leaf name: gradient} for one random upstream gradient per output."""
    outputs = fn(backend, maker)
    gen = torch.Generator(device="cpu").manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outputs)
    names = list(maker.leaves)
    grads = torch.autograd.grad(loss, [maker.leaves[n] for n in names], allow_unused=True)
    return [o.detach() for o in outputs], {n: g for n, g in zip(names, grads) if g is not None}


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item() if want.numel() else 0.0


def _compare(what: str, got, want, lowp=None, dtype=torch.float32) -> str:
    """'' when ``got`` passes (see the module docstring), else why not. ``lowp``: PyTorch's own result in the
    low-precision ``dtype`` (bf16 checks), whose error against ``want`` sets the bound. (Gradients of fp32
    parameters are fp32 tensors, but computed through bf16 activations: the rounding unit is ``dtype``'s.)"""
    if got is None:
        return f"{what}: no gradient"
    if got.shape != want.shape:
        return f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if lowp is None:
        try:
            torch.testing.assert_close(got, want, **FP32_TOLERANCE)
        except AssertionError as exc:
            return f"{what}: " + " ".join(str(exc).split())[:200]
        return ""
    if got.dtype != lowp.dtype:
        return f"{what}: dtype {got.dtype}, PyTorch gives {lowp.dtype}"
    if not torch.isfinite(got).all():
        return f"{what}: non-finite values"
    scale = want.float().abs().max().item() if want.numel() else 0.0
    err, torch_err = _max_err(got, want), _max_err(lowp, want)
    bound = LOW_PRECISION_FACTOR * torch_err + torch.finfo(dtype).eps * scale
    return "" if err <= bound else f"{what}: max error {err:.3g} > bound {bound:.3g} (PyTorch's own {torch_err:.3g})"


def check(op_fn, backend: str, device: torch.device, dtype: torch.dtype, layout: str) -> tuple[list[str], float]:
    """(problems, largest error seen relative to the reference's scale) for one op, dtype and layout."""
    ours, ours_g = _run_case(op_fn, backend, Maker(device, dtype, dtype, layout))
    ref, ref_g = _run_case(op_fn, "eager", Maker(device, torch.float32, dtype, layout))
    lowp, lowp_g = (None, {}) if dtype == torch.float32 else _run_case(op_fn, "eager", Maker(device, dtype, dtype, layout))
    problems, worst = [], 0.0
    pairs = [(f"output {i}", o, r, None if lowp is None else lowp[i]) for i, (o, r) in enumerate(zip(ours, ref))]
    pairs += [(f"grad {n}", ours_g.get(n), g, lowp_g.get(n)) for n, g in ref_g.items()]
    for what, got, want, low in pairs:
        problem = _compare(what, got, want, low, dtype)
        if problem:
            problems.append(problem)
        elif got is not None and want.numel():
            worst = max(worst, _max_err(got, want) / max(want.float().abs().max().item(), 1e-30))
    return problems, worst


def run(backend: str, device: str, dtypes=tuple(DTYPES), layouts=LAYOUTS, only=None) -> int:
    device = torch.device(device)
    failures = 0
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for dtype_name in dtypes:
            for layout in layouts:
                for op, fn in CASES:
                    if only and op.split()[0] not in only:
                        continue
                    try:
                        problems, worst = check(fn, backend, device, DTYPES[dtype_name], layout)
                    except Exception as exc:  # report every op, then fail
                        problems, worst = [f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"], 0.0
                    failures += bool(problems)
                    status = f"ok (max rel. error {worst:.1e})" if not problems else "FAILED " + "; ".join(problems)
                    print(f"{op:<24} {dtype_name} {layout:<13} {backend} vs eager on {device.type}: {status}",
                          flush=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"selfcheck: {failures} failure(s)")
    return 1 if failures else 0


def _csv(choices):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(t for t in text.split(",") if t)
        unknown = set(items) - set(choices)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {sorted(unknown)}; choose from {', '.join(choices)}")
        return items
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upernet_fast.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="triton", choices=[b for b in _backend.BACKENDS if b != "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", type=_csv(DTYPES), default=tuple(DTYPES), help="comma-separated: fp32,bf16")
    parser.add_argument("--layouts", type=_csv(LAYOUTS), default=LAYOUTS, help="comma-separated: nchw,channels_last")
    ops_names = sorted({op.split()[0] for op, _ in CASES})
    parser.add_argument("--ops", type=_csv(ops_names), default=None, help="comma-separated op names (default: all)")
    args = parser.parse_args(argv)
    return run(args.backend, args.device, args.dtypes, args.layouts, args.ops)


if __name__ == "__main__":
    sys.exit(main())
