"""Analytic bytes moved per op and mode: the least traffic any implementation must do.

Each op's bytes are its inputs read once plus its outputs written once (backward: the incoming gradients and
whatever the gradient formula must read, plus the gradients written). Intermediate tensors that a particular
implementation saves or re-reads are not counted, so GB/s from this model is an honest fraction of the copy
ceiling: 100% would mean the op ran at copy speed doing only unavoidable work.
``forward+backward`` is the sum of both; ``inference`` moves what ``forward`` moves.
"""

from __future__ import annotations

from math import prod

LABEL_BYTES = 8  # int64 labels, as F.cross_entropy takes them
SCALAR_BYTES = 4  # a reduced loss value (or its incoming gradient)


def op_bytes(op: str, p: dict, mode: str, elem: int) -> int:
    """Bytes moved by ``op`` with shape parameters ``p`` (see benchmarks.shapes) for elements of ``elem`` bytes."""
    if mode == "forward+backward":
        return op_bytes(op, p, "forward", elem) + op_bytes(op, p, "backward", elem)
    forward = mode in ("forward", "inference")
    if mode not in ("forward", "inference", "backward"):
        raise ValueError(mode)

    if op == "adaptive_avg_pool_multi":
        # forward: read x, write every pooled map. backward: read every pooled grad, write grad_x.
        b, c, h, w = p["x"]
        return elem * (b * c * h * w + sum(b * c * s * s for s in p["scales"]))

    if op == "upsample_add":
        # forward: read low and lateral, write out (lateral's size).
        # backward: grad_lateral is the incoming grad itself (no copy); read grad_out, write grad_low.
        low, lat = prod(p["low"]), prod(p["lateral"])
        return elem * (low + 2 * lat) if forward else elem * (lat + low)

    if op == "upsample_concat":
        # forward: read each input, write the concatenated output. backward: read grad_out, write each grad.
        b = p["tensors"][0][0]
        out = b * sum(t[1] for t in p["tensors"]) * p["size"][0] * p["size"][1]
        return elem * (sum(prod(t) for t in p["tensors"]) + out)

    if op == "upsample_cross_entropy":
        # forward: read low-resolution logits and full-resolution labels, write the reduced loss.
        # backward: read the logits and labels again (the gradient needs softmax at every label pixel), read the
        # scalar grad, write grad_logits (low resolution). Per-pixel statistics an implementation saves are extra.
        logits, labels = prod(p["logits"]), prod(p["labels"])
        if forward:
            return elem * logits + LABEL_BYTES * labels + SCALAR_BYTES
        return 2 * elem * logits + LABEL_BYTES * labels + SCALAR_BYTES

    if op == "bn_relu":
        # Training BatchNorm+ReLU. forward: read y, write the output (the statistics need a second read of y
        # unless it stays in cache: counted as extra work, not as necessary bytes). backward: read grad_out and
        # y, write grad_y (per-channel parameters and statistics are negligible).
        y = prod(p["y"])
        return elem * 2 * y if forward else elem * 3 * y

    if op == "conv_bn_relu":
        # forward: read x and the weight, write the activated output (BN parameters are negligible).
        # backward: read grad_out, x and the weight; write grad_x and grad_weight.
        b, h, w = p["batch"], p["height"], p["width"]
        x = b * p["in_channels"] * h * w
        y = b * p["out_channels"] * h * w
        weight = p["out_channels"] * p["in_channels"] * p["kernel"] ** 2
        return elem * (x + weight + y) if forward else elem * (y + x + weight + x + weight)

    raise KeyError(f"no bytes model for op {op!r}")


def op_flops(op: str, p: dict, mode: str) -> int | None:
    """FLOPs of the convolution blocks (forward 2*B*H*W*Cin*Cout*k*k; backward twice that: grad input and grad
    weight); None for the memory-bound ops."""
    if op != "conv_bn_relu":
        return None
    f = 2 * p["batch"] * p["height"] * p["width"] * p["in_channels"] * p["out_channels"] * p["kernel"] ** 2
    return {"inference": f, "forward": f, "backward": 2 * f, "forward+backward": 3 * f}[mode]
