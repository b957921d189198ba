"""Benchmark shapes, stored as data: real backbone configurations and the per-op shapes they imply.

A UperNet head sees four feature maps at strides 4, 8, 16 and 32 of the crop, with the backbone's channel
counts; it works at ``HIDDEN`` channels, pools the last map at ``POOL_SCALES`` and predicts ``NUM_CLASSES``
classes at stride 4 (shared/reference/upernet-spec.md). Every op case below is derived from such a workload,
so the numbers are the ones a real model hits, not arbitrary sizes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

BACKBONE_CHANNELS: dict[str, tuple[int, int, int, int]] = {
    "convnext_t": (96, 192, 384, 768),
    "convnext_s": (96, 192, 384, 768),
    "convnext_b": (128, 256, 512, 1024),
    "swin_t": (96, 192, 384, 768),
    "resnet50": (256, 512, 1024, 2048),
}
CROPS = (512, 640)
BATCHES = (1, 2, 4, 8, 16, 32)
STRIDES = (4, 8, 16, 32)
HIDDEN = 512
NUM_CLASSES = 150
POOL_SCALES = (1, 2, 3, 6)

SHAPE_SETS = ("full", "quick", "headline", "tiny", "cpu-inference")
# Sets that only the e2e suite has: the CPU inference rows of issue #13 (ConvNeXt-T UperNet at 512x512).
E2E_ONLY_SETS = ("cpu-inference",)
HEADLINE_BLOCK = "fpn_convs.0"  # the conv block of the headline set

DRY_RUN_ENV = "UPERNET_FAST_GPU_DRY_RUN"
DRY_RUN_COMPILE_BACKEND = "aot_eager"


def gpu_dry_run() -> bool:
    """True in the GPU session's CPU rehearsal (``UPERNET_FAST_GPU_DRY_RUN=1 bash .ci/gpu-session``).

    The one switch of the rehearsal, read here only: the ``headline`` set keeps its selection (ops, instances,
    modes, dtype, layout, providers, targets) at toy sizes; Triton is timed under its interpreter (numbers
    without meaning, the code path is what is proven); ``torch.compile`` uses the ``aot_eager`` backend (dynamo
    and AOT autograd run, Inductor's C++ build is left out) and is not skipped on the CPU; timers take the
    fewest samples. Nothing else differs from the run on the GPU."""
    return os.environ.get(DRY_RUN_ENV, "") not in ("", "0")


def toy_sizes(shape_set: str) -> bool:
    """Whether this run measures toy shapes (the tests' ``tiny`` set, or the headline set in a dry run)."""
    return shape_set == "tiny" or (shape_set == "headline" and gpu_dry_run())


@dataclass(frozen=True)
class Workload:
    """One model configuration: backbone channels, crop, batch (and the head's width and class count)."""

    name: str
    channels: tuple[int, int, int, int]
    crop: int
    batch: int
    hidden: int = HIDDEN
    num_classes: int = NUM_CLASSES
    pool_scales: tuple[int, ...] = POOL_SCALES

    @property
    def label(self) -> str:
        return f"{self.name} b{self.batch} {self.crop}px"

    def size(self, level: int) -> int:
        """Side of feature map ``level`` (0..3, strides 4..32)."""
        return max(1, self.crop // STRIDES[level])

    def feature_shape(self, level: int) -> tuple[int, int, int, int]:
        s = self.size(level)
        return (self.batch, self.channels[level], s, s)


def workload(backbone: str, crop: int, batch: int) -> Workload:
    # Backbones with the same channel list give the same head shapes: name them together.
    channels = BACKBONE_CHANNELS[backbone]
    same = [name for name, ch in BACKBONE_CHANNELS.items() if ch == channels]
    return Workload("/".join(same), channels, crop, batch)


# A tiny workload for the tests and the CPU smoke run: same structure, toy sizes.
TINY = Workload("tiny", (8, 16, 32, 64), crop=64, batch=2, hidden=16, num_classes=5)
# Smaller still for the GPU session's dry run, where every Triton call runs in the interpreter at Python speed.
DRY_RUN = Workload("dry run", (8, 16, 32, 64), crop=32, batch=2, hidden=16, num_classes=5)


@dataclass(frozen=True)
class OpCase:
    """One op at one shape. ``params`` are the op's shape arguments; ``primary`` marks the headline workload."""

    op: str
    name: str  # which instance in the head, e.g. "fpn_concat", "topdown 1/8->1/4", "fpn_bottleneck"
    workload: Workload
    params: dict = field(hash=False, compare=False)
    modes: tuple[str, ...] = ("forward", "backward", "forward+backward")
    primary: bool = True

    @property
    def shape(self) -> str:
        return f"{self.workload.label} | {self.name}: {describe_params(self.op, self.params)}"


def describe_params(op: str, p: dict) -> str:
    from benchmarks.bytes_model import op_module  # the per-op modules import nothing from here

    return op_module(op).describe(p)


def conv_blocks(w: Workload) -> list[dict]:
    """The head's conv-BN-ReLU blocks (one of each kind; the three lateral/fpn instances differ only in size)."""
    s0, s3 = w.size(0), w.size(3)
    ppm = max(w.pool_scales)
    blocks = [
        ("lateral_convs.0", w.channels[0], 1, s0),
        ("fpn_convs.0", w.hidden, 3, s0),
        ("fpn_bottleneck", 4 * w.hidden, 3, s0),
        ("bottleneck", w.channels[3] + len(w.pool_scales) * w.hidden, 3, s3),
        (f"psp_modules (scale {ppm})", w.channels[3], 1, ppm),
    ]
    return [
        dict(block=n, in_channels=cin, out_channels=w.hidden, kernel=k, padding=k // 2, batch=w.batch, height=s, width=s)
        for n, cin, k, s in blocks
    ]


def conv_flops(p: dict) -> int:
    """Forward FLOPs of the convolution (2 per multiply-add); BN and ReLU are not counted."""
    return 2 * p["batch"] * p["height"] * p["width"] * p["in_channels"] * p["out_channels"] * p["kernel"] ** 2


def head_op_cases(w: Workload, *, primary: bool, all_instances: bool, conv: str,
                  bn_relu_inference: bool = False) -> list[OpCase]:
    """Op cases of one workload. ``all_instances``: every top-down step and both concats, else the largest.
    ``conv``: "all" blocks, "none", or "cheap" (blocks under 5 GFLOP, for a CPU run). ``bn_relu_inference``: the
    BN+ReLU cases in eval too (the CPU runs: the C++ eval kernel; Triton covers training only)."""
    b, hid = w.batch, w.hidden
    cases = [OpCase("adaptive_avg_pool_multi", "ppm pools", w, dict(x=w.feature_shape(3), scales=w.pool_scales), primary=primary)]
    steps = [(1, 0)] + ([(2, 1), (3, 2)] if all_instances else [])
    for lo, hi in steps:
        sl, sh = w.size(lo), w.size(hi)
        cases.append(OpCase("upsample_add", f"topdown 1/{STRIDES[lo]}->1/{STRIDES[hi]}", w,
                            dict(low=(b, hid, sl, sl), lateral=(b, hid, sh, sh)), primary=primary))
    s0, s3 = w.size(0), w.size(3)
    cases.append(OpCase("upsample_concat", "fpn_concat", w,
                        dict(tensors=[(b, hid, w.size(i), w.size(i)) for i in range(4)], size=(s0, s0)), primary=primary))
    if all_instances:
        ppm_maps = [w.feature_shape(3)] + [(b, hid, s, s) for s in w.pool_scales]
        cases.append(OpCase("upsample_concat", "ppm_concat", w, dict(tensors=ppm_maps, size=(s3, s3)), primary=primary))
    cases.append(OpCase("upsample_cross_entropy", "decode loss", w,
                        dict(logits=(b, w.num_classes, s0, s0), labels=(b, w.crop, w.crop)), primary=primary))
    if conv != "none":
        for p in conv_blocks(w):
            if conv == "cheap" and conv_flops(p) > 5e9:
                continue
            cases.append(OpCase("conv_bn_relu", p["block"], w, p,
                                modes=("inference", "forward", "backward", "forward+backward"), primary=primary))
        # The BN+ReLU half of each block on its own, at the block's output size, in training (issue 4's
        # bandwidth target); every size once, whatever the conv costs.
        for p in conv_blocks(w):
            y = (p["batch"], p["out_channels"], p["height"], p["width"])
            modes = (("inference",) if bn_relu_inference else ()) + ("forward", "backward", "forward+backward")
            cases.append(OpCase("bn_relu", p["block"], w, dict(y=y, block=p["block"]), modes=modes, primary=primary))
    return cases


@dataclass(frozen=True)
class OpsPlan:
    """What the ops suite runs: cases, each with its dtypes and layouts."""

    entries: list  # (OpCase, dtype name, layout, modes)


def ops_plan(shape_set: str, device: str) -> OpsPlan:
    entries = []

    def add(cases, dtypes, layouts, modes=None):
        for c in cases:
            for dt in dtypes:
                for lay in layouts:
                    entries.append((c, dt, lay, tuple(m for m in c.modes if modes is None or m in modes)))

    if shape_set == "tiny":
        add(head_op_cases(TINY, primary=True, all_instances=True, conv="all", bn_relu_inference=True), ["fp32"],
            ["nchw", "channels_last"])
    elif shape_set == "headline":
        # The GPU session's list (3 minutes with e2e, torch.compile included): the headline workload, bf16
        # channels_last (what a converted model runs), forward and backward, one case per op: the largest
        # instance of each resize op, and the conv block and BN+ReLU of fpn_convs.0 (3x3 512->512 at 1/4
        # resolution: issue 4's target); the conv block also in inference (BN folded).
        w = DRY_RUN if gpu_dry_run() else workload("convnext_t", 512, 16)
        cases = [c for c in head_op_cases(w, primary=True, all_instances=False, conv="all")
                 if c.op not in ("conv_bn_relu", "bn_relu") or c.name == HEADLINE_BLOCK]
        add(cases, ["bf16"], ["channels_last"], modes=("inference", "forward", "backward"))
    elif device == "cuda":
        real = workload("convnext_t", 512, 16)  # the headline workload of issues 3-5
        if shape_set == "quick":
            add(head_op_cases(real, primary=True, all_instances=False, conv="none"), ["bf16"], ["channels_last"],
                modes=("forward", "backward"))
            fpn = [c for c in head_op_cases(real, primary=True, all_instances=False, conv="all") if c.name == "fpn_convs.0"]
            add(fpn, ["bf16"], ["channels_last"], modes=("inference", "forward+backward"))
        else:
            # Headline workload, both layouts first (channels_last first: what a converted model runs).
            add(head_op_cases(real, primary=True, all_instances=True, conv="all"), ["bf16"], ["channels_last", "nchw"])
            # Sweep of sizes: other backbones, crops and batches; forward and backward only, channels_last.
            sweep = [workload("convnext_b", 512, 16), workload("resnet50", 512, 16), workload("convnext_t", 640, 16),
                     workload("convnext_t", 512, 1), workload("convnext_t", 512, 32)]
            for w in sweep:
                add(head_op_cases(w, primary=False, all_instances=False, conv="none"), ["bf16"], ["channels_last"],
                    modes=("forward", "backward"))
    else:  # CPU (2-core machines): fp32, ConvNeXt-T channels at batch 1; --quick at a 128 crop, a smoke run
        w = workload("convnext_t", 128 if shape_set == "quick" else 512, 1)
        add(head_op_cases(w, primary=True, all_instances=shape_set == "full", conv="cheap", bn_relu_inference=True),
            ["fp32"], ["nchw"])
    return OpsPlan(entries)


# End-to-end configurations (transformers configs; random weights).
E2E_MODELS = {
    "convnext_t": dict(kind="convnext", hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
    "swin_t": dict(kind="swin", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
}
E2E_TINY_MODELS = {
    "convnext_t": dict(kind="convnext", hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1]),
    "swin_t": dict(kind="swin", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4),
}


@dataclass(frozen=True)
class E2EPlan:
    models: dict  # name -> backbone config kwargs
    crop: int
    batch: int
    hidden: int
    num_classes: int
    aux_channels: int
    backbones: tuple[str, ...]  # which models get a whole-model benchmark (the head is always benchmarked)
    amp_channels_last: bool = False  # AMP bf16 with channels_last weights and inputs (else fp32, NCHW)
    head: bool = True  # also benchmark the decode head alone
    modes: tuple[str, ...] = ("inference", "train_step")


def e2e_plans(shape_set: str, device: str) -> list[E2EPlan]:
    """The e2e suite's plans: one, except for cpu-inference (batch 1 and 2)."""
    if shape_set == "cpu-inference":
        if device != "cpu":
            raise ValueError("the cpu-inference shape set is for --device cpu")
        # The whole model only, eval: the converted model against transformers' and Inductor's (2 threads).
        return [E2EPlan(E2E_MODELS, crop=512, batch=b, hidden=HIDDEN, num_classes=NUM_CLASSES, aux_channels=256,
                        backbones=("convnext_t",), head=False, modes=("inference",)) for b in (1, 2)]
    return [e2e_plan(shape_set, device)]


def e2e_plan(shape_set: str, device: str) -> E2EPlan:
    if shape_set == "headline":  # the GPU session: ConvNeXt-T at batch 16, 512x512, AMP bf16 (toy in a dry run)
        if gpu_dry_run():
            return E2EPlan(E2E_TINY_MODELS, crop=DRY_RUN.crop, batch=DRY_RUN.batch, hidden=DRY_RUN.hidden,
                           num_classes=DRY_RUN.num_classes, aux_channels=8, backbones=("convnext_t",),
                           amp_channels_last=False)
        return E2EPlan(E2E_MODELS, crop=512, batch=16, hidden=HIDDEN, num_classes=NUM_CLASSES, aux_channels=256,
                       backbones=("convnext_t",), amp_channels_last=True)
    if device == "cuda" and shape_set != "tiny":
        backbones = ("convnext_t",) if shape_set == "quick" else ("convnext_t", "swin_t")
        return E2EPlan(E2E_MODELS, crop=512, batch=16, hidden=HIDDEN, num_classes=NUM_CLASSES, aux_channels=256,
                       backbones=backbones, amp_channels_last=True)
    # CPU (any set) and the tiny set: toy configs, so that --quick finishes in about a minute on 2 cores.
    crop = 64 if shape_set in ("tiny", "quick") else 128
    return E2EPlan(E2E_TINY_MODELS, crop=crop, batch=2, hidden=16, num_classes=5, aux_channels=8,
                   backbones=("convnext_t",) if shape_set == "tiny" else ("convnext_t", "swin_t"))
