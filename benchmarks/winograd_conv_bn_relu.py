"""ATen against the Winograd F(4x4, 3x3) blocks, side by side, at every 3x3 block of the ConvNeXt-T UperNet head
(512x512, batch 1) on the CPU: ``python -m benchmarks.winograd_conv_bn_relu``.

Rows (appended to ``benchmarks/results/winograd_cpu.csv``, table in ``winograd_cpu.md``, plots beside them):

* ``eager``: what transformers' model runs for the block: conv + BN + ReLU (eval), and for the two bottlenecks
  also the bilinear resizes and the concat that feed them (``upernet_fast.reference``);
* ``cpp``: the block as the converted model calls it under ``torch.no_grad`` (``ConvBNReLU.forward_concat`` for
  the bottlenecks: the concat never built), the per-call check of the filter cache included, the one-off filter
  transform not (in the note);
* op ``matmul_peak``: the sgemm ceiling (4096^3) measured in the same run, and per block the rate of one chunk's
  36 transform-domain products (36 x [tiles, C_in] x [C_in, C_out]; C_in the channels Winograd convolves, after
  the low-resolution split) by the block's own packed kernel (provider ``cpp``,
  ``winograd_transform_domain_products``) and by MKL's batched matmul (provider ``torch``), which the block
  used before.

``--train`` (rows in ``winograd_train_cpu.csv`` / ``.md``): the training step of each block instead, forward and
backward (``torch.autograd.grad`` of the inputs and the block's parameters for a fixed upstream gradient), BN
normalising with batch statistics: ``eager`` is transformers' block (and resizes and concat) under ATen's
autograd, ``cpp`` the converted block, whose conv forward and input gradient run by Winograd and whose weight
gradient is ATen's (``winograd_conv_bn_relu.training_conv``; the bottlenecks by input map, ``_ConcatConv``).
``--batch`` sets the batch (default 1).

Runs alternate (ATen, Winograd, ATen, ...) in one process, so both see the same machine load: the ratio of
the medians is the number to read, never a time from another run. ``tflops`` is direct-convolution FLOPs
(2 * C_in * C_out * 9 * H * W) per second for both providers (Winograd does ~4x fewer multiplications, so it
can pass the matmul ceiling), ``pct_matmul`` the same against the sgemm ceiling.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks import measure
from benchmarks.plots import plot_file
from benchmarks.results import DEFAULT_RESULTS_DIR, append_rows, csv_path, format_markdown, format_table, make_row
from upernet_fast import reference
from upernet_fast.backend import backend_unavailable
from upernet_fast.ops import winograd_conv_bn_relu as winograd
from upernet_fast.ops.conv_bn_relu import ConvBNReLU

HIDDEN = 512
# (block, [(C, h, w) of each input]): the output size is the first input's, the inputs after it are resized.
BLOCKS = [
    ("fpn_convs.0", [(HIDDEN, 128, 128)]),
    ("fpn_convs.1", [(HIDDEN, 64, 64)]),
    ("fpn_convs.2", [(HIDDEN, 32, 32)]),
    ("bottleneck (PPM)", [(768, 16, 16)] + [(HIDDEN, s, s) for s in (1, 2, 3, 6)]),
    ("fpn_bottleneck", [(HIDDEN, 128 >> k, 128 >> k) for k in range(4)]),
]
CHUNK_TILES = 256  # tiles per transform-domain product in csrc/cpu/winograd_conv_bn_relu.cpp (whole tile rows)


def _chunk_tiles(height: int, width: int) -> int:
    """Tiles of the first chunk of products at this map size (the .cpp's convolve, batch 1)."""
    tiles_h, tiles_w = -(-height // 4), -(-width // 4)
    return min(max(1, CHUNK_TILES // tiles_w), tiles_h) * tiles_w


def _block(cin: int, cout: int) -> ConvBNReLU:
    block = ConvBNReLU(cin, cout, 3, padding=1).eval()
    with torch.no_grad():
        block.conv.weight.normal_(0.0, (2.0 / (9 * cin)) ** 0.5)
        block.batch_norm.running_mean.normal_(0.0, 0.2)
        block.batch_norm.running_var.uniform_(0.5, 2.0)
    block.backend = "cpp"
    return block


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _matmul_row(stamp: dict, shape: str, flop: float, fn, sgemm_gflops: float | None = None, provider: str = "torch"):
    """(row, GFLOP/s) of a matmul ceiling or of one chunk's products: best of 3 calls after one warm-up."""
    fn()
    best = min(_seconds(fn) for _ in range(3))
    gflops = flop / best / 1e9
    row = make_row(stamp, suite="winograd", op="matmul_peak", provider=provider, mode="mm", shape=shape, dtype="fp32",
                   layout="-", p20_ms=best * 1e3, p50_ms=best * 1e3, p80_ms=best * 1e3, tflops=gflops / 1e3,
                   pct_matmul=100.0 if sgemm_gflops is None else gflops / sgemm_gflops * 100,
                   note="best of 3; " + ("the ceiling of the pct_matmul column" if sgemm_gflops is None else
                                         "a Winograd chunk's transform-domain product, alone"))
    return row, gflops


def _eager(block: ConvBNReLU, inputs: list[torch.Tensor]):
    if len(inputs) == 1:
        return lambda: reference.conv_bn_relu(inputs[0], block.conv, block.batch_norm)
    size = tuple(inputs[0].shape[-2:])
    return lambda: reference.conv_bn_relu(reference.upsample_concat(inputs, size), block.conv, block.batch_norm)


def _ours(block: ConvBNReLU, inputs: list[torch.Tensor]):
    if len(inputs) == 1:
        return lambda: block(inputs[0])
    size = tuple(inputs[0].shape[-2:])
    return lambda: block.forward_concat(inputs, size, concat_backend="cpp")


def _train_rows(stamp, name, block, inputs, shape, layout, flop, sgemm, repeats) -> list[dict]:
    """The block's training step, ATen (transformers' block) and cpp alternating: forward + backward."""
    block.train()
    leaves = [t.requires_grad_() for t in inputs]
    params = [p for p in block.parameters() if p.requires_grad]
    upstream = torch.randn(inputs[0].shape[0], HIDDEN, *inputs[0].shape[-2:])
    forwards = {"eager": _eager(block, leaves), "cpp": _ours(block, leaves)}
    steps = {key: (lambda f=f: torch.autograd.grad(f(), leaves + params, upstream)) for key, f in forwards.items()}
    first = _seconds(steps["cpp"])
    with torch.no_grad():
        expected, got = forwards["eager"](), forwards["cpp"]()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    times = {"eager": [], "cpp": []}
    for _ in range(repeats):
        for key in times:
            times[key].append(_seconds(steps[key]))
    rows = []
    for provider, samples in times.items():
        p20, p50, p80 = measure.quantiles([s * 1e3 for s in samples])
        note = f"medians of {repeats}, alternating with the other provider"
        if provider == "cpp":
            note += f"; first call {first * 1e3:.0f} ms; max |cpp - eager| / max |eager| (forward) {error:.1e}"
        step_flop = 3 * flop  # forward, input gradient, weight gradient
        rows.append(make_row(stamp, suite="winograd_train", op=name, provider=provider, mode="forward+backward",
                             shape=shape, dtype="fp32", layout=layout, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                             tflops=step_flop / (p50 * 1e-3) / 1e12,
                             pct_matmul=step_flop / (p50 * 1e-3) / 1e9 / sgemm * 100, note=note))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.winograd_conv_bn_relu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nchw", action="store_true", help="NCHW inputs (default channels_last, as the converted "
                        "model runs after a ConvNeXt or Swin backbone)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per provider and block (default 5)")
    parser.add_argument("--blocks", default=None, help="comma-separated block names (default: all)")
    parser.add_argument("--train", action="store_true", help="time the training step (forward + backward)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--results-dir", default=str(DEFAULT_RESULTS_DIR))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    reason = backend_unavailable("cpp")  # builds/loads the C++ extension and attaches its ops
    if reason is not None:
        raise SystemExit(f"the C++ backend is unavailable: {reason}")
    torch.manual_seed(0)
    stamp = measure.run_stamp("cpu")
    fmt = torch.contiguous_format if args.nchw else torch.channels_last
    layout = "nchw" if args.nchw else "channels_last"
    chosen = set(args.blocks.split(",")) if args.blocks else None
    load_before = os.getloadavg()
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    row, sgemm = _matmul_row(stamp, "sgemm 4096^3 (torch.mm)", 2 * 4096**3, lambda: torch.mm(a, b))
    rows = [row]
    del a, b
    for name, shapes in BLOCKS:
        if chosen is not None and name not in chosen:
            continue
        cin = sum(c for c, _, _ in shapes)
        height, width = shapes[0][1:]
        block = _block(cin, HIDDEN)
        inputs = [torch.randn(args.batch, c, h, w).contiguous(memory_format=fmt) for c, h, w in shapes]
        flop = 2 * cin * HIDDEN * 9 * height * width * args.batch
        shape = " + ".join(f"{c}x{h}x{w}" for c, h, w in shapes) + f" -> {HIDDEN}x{height}x{width}, 3x3"
        shape = shape if args.batch == 1 else f"b{args.batch} {shape}"
        if args.train:
            rows += _train_rows(stamp, name, block, inputs, shape, layout, flop, sgemm, args.repeats)
            print(format_table(rows[-2:]), flush=True)
            continue
        eager, ours = _eager(block, inputs), _ours(block, inputs)
        with torch.no_grad():
            transform = _seconds(ours)  # first call: fold + filter transform + the block
            expected, got = eager(), ours()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            times = {"eager": [], "cpp": []}
            for _ in range(args.repeats):
                times["eager"].append(_seconds(eager))
                times["cpp"].append(_seconds(ours))
        # One chunk's products: the channels Winograd convolves (the rest go through the low-resolution split).
        first = winograd.lowres_first(inputs, (height, width)) if len(inputs) > 1 else None
        direct = sum(c for c, _, _ in shapes[:first])
        tiles = _chunk_tiles(height, width)
        v, u = torch.randn(36, tiles, direct), torch.randn(36, HIDDEN, direct)
        packed = winograd.winograd_filter_transform(torch.randn(HIDDEN, direct, 3, 3))
        product_shape = f"36x[{tiles},{direct}]x[{direct},{HIDDEN}] ({name})"
        product_flop = 2 * 36 * tiles * direct * HIDDEN
        bmm_row, _ = _matmul_row(stamp, f"bmm {product_shape}", product_flop,
                                 lambda: torch.bmm(v, u.transpose(1, 2)), sgemm)
        packed_row, _ = _matmul_row(stamp, f"packed products {product_shape}", product_flop,
                                    lambda: winograd.winograd_transform_domain_products(v, packed), sgemm, "cpp")
        del v, u, packed
        for provider, samples in times.items():
            p20, p50, p80 = measure.quantiles([s * 1e3 for s in samples])
            note = f"medians of {args.repeats}, alternating with the other provider"
            if provider == "cpp":
                note += (f"; first call (fold + filter transform) {transform * 1e3:.0f} ms; "
                         f"max |cpp - eager| / max |eager| {error:.1e}")
            rows.append(make_row(stamp, suite="winograd", op=name, provider=provider, mode="inference", shape=shape,
                                 dtype="fp32", layout=layout, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                                 tflops=flop / (p50 * 1e-3) / 1e12, pct_matmul=flop / (p50 * 1e-3) / 1e9 / sgemm * 100,
                                 note=note))
        rows += [packed_row, bmm_row]
        print(format_table(rows[-4:]), flush=True)
    rows[0]["note"] += f"; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}"
    path = csv_path(args.results_dir, "winograd_train" if args.train else "winograd", "cpu")
    append_rows(path, rows)
    path.with_suffix(".md").write_text(f"# {path.stem}: latest run\n\n" + format_markdown(rows))
    plot_file(path)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
