"""Segmentation data: sources (synthetic, ADE20K, image/mask folders), training augmentation, the resumable
distributed sampler and the DataLoaders.

Reproducibility is by construction rather than by seeding global state: every random choice made for a training
sample (its scale, crop and flip) comes from a generator seeded with ``(seed, epoch, index)``, and the order of
samples is DistributedSampler's order for each epoch. So what a step sees depends only on the step number, not
on how many DataLoader workers there are or whether the run was resumed in between.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from upernet_fast.train.errors import InputNotFound, UsageError

# transformers' image processors for ConvNeXt, Swin and ResNet normalise with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255  # transformers' UperNetConfig.loss_ignore_index
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

SYNTHETIC_CLASSES = 6
SYNTHETIC_TRAIN_IMAGES = 1000
SYNTHETIC_VAL_IMAGES = 48
ADE20K_CLASSES = 150
_SPLIT_DIRS = {"train": "training", "val": "validation"}


# ----------------------------------------------------------------------------------------------- sources
class SyntheticShapes:
    """Procedural images: a textured grey background (class 0) with circles, rectangles and triangles on it.

    A shape's class decides its colour (hues spread around the colour wheel) and its stripe texture (angle and
    period), never its outline, so a small network learns it from local appearance within a few hundred steps.
    Image ``i`` of a split is a pure function of ``(seed, split, i)``: no files, no download.
    """

    def __init__(self, num_images: int, size: int, num_classes: int = SYNTHETIC_CLASSES, seed: int = 0,
                 split: str = "train") -> None:
        if num_classes < 2:
            raise UsageError(f"the synthetic data needs --num-labels >= 2, got {num_classes}")
        self.num_images, self.size, self.num_labels, self.seed = num_images, size, num_classes, seed
        self.split_id = 0 if split == "train" else 1
        hues = np.arange(num_classes - 1) / max(num_classes - 1, 1)
        self.palette = np.array([colorsys.hsv_to_rgb(h, 0.9, 0.9) for h in hues]) * 255.0

    def __len__(self) -> int:
        return self.num_images

    def name(self, index: int) -> str:
        return f"synthetic-{index:06d}"

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.split_id, index])
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
        # Background: a grey (the same in every channel, so it never looks like a class colour) with noise.
        image = rng.uniform(80, 160) + 10.0 * rng.standard_normal((s, s, 1)) + np.zeros((1, 1, 3))
        mask = np.zeros((s, s), dtype=np.int64)
        for _ in range(rng.integers(2, 5)):
            cls = int(rng.integers(1, self.num_labels))
            cy, cx = rng.uniform(0, s, size=2)
            radius = rng.uniform(0.15, 0.35) * s
            kind = rng.integers(0, 3)
            if kind == 0:
                inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
            elif kind == 1:
                ry, rx = radius * rng.uniform(0.6, 1.0, size=2)
                inside = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
            else:  # a triangle pointing up: below two lines and above a base
                inside = (yy < cy + radius * 0.6) & (np.abs(xx - cx) < (yy - cy + radius) * 0.7)
            angle = np.pi * (cls - 1) / (self.num_labels - 1)  # class-specific stripe direction
            period = 3.0 + 2.0 * ((cls - 1) % 3)
            stripes = np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / period)
            colour = self.palette[cls - 1] + rng.uniform(-15, 15, size=3)
            shaded = colour[None, None, :] + 20.0 * stripes[..., None]
            image = np.where(inside[..., None], shaded, image)
            mask[inside] = cls
        image = image + 6.0 * rng.standard_normal(image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), mask


class ImageMaskFiles:
    """Pairs of image files and single-channel masks (PNG) holding class indices.

    ``reduce_zero_label`` (ADE20K): mask value 0 ("other") becomes 255 (ignored) and k becomes k - 1.
    Mask values must then lie in [0, num_labels) or equal 255; anything else is an error naming the file.
    """

    def __init__(self, pairs: list[tuple[Path, Path]], num_labels: int, reduce_zero_label: bool = False) -> None:
        if not pairs:
            raise UsageError("no image/mask pairs")
        self.pairs, self.num_labels, self.reduce_zero_label = pairs, num_labels, reduce_zero_label

    def __len__(self) -> int:
        return len(self.pairs)

    def name(self, index: int) -> str:
        return self.pairs[index][0].stem

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        image_path, mask_path = self.pairs[index]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        with Image.open(mask_path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise UsageError(f"mask {mask_path} must be a single-channel (L or P) PNG of class indices, got mode {im.mode}")
            mask = np.asarray(im).astype(np.int64)
        if mask.shape != image.shape[:2]:
            raise UsageError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                             f"{image.shape[1]}x{image.shape[0]}")
        if self.reduce_zero_label:
            mask = np.where(mask == 0, IGNORE_INDEX + 1, mask) - 1  # 0 -> 255, k -> k - 1
        bad = (mask != IGNORE_INDEX) & ((mask < 0) | (mask >= self.num_labels))
        if bad.any():
            values = sorted(set(np.unique(mask[bad]).tolist()))[:8]
            shift = " after reduce-zero-label" if self.reduce_zero_label else ""
            raise UsageError(f"mask {mask_path} has class values {values}{shift} outside [0, {self.num_labels}) "
                             f"(and not {IGNORE_INDEX}, the ignore value): check --num-labels")
        return image, mask


def _images_in(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise InputNotFound(f"{what}: folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputNotFound(f"{what}: folder {folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def pair_by_stem(images_dir: Path, masks_dir: Path, what: str) -> list[tuple[Path, Path]]:
    """Each image with the mask of the same file stem; an image without one is an error naming it."""
    images = _images_in(images_dir, what)
    masks = {p.stem: p for p in _images_in(masks_dir, what)}
    missing = [p for p in images if p.stem not in masks]
    if missing:
        raise InputNotFound(f"{what}: {len(missing)} image(s) without a mask of the same name in {masks_dir}, "
                                f"first {missing[0]}")
    return [(p, masks[p.stem]) for p in images]


DATA_SPEC_HELP = "--data must be 'synthetic', 'ade20k:DIR' or 'folder:IMAGES_DIR,MASKS_DIR'"


def data_kind(spec: str) -> str:
    """``synthetic``, ``ade20k`` or ``folder``: the kind of a --data spec, checked for its form."""
    kind, _, rest = spec.partition(":")
    if (kind == "synthetic" and not rest) or (kind == "ade20k" and rest) or (kind == "folder" and rest.count(",") == 1):
        return kind
    raise UsageError(f"{DATA_SPEC_HELP}; got {spec!r}")


def default_num_labels(spec: str) -> int | None:
    """Classes implied by a --data spec: synthetic's and ADE20K's are known; a folder's must be given."""
    return {"synthetic": SYNTHETIC_CLASSES, "ade20k": ADE20K_CLASSES}.get(data_kind(spec))


def open_source(spec: str, split: str, num_labels: int, size: int, seed: int = 0):
    """A source for ``--data SPEC``: ``synthetic``, ``ade20k:DIR`` or ``folder:IMAGES_DIR,MASKS_DIR``.

    ``split`` is ``train`` or ``val``. Synthetic images are ``size`` pixels square. A folder source has no
    splits: validation reads the same pairs (give eval a separate folder for a held-out score).
    """
    kind, rest = data_kind(spec), spec.partition(":")[2]
    if kind == "synthetic":
        count = SYNTHETIC_TRAIN_IMAGES if split == "train" else SYNTHETIC_VAL_IMAGES
        return SyntheticShapes(count, size, num_labels, seed=seed, split=split)
    if kind == "ade20k":
        root = Path(rest)
        if not root.is_dir():
            raise InputNotFound(f"--data ade20k: folder {root} does not exist")
        sub = _SPLIT_DIRS[split]
        pairs = pair_by_stem(root / "images" / sub, root / "annotations" / sub, f"--data ade20k ({split})")
        return ImageMaskFiles(pairs, num_labels, reduce_zero_label=True)
    images_dir, masks_dir = (Path(p) for p in rest.split(","))
    return ImageMaskFiles(pair_by_stem(images_dir, masks_dir, "--data folder"), num_labels)


# ------------------------------------------------------------------------------------------- transforms
def to_tensors(image: np.ndarray, mask: np.ndarray | None = None):
    """uint8 HxWx3 -> float CxHxW in [0, 255]; int mask HxW -> int64 tensor."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # a copy: PIL arrays are read-only
    return pixels, (None if mask is None else torch.from_numpy(np.ascontiguousarray(mask)).long())


def normalize(pixels: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """[0, 255] float CxHxW (or BxCxHxW) -> (x / 255 - mean) / std, as transformers' image processors do."""
    shape = (3, 1, 1)
    return (pixels / 255.0 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@dataclass(frozen=True)
class Augment:
    crop: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        """Random rescale, pad to the crop (image 0 after normalising, mask ignored), random crop, random flip."""
        pixels, labels = to_tensors(image, mask)
        scale = rng.uniform(*self.scale_range)
        h, w = labels.shape
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        if size != (h, w):
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
            labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        pixels = normalize(pixels)
        pad_h, pad_w = max(0, self.crop - size[0]), max(0, self.crop - size[1])
        if pad_h or pad_w:
            pixels = F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)
            labels = F.pad(labels, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        top = int(rng.integers(0, labels.shape[0] - self.crop + 1))
        left = int(rng.integers(0, labels.shape[1] - self.crop + 1))
        pixels = pixels[:, top : top + self.crop, left : left + self.crop]
        labels = labels[top : top + self.crop, left : left + self.crop]
        if self.flip and rng.random() < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return pixels.contiguous(), labels.contiguous()


class TrainDataset(Dataset):
    """Indexed by ``(epoch, index)`` keys from :class:`ResumableDistributedSampler`; augmentation is seeded
    from ``(seed, epoch, index)``, so a sample is the same whichever worker or process loads it."""

    def __init__(self, source, augment: Augment, seed: int) -> None:
        self.source, self.augment, self.seed = source, augment, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, mask = self.source.load(index)
        return self.augment(image, mask, np.random.default_rng([self.seed, epoch, index]))


class EvalDataset(Dataset):
    """Whole images, normalised, with their masks and indices (no resize: eval slides a window over them)."""

    def __init__(self, source) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        image, mask = self.source.load(index)
        pixels, labels = to_tensors(image, mask)
        return normalize(pixels), labels, index


# ------------------------------------------------------------------------------------------- sampling
class ResumableDistributedSampler(Sampler):
    """An endless stream of ``(epoch, index)`` keys for one rank, starting after ``start`` samples.

    Epoch ``e`` lists exactly what ``DistributedSampler(shuffle=True, seed=seed).set_epoch(e)`` gives this rank,
    so rank r of N sees every N-th sample of the epoch's permutation; resuming at step k only needs the number
    of samples this rank has consumed (k * batch * grad_accum), no iterator state.
    """

    def __init__(self, num_samples: int, num_replicas: int, rank: int, seed: int, start: int = 0) -> None:
        self.inner = DistributedSampler(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True,
                                        seed=seed, drop_last=False)
        self.start = start

    def __iter__(self):
        epoch, offset = divmod(self.start, len(self.inner))
        while True:
            self.inner.set_epoch(epoch)
            for index in list(self.inner)[offset:]:
                yield epoch, index
            epoch, offset = epoch + 1, 0


def _seed_worker_globals(worker_id: int) -> None:
    # Our transforms use per-sample generators; this only keeps third-party code that reads numpy's or Python's
    # global RNG in a worker reproducible (torch seeds each worker's torch RNG from the loader's generator).
    import random

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def train_loader(dataset: TrainDataset, batch_size: int, sampler: ResumableDistributedSampler, workers: int,
                 seed: int, pin_memory: bool) -> DataLoader:
    # A dedicated generator: the loader draws its worker base seed from it, not from the global torch RNG, so
    # creating the loader (again, on resume) does not shift the RNG stream that dropout and drop-path use.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=_seed_worker_globals, generator=torch.Generator().manual_seed(seed),
                      persistent_workers=workers > 0)
