"""Ahead-of-time compilation of every Triton kernel for an H100 (sm_90), with the launch configurations the host
launchers choose on CUDA.

The other kernel tests run without a GPU through Triton's interpreter, which never builds PTX or SASS: a kernel
that only fails in the real compiler (a layout or shape the backend rejects, ptxas running out of registers)
would pass them. This file closes that gap on any machine, GPU or not.

How: the work runs in child processes (this file run as a script, one per CPU up to 4, each compiling a share
of the specialisations), because under TRITON_INTERPRET=1, which conftest.py sets before Triton is imported,
every ``@triton.jit`` function (``triton.language``'s own ``tl.sum``, ``tl.cdiv``, ... included) is an
interpreter object that the compiler cannot take, and the decision is made once, at import. In a child,
started without TRITON_INTERPRET:

1. the kernel modules are imported normally: their kernels are ``JITFunction``s, and every launcher takes its
   CUDA branch (``interpreting()`` is False);
2. ``JITFunction.run`` is replaced, while the launchers are called, by a recorder that does what the real
   ``run`` does up to its compile call, for ``GPUTarget("cuda", 90, 32)``: bind the arguments, specialise
   them (dtypes, ints equal to 1 and divisibility by 16, pointer alignment), parse the launch options
   (num_warps, num_stages, ...). Nothing runs. Tensors are on the ``meta`` device (shapes and strides only), so
   the real workloads, and maps big enough to switch the kernels to int64 indexing, cost no memory; ``meta``
   tensors report data pointer 0, i.e. aligned like CUDA allocations;
3. each distinct specialisation is compiled once with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   90, 32))`` (Triton bundles ptxas: no GPU needed), and the cubin's registers and local memory (spills) are
   read with the bundled ``cuobjdump -res-usage`` (local memory is what Triton reports as ``n_spills``).
   Compiled kernels land in Triton's usual cache, so a second run is quick (about 70 s cold on 2 cores).

Every launcher's CUDA path is reached with ``meta`` tensors, so no configuration is re-derived here by
hand: the block sizes, warps and flags compiled are the ones the launchers' own code picks.

The tests read the children's results: one test per kernel file, failing with the specialisation, its workloads
and the compiler's error when a kernel does not build. ``pytest -s`` prints every specialisation with its
registers and spills.

Workloads: UperNet with a ConvNeXt-T backbone at batch 2 and 512x512 input (PPM on 2x768x16x16, FPN maps of
512 channels at 16..128, four-map concat to 128x128, 150-class loss 128x128 -> 512x512 at batch 1, BatchNorm
on 2x512x32x32 and 2x512x128x128), in fp32 / fp16 / bf16 and NCHW / channels_last, forward and backward
launchers, plus odd tiny shapes, strided views and int64-sized maps.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import pytest
import torch

if __name__ != "__main__":
    pytest.importorskip("triton")

from upernet_fast.kernels._utils import is_channels_last  # noqa: E402 (imports no Triton)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KERNEL_PACKAGE = "upernet_fast.kernels"
KERNEL_MODULES = (  # _bilinear has no kernels of its own: its helpers compile inside these
    "adaptive_avg_pool_multi",
    "upsample_add",
    "upsample_concat",
    "upsample_cross_entropy",
    "bn_relu",
)
DEVICE = "meta"  # shapes and strides only: the launchers allocate nothing real and no kernel runs
# Local memory per thread (spill slots and stack) that a kernel may use on sm_90 before this file fails: generous,
# a guard against a configuration change that makes ptxas spill heavily, not a performance threshold.
MAX_LOCAL_BYTES = 512
WORKER_TIMEOUT_S = 900


# ------------------------------------------------------------------------------------------------ workloads


def _t(shape, dtype=torch.float32, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device=DEVICE, memory_format=fmt)


def _layout_name(channels_last: bool) -> str:
    return "channels_last" if channels_last else "NCHW"


def _grid(*, dtypes=DTYPES):
    return [(dtype, cl) for dtype in dtypes for cl in (False, True)]


# adaptive_avg_pool_multi: pool_forward / pool_backward


def _pool(shape, scales, dtype, channels_last=False, view=None):
    def scenario(m):
        k = m["adaptive_avg_pool_multi"]
        x = _t(shape, dtype, channels_last)
        if view is not None:
            x = view(x)
        outs = k.pool_forward(x, scales)
        cl = is_channels_last(x)
        k.pool_backward([torch.empty_like(o) for o in outs], x.shape, scales, cl)

    return scenario


POOL_SCENARIOS = [
    (f"PPM 2x768x16x16 (1,2,3,6) {DTYPE_NAMES[d]} {_layout_name(cl)}", _pool((2, 768, 16, 16), (1, 2, 3, 6), d, cl))
    for d, cl in _grid()
] + [
    ("tiny 1x3x5x7 (1,2,3,6) fp32 (bins wider than the map)", _pool((1, 3, 5, 7), (1, 2, 3, 6), torch.float32)),
    ("tiny 3x5x1x1 (2,) fp16 channels_last", _pool((3, 5, 1, 1), (2,), torch.float16, True)),
    ("strided view of 2x20x9x11 bf16 (1,3)", _pool((2, 20, 9, 11), (1, 3), torch.bfloat16,
                                                  view=lambda x: x[:, ::2, 1:, :-1])),
    ("2x16x12x12 fp32 ten scales (two launches, accumulating backward)",
     _pool((2, 16, 12, 12), tuple(range(1, 11)), torch.float32)),
    ("int64-sized 64x2048x128x160 bf16 channels_last (1,2,3,6)",
     _pool((64, 2048, 128, 160), (1, 2, 3, 6), torch.bfloat16, True)),
]


# upsample_add: forward kernel, backward = upsample_concat's backward kernel for one slice at offset 0


def _upsample_add(low_shape, lateral_shape, dtype, low_cl=False, lateral_cl=None):
    lateral_cl = low_cl if lateral_cl is None else lateral_cl

    def scenario(m):
        low, lateral = _t(low_shape, dtype, low_cl), _t(lateral_shape, dtype, lateral_cl)
        out = m["upsample_add"].upsample_add_forward(low, lateral)
        if tuple(low_shape[-2:]) != tuple(lateral_shape[-2:]):  # equal sizes: the grad of low is grad itself
            grad_low = _t(low_shape, dtype, is_channels_last(low))
            m["upsample_concat"].upsample_concat_backward(torch.empty_like(out), [grad_low], [0])

    return scenario


UPSAMPLE_ADD_SCENARIOS = [
    (f"FPN 2x512x{s}x{s} -> {2 * s}x{2 * s} {DTYPE_NAMES[d]} {_layout_name(cl)}",
     _upsample_add((2, 512, s, s), (2, 512, 2 * s, 2 * s), d, cl))
    for d, cl in _grid() for s in (16, 32, 64)
] + [
    ("tiny 1x3x5x7 -> 11x13 fp32", _upsample_add((1, 3, 5, 7), (1, 3, 11, 13), torch.float32)),
    ("same size 2x6x9x9 bf16 channels_last", _upsample_add((2, 6, 9, 9), (2, 6, 9, 9), torch.bfloat16, True)),
    ("downsample 1x5x13x10 -> 5x4 fp16", _upsample_add((1, 5, 13, 10), (1, 5, 5, 4), torch.float16)),
    ("mixed layouts 2x512x32x32 NCHW -> 64x64 channels_last fp32",
     _upsample_add((2, 512, 32, 32), (2, 512, 64, 64), torch.float32, False, True)),
    # lateral of 64 * 512 * 256 * 256 = 2**31 elements (e.g. batch 64 at 1024x1024)
    ("int64-sized 64x512x128x128 -> 256x256 bf16", _upsample_add((64, 512, 128, 128), (64, 512, 256, 256),
                                                                 torch.bfloat16)),
]


# upsample_concat: forward and backward kernels


def _upsample_concat(shapes, size, dtype, channels_last=False, layouts=None):
    layouts = [channels_last] * len(shapes) if layouts is None else layouts

    def scenario(m):
        uc = m["upsample_concat"]
        tensors = [_t(s, dtype, cl) for s, cl in zip(shapes, layouts)]
        first = tensors[0]
        out = _t((first.shape[0], sum(t.shape[1] for t in tensors), *size), dtype,
                 is_channels_last(first))
        uc.upsample_concat_forward(tensors, size, out)
        offsets, resized, offset = [], [], 0
        for t in tensors:
            if tuple(t.shape[-2:]) != tuple(size):
                resized.append(_t(t.shape, dtype, is_channels_last(t)))
                offsets.append(offset)
            offset += t.shape[1]
        if resized:
            uc.upsample_concat_backward(torch.empty_like(out), resized, offsets)

    return scenario


FPN_MAPS = [(2, 512, 128, 128), (2, 512, 64, 64), (2, 512, 32, 32), (2, 512, 16, 16)]
PPM_MAPS = [(2, 768, 16, 16)] + [(2, 512, s, s) for s in (1, 2, 3, 6)]
UPSAMPLE_CONCAT_SCENARIOS = [
    (f"FPN concat 4x 2x512 -> 128x128 {DTYPE_NAMES[d]} {_layout_name(cl)}",
     _upsample_concat(FPN_MAPS, (128, 128), d, cl))
    for d, cl in _grid()
] + [
    (f"PPM concat 2x768x16x16 + 4 pooled 2x512 -> 16x16 {DTYPE_NAMES[d]} {_layout_name(cl)}",
     _upsample_concat(PPM_MAPS, (16, 16), d, cl))
    for d, cl in _grid()
] + [
    ("seven tiny inputs -> 9x7 fp16 (two launches)", _upsample_concat(
        [(1, 1, 3, 3), (1, 3, 9, 7), (1, 2, 1, 1), (1, 5, 4, 2), (1, 2, 9, 7), (1, 1, 12, 13), (1, 4, 2, 5)],
        (9, 7), torch.float16)),
    ("mixed layouts 2x3x5x5 + 2x4x2x3 -> 6x6 bf16",
     _upsample_concat([(2, 3, 5, 5), (2, 4, 2, 3)], (6, 6), torch.bfloat16, layouts=[True, False])),
    # Cityscapes-size inference (1024x2048, batch 8): the concat has 8 * 2048 * 256 * 512 = 2**31 elements
    ("int64-sized FPN concat 4x 8x512 -> 256x512 fp32 (Cityscapes 1024x2048, batch 8)",
     _upsample_concat([(8, 512, 256, 512), (8, 512, 128, 256), (8, 512, 64, 128), (8, 512, 32, 64)], (256, 512),
                      torch.float32)),
]


# upsample_cross_entropy: forward and backward kernels


def _cross_entropy(logits_shape, out_size, dtype, *, channels_last=False, reduction="mean", weight=False,
                   align_corners=False):
    def scenario(m):
        ce = m["upsample_cross_entropy"]
        logits = _t(logits_shape, dtype, channels_last)
        labels = torch.empty((logits_shape[0], *out_size), dtype=torch.int64, device=DEVICE)  # the op's .long()
        w = torch.empty(logits_shape[1], dtype=torch.float32, device=DEVICE) if weight else None
        loss, lse, denominator = ce.forward(logits, labels, w, 255, reduction, align_corners)
        ce.backward(torch.empty_like(loss), logits, labels, w, lse, denominator, 255, align_corners)

    return scenario


CROSS_ENTROPY_SCENARIOS = [
    (f"150 classes 1x150x128x128 -> 512x512 {DTYPE_NAMES[d]} {_layout_name(cl)} {red}",
     _cross_entropy((1, 150, 128, 128), (512, 512), d, channels_last=cl, reduction=red))
    for d, cl in _grid() for red in ("mean", "none")
] + [
    ("150 classes batch 16 -> 512x512 bf16 mean", _cross_entropy((16, 150, 128, 128), (512, 512), torch.bfloat16)),
    ("auxiliary head 16x150x32x32 -> 512x512 bf16 channels_last mean",
     _cross_entropy((16, 150, 32, 32), (512, 512), torch.bfloat16, channels_last=True)),
    ("62 columns (32-cell backward blocks) 2x19x40x62 -> 160x248 fp32 none",
     _cross_entropy((2, 19, 40, 62), (160, 248), torch.float32, reduction="none")),
    ("150 classes fp32 class weights mean", _cross_entropy((1, 150, 128, 128), (512, 512), torch.float32,
                                                           weight=True)),
    ("150 classes fp16 class weights none", _cross_entropy((1, 150, 128, 128), (512, 512), torch.float16,
                                                           weight=True, reduction="none")),
    ("150 classes bf16 align_corners mean", _cross_entropy((1, 150, 128, 128), (512, 512), torch.bfloat16,
                                                           align_corners=True)),
    ("tiny 2x3x5x7 -> 9x11 fp16 mean", _cross_entropy((2, 3, 5, 7), (9, 11), torch.float16)),
    ("one class 2x1x4x4 -> 8x8 fp32 none align_corners",
     _cross_entropy((2, 1, 4, 4), (8, 8), torch.float32, reduction="none", align_corners=True)),
    ("downsample 1x19x8x8 -> 5x5 bf16 channels_last sum",
     _cross_entropy((1, 19, 8, 8), (5, 5), torch.bfloat16, channels_last=True, reduction="sum")),
]


# bn_relu: statistics (partial + finalize), apply, backward (partial + finalize) and backward apply


def _bn(shape, dtype, channels_last=False, param_dtype=torch.float32):
    def scenario(m):
        k = m["bn_relu"]
        x = _t(shape, dtype, channels_last)
        c = shape[1]
        weight = torch.empty(c, dtype=param_dtype, device=DEVICE)
        bias = torch.empty(c, dtype=param_dtype, device=DEVICE)
        mean, var = k.channel_stats(x)
        invstd = torch.empty_like(var)
        k.bn_relu_apply(x, mean, invstd, weight, bias)
        grad = torch.empty_like(x)
        sum_g, sum_gxhat = k.bn_relu_backward_reduce(grad, x, mean, invstd, weight, bias)
        k.bn_relu_backward_input(grad, x, mean, invstd, weight, bias, sum_g, sum_gxhat, float(x.numel() // c))

    return scenario


BN_SCENARIOS = [
    (f"BN 2x512x32x32 {DTYPE_NAMES[d]} {_layout_name(cl)} fp32 params", _bn((2, 512, 32, 32), d, cl))
    for d, cl in _grid()
] + [
    (f"BN 2x512x32x32 {DTYPE_NAMES[d]} {_layout_name(cl)} {DTYPE_NAMES[d]} params",
     _bn((2, 512, 32, 32), d, cl, param_dtype=d))
    for d, cl in _grid(dtypes=(torch.float16, torch.bfloat16))
] + [
    (f"BN fpn_bottleneck 2x512x128x128 {DTYPE_NAMES[d]} {_layout_name(cl)}", _bn((2, 512, 128, 128), d, cl))
    for d, cl in _grid(dtypes=(torch.float32, torch.bfloat16))
] + [
    ("BN PPM 2x512x1x1 fp32", _bn((2, 512, 1, 1), torch.float32)),
    ("tiny 1x1x1x1 fp32", _bn((1, 1, 1, 1), torch.float32)),
    ("tiny 3x5x7x2 fp16 channels_last", _bn((3, 5, 7, 2), torch.float16, True)),
    ("one channel 2x1x9x9 bf16", _bn((2, 1, 9, 9), torch.bfloat16)),
]


FAMILIES = {
    "adaptive_avg_pool_multi": POOL_SCENARIOS,
    "upsample_add": UPSAMPLE_ADD_SCENARIOS,
    "upsample_concat": UPSAMPLE_CONCAT_SCENARIOS,
    "upsample_cross_entropy": CROSS_ENTROPY_SCENARIOS,
    "bn_relu": BN_SCENARIOS,
}


# --------------------------------------------------------------------------- the child process (the worker)


def _find_toolchain():
    """(target, backend, cuobjdump path) for sm_90, or the reason this Triton cannot compile for it."""
    import triton

    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
    except Exception as exc:  # an older or newer Triton without these internals
        return f"this Triton ({triton.__version__}) lacks the AOT compile API used here: {type(exc).__name__}: {exc}"
    if not hasattr(JITFunction, "_pack_args"):
        return f"this Triton ({triton.__version__}) has no JITFunction._pack_args to specialise launches with"
    try:
        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)
    except Exception as exc:
        return f"Triton has no CUDA backend here: {type(exc).__name__}: {exc}"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(target.arch).path
        except TypeError:  # Triton versions whose get_ptxas takes no architecture
            ptxas = get_ptxas().path
        subprocess.run([ptxas, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        return f"ptxas (needed to build sm_90 cubins) is not usable: {type(exc).__name__}: {exc}"
    try:
        cuobjdump = knobs.nvidia.cuobjdump.path
        subprocess.run([cuobjdump, "--version"], check=True, capture_output=True, timeout=60)
    except Exception as exc:
        return f"cuobjdump (needed to read register and spill counts) is not usable: {type(exc).__name__}: {exc}"
    return target, backend, cuobjdump


class _Launch:
    """One specialisation of one kernel, as its launcher would compile it on an sm_90 GPU."""

    def __init__(self, fn, signature, constexprs, attrs, options, label):
        self.fn, self.signature, self.constexprs, self.attrs, self.options = fn, signature, constexprs, attrs, options
        self.labels = [label]
        self.name = fn.fn.__name__
        self.key = (fn.module, self.name, repr(signature), repr(sorted(constexprs.items())),
                    repr(sorted(attrs.items())), repr(options))

    def constants(self) -> dict:
        """The kernel's own constexprs by name (lower-case ones are ints that Triton pinned because they are 1)."""
        names = [p.name for p in self.fn.params]
        return {names[path[0]]: value for path, value in sorted(self.constexprs.items()) if len(path) == 1
                and names[path[0]].isupper() and isinstance(value, (bool, int, float))}

    def describe(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constants().items())
        names = [p.name for p in self.fn.params]
        ones = [names[path[0]] for path in sorted(self.constexprs) if len(path) == 1 and not names[path[0]].isupper()]
        pinned = f"; ==1: {','.join(ones)}" if ones else ""  # e.g. the unit stride: which layout this is
        pointers = sorted({ty for ty in self.signature.values() if isinstance(ty, str) and ty.startswith("*")})
        return (f"{self.name}[{consts}; {'/'.join(pointers)}{pinned}; num_warps={self.options.num_warps}, "
                f"num_stages={self.options.num_stages}]")


def _capture(scenarios, modules, backend) -> list:
    """Runs each ``(label, fn(modules))`` with kernel launches recorded, not run; returns the distinct
    specialisations, each with the labels of the workloads that launch it."""
    from triton import knobs
    from triton.runtime.jit import JITFunction, create_function_from_signature

    launches, label, binders = [], [""], {}

    def record(self, *args, grid, warmup, **kwargs):
        # JITFunction.run's steps up to its compile call, for the sm_90 backend instead of the active driver's.
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        if hasattr(knobs.compilation, "instrumentation_mode"):
            kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        if self not in binders:
            binders[self] = create_function_from_signature(self.signature, self.params, backend)
        bound_args, specialization, options = binders[self](*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound_args, specialization, options)
        launches.append(_Launch(self, signature, constexprs, attrs, options, label[0]))

    real_run = JITFunction.run
    JITFunction.run = record
    try:
        for name, scenario in scenarios:
            label[0] = name
            before = len(launches)
            scenario(modules)
            if len(launches) == before:
                raise AssertionError(f"workload {name!r} launched no kernel")
    finally:
        JITFunction.run = real_run
    distinct = {}
    for launch in launches:
        if launch.key not in distinct:
            distinct[launch.key] = launch
        elif launch.labels[0] not in distinct[launch.key].labels:
            distinct[launch.key].labels.append(launch.labels[0])
    return list(distinct.values())


def _resource_usage(cuobjdump: str, cubin: bytes, name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "-res-usage", path], check=True, capture_output=True, text=True,
                              timeout=120).stdout
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Function") and name in line and i + 1 < len(lines):
            return {k: int(v) for k, v in (item.split(":", 1) for item in lines[i + 1].split()) if v.isdigit()}
    raise AssertionError(f"no resource usage for {name} in cuobjdump's output:\n{text}")


def _global_access_widths(ptx: str) -> dict:
    """Static count of the PTX global loads and stores by width, e.g. {"ld.v4.b32": 4, "st.b16": 2}: how wide
    each thread's memory instructions are (128-bit accesses keep more bytes in flight per instruction, which the
    bandwidth-bound kernels need). Counted in the code, not per execution."""
    counts: dict = {}
    # e.g. "ld.global.L1::evict_last.v4.b32", "st.global.v2.b16", "ld.global.b32"
    for op, vec, ty in re.findall(r"\b(ld|st)\.global(?:\.[\w:]+?)*?(\.v[248])?\.([busf]\d+)\b", ptx):
        key = f"{op}{vec}.{ty}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _compile(launch, target, cuobjdump) -> dict:
    import triton
    from triton.compiler import ASTSource

    result = {"kernel": launch.name, "module": launch.fn.module, "spec": launch.describe(),
              "constants": launch.constants(), "num_warps": launch.options.num_warps,
              "num_stages": launch.options.num_stages, "signature": repr(launch.signature), "error": None}
    start = time.perf_counter()
    try:
        src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
        kernel = triton.compile(src, target=target, options=launch.options.__dict__)
        cubin = kernel.asm.get("cubin")
        if not cubin:
            raise AssertionError(f"compiled without a cubin (artifacts: {sorted(kernel.asm)})")
        if kernel.metadata.num_warps != launch.options.num_warps:
            raise AssertionError(f"compiled for {kernel.metadata.num_warps} warps, launched with "
                                 f"{launch.options.num_warps}")
        usage = _resource_usage(cuobjdump, cubin, kernel.metadata.name)
        result.update(regs=usage.get("REG"), local_bytes=usage.get("LOCAL"), stack_bytes=usage.get("STACK"),
                      shared_bytes=usage.get("SHARED"), cubin_bytes=len(cubin),
                      global_access=_global_access_widths(kernel.asm.get("ptx", "")))
    except Exception as exc:  # noqa: BLE001 - reported with its specialisation by the tests
        # A CompilationError names the kernel line; its causes name the helper and, last, the actual error.
        parts, seen = [], exc
        while seen is not None and len(parts) < 8:
            text = f"{type(seen).__name__}: {seen}"
            parts.append(text if len(text) < 2500 else "...\n" + text[-2500:])
            seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
        result["error"] = "\n-- caused by --\n".join(parts)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _emit(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def _worker(out_path: str, shard: int, shards: int) -> None:
    """Writes one JSON line per event to ``out_path``.

    Every shard records every launch (cheap) and numbers the distinct specialisations in the same order; shard
    ``k`` compiles those numbered ``k`` modulo ``shards``. Shard 0 also writes, per kernel file, its
    ``capture_error`` or one ``launch`` line per specialisation, and a last ``coverage`` line. Compiles write a
    ``compiling`` line before and a ``compiled`` line after (a compiler crash leaves a ``compiling`` alone).
    """
    import importlib

    with open(out_path, "w") as out:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            _emit(out, {"type": "skip", "reason": "the worker was started with TRITON_INTERPRET set"})
            return
        toolchain = _find_toolchain()
        if isinstance(toolchain, str):
            _emit(out, {"type": "skip", "reason": toolchain})
            return
        target, backend, cuobjdump = toolchain
        warnings.simplefilter("ignore")  # e.g. Triton 3.9's TRITON_DEFAULT_FP_FUSION notice
        modules = {name: importlib.import_module(f"{KERNEL_PACKAGE}.{name}") for name in KERNEL_MODULES}
        numbers, covered = {}, set()
        for family, scenarios in FAMILIES.items():
            try:
                launches = _capture(scenarios, modules, backend)
            except Exception:  # noqa: BLE001
                if shard == 0:
                    _emit(out, {"type": "capture_error", "family": family, "error": traceback.format_exc()})
                continue
            for launch in launches:
                covered.add((launch.fn.module, launch.name))
                new = launch.key not in numbers
                number = numbers.setdefault(launch.key, len(numbers))
                if shard == 0:
                    _emit(out, {"type": "launch", "family": family, "number": number, "labels": launch.labels})
                if new and number % shards == shard:
                    _emit(out, {"type": "compiling", "number": number, "spec": launch.describe()})
                    _emit(out, {"type": "compiled", "number": number, **_compile(launch, target, cuobjdump)})
        if shard == 0:
            from triton.runtime.jit import JITFunction

            defined = sorted(
                (module.__name__, name)
                for module in modules.values()
                for name, value in vars(module).items()
                if isinstance(value, JITFunction) and name.endswith("_kernel")
            )
            _emit(out, {"type": "coverage", "defined": defined, "covered": sorted(covered)})
        _emit(out, {"type": "done"})


# ---------------------------------------------------------------------------------------------------- tests


def _shards() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


@pytest.fixture(scope="module")
def sm90() -> dict:
    """The workers' results for this session: {"launches": {family: [result + labels]}, "coverage": ...}.

    The workers run once, in parallel child processes without the interpreter, one shard of the compiles each.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = _shards()
    records, problems, skips = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"sm90-{k}.jsonl") for k in range(shards)]
        logs = [os.path.join(tmp, f"sm90-{k}.log") for k in range(shards)]
        procs = []
        for k in range(shards):
            with open(logs[k], "w") as log:
                procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), paths[k], str(k),
                                               str(shards)], env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                proc.wait()
        for k, proc in enumerate(procs):
            with open(logs[k]) as log:
                output = log.read()
            shard_records = []
            if os.path.exists(paths[k]):
                with open(paths[k]) as f:
                    shard_records = [json.loads(line) for line in f if line.strip()]
            skips += [r["reason"] for r in shard_records if r["type"] == "skip"]
            if not skips and (proc.returncode != 0 or not shard_records or shard_records[-1]["type"] != "done"):
                done = {r["number"] for r in shard_records if r["type"] == "compiled"}
                crashed = [r["spec"] for r in shard_records if r["type"] == "compiling" and r["number"] not in done]
                problems.append(
                    f"sm_90 compile worker {k} " + ("ran past the time limit" if timed_out else
                                                    f"exited with status {proc.returncode}")
                    + (f" while compiling {crashed[-1]}" if crashed else "") + f"\noutput (tail):\n{output[-6000:]}"
                )
            records += shard_records
    if skips:
        pytest.skip(f"cannot compile for sm_90 here: {skips[0]}")
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
    compiled = {r["number"]: r for r in records if r["type"] == "compiled"}
    families: dict = {family: [] for family in FAMILIES}
    capture_errors = {r["family"]: r["error"] for r in records if r["type"] == "capture_error"}
    for r in records:
        if r["type"] == "launch":
            families[r["family"]].append({**compiled[r["number"]], "labels": r["labels"]})
    coverage = [r for r in records if r["type"] == "coverage"][0]
    return {"families": families, "capture_errors": capture_errors, "coverage": coverage,
            "compiled": list(compiled.values())}


def _line(r: dict) -> str:
    if r["error"]:
        return f"FAILED {r['spec']}"
    more = f" +{len(r['labels']) - 1} more" if len(r["labels"]) > 1 else ""
    return (f"ok {r['spec']}: regs={r['regs']} spills(local)={r['local_bytes']}B shared={r['shared_bytes']}B "
            f"cubin={r['cubin_bytes']}B global={r['global_access']} ({r['seconds']}s) <- {r['labels'][0]}{more}")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernels_compile_for_sm90(sm90, family):
    """Every specialisation the family's launchers make on CUDA for the workloads builds an sm_90 cubin."""
    if family in sm90["capture_errors"]:
        pytest.fail(f"recording the {family} launches failed:\n{sm90['capture_errors'][family]}", pytrace=False)
    results = sm90["families"][family]
    assert results, f"no {family} launch was recorded"
    print(f"\n[{family}] {len(results)} distinct sm_90 specialisations")
    for r in results:
        print("  " + _line(r))
    failures = [r for r in results if r["error"]]
    if failures:
        report = "\n\n".join(
            f"{r['spec']}\n  workloads: {'; '.join(r['labels'])}\n  signature: {r['signature']}\n"
            f"  error: {r['error']}" for r in failures
        )
        pytest.fail(f"{len(failures)} of {len(results)} {family} specialisations do not compile for sm_90 with "
                    f"their CUDA launch configuration:\n\n{report}", pytrace=False)
    for r in results:
        assert r["cubin_bytes"] > 0 and r["regs"], _line(r)
    heavy = [r for r in results if r["local_bytes"] > MAX_LOCAL_BYTES]
    assert not heavy, (f"sm_90 kernels using more than {MAX_LOCAL_BYTES} B of local memory (spills) per thread:\n"
                       + "\n".join(_line(r) for r in heavy))


def test_every_kernel_is_covered(sm90):
    """Each ``*_kernel`` JITFunction of ``upernet_fast.kernels`` is compiled by at least one workload above."""
    coverage = sm90["coverage"]
    missing = sorted({tuple(k) for k in coverage["defined"]} - {tuple(k) for k in coverage["covered"]})
    assert not missing, f"kernels with no sm_90 compile workload in this file: {missing}"


def test_launchers_took_their_cuda_configuration(sm90):
    """The recorded launches carry the GPU block sizes, not the interpreter's (a guard on this file's set-up):
    see ``upsample_cross_entropy._forward_blocks`` / ``_backward_blocks`` and ``bn_relu``'s
    ``_elementwise_block``."""

    def of(module, kernel):
        found = [r for r in sm90["compiled"] if r["module"] == f"{KERNEL_PACKAGE}.{module}" and r["kernel"] == kernel]
        assert found, f"no launch of {module}.{kernel} recorded"
        return found

    for r in of("upsample_cross_entropy", "_forward_kernel"):
        assert r["constants"]["BLOCK_P"] == 64 and r["constants"]["BLOCK_C"] <= 32 and r["num_warps"] == 4, r
    backward = of("upsample_cross_entropy", "_backward_kernel")
    for r in backward:
        c = r["constants"]
        assert c["BLOCK_C"] <= 32 and c["BLOCK_J"] in (8, 16, 32) and 2 <= c["BLOCK_I"] <= 16, r
        assert r["num_warps"] == max(1, min(4, c["BLOCK_C"] * c["BLOCK_J"] // 128)), r
    decode = [r for r in sm90["families"]["upsample_cross_entropy"]
              if r["kernel"] == "_backward_kernel" and "150 classes batch 16 -> 512x512 bf16 mean" in r["labels"]]
    assert [(r["constants"]["BLOCK_C"], r["constants"]["BLOCK_J"], r["constants"]["BLOCK_I"], r["num_warps"])
            for r in decode] == [(32, 16, 16, 4)], decode
    assert {r["constants"]["BLOCK_J"] for r in backward} == {8, 16, 32}, backward
    assert max(r["constants"]["BLOCK"] for r in of("bn_relu", "_apply_kernel")) == 2048


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
