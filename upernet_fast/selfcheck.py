"""``python -m upernet_fast.selfcheck [--backend triton] [--device cuda]``: every op of one backend against
the eager reference, forward and backward, on small odd shapes, fp32. Exits non-zero on any mismatch.

Meant for a new machine (does the Triton build work here?) and as the workload of compute-sanitizer memcheck,
which then sees every kernel launch of every op once.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from upernet_fast import backend as _backend
from upernet_fast import ops

TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # fp32; kernels may sum in another order than PyTorch


def _cases(device):
    """(op name, fn(backend) -> tuple of outputs); every fn reads the same inputs, made once here."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_()

    x = rand(2, 5, 7, 11)  # odd, non-square: non-divisible pooling bins
    low, lateral = rand(2, 3, 5, 4), rand(2, 3, 13, 11)  # 5x4 -> 13x11: non-integer ratios
    labels = torch.randint(0, 3, (2, 17, 13), generator=g).to(device)
    labels[0, :2] = 255
    block = ops.ConvBNReLU(3, 5, 3, padding=1).to(device)
    blocks = {}  # one copy per backend: training-mode BatchNorm updates its running statistics

    def conv_block(b):
        module = blocks.setdefault(b, copy.deepcopy(block))
        module.backend = b
        return (module(lateral),)

    return [
        ("adaptive_avg_pool_multi", lambda b: ops.adaptive_avg_pool_multi(x, (1, 2, 3, 6), backend=b)),
        ("upsample_add", lambda b: (ops.upsample_add(low, lateral, backend=b),)),
        ("upsample_concat", lambda b: (ops.upsample_concat([lateral, low, x[:, :2]], (13, 11), backend=b),)),
        ("upsample_cross_entropy", lambda b: (ops.upsample_cross_entropy(low, labels, backend=b),)),
        ("conv_bn_relu", conv_block),
    ]


def run(backend: str, device: str) -> int:
    failures = 0
    for op, fn in _cases(torch.device(device)):
        reason = None
        try:
            outputs = fn(backend)
            expected = fn("eager")
            for out, ref in zip(outputs, expected):
                torch.testing.assert_close(out, ref, **TOLERANCE)
            # The inputs both graphs read (module copies differ per backend, their parameters are not shared).
            ours = {id(t) for t in _leaves(outputs)}
            inputs = [t for t in _leaves(expected) if id(t) in ours]
            grads = torch.autograd.grad(sum(o.float().sum() for o in outputs), inputs, allow_unused=True)
            grads_ref = torch.autograd.grad(sum(o.float().sum() for o in expected), inputs, allow_unused=True)
            for got, want in zip(grads, grads_ref):
                if want is not None:
                    torch.testing.assert_close(got, want, **TOLERANCE)
        except Exception as exc:  # report every op, then fail
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        status = "ok" if reason is None else f"FAILED {reason}"
        failures += reason is not None
        print(f"{op:<24} {backend} vs eager on {device}: {status}")
    return 1 if failures else 0


def _leaves(outputs):
    """The leaf tensors that require grad and feed these outputs (found by walking the autograd graph)."""
    seen, leaves, stack = set(), [], [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return leaves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m upernet_fast.selfcheck", description=__doc__)
    parser.add_argument("--backend", default="triton", choices=[b for b in _backend.BACKENDS if b != "eager"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    return run(args.backend, args.device)


if __name__ == "__main__":
    sys.exit(main())
