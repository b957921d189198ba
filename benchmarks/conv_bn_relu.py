"""conv_bn_relu in the ops suite (the head's conv-BN-ReLU blocks, fp32 parameters with activations under
autocast: an AMP training step; inference in eval mode): ``python -m benchmarks.conv_bn_relu`` runs it alone
(see benchmarks.op_bench). The CPU eval blocks' Winograd kernel has its own benchmark,
:mod:`benchmarks.winograd_conv_bn_relu`."""

from __future__ import annotations

import sys

import torch

from benchmarks.op_bench import Built, main_for, tensor

OP = "conv_bn_relu"


def describe(p: dict) -> str:
    b, h, w = p["batch"], p["height"], p["width"]
    return f"{p['kernel']}x{p['kernel']} {p['in_channels']}->{p['out_channels']} at {b}x{h}x{w}"


def build(p: dict, dtype, layout: str, device: str) -> Built:
    import upernet_fast.ops as ops
    from upernet_fast import reference

    block = ops.ConvBNReLU(p["in_channels"], p["out_channels"], p["kernel"], padding=p["padding"]).to(device)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
    x = tensor((p["batch"], p["in_channels"], p["height"], p["width"]), dtype, device, layout)
    conv, bn = block.conv, block.batch_norm
    return Built((x,), [x, *block.parameters()],
                 lambda x, backend: ops.conv_bn_relu(x, conv, bn, backend=backend),
                 lambda x: reference.conv_bn_relu(x, conv, bn), (x, conv, bn),
                 autocast=None if dtype == torch.float32 else dtype, module=block)


def bytes_moved(p: dict, forward: bool, elem: int) -> int:
    # forward: read x and the weight, write the activated output (BN parameters are negligible).
    # backward: read grad_out, x and the weight; write grad_x and grad_weight.
    b, h, w = p["batch"], p["height"], p["width"]
    x = b * p["in_channels"] * h * w
    y = b * p["out_channels"] * h * w
    weight = p["out_channels"] * p["in_channels"] * p["kernel"] ** 2
    return elem * (x + weight + y) if forward else elem * (y + x + weight + x + weight)


def flops(p: dict, mode: str) -> int:
    """Forward 2*B*H*W*Cin*Cout*k*k; backward twice that (grad input and grad weight)."""
    f = 2 * p["batch"] * p["height"] * p["width"] * p["in_channels"] * p["out_channels"] * p["kernel"] ** 2
    return {"inference": f, "forward": f, "backward": 2 * f, "forward+backward": 3 * f}[mode]


if __name__ == "__main__":
    sys.exit(main_for(OP))
