"""Command-line parsers of ``upernet-fast train | eval | predict``; cli.py adds them and calls ``args.run``.

Only argparse is imported here: torch and transformers load when a command runs, not when ``upernet-fast``
parses its arguments.
"""

from __future__ import annotations

import argparse

from upernet_fast.backend import AUTO
from upernet_fast.backend import BACKENDS as ALL_BACKENDS

BACKENDS = (AUTO, *ALL_BACKENDS)  # upernet_fast.backend's names, "auto" first
AMP = ("none", "bf16", "fp16")


def _scale_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two numbers), got {text!r}") from None
    return lo, hi


def _run_train(args) -> int:
    from upernet_fast.train.loop import TrainConfig, train

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    train(TrainConfig(**fields))
    return 0


def _run_eval(args) -> int:
    from upernet_fast.train.evaluate import run_eval

    return run_eval(args)


def _run_predict(args) -> int:
    from upernet_fast.train.evaluate import run_predict

    return run_predict(args)


def _inference_options(parser: argparse.ArgumentParser, window_default: int | None) -> None:
    parser.add_argument("--model", required=True, help="OUT/final, OUT/checkpoint-STEP or a transformers "
                        "save_pretrained folder of an UperNetForSemanticSegmentation")
    parser.add_argument("--window", type=int, default=window_default,
                        help=f"sliding-window side for images larger than it (default {window_default or '--crop'})")
    parser.add_argument("--stride", type=int, default=None, help="window stride (default: 2/3 of --window)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--amp", choices=AMP, default="none")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_subcommands(sub) -> None:
    """Add ``train``, ``eval`` and ``predict`` to an argparse subparsers object."""
    from upernet_fast.train.backbones import backbone_names

    t = sub.add_parser("train", help="train UperNet (synthetic, ADE20K or image/mask folders); torchrun for DDP",
                       description="Train a converted UperNet. Under `torchrun --nproc_per_node N` the same "
                       "command runs DistributedDataParallel (NCCL on GPUs, gloo on CPUs).")
    t.add_argument("--out", required=True, help="output folder: checkpoint-STEP/, final/, metrics.jsonl")
    t.add_argument("--backbone", choices=backbone_names(), default="convnext-tiny")
    t.add_argument("--pretrained", default=None, help="start from a local save_pretrained folder")
    t.add_argument("--num-labels", type=int, default=None, help="classes (default: 6 synthetic, 150 ADE20K)")
    t.add_argument("--backend", choices=BACKENDS + ("transformers",), default="auto",
                   help="upernet_fast backend (eager: PyTorch ops); transformers: do not convert (for comparisons)")
    t.add_argument("--data", default="synthetic", help="synthetic | ade20k:DIR | folder:IMAGES_DIR,MASKS_DIR")
    t.add_argument("--crop", type=int, default=None, help="training crop side (default: 64 synthetic, 512 otherwise)")
    t.add_argument("--scale-range", type=_scale_range, default=(0.5, 2.0), help="random rescale MIN,MAX (0.5,2.0)")
    t.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    t.add_argument("--batch-size", type=int, default=8, help="images per process per micro-batch (default 8)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: 1e-3 synthetic, 1e-4 otherwise)")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--schedule", choices=("poly", "cosine"), default="poly")
    t.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default: steps/10, at most 100)")
    t.add_argument("--amp", choices=AMP, default="none", help="autocast dtype; fp16 uses loss scaling")
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (0: main process)")
    t.add_argument("--eval-every", type=int, default=0, help="validate every N steps (0: at the end only)")
    t.add_argument("--eval-images", type=int, default=None, help="validate on the first N images only")
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    t.add_argument("--log-every", type=int, default=10, help="metrics.jsonl / log line every N steps")
    t.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest complete checkpoint in --out, or from the one named")
    t.set_defaults(run=_run_train)

    e = sub.add_parser("eval", help="mIoU, pixel accuracy and per-class IoU on a validation split")
    _inference_options(e, window_default=None)
    e.add_argument("--data", default="synthetic", help="synthetic | ade20k:DIR | folder:IMAGES_DIR,MASKS_DIR")
    e.add_argument("--crop", type=int, default=None, help="the training crop: default window, and the synthetic "
                   "images' side (default: 64 synthetic, 512 otherwise)")
    e.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    e.add_argument("--json", default=None, help="where to write the scores (default MODEL/eval.json)")
    e.set_defaults(run=_run_eval)

    p = sub.add_parser("predict", help="class-index PNGs and colour overlays for image files or folders")
    _inference_options(p, window_default=512)
    p.add_argument("inputs", nargs="+", help="image files or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=_run_predict)
