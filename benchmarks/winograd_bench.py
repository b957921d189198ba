"""ATen conv + BN + ReLU (eval) against the Winograd F(4x4, 3x3) block, side by side, at the ConvNeXt-T UperNet
head's 512x512 batch-1 shapes on the CPU: ``python -m benchmarks.winograd_bench``.

Runs alternate (ATen, Winograd, ATen, ...) in one process, so both see the same machine load; the ratio of the
medians is the number to read, never a time measured in another run. The Winograd side is the block as the
converted model calls it (``conv_bn_relu(..., backend="cpp")`` under ``torch.no_grad``): the per-call check of
the filter cache included, the one-off filter transform not (reported separately). GFLOP/s are direct-
convolution FLOPs (2 * C_in * C_out * 9 * H * W) per second; the transform-domain products' own rate is the
MKL batched matmul at one chunk's shape, next to the sgemm ceiling measured in the same run. Prints only;
stores no rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from upernet_fast import reference
from upernet_fast.backend import backend_unavailable
from upernet_fast.ops import winograd_conv_bn_relu as winograd
from upernet_fast.ops.conv_bn_relu import ConvBNReLU, conv_bn_relu

# (name, C_in, C_out, H, W, repetitions): the head's largest 3x3 blocks at a 512x512 input (stride 4 maps).
SHAPES = [
    ("fpn_convs.0 512->512 @128x128", 512, 512, 128, 128, 5),
    ("fpn_bottleneck 2048->512 @128x128", 2048, 512, 128, 128, 3),  # ~2.5 s per ATen call here
]
CHUNK_TILES = 256  # tiles per transform-domain product in csrc/cpu/winograd_conv_bn_relu.cpp


def _block(cin: int, cout: int) -> ConvBNReLU:
    block = ConvBNReLU(cin, cout, 3, padding=1).eval()
    with torch.no_grad():
        block.conv.weight.normal_(0.0, (2.0 / (9 * cin)) ** 0.5)
        block.batch_norm.running_mean.normal_(0.0, 0.2)
        block.batch_norm.running_var.uniform_(0.5, 2.0)
    return block


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _matmul_rates(cin: int, cout: int) -> tuple[float, float]:
    """(sgemm 2048^3, batched matmul 36 x [256, C_in] x [C_in, C_out]) in GFLOP/s, best of 3."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    v, u = torch.randn(36, CHUNK_TILES, cin), torch.randn(36, cout, cin)
    torch.mm(a, b), torch.bmm(v, u.transpose(1, 2))
    sgemm = min(_seconds(lambda: torch.mm(a, b)) for _ in range(3))
    bmm = min(_seconds(lambda: torch.bmm(v, u.transpose(1, 2))) for _ in range(3))
    return 2 * 2048**3 / sgemm / 1e9, 2 * 36 * CHUNK_TILES * cin * cout / bmm / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="inputs in channels_last (default NCHW)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = backend_unavailable("cpp")  # builds/loads the C++ extension and attaches its ops
    if reason is not None:
        raise SystemExit(f"the C++ backend is unavailable: {reason}")
    torch.manual_seed(0)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"layout {'channels_last' if args.channels_last else 'NCHW'}, load average {os.getloadavg()}")
    for name, cin, cout, h, w, reps in SHAPES:
        block = _block(cin, cout)
        x = torch.randn(1, cin, h, w).contiguous(memory_format=layout)
        flop = 2 * cin * cout * 9 * h * w
        with torch.no_grad():
            reason = winograd.why_not(x, block.conv, block.batch_norm)
            if reason is not None:
                raise SystemExit(f"{name}: the Winograd path would not run ({reason})")
            transform = _seconds(lambda: winograd.transformed_filter(block.conv, block.batch_norm))
            aten_out = reference.conv_bn_relu(x, block.conv, block.batch_norm)  # warm-up of both sides
            ours_out = conv_bn_relu(x, block.conv, block.batch_norm, backend="cpp")
            error = ((ours_out - aten_out).abs().max() / aten_out.abs().max()).item()
            aten, ours = [], []
            for _ in range(reps):
                aten.append(_seconds(lambda: reference.conv_bn_relu(x, block.conv, block.batch_norm)))
                ours.append(_seconds(lambda: conv_bn_relu(x, block.conv, block.batch_norm, backend="cpp")))
            check = min(_seconds(lambda: winograd.transformed_filter(block.conv, block.batch_norm))
                        for _ in range(3))
        sgemm, bmm = _matmul_rates(cin, cout)
        a50, o50 = statistics.median(aten), statistics.median(ours)
        print(f"{name}: ATen {a50 * 1e3:.0f} ms (min {min(aten) * 1e3:.0f}, {flop / a50 / 1e9:.0f} GFLOP/s) | "
              f"Winograd {o50 * 1e3:.0f} ms (min {min(ours) * 1e3:.0f}, {flop / o50 / 1e9:.0f} direct-GFLOP/s) | "
              f"speed-up {a50 / o50:.2f}x (medians of {reps}, alternating)")
        print(f"    filter transform once {transform * 1e3:.0f} ms, cache check per call {check * 1e3:.1f} ms; "
              f"max |Winograd - ATen| / max |ATen| {error:.1e}; sgemm 2048^3 {sgemm:.0f} GFLOP/s, "
              f"bmm 36x[{CHUNK_TILES},{cin}]x[{cin},{cout}] {bmm:.0f} GFLOP/s")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
