"""Small transformers UperNet configurations (no weights needed) used across the tests."""

from __future__ import annotations

import torch
from transformers import ConvNextConfig, ResNetConfig, SwinConfig, UperNetConfig
from transformers import UperNetForSemanticSegmentation as HFUperNet

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def backbone_config(kind: str):
    if kind == "convnext":  # the transformers test config
        return ConvNextConfig(hidden_sizes=[10, 20, 30, 40], depths=[1, 1, 1, 1], out_features=STAGES)
    if kind == "swin":
        return SwinConfig(
            embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2, image_size=32, out_features=STAGES,
            drop_path_rate=0.0,  # stochastic depth would make two runs differ in training
        )
    if kind == "resnet":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], out_features=STAGES)
    raise ValueError(kind)


def upernet_config(kind: str = "convnext", **overrides) -> UperNetConfig:
    fields = dict(hidden_size=16, auxiliary_channels=8, num_labels=3)
    fields.update(overrides)
    return UperNetConfig(backbone_config=backbone_config(kind), **fields)


def reference_model(kind: str = "convnext", seed: int = 0, **overrides) -> HFUperNet:
    torch.manual_seed(seed)
    return HFUperNet(upernet_config(kind, **overrides))


def batch(num_labels: int = 3, batch_size: int = 2, size: int = 32, ignore: int | None = 255, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.randint(0, num_labels, (batch_size, size, size), generator=generator)
    if ignore is not None:
        labels[:, :3, :5] = ignore  # a block of ignored pixels
    return pixels, labels
