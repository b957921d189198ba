"""Backbone names -> transformers UperNet configurations, and building (or loading) the model to train.

The full-size entries follow the published UperNet recipes (ConvNeXt / Swin / ResNet with a 512-channel head,
256-channel auxiliary head); the ``*-test`` entries are tiny configurations (a few thousand parameters) for
tests and smoke runs on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from upernet_fast.train.errors import InputNotFound, UsageError

# transformers is imported inside the functions: the CLI lists backbone names without loading it.
STAGES = ["stage1", "stage2", "stage3", "stage4"]


def _convnext(hidden_sizes, depths):
    def make():
        from transformers import ConvNextConfig

        return ConvNextConfig(hidden_sizes=hidden_sizes, depths=depths, out_features=STAGES)

    return make


def _swin(embed_dim, depths, num_heads, **extra):
    def make():
        from transformers import SwinConfig

        return SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=num_heads, out_features=STAGES, **extra)

    return make


def _resnet(hidden_sizes, depths, **extra):
    def make():
        from transformers import ResNetConfig

        return ResNetConfig(hidden_sizes=hidden_sizes, depths=depths, out_features=STAGES, **extra)

    return make


# name -> (backbone config factory, head hidden_size, auxiliary_channels)
BACKBONES = {
    "convnext-tiny": (_convnext([96, 192, 384, 768], [3, 3, 9, 3]), 512, 256),
    "convnext-small": (_convnext([96, 192, 384, 768], [3, 3, 27, 3]), 512, 256),
    "convnext-base": (_convnext([128, 256, 512, 1024], [3, 3, 27, 3]), 512, 256),
    "swin-tiny": (_swin(96, [2, 2, 6, 2], [3, 6, 12, 24], window_size=7), 512, 256),
    "swin-small": (_swin(96, [2, 2, 18, 2], [3, 6, 12, 24], window_size=7), 512, 256),
    "swin-base": (_swin(128, [2, 2, 18, 2], [4, 8, 16, 32], window_size=7), 512, 256),
    "resnet-50": (_resnet([256, 512, 1024, 2048], [3, 4, 6, 3], layer_type="bottleneck"), 512, 256),
    "resnet-101": (_resnet([256, 512, 1024, 2048], [3, 4, 23, 3], layer_type="bottleneck"), 512, 256),
    # Tiny: enough capacity to learn the synthetic set in a few hundred CPU steps, nothing more.
    "convnext-test": (_convnext([16, 24, 32, 48], [1, 1, 1, 1]), 32, 16),
    # drop_path_rate=0: stochastic depth is fine for training but makes the tiny test model noisier.
    "swin-test": (_swin(16, [1, 1, 1, 1], [1, 1, 2, 2], window_size=4, drop_path_rate=0.0), 32, 16),
    "resnet-test": (_resnet([16, 24, 32, 48], [1, 1, 1, 1], embedding_size=16), 32, 16),
}


def backbone_names() -> list[str]:
    return list(BACKBONES)


def upernet_config(backbone: str, num_labels: int):
    """The UperNetConfig for a backbone name (see ``BACKBONES``) and a number of classes."""
    if backbone not in BACKBONES:
        raise UsageError(f"--backbone must be one of {', '.join(BACKBONES)}; got {backbone!r}")
    if not isinstance(num_labels, int) or num_labels < 2:
        raise UsageError(f"--num-labels must be an integer >= 2, got {num_labels!r}")
    from transformers import UperNetConfig

    make_backbone, hidden_size, auxiliary_channels = BACKBONES[backbone]
    return UperNetConfig(
        backbone_config=make_backbone(),
        hidden_size=hidden_size,
        auxiliary_channels=auxiliary_channels,
        num_labels=num_labels,
    )


def build_model(backbone: str, num_labels: int, pretrained: str | None = None):
    """transformers' UperNet, random init from a backbone name, or loaded from a local ``save_pretrained`` folder.

    With ``pretrained``, a different ``num_labels`` replaces the classifiers (fine-tuning on new classes).
    Returned unconverted: the caller converts it with the backend it was asked for.
    """
    from transformers import UperNetForSemanticSegmentation as HFUperNet

    if pretrained is None:
        return HFUperNet(upernet_config(backbone, num_labels))
    folder = Path(pretrained)
    if not (folder / "config.json").is_file():
        raise InputNotFound(
            f"--pretrained must be a local folder written by save_pretrained (with config.json); {folder} has none"
        )
    return HFUperNet.from_pretrained(str(folder), num_labels=num_labels, ignore_mismatched_sizes=True)
