"""The trainer: one process, or DistributedDataParallel under ``torchrun`` (NCCL on GPUs, gloo on CPUs).

Exact resume rests on three things: every random choice of the data pipeline is a function of
``(seed, epoch, index)`` (see data.py), the sampler restarts from the number of samples consumed, and the
checkpoint carries everything else that changes from step to step (weights and BN statistics, optimizer,
scheduler, GradScaler, each process's RNG states). A run resumed from step K is then the same computation as
one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from upernet_fast.backend import AUTO
from upernet_fast.backend import BACKENDS as ALL_BACKENDS
from upernet_fast.measure import peak_memory_so_far_mb
from upernet_fast.train import checkpoint as ckpt
from upernet_fast.train.backbones import build_model
from upernet_fast.train.distributed import DataParallel, init_distributed
from upernet_fast.train.data import (Augment, ResumableDistributedSampler, TrainDataset, data_kind, default_num_labels,
                                     open_source, train_loader)
from upernet_fast.train.evaluate import autocast_for, evaluate
from upernet_fast.train.errors import UsageError

AMP_MODES = ("none", "bf16", "fp16")
SCHEDULES = ("poly", "cosine")
UNCONVERTED = "transformers"  # --backend transformers: transformers' own model, not converted (for comparisons)
BACKENDS = (AUTO, *ALL_BACKENDS, UNCONVERTED)
SYNTHETIC_CROP, DEFAULT_CROP = 64, 512
SYNTHETIC_LR, DEFAULT_LR = 1e-3, 1e-4
# Arguments that decide which samples each step sees: a resumed run must use the same ones.
DATA_ORDER_KEYS = ("data", "seed", "batch_size", "grad_accum", "crop", "scale_range", "world_size")


@dataclass
class TrainConfig:
    out: str
    backbone: str = "convnext-tiny"
    pretrained: str | None = None
    num_labels: int | None = None  # None: 6 for synthetic, 150 for ADE20K; a folder needs it
    backend: str = "auto"
    data: str = "synthetic"
    crop: int | None = None  # None: 64 for synthetic, 512 otherwise
    scale_range: tuple[float, float] = (0.5, 2.0)
    steps: int = 300
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-3 for synthetic (training from scratch), 1e-4 otherwise
    weight_decay: float = 0.01
    schedule: str = "poly"
    warmup: int | None = None  # None: a tenth of the steps, at most 100
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
    workers: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_images: int | None = None  # None: the whole validation split
    save_every: int = 0  # 0: only at the end
    log_every: int = 10
    resume: str | None = None  # "auto" (newest verified in out) or a checkpoint folder

    def resolved(self) -> "TrainConfig":
        """Fill the data-dependent defaults and check every value; errors name the command-line option."""
        synthetic = data_kind(self.data) == "synthetic"
        if self.num_labels is None:
            self.num_labels = default_num_labels(self.data)
            if self.num_labels is None:
                raise UsageError("--num-labels is required with --data folder:... (the number of classes in the masks)")
        self.crop = self.crop or (SYNTHETIC_CROP if synthetic else DEFAULT_CROP)
        self.lr = self.lr or (SYNTHETIC_LR if synthetic else DEFAULT_LR)
        self.warmup = min(100, self.steps // 10) if self.warmup is None else self.warmup
        for name in ("steps", "batch_size", "grad_accum", "crop"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("workers", "eval_every", "save_every", "warmup"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise UsageError(f"--log-every must be >= 1, got {self.log_every}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise UsageError(f"--scale-range must be MIN,MAX with 0 < MIN <= MAX, got {lo},{hi}")
        if self.amp not in AMP_MODES:
            raise UsageError(f"--amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        return self


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps: linear warmup, then poly (power 0.9,
    mmsegmentation's) or cosine decay to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # every rank builds the same initial weights (DDP also broadcasts rank 0's)
    np.random.seed(seed)
    random.seed(seed)


def _set_deterministic(on: bool) -> None:
    if on:
        # cuBLAS needs a fixed workspace for reproducible matmuls; it must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on norms' scales and biases (1-D parameters), as in the ConvNeXt / Swin recipes.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class _Reporter:
    """Progress bar (tqdm) when stderr is a terminal, a plain line per ``log_every`` steps otherwise; metrics
    appended to ``OUT/metrics.jsonl``. Only rank 0 reports."""

    def __init__(self, cfg: TrainConfig, start: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.enabled, self.cfg = enabled, cfg
        self.bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (enabled and sys.stderr.isatty()))
        self.metrics = Path(cfg.out) / "metrics.jsonl"

    def record(self, entry: dict) -> None:
        if self.enabled:
            with self.metrics.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    def say(self, text: str) -> None:
        if self.enabled:
            if self.bar.disable:
                print(text, flush=True)
            else:
                self.bar.write(text)

    def step(self, step: int, loss: float, lr: float, images_per_s: float, device: torch.device) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.1f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.record({"step": step, "split": "train", "loss": loss, "lr": lr, "images_per_s": images_per_s,
                         "peak_memory_mb": peak_memory_so_far_mb(device), "time": time.time()})
            if self.bar.disable:
                eta = (self.cfg.steps - step) * self.cfg.batch_size * self.cfg.grad_accum / max(images_per_s, 1e-9)
                self.say(f"step {step}/{self.cfg.steps} loss {loss:.4f} lr {lr:.2e} {images_per_s:.1f} img/s "
                         f"eta {eta:.0f}s")

    def close(self) -> None:
        self.bar.close()


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a training; returns a summary (last loss, last validation scores, output folders)."""
    cfg.resolved()
    dist_info = init_distributed()
    device = torch.device(f"cuda:{dist_info.local_rank}" if torch.cuda.is_available() else "cpu")
    _set_deterministic(cfg.deterministic)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed)

    import upernet_fast

    model = build_model(cfg.backbone, cfg.num_labels, cfg.pretrained)
    if cfg.backend != UNCONVERTED:
        # Data-parallel: the heads' BatchNorms become SyncBatchNorm (through upernet_fast's fused BN, CPU too).
        # The training loop only uses the loss, so the model need not return full-resolution logits: that saves
        # the (B, classes, H, W) tensor and keeps PyTorch's bilinear backward (not deterministic on CUDA) out of
        # the step. Evaluation (eval mode) still returns full-resolution logits.
        upernet_fast.convert(model, backend=cfg.backend, sync_bn=dist_info.world_size > 1,
                             full_resolution_logits=False)
    elif dist_info.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
    if dist_info.world_size > 1 and _has_batchnorm(model.backbone):
        if device.type == "cuda":
            model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)
        elif dist_info.main:
            print("note: the backbone's BatchNorm layers keep per-process statistics (torch's SyncBatchNorm runs "
                  "on GPUs only)", file=sys.stderr)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.steps, cfg.warmup, cfg.schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    data_order = {k: getattr(cfg, k) for k in DATA_ORDER_KEYS if k != "world_size"}
    data_order["scale_range"] = list(cfg.scale_range)
    data_order["world_size"] = dist_info.world_size
    start = 0
    if dist_info.main:
        for folder in ckpt.remove_partial_saves(out_dir):
            print(f"removed {folder}: a save that never completed", file=sys.stderr)
    resume_from = ckpt.resolve_resume(cfg.resume, out_dir, warn=lambda m: print(m, file=sys.stderr)) if cfg.resume else None
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, model, dist_info.rank)
        for key, value in data_order.items():
            if state["data_order"][key] != value:
                raise ckpt.CheckpointError(
                    f"--{key.replace('_', '-')} is {value!r} but {resume_from} was trained with "
                    f"{state['data_order'][key]!r}: an exact resume needs the same data order")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start = state["step"]
        if dist_info.main:
            print(f"resuming from {resume_from} at step {start}", file=sys.stderr)
    elif cfg.resume == "auto" and dist_info.main:
        print(f"--resume: no complete checkpoint in {out_dir} yet; starting at step 0", file=sys.stderr)

    net = model
    if dist_info.world_size > 1:
        net = DataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # Static shapes: a second input shape (a smaller last batch) would otherwise recompile with symbolic
        # sizes, and torch 2.13's Inductor then fails on ConvNeXt's channels_last views in the backward
        # ("cannot determine truth value of Relational"; transformers' own model fails the same way).
        net = torch.compile(net, dynamic=False)

    train_source = open_source(cfg.data, "train", cfg.num_labels, size=cfg.crop, seed=cfg.seed)
    val_source = open_source(cfg.data, "val", cfg.num_labels, size=cfg.crop, seed=cfg.seed)
    per_rank_step = cfg.batch_size * cfg.grad_accum
    sampler = ResumableDistributedSampler(len(train_source), dist_info.world_size, dist_info.rank, cfg.seed,
                                          start=start * per_rank_step)
    dataset = TrainDataset(train_source, Augment(cfg.crop, tuple(cfg.scale_range)), cfg.seed)
    batches = iter(train_loader(dataset, cfg.batch_size, sampler, cfg.workers, cfg.seed, device.type == "cuda"))

    reporter = _Reporter(cfg, start, dist_info.main)
    reporter.record({"event": "start", "step": start, "config": asdict(cfg), "world_size": dist_info.world_size})
    summary = {"out": str(out_dir), "start_step": start, "loss": None, "val": None}
    images_per_step = per_rank_step * dist_info.world_size
    model.train()
    try:
        for step in range(start + 1, cfg.steps + 1):
            tic = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                pixels, labels = next(batches)
                pixels = pixels.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if cfg.channels_last:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                # Gradients are all-reduced once per optimizer step, on the last micro-batch.
                sync = micro == cfg.grad_accum - 1 or not isinstance(net, nn.parallel.DistributedDataParallel)
                with (contextlib.nullcontext() if sync else net.no_sync()), autocast_for(device, cfg.amp):
                    loss = net(pixel_values=pixels, labels=labels).loss / cfg.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if dist_info.world_size > 1:  # the logged loss is the mean over processes (no effect on training)
                dist.all_reduce(loss_sum)
                loss_sum /= dist_info.world_size
            loss_value = loss_sum.item()  # also waits for the GPU, so the step time below is real
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at step {step}: lower --lr or use --amp bf16")
            images_per_s = images_per_step / (time.perf_counter() - tic)
            reporter.step(step, loss_value, scheduler.get_last_lr()[0], images_per_s, device)
            summary["loss"] = loss_value
            last = step == cfg.steps
            if (cfg.eval_every and step % cfg.eval_every == 0) or last:
                scores = evaluate(model, val_source, cfg.crop, max(1, cfg.crop * 2 // 3), device, cfg.amp,
                                  dist_info.rank, dist_info.world_size, limit=cfg.eval_images)
                reporter.record({"step": step, "split": "val", **scores, "time": time.time()})
                reporter.say(f"step {step}: val mIoU {scores['mIoU'] * 100:.2f} pixel accuracy "
                             f"{scores['pixel_accuracy'] * 100:.2f} ({scores['images']} images)")
                summary["val"] = scores
            if (cfg.save_every and step % cfg.save_every == 0) or last:
                state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "scaler": scaler.state_dict(), "data_order": data_order}
                folder = ckpt.save_checkpoint(out_dir, step, model, state, dist_info.rank)
                reporter.say(f"saved {folder}")
        summary["final"] = str(ckpt.save_final(out_dir, model, dist_info.rank))
    finally:
        reporter.close()
    return summary
