"""UperNet heads and model, drop-in for transformers' ``UperNetForSemanticSegmentation``.

Every class keeps the attribute names, child-module names and state_dict keys of its transformers twin, and
the same non-module attributes (``blocks``, ``layers``, ``pool_scales``, ...), so that ``upernet_fast.convert``
and ``upernet_fast.revert`` can turn one into the other by assigning ``__class__``: parameters and buffers
stay the very same objects, and optimizers built before a conversion keep working.

What differs is only how the forward runs: the pyramid pooling, the top-down upsample-and-add, the two
upsample-concats, the conv-BN-ReLU blocks and the loss go through :mod:`upernet_fast.ops`, whose backends
(eager reference, Triton, C++) are chosen per call by :mod:`upernet_fast.backend`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.upernet import modeling_upernet as hf

from upernet_fast import ops, recompute
from upernet_fast._checks import check_tensor
from upernet_fast.ops.conv_bn_relu import ConvBNReLU

try:  # transformers >= 4.46 moved load_backbone; keep the import local to one place.
    from transformers.backbone_utils import load_backbone
except ImportError:  # pragma: no cover - older transformers
    from transformers.utils.backbone_utils import load_backbone


def _backend_of(module: nn.Module) -> str:
    # Instances converted from transformers' classes never ran our __init__: "auto" until convert sets it.
    return getattr(module, "backend", "auto")


def check_features(name: str, features, channels: Sequence[int]) -> None:
    """Feature maps must be a sequence of ``len(channels)`` 4D tensors with exactly those channel counts."""
    if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of {len(channels)} feature maps, got {type(features).__name__}")
    if len(features) != len(channels):
        raise ValueError(f"{name} must hold {len(channels)} feature maps (one per backbone stage), got {len(features)}")
    for i, (f, c) in enumerate(zip(features, channels)):
        check_tensor(f"{name}[{i}]", f, ndim=4, floating=True)
        if f.shape[1] != c:
            raise ValueError(f"{name}[{i}] must have {c} channels (from the config), got shape {tuple(f.shape)}")


class UperNetPyramidPoolingBlock(nn.Module):
    """``AdaptiveAvgPool2d(scale)`` (child ``0``) then a 1x1 ConvBNReLU (child ``1``); keys as transformers'."""

    def __init__(self, pool_scale: int, in_channels: int, channels: int) -> None:
        super().__init__()
        self.layers = [nn.AdaptiveAvgPool2d(pool_scale), ConvBNReLU(in_channels, channels, kernel_size=1)]
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)

    @property
    def conv_block(self) -> nn.Module:
        return self._modules["1"]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # Standalone use only; UperNetHead pools every scale in one op instead.
        return self.conv_block(self._modules["0"](input))


class UperNetPyramidPoolingModule(nn.Module):
    """The PPM: one block per pool scale; returns each block's output upsampled to the input size."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool) -> None:
        super().__init__()
        self.pool_scales = pool_scales
        self.align_corners = align_corners
        self.in_channels = in_channels
        self.channels = channels
        self.blocks = []
        for i, pool_scale in enumerate(pool_scales):
            block = UperNetPyramidPoolingBlock(pool_scale=pool_scale, in_channels=in_channels, channels=channels)
            self.blocks.append(block)
            self.add_module(str(i), block)

    def branches(self, x: torch.Tensor, backend: str = "auto") -> list[torch.Tensor]:
        """Each scale's pooled-and-projected map at its pooled size (not upsampled): one pooling op for all."""
        pooled = ops.adaptive_avg_pool_multi(x, tuple(int(s) for s in self.pool_scales), backend=backend)
        return [block.conv_block(p) for block, p in zip(self.blocks, pooled)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        size = x.shape[-2:]
        return [F.interpolate(b, size=size, mode="bilinear", align_corners=False) for b in self.branches(x)]


class UperNetHead(nn.Module):
    """UperNet decode head (PPM + FPN + fusion); same constructor, attributes and keys as transformers'."""

    def __init__(self, config, in_channels: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        self.pool_scales = config.pool_scales
        self.in_channels = in_channels
        self.channels = config.hidden_size
        self.align_corners = False
        self.classifier = nn.Conv2d(self.channels, config.num_labels, kernel_size=1)
        self.psp_modules = UperNetPyramidPoolingModule(
            self.pool_scales, self.in_channels[-1], self.channels, align_corners=self.align_corners
        )
        self.bottleneck = ConvBNReLU(
            self.in_channels[-1] + len(self.pool_scales) * self.channels, self.channels, kernel_size=3, padding=1
        )
        self.lateral_convs = nn.ModuleList()
        self.fpn_convs = nn.ModuleList()
        for channels in self.in_channels[:-1]:  # the top level goes through the PPM instead
            self.lateral_convs.append(ConvBNReLU(channels, self.channels, kernel_size=1))
            self.fpn_convs.append(ConvBNReLU(self.channels, self.channels, kernel_size=3, padding=1))
        self.fpn_bottleneck = ConvBNReLU(len(self.in_channels) * self.channels, self.channels, kernel_size=3, padding=1)
        self.backend = "auto"

    def psp_forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        x = inputs[-1]
        backend = _backend_of(self)
        branches = self.psp_modules.branches(x, backend=backend)
        # The reference upsamples every branch to x's size and concatenates [x, *branches]: one op here, or
        # none (the C++ eval path's Winograd block reads the branches itself; ConvBNReLU.forward_concat).
        return self.bottleneck.forward_concat([x, *branches], tuple(x.shape[-2:]), concat_backend=backend)

    def forward(self, encoder_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        check_features("encoder_hidden_states", encoder_hidden_states, self.in_channels)
        # Training on the kernel backends: BN+ReLU outputs and the concats are rebuilt in the backward instead
        # of saved (bitwise the same; see upernet_fast.recompute), where the FPN concat would be large enough for
        # it to pay (recompute.MIN_BYTES). The eager backend stays PyTorch's own graph.
        first = encoder_hidden_states[0]
        concat_values = first.shape[0] * len(self.in_channels) * self.channels * first.shape[2] * first.shape[3]
        with recompute.recomputing(
            self.training and _backend_of(self) != "eager" and recompute.pays_for(first, concat_values)
        ):
            return self._forward(encoder_hidden_states)

    def _forward(self, encoder_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        backend = _backend_of(self)
        laterals = [conv(encoder_hidden_states[i]) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(encoder_hidden_states))
        # Top-down path, coarse to fine, out of place: laterals[i-1] += up(laterals[i]).
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = ops.upsample_add(laterals[i], laterals[i - 1], backend=backend)
        # In training the backward rebuilds these maps from recipes (where recompute.pays_for), so no list keeps one
        # longer than it is read (held to the end of this method, the sums and fpn_convs' outputs were 42 of the
        # 480 MiB of the CPU demo's training peak, batch 2 at 256x256, which falls in fpn_bottleneck's forward).
        fpn_outs = []
        for i, block in enumerate(self.fpn_convs):
            fpn_outs.append(block(laterals[i]))
            laterals[i] = None
        fpn_outs.append(laterals[-1])  # no fpn conv on the PPM level
        del laterals
        size = tuple(fpn_outs[0].shape[-2:])
        fused = self.fpn_bottleneck.forward_concat(fpn_outs, size, concat_backend=backend, release=True)
        return self.classifier(fused)


class UperNetFCNHead(nn.Module):
    """The auxiliary FCN head on ``in_index``; same constructor, attributes and keys as transformers'."""

    def __init__(
        self, config, in_channels: Sequence[int], in_index: int = 2, kernel_size: int = 3, dilation=1
    ) -> None:
        super().__init__()
        self.config = config
        self.in_channels = in_channels[in_index] if config.auxiliary_in_channels is None else config.auxiliary_in_channels
        self.channels = config.auxiliary_channels
        self.num_convs = config.auxiliary_num_convs
        self.concat_input = config.auxiliary_concat_input
        self.in_index = in_index
        conv_padding = (kernel_size // 2) * dilation
        convs = [
            ConvBNReLU(self.in_channels, self.channels, kernel_size=kernel_size, padding=conv_padding, dilation=dilation)
        ]
        for _ in range(self.num_convs - 1):
            convs.append(
                ConvBNReLU(self.channels, self.channels, kernel_size=kernel_size, padding=conv_padding, dilation=dilation)
            )
        self.convs = nn.Identity() if self.num_convs == 0 else nn.Sequential(*convs)
        if self.concat_input:
            self.conv_cat = ConvBNReLU(
                self.in_channels + self.channels, self.channels, kernel_size=kernel_size, padding=kernel_size // 2
            )
        self.classifier = nn.Conv2d(self.channels, config.num_labels, kernel_size=1)
        self.backend = "auto"

    def forward(self, encoder_hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(encoder_hidden_states, torch.Tensor) or not isinstance(encoder_hidden_states, (list, tuple)):
            raise TypeError("encoder_hidden_states must be a list or tuple of feature maps")
        if not -len(encoder_hidden_states) <= self.in_index < len(encoder_hidden_states):
            raise ValueError(
                f"encoder_hidden_states has {len(encoder_hidden_states)} feature maps; in_index={self.in_index} is out of range"
            )
        hidden_states = encoder_hidden_states[self.in_index]
        check_tensor(f"encoder_hidden_states[{self.in_index}]", hidden_states, ndim=4, floating=True)
        if hidden_states.shape[1] != self.in_channels:
            raise ValueError(
                f"encoder_hidden_states[{self.in_index}] must have {self.in_channels} channels, "
                f"got shape {tuple(hidden_states.shape)}"
            )
        # As in UperNetHead, where its largest saved map (a conv's output, or conv_cat's concat) is large enough.
        largest = max(self.channels if self.num_convs else 0,
                      self.in_channels + self.channels if self.concat_input else 0)
        values = hidden_states.shape[0] * largest * hidden_states.shape[2] * hidden_states.shape[3]
        with recompute.recomputing(
            self.training and _backend_of(self) != "eager" and recompute.pays_for(hidden_states, values)
        ):
            return self._forward(hidden_states)

    def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        output = self.convs(hidden_states)
        if self.concat_input:
            # Same size on both sides: the concat has no resize, exactly torch.cat.
            output = self.conv_cat.forward_concat(
                [hidden_states, output], tuple(output.shape[-2:]), concat_backend=_backend_of(self)
            )
        return self.classifier(output)


class UperNetForSemanticSegmentation(hf.UperNetForSemanticSegmentation):
    """Drop-in for transformers' class of the same name (it subclasses it): same config, weights, outputs.

    Differences, none of which changes an output:

    * the auxiliary head is computed only when ``labels`` are given (transformers computes it and throws it
      away; in training mode without labels this also means its BatchNorm running statistics are not updated);
    * the loss runs through :func:`upernet_fast.ops.upsample_cross_entropy` on the head-resolution logits;
    * ``full_resolution_logits=False`` (an option of :func:`upernet_fast.convert`) returns the head's 1/4
      resolution logits in training instead of upsampling them, to save memory.
    """

    runtime_attributes = ("full_resolution_logits", "loss_reduction")

    def __init__(self, config) -> None:
        hf.UperNetPreTrainedModel.__init__(self, config)
        self.backbone = load_backbone(config)
        self.decode_head = UperNetHead(config, in_channels=self.backbone.channels)
        self.auxiliary_head = (
            UperNetFCNHead(config, in_channels=self.backbone.channels) if config.use_auxiliary_head else None
        )
        self.full_resolution_logits = True
        self.loss_reduction = "mean"
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("The number of labels should be greater than one")
        check_tensor("pixel_values", pixel_values, ndim=4, floating=True)
        if labels is not None:
            _check_labels(labels, pixel_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions

        outputs = self.backbone.forward_with_filtered_kwargs(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        features = outputs.feature_maps
        head_logits = self.decode_head(features)
        if getattr(self, "full_resolution_logits", True) or not self.training:
            logits = _upsample_logits(head_logits, pixel_values.shape[2:], _backend_of(self.decode_head))
        else:
            logits = head_logits

        loss = None
        if labels is not None:
            loss = self._loss(head_logits, labels, resized=None if logits is head_logits else logits)
            if self.auxiliary_head is not None:
                auxiliary_loss = self._loss(self.auxiliary_head(features), labels)
                loss = loss + self.config.auxiliary_loss_weight * auxiliary_loss

        if not return_dict:
            output = (logits,) + (outputs[1:] if output_hidden_states else outputs[2:])
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def _loss(self, head_logits: torch.Tensor, labels: torch.Tensor, resized: torch.Tensor | None = None):
        return ops.upsample_cross_entropy(
            head_logits,
            labels,
            ignore_index=self.config.loss_ignore_index,
            reduction=getattr(self, "loss_reduction", "mean"),
            backend=_backend_of(self.decode_head),
            resized=resized,
        )


def _upsample_logits(head_logits: torch.Tensor, size, backend: str) -> torch.Tensor:
    """``interpolate(head_logits, size, bilinear)``: through the resize kernels unless the backend is eager.

    Why: ATen's CPU bilinear upsample of 150 x 128 x 128 logits to 512 x 512 measured 130-190 ms against 35-37 ms
    for the C++ kernel (2 threads), about 6% of the converted model's eval forward. The kernel's values differ
    from ATen's by rounding only (ATen contracts multiply-adds; ours computes PyTorch's expression as written).
    """
    if backend == "eager":
        return F.interpolate(head_logits, size=size, mode="bilinear", align_corners=False)
    return ops.upsample_concat([head_logits], tuple(size), backend=backend)


def _check_labels(labels, pixel_values: torch.Tensor) -> None:
    check_tensor("labels", labels, ndim=3)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices (int64), got {labels.dtype}")
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"labels must have shape (batch, height, width) = {expected} to match pixel_values, "
            f"got {tuple(labels.shape)}"
        )
