"""End to end: the UperNet head and the whole model, inference and a full training step, reference vs converted.

Models are transformers' ``UperNetForSemanticSegmentation`` with ConvNeXt-T and Swin-T backbones and random
weights (nothing is downloaded). "converted" is ``upernet_fast.convert`` applied to a deep copy of the
reference, so both start from identical weights. On CUDA everything runs under AMP bf16 with channels_last
activations and weights; on CPU in fp32 with toy configs.

Providers: ``reference``, ``converted``, and each ``+compile`` (``torch.compile`` of the module, or of
head + loss for the head's training step). Modes: ``inference`` (eval, no grad, forward) and ``train_step``
(forward, loss, backward, AdamW step, grads cleared).

On the CPU at real sizes, a target's uncompiled providers are built together and timed in CPU_ROUNDS interleaved
rounds (``_interleaves``); elsewhere, and for the compiled providers, one after another.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks import measure
from benchmarks.results import FAILED_PREFIX, SKIPPED_PREFIX, make_row
from benchmarks.shapes import STRIDES, E2EPlan, e2e_plans, gpu_dry_run, toy_sizes
from upernet_fast.measure import peak_memory_mb, rotated, saved_activation_mb

OUT_FEATURES = ["stage1", "stage2", "stage3", "stage4"]
IGNORE_INDEX = 255
BASE_PROVIDERS = ("reference", "converted")


def build_model(plan: E2EPlan, backbone: str):
    from transformers import ConvNextConfig, SwinConfig, UperNetConfig, UperNetForSemanticSegmentation

    spec = dict(plan.models[backbone])
    kind = spec.pop("kind")
    if kind == "convnext":
        # transformers 5.23 needs hidden_sizes and depths as lists when out_features is given.
        bb = ConvNextConfig(hidden_sizes=list(spec["hidden_sizes"]), depths=list(spec["depths"]),
                            out_features=OUT_FEATURES)
    else:
        bb = SwinConfig(embed_dim=spec["embed_dim"], depths=list(spec["depths"]), num_heads=list(spec["num_heads"]),
                        window_size=spec["window_size"], image_size=plan.crop, out_features=OUT_FEATURES)
    cfg = UperNetConfig(backbone_config=bb, hidden_size=plan.hidden, num_labels=plan.num_classes,
                        auxiliary_channels=plan.aux_channels)
    torch.manual_seed(0)
    return UperNetForSemanticSegmentation(cfg)


@dataclass
class Options:
    device: str
    shape_set: str
    cpu_compile: bool = False
    deadline: float = float("inf")
    log: Callable[[str], None] = print
    emit: Callable[[list[dict]], None] | None = None  # gets each row as soon as it exists (run.py saves them)


class ConvertUnavailable(Exception):
    """This checkout has no ``upernet_fast.convert``: the converted providers are skipped, with this reason."""


def _convert(model):
    import upernet_fast

    convert = getattr(upernet_fast, "convert", None)
    if convert is None:
        raise ConvertUnavailable("upernet_fast.convert is not available in this checkout")
    return convert(copy.deepcopy(model))


def _labels(plan: E2EPlan, device: str) -> torch.Tensor:
    shape = (plan.batch, plan.crop, plan.crop)
    labels = torch.randint(0, plan.num_classes, shape, device=device)
    labels[torch.rand(shape, device=device) < 0.05] = IGNORE_INDEX
    return labels


def _reference_head_loss(logits, labels):
    full = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(full.float(), labels, ignore_index=IGNORE_INDEX)


def _converted_head_loss(logits, labels):
    from upernet_fast.ops import upsample_cross_entropy

    return upsample_cross_entropy(logits, labels, IGNORE_INDEX, "mean")


class Target:
    """A head or a whole model, with its inputs, under one provider."""

    def __init__(self, kind: str, module, channels, plan: E2EPlan, device: str, converted: bool, compiled: bool):
        self.compiled, self.converted = compiled, converted
        self.kind, self.module, self.plan, self.device = kind, module, plan, device
        self.channels_last = plan.amp_channels_last
        self.amp = torch.bfloat16 if plan.amp_channels_last else None
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.labels = _labels(plan, device)
        if kind == "head":
            sizes = [max(1, plan.crop // s) for s in STRIDES]
            self.inputs = [torch.randn(plan.batch, c, s, s, device=device).contiguous(memory_format=fmt)
                           .requires_grad_() for c, s in zip(channels, sizes)]
            loss_fn = _converted_head_loss if converted else _reference_head_loss
            head = module

            def head_loss(feats, labels):
                return loss_fn(head(feats), labels)

            self._loss = torch.compile(head_loss, backend=measure.compile_backend()) if compiled else head_loss
            self._infer = torch.compile(head, backend=measure.compile_backend()) if compiled else head
        else:
            self.inputs = [torch.randn(plan.batch, 3, plan.crop, plan.crop, device=device).contiguous(memory_format=fmt)]
            runner = torch.compile(module, backend=measure.compile_backend()) if compiled else module
            self._loss = lambda x, labels: runner(pixel_values=x, labels=labels).loss
            self._infer = lambda x: runner(pixel_values=x).logits
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def _autocast(self):
        return torch.autocast(self.device, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()

    def inference(self):
        with torch.no_grad(), self._autocast():
            if self.kind == "head":
                return self._infer(self.inputs)
            return self._infer(self.inputs[0])

    def forward_loss(self):
        """The training forward alone (what autograd saves for backward is measured on it)."""
        with self._autocast():
            return self._loss(self.inputs if self.kind == "head" else self.inputs[0], self.labels)

    def train_step(self):
        with self._autocast():
            loss = self._loss(self.inputs if self.kind == "head" else self.inputs[0], self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def clear_input_grads(self):
        for t in self.inputs:
            t.grad = None


def _skip_compile_reason(opts: Options) -> str | None:
    if opts.device == "cpu" and not opts.cpu_compile and not gpu_dry_run() and opts.shape_set != "cpu-inference":
        return ("torch.compile not run on CPU by default: Inductor's C++ build takes minutes for a whole model on a "
                "2-core machine (--cpu-compile includes it)")
    if opts.shape_set == "quick":
        return "--quick: torch.compile not run (compiling alone exceeds the one-minute budget)"
    return None


# CPU rounds of the uncompiled providers (see _interleaves).
CPU_ROUNDS = 3


def _interleaves(opts: Options, compiled: bool) -> bool:
    """Whether a target's uncompiled providers are timed in interleaved rounds: on the CPU (a shared VM whose speed
    moves by phases of seconds to minutes: one model timed after the other, a slow phase falls on one side only), at
    real sizes. Compiled providers keep their own pass (each compiles from a fresh cache)."""
    return opts.device == "cpu" and not toy_sizes(opts.shape_set) and not compiled


def _call(target: Target, mode: str):
    return target.inference if mode == "inference" else target.train_step


def _first_call(target: Target, mode: str, opts: Options) -> float:
    """The first call (compiles under torch.compile, allocates optimizer state in training), in seconds."""
    target.module.train(mode != "inference")
    t0 = time.perf_counter()
    _call(target, mode)()
    measure.sync(opts.device)
    return time.perf_counter() - t0


def _time(target: Target, mode: str, opts: Options, rounds: int = 1) -> measure.Timing:
    """One timing of the call; with rounds > 1 (CPU), one round's share of the budget, no warm-up (the first call,
    and the earlier rounds, warmed it)."""
    fn, setup = _call(target, mode), target.clear_input_grads
    target.module.train(mode != "inference")
    quick = opts.shape_set != "full"
    if opts.device == "cuda":
        return measure.time_cuda_events(fn, setup=setup, warmup=1 if quick else 2, repeats=5 if quick else 10)
    toy = toy_sizes(opts.shape_set)
    budget_s = 0.0 if toy else {"quick": 0.2}.get(opts.shape_set, 1.0)
    if rounds > 1:
        return measure.time_cpu(fn, setup=setup, warmup=0, min_repeats=2, max_repeats=max(2, 20 // rounds),
                                budget_s=budget_s / rounds)
    return measure.time_cpu(fn, setup=setup, warmup=0 if toy else 1,
                            min_repeats=(1 if gpu_dry_run() else 3) if toy else 5, max_repeats=20, budget_s=budget_s)


def _memory(target: Target, mode: str, opts: Options):
    """Peak memory of one call (and the base it starts from), and in training what autograd saves for backward."""
    fn = _call(target, mode)
    target.module.train(mode != "inference")
    peak, base_mb = peak_memory_mb(fn, opts.device, setup=target.clear_input_grads, cpu=False)
    saved_mb = None
    if mode == "train_step" and not target.compiled:  # hooks do not see inside a compiled graph
        saved_mb = saved_activation_mb(target.forward_loss)
    return peak, base_mb, saved_mb


def run_e2e(opts: Options, stamp: dict) -> list[dict]:
    rows = []
    for plan in e2e_plans(opts.shape_set, opts.device):
        rows += _run_plan(plan, opts, stamp)
    return rows


def _run_plan(plan: E2EPlan, opts: Options, stamp: dict) -> list[dict]:
    dtype = "bf16-amp" if plan.amp_channels_last else "fp32"
    layout = "channels_last" if plan.amp_channels_last else "nchw"
    emit = opts.emit or (lambda rows: None)
    targets = [("head", plan.backbones[0])] * plan.head + [("model", b) for b in plan.backbones]
    compile_reason = _skip_compile_reason(opts)
    rows = []

    def add(row):
        rows.append(row)
        emit([row])

    def row_of(provider, compiled, kind, backbone, mode, **fields):
        label = provider + ("+compile" if compiled else "")
        shape = (f"b{plan.batch} 3x{plan.crop}x{plan.crop}" if kind == "model" else
                 f"b{plan.batch} features of {plan.crop}px, hidden {plan.hidden}, {plan.num_classes} classes")
        return make_row(stamp, suite="e2e", op=f"{kind} {backbone}", provider=label, shape=shape, dtype=dtype,
                        layout=layout, mode=mode, **fields)

    # Uncompiled providers of every target first, then the compiled ones: the budget guard drops the costliest.
    for compiled in (False, True):
        for kind, backbone in targets:
            for mode in plan.modes:
                for row in _run_group(plan, opts, kind, backbone, mode, compiled, compile_reason, row_of):
                    add(row)
    return rows


def _run_group(plan: E2EPlan, opts: Options, kind: str, backbone: str, mode: str, compiled: bool,
               compile_reason: str | None, row_of) -> list[dict]:
    """Every provider of one target and mode: built, called once, timed (in interleaved rounds where _interleaves
    says so, the order rotated each round and each provider's samples pooled; else one provider after another,
    each freed before the next is built), and its memory measured. Rows in BASE_PROVIDERS' order."""
    rows: dict[str, dict] = {}
    interleaved = _interleaves(opts, compiled)
    rounds = CPU_ROUNDS if interleaved else 1
    live: dict[str, tuple[Target, float]] = {}

    def fail(provider, exc):
        note = (SKIPPED_PREFIX + str(exc) if isinstance(exc, ConvertUnavailable) else
                FAILED_PREFIX + f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300])
        rows[provider] = row_of(provider, compiled, kind, backbone, mode, note=note)

    def build(provider):
        model = build_model(plan, backbone).to(opts.device)
        if provider == "converted":
            model = _convert(model)
        module = model.decode_head if kind == "head" else model
        if compiled:
            measure.fresh_compile_cache()
        target = Target(kind, module, model.backbone.channels, plan, opts.device,
                        converted=provider == "converted", compiled=compiled)
        return target, _first_call(target, mode, opts)

    def finish(provider, target, first_s, timing):
        peak, base_mb, saved_mb = _memory(target, mode, opts)
        note = [f"images/s {plan.batch / (timing.p50 * 1e-3):.1f}", f"first call {first_s:.1f}s"]
        if base_mb is not None:
            note.append(f"base {base_mb:.0f} MB")
        if saved_mb is not None:
            note.append(f"saved for backward {saved_mb:.1f} MB")
        note.append(timing.method + (f" n={timing.samples}" if timing.samples else ""))
        rows[provider] = row_of(provider, compiled, kind, backbone, mode, p20_ms=timing.p20, p50_ms=timing.p50,
                                p80_ms=timing.p80, peak_mb=peak, note="; ".join(note))

    def release():
        if opts.device == "cuda":
            torch.cuda.empty_cache()

    for provider in BASE_PROVIDERS:
        reason = compile_reason if compiled else None
        if reason is None and time.monotonic() > opts.deadline:
            reason = "time budget used up before this case (see --budget-s)"
        if reason is not None:
            rows[provider] = row_of(provider, compiled, kind, backbone, mode, note=SKIPPED_PREFIX + reason)
            continue
        label = provider + ("+compile" if compiled else "")
        opts.log(f"[e2e] {kind} {backbone} {label} {mode}")
        try:
            target, first_s = build(provider)
            if not interleaved:  # one at a time: timed, measured and freed before the next provider is built
                finish(provider, target, first_s, _time(target, mode, opts))
                target = None
                release()
                continue
            live[provider] = (target, first_s)
        except Exception as exc:  # a build, compile or kernel failure is a result too: record it
            target = None
            release()
            fail(provider, exc)
    pooled: dict[str, list[float]] = {provider: [] for provider in live}
    order = list(live)
    for r in range(rounds):
        for provider in rotated(order, r):
            if provider not in live:
                continue
            try:
                pooled[provider] += _time(live[provider][0], mode, opts, rounds).values
            except Exception as exc:
                live.pop(provider)
                fail(provider, exc)
    for provider, (target, first_s) in list(live.items()):
        p20, p50, p80 = measure.quantiles(pooled[provider])
        timing = measure.Timing(p20, p50, p80, len(pooled[provider]),
                                f"perf_counter, providers interleaved in {rounds} rounds")
        try:
            finish(provider, target, first_s, timing)
        except Exception as exc:
            fail(provider, exc)
        live.pop(provider)
    return [rows[p] for p in BASE_PROVIDERS if p in rows]
