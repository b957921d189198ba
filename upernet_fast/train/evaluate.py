"""Sliding-window inference, evaluation (mIoU on a validation split) and prediction to PNG files.

Both ``eval`` and ``predict`` take a model folder: ours (``OUT/final``, ``OUT/checkpoint-STEP``, verified
against its manifest) or any transformers ``save_pretrained`` folder of an UperNetForSemanticSegmentation.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from upernet_fast.train.data import IMAGE_SUFFIXES, IMAGENET_MEAN, IMAGENET_STD, EvalDataset, normalize, to_tensors
from upernet_fast.train.metrics import ConfusionMatrix
from upernet_fast.train.errors import InputNotFound, UsageError


def autocast_for(device: torch.device, amp: str):
    """bf16 / fp16 autocast on the model's device, or nothing for ``amp='none'``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:  # the last window ends at the border
        starts.append(length - window)
    return starts


@torch.no_grad()
def sliding_window_logits(model, pixels: torch.Tensor, window: int, stride: int, amp: str = "none") -> torch.Tensor:
    """Class logits (B, C, H, W) in fp32: one pass when the image fits in ``window`` (padded to it), else the
    mean of the overlapping windows' logits at each pixel (windows ``stride`` apart, the last one flush with
    the border)."""
    _, _, height, width = pixels.shape
    out = None
    count = torch.zeros(1, 1, height, width, device=pixels.device)
    for top in _window_starts(height, window, stride):
        for left in _window_starts(width, window, stride):
            crop = pixels[:, :, top : top + window, left : left + window]
            h, w = crop.shape[2:]
            # A window larger than the image is padded (with 0, the mean colour after normalising, as in
            # training): backbones that downsample by 32 cannot run on images much smaller than that.
            padded = F.pad(crop, (0, window - w, 0, window - h)) if (h, w) != (window, window) else crop
            with autocast_for(pixels.device, amp):
                logits = model(pixel_values=padded).logits.float()[:, :, :h, :w]
            if out is None:
                out = torch.zeros(pixels.shape[0], logits.shape[1], height, width, device=pixels.device)
            out[:, :, top : top + h, left : left + w] += logits
            count[:, :, top : top + h, left : left + w] += 1
    return out / count


def check_window(window: int, stride: int | None) -> int:
    """The stride to use (default: two thirds of the window); bad values are errors naming the option."""
    if window < 1:
        raise UsageError(f"--window must be a positive number of pixels, got {window}")
    stride = stride if stride is not None else max(1, window * 2 // 3)
    if not 1 <= stride <= window:
        raise UsageError(f"--stride must be between 1 and --window ({window}), got {stride}")
    return stride


@torch.no_grad()
def evaluate(model, source, window: int, stride: int, device: torch.device, amp: str = "none", rank: int = 0,
             world: int = 1, limit: int | None = None, progress: bool = False) -> dict:
    """Scores of ``model`` on every image of ``source`` (this rank takes every ``world``-th image; the confusion
    matrices are summed over ranks), whole images at their own size, sliding windows where larger."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    dataset = EvalDataset(source)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    matrix = ConfusionMatrix(source.num_labels)
    for i in tqdm(range(rank, count, world), desc="eval", disable=not progress, leave=False):
        pixels, labels, _ = dataset[i]
        logits = sliding_window_logits(model, pixels[None].to(device), window, stride, amp)
        matrix.update(logits.argmax(1)[0].cpu(), labels)
    matrix.all_reduce()
    model.train(was_training)
    scores = matrix.scores()
    scores["images"] = count
    return scores


def image_statistics(folder: Path) -> tuple[tuple, tuple]:
    """Normalisation mean/std from a ``preprocessor_config.json`` when the folder has one, else ImageNet's."""
    path = Path(folder) / "preprocessor_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        if "image_mean" in config and "image_std" in config:
            return tuple(config["image_mean"]), tuple(config["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


def load_for_inference(folder: str, backend: str = "auto", device: str | None = None):
    """A converted model in eval mode on ``device`` from one of our folders or a transformers folder."""
    import upernet_fast
    from upernet_fast.train.checkpoint import MANIFEST, verify

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise InputNotFound(f"--model must be a folder with config.json (save_pretrained output or "
                                f"OUT/final, OUT/checkpoint-STEP); {path} has none")
    if (path / MANIFEST).is_file():
        verify(path)  # a checkpoint of ours: refuse it when corrupt rather than evaluate garbage
    model = upernet_fast.UperNetForSemanticSegmentation.from_pretrained(str(path))
    upernet_fast.convert(model, backend=backend)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval(), device


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files named directly, and the image files inside named folders (sorted); others are errors."""
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputNotFound(f"predict: folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputNotFound(f"predict: input {path} is neither an image file nor a folder")
    return files


def palette(num_labels: int) -> np.ndarray:
    """A fixed colour per class (hues spaced by the golden ratio, so neighbouring classes differ), uint8 (C, 3)."""
    import colorsys

    hues = (np.arange(num_labels) * 0.618033988749895) % 1.0
    return (np.array([colorsys.hsv_to_rgb(h, 0.8, 0.95) for h in hues]) * 255).astype(np.uint8)


def _save_class_map(classes: np.ndarray, path: Path) -> None:
    from PIL import Image

    if classes.max(initial=0) < 256:
        Image.fromarray(classes.astype(np.uint8), mode="L").save(path)
    else:  # more than 256 classes: 16-bit PNG
        Image.fromarray(classes.astype(np.uint16)).save(path)


@torch.no_grad()
def predict(model, device, images: list[Path], out_dir: Path, window: int, stride: int, mean=IMAGENET_MEAN,
            std=IMAGENET_STD, amp: str = "none", alpha: float = 0.5) -> list[Path]:
    """For each image: ``OUT/STEM.png`` (class index per pixel) and ``OUT/STEM_overlay.png`` (colours blended
    over the image). Returns the written paths."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = palette(model.config.num_labels)
    written = []
    for path in images:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
        pixels, _ = to_tensors(image)
        logits = sliding_window_logits(model, normalize(pixels, mean, std)[None].to(device), window, stride, amp)
        classes = logits.argmax(1)[0].cpu().numpy()
        _save_class_map(classes, out_dir / f"{path.stem}.png")
        overlay = (1 - alpha) * image + alpha * colours[classes]
        Image.fromarray(overlay.round().astype(np.uint8)).save(out_dir / f"{path.stem}_overlay.png")
        written += [out_dir / f"{path.stem}.png", out_dir / f"{path.stem}_overlay.png"]
    return written


def run_eval(args) -> int:
    from upernet_fast.train.data import data_kind, open_source
    from upernet_fast.train.loop import DEFAULT_CROP, SYNTHETIC_CROP
    from upernet_fast.train.metrics import format_scores

    if args.crop is None:
        args.crop = SYNTHETIC_CROP if data_kind(args.data) == "synthetic" else DEFAULT_CROP
    if args.crop < 1:
        raise UsageError(f"--crop must be >= 1, got {args.crop}")
    args.window = args.window or args.crop
    stride = check_window(args.window, args.stride)
    model, device = load_for_inference(args.model, args.backend, args.device)
    source = open_source(args.data, "val", model.config.num_labels, size=args.crop, seed=args.seed)
    scores = evaluate(model, source, args.window, stride, device, args.amp, limit=args.limit, progress=True)
    print(format_scores(scores))
    out = Path(args.json) if args.json else Path(args.model) / "eval.json"
    out.write_text(json.dumps({"model": str(args.model), "data": args.data, "window": args.window, "stride": stride,
                               **scores}, indent=1))
    print(f"wrote {out}")
    return 0


def run_predict(args) -> int:
    stride = check_window(args.window, args.stride)
    model, device = load_for_inference(args.model, args.backend, args.device)
    mean, std = image_statistics(Path(args.model))
    written = predict(model, device, collect_images(args.inputs), Path(args.out), args.window, stride, mean, std,
                      args.amp)
    print(f"wrote {len(written)} files to {args.out}")
    return 0
