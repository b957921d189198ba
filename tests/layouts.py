"""Inputs in the memory layouts every kernel test covers."""

import torch

LAYOUTS = ("contiguous", "channels_last", "sliced", "sliced_channels_last")


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` (B, C, H, W) in ``layout``.

    "sliced" layouts are strided views into a larger NaN-filled buffer (offset in batch, channels and both
    spatial axes, every other column), so any read outside the view shows up as NaN in a result.
    """
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout not in ("sliced", "sliced_channels_last"):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    b, c, h, w = t.shape
    big = torch.full((b + 1, c + 2, h + 3, 2 * w + 1), float("nan"), dtype=t.dtype, device=t.device)
    if layout == "sliced_channels_last":
        big = big.contiguous(memory_format=torch.channels_last)
    view = big[1:, 1 : c + 1, 2 : h + 2, 1 : 2 * w + 1 : 2]
    view.copy_(t)
    return view
