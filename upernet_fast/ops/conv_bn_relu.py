"""Conv -> BatchNorm -> ReLU block (transformers' ``UperNetConvModule``): module, entry point and backends."""

from __future__ import annotations

import torch
from torch import nn

from upernet_fast import backend as _backend
from upernet_fast import reference
from upernet_fast._checks import check_tensor

OP = "conv_bn_relu"


def conv_bn_relu(
    x: torch.Tensor, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, *, backend: str = "auto"
) -> torch.Tensor:
    """``relu(batch_norm(conv(x)))`` with ``batch_norm`` in its own mode (training updates running stats)."""
    check_tensor("x", x, ndim=4, floating=True)
    if x.shape[1] != conv.in_channels:
        raise ValueError(f"x must have {conv.in_channels} channels (conv.in_channels), got shape {tuple(x.shape)}")
    impl = _backend.select(OP, backend, x, conv, batch_norm)
    return impl.fn(x, conv, batch_norm)


class ConvBNReLU(nn.Module):
    """Drop-in for transformers' ``UperNetConvModule``: same constructor, attributes and state_dict keys.

    ``conv`` (Conv2d, stride 1, no bias by default) -> ``batch_norm`` (BatchNorm2d) -> ``activation`` (ReLU).
    ``backend`` picks the implementation (see upernet_fast.backend); it is plain Python state, not saved.
    """

    # Attributes that are runtime state of this class only; upernet_fast.revert deletes them.
    runtime_attributes = ("backend",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        padding: int | tuple[int, int] | str = 0,
        bias: bool = False,
        dilation: int | tuple[int, int] = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            padding=padding,
            bias=bias,
            dilation=dilation,
        )
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()
        self.backend = "auto"

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return conv_bn_relu(input, self.conv, self.batch_norm, backend=getattr(self, "backend", "auto"))


_backend.register(OP, "eager", reference.conv_bn_relu)
