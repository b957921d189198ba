"""Training data: synthetic generator, ADE20K and folder layouts (generated in tmp_path), their errors,
augmentation, and the resumable distributed sampler."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from tests.train_utils import one_thread, write_png
from upernet_fast.train.data import (IGNORE_INDEX, Augment, ResumableDistributedSampler, SyntheticShapes,
                                     TrainDataset, open_source)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/train_utils.py


def test_synthetic_images_are_a_function_of_seed_split_and_index():
    a, b = SyntheticShapes(4, 32, seed=3), SyntheticShapes(4, 32, seed=3)
    image, mask = a.load(2)
    image2, mask2 = b.load(2)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and mask.shape == (32, 32)
    assert np.array_equal(image, image2) and np.array_equal(mask, mask2)
    assert not np.array_equal(image, a.load(1)[0])
    assert not np.array_equal(image, SyntheticShapes(4, 32, seed=3, split="val").load(2)[0])
    masks = np.stack([a.load(i)[1] for i in range(4)])
    assert masks.min() == 0 and 0 < masks.max() < a.num_labels  # background and some shapes, all in range


def _ade20k(root, masks_by_split):
    for split, masks in masks_by_split.items():
        for i, mask in enumerate(masks):
            write_png(root / "images" / split / f"ADE_{i}.jpg", np.full((*mask.shape, 3), 100 + i))
            write_png(root / "annotations" / split / f"ADE_{i}.png", mask)


def test_ade20k_layout_reduces_zero_label(tmp_path):
    mask = np.array([[0, 1, 2], [150, 3, 0]])
    _ade20k(tmp_path, {"training": [mask, mask], "validation": [mask]})
    train = open_source(f"ade20k:{tmp_path}", "train", num_labels=150, size=0)
    val = open_source(f"ade20k:{tmp_path}", "val", num_labels=150, size=0)
    assert (len(train), len(val)) == (2, 1)
    image, labels = val.load(0)
    assert image.shape == (2, 3, 3)
    assert labels.tolist() == [[IGNORE_INDEX, 0, 1], [149, 2, IGNORE_INDEX]]  # 0 -> 255, k -> k - 1


def test_folder_layout_pairs_by_stem(tmp_path):
    for name, value in (("b", 2), ("a", 1)):
        write_png(tmp_path / "img" / f"{name}.png", np.full((4, 5, 3), value * 50))
        write_png(tmp_path / "lbl" / f"{name}.png", np.full((4, 5), value))
    source = open_source(f"folder:{tmp_path / 'img'},{tmp_path / 'lbl'}", "train", num_labels=3, size=0)
    assert [source.name(i) for i in range(2)] == ["a", "b"]
    image, labels = source.load(1)
    assert image[0, 0, 0] == 100 and (labels == 2).all()  # no reduce-zero-label for plain folders


def test_data_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(f"ade20k:{tmp_path / 'nowhere'}", "train", 150, 0)
    _ade20k(tmp_path / "ade", {"training": [np.zeros((2, 2))]})
    with pytest.raises(FileNotFoundError, match="validation.*does not exist"):
        open_source(f"ade20k:{tmp_path / 'ade'}", "val", 150, 0)
    write_png(tmp_path / "img" / "a.png", np.zeros((2, 2, 3)))
    write_png(tmp_path / "img" / "b.png", np.zeros((2, 2, 3)))
    write_png(tmp_path / "lbl" / "a.png", np.array([[0, 1], [7, 255]]))
    with pytest.raises(FileNotFoundError, match=r"without a mask.*b\.png"):
        open_source(f"folder:{tmp_path / 'img'},{tmp_path / 'lbl'}", "train", 3, 0)
    (tmp_path / "img" / "b.png").unlink()
    source = open_source(f"folder:{tmp_path / 'img'},{tmp_path / 'lbl'}", "train", 3, 0)
    with pytest.raises(ValueError, match=r"mask .*a\.png has class values \[7\] outside \[0, 3\)"):
        source.load(0)
    write_png(tmp_path / "rgb" / "a.png", np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="single-channel"):
        open_source(f"folder:{tmp_path / 'img'},{tmp_path / 'rgb'}", "train", 3, 0).load(0)
    for spec in ("imagenet", "folder:only_one", "ade20k:", "synthetic:x"):
        with pytest.raises(ValueError, match="--data must be"):
            open_source(spec, "train", 3, 0)


def test_augment_pads_crops_and_is_seeded_per_sample():
    dataset = TrainDataset(SyntheticShapes(8, 24), Augment(crop=32, scale_range=(0.5, 1.5)), seed=5)
    pixels, labels = dataset[(0, 3)]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32 and labels.shape == (32, 32)
    again = dataset[(0, 3)]
    assert torch.equal(pixels, again[0]) and torch.equal(labels, again[1])
    assert not torch.equal(pixels, dataset[(1, 3)][0])  # another epoch, other augmentation
    padded = [dataset[(e, 3)][1] for e in range(8)]
    assert any((p == IGNORE_INDEX).any() for p in padded)  # scales below 32/24 leave ignored padding


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_sampler_resumes_where_it_stopped_and_shards_like_distributed_sampler():
    full = _take(ResumableDistributedSampler(10, 1, 0, seed=1), 25)
    assert sorted(i for e, i in full[:10]) == list(range(10)) and full[10][0] == 1  # epoch 1 starts at sample 10
    assert _take(ResumableDistributedSampler(10, 1, 0, seed=1, start=13), 12) == full[13:25]
    ranks = [_take(ResumableDistributedSampler(10, 2, r, seed=1), 5) for r in range(2)]
    # rank r takes every second sample of the same permutation: together, the one-process order
    assert [x for pair in zip(*ranks) for x in pair] == full[:10]
