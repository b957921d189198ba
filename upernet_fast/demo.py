"""The main job: build UperNet ConvNeXt-T, convert it, check it against transformers, time both.

Prints the backend each op uses, the largest output/loss differences, and a table of forward (inference) and
forward+backward (training step without optimizer) time and peak memory, reference vs converted, on the
chosen device. On CUDA the timings run under bf16 autocast with channels_last (how the model is trained);
the correctness check always runs in fp32.
"""

from __future__ import annotations

import contextlib
import copy

import torch

import upernet_fast
from upernet_fast import backend
from upernet_fast.measure import peak_memory_mb, quantiles, rotated, time_ms
from upernet_fast.ops import winograd_conv_bn_relu as winograd

NUM_LABELS = 150


def build_convnext_tiny_upernet(weights: str | None = None):
    """transformers' UperNet with a ConvNeXt-T backbone: random weights, or a local ``save_pretrained`` folder."""
    from transformers import ConvNextConfig, UperNetConfig, UperNetForSemanticSegmentation

    if weights:
        return UperNetForSemanticSegmentation.from_pretrained(weights)
    backbone = ConvNextConfig(
        hidden_sizes=[96, 192, 384, 768],
        depths=[3, 3, 9, 3],
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = UperNetConfig(backbone_config=backbone, hidden_size=512, num_labels=NUM_LABELS)
    return UperNetForSemanticSegmentation(config)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def time_interleaved(runs: dict, device, rounds: int) -> dict[str, list[float]]:
    """Each run timed once per round (ms), the order rotated every round, so that a shared machine's slow phase
    (seconds to minutes on a VM) falls on every run alike instead of on whichever was timed during it."""
    names = list(runs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in rotated(names, r):
            samples[name] += time_ms(runs[name], device, repeats=1, warmup=0)
    return samples


def run_demo(device=None, batch=None, size=None, weights=None, repeats=None) -> int:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"
    batch = batch or (16 if on_cuda else 2)
    size = size or (512 if on_cuda else 256)
    repeats = repeats or (10 if on_cuda else 3)
    torch.manual_seed(0)
    reference = build_convnext_tiny_upernet(weights).to(device)
    converted = upernet_fast.convert(copy.deepcopy(reference))
    num_labels = reference.config.num_labels
    pixels = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, num_labels, (batch, size, size), device=device)
    labels[:, : size // 8] = reference.config.loss_ignore_index  # some ignored pixels, as in real data

    print(f"UperNet ConvNeXt-T ({'local weights ' + weights if weights else 'random weights'}), "
          f"batch {batch}, {size}x{size}, {num_labels} labels, device {device}")
    head_inputs = reference.backbone(pixels[:1]).feature_maps
    for op, args in (
        ("adaptive_avg_pool_multi", (head_inputs[-1], tuple(reference.config.pool_scales))),
        ("upsample_add", (head_inputs[-1], head_inputs[-2][:, : head_inputs[-1].shape[1]])),
    ):
        print(f"  {op}: {backend.select(op, 'auto', *args).backend} backend")

    # Correctness, fp32: eval logits, then training loss and gradients (same inputs, same BN statistics).
    with torch.no_grad():
        reference.eval(), converted.eval()
        logits_error = _max_rel(converted(pixels).logits, reference(pixels).logits)
    reference.train(), converted.train()
    loss_ref = reference(pixels, labels=labels).loss
    loss_conv = converted(pixels, labels=labels).loss
    loss_ref.backward()
    loss_conv.backward()
    pairs = [(p.grad, q.grad) for p, q in zip(converted.parameters(), reference.parameters()) if q.grad is not None]
    # Errors relative to the model's largest gradient, not each parameter's own: per parameter the comparison is
    # ill-conditioned here. Some gradients are zero in exact arithmetic (a LayerNorm bias feeding only a conv +
    # BatchNorm) and hold rounding noise no two summation orders share, and with training-mode BatchNorm over a
    # batch of 2 the head's conv-weight gradients cancel so much that transformers' own fp32 model is 1-2% off a
    # float64 run on them (measured at 256x256; the cpp backend within 2.4x of that). So 1e-2 of the largest
    # gradient: far above that rounding, far below a wrong kernel. tests/test_model.py judges every gradient of
    # the cpp backend against float64 instead.
    largest = max(q.abs().max().item() for _, q in pairs)
    grad_error = max((p.float() - q.float()).abs().max().item() for p, q in pairs) / largest
    loss_error = abs(loss_conv.item() - loss_ref.item()) / abs(loss_ref.item())
    ok = logits_error < 1e-4 and loss_error < 1e-5 and grad_error < 1e-2
    print(f"check (fp32): logits max rel err {logits_error:.2e}, loss rel err {loss_error:.2e}, "
          f"worst gradient error / largest gradient {grad_error:.2e} -> {'OK' if ok else 'MISMATCH'}")

    if on_cuda:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
        for model in (reference, converted):
            model.to(memory_format=torch.channels_last)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext
    )

    def forward(model):
        def run():
            model.eval()
            with torch.no_grad(), autocast():
                model(pixels)
        return run

    def forward_backward(model):
        def run():
            model.train()
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = model(pixels, labels=labels).loss
            loss.backward()
        return run

    print(f"\n{'mode':<18}{'model':<12}{'p50 ms':>10}{'p20-p80 ms':>18}{'speed-up':>10}{'peak MiB':>11}")
    cache_line = None
    models = {"reference": reference, "converted": converted}
    for mode, make in (("forward", forward), ("forward+backward", forward_backward)):
        runs = {name: make(model) for name, model in models.items()}
        # Also the warm-up runs. The training step's peak is measured in training mode already: the converted
        # model's switch to it frees the eval Winograd cache, which would otherwise count against its peak.
        peaks = {name: peak_memory_mb(run, device, setup=models[name].train if make is forward_backward else None)[0]
                 for name, run in runs.items()}
        samples = time_interleaved(runs, device, rounds=repeats)
        p50_ref = quantiles(samples["reference"])[1]
        for name in runs:
            p20, p50, p80 = quantiles(samples[name])
            print(f"{mode:<18}{name:<12}{p50:>10.1f}{f'{p20:.1f}-{p80:.1f}':>18}{f'{p50_ref / p50:.2f}x':>10}"
                  f"{peaks[name]:>11.0f}")
        cache = winograd.cache_nbytes(converted) / 2**20 if make is forward else 0  # (train() frees it)
        if cache:
            later = peak_memory_mb(runs["converted"], device)[0]
            cache_line = (f"converted forward: its first eval call made {cache:.0f} MiB of Winograd filter transforms "
                          f"(in its peak above; kept for later eval calls,\n  freed by model.train()); a later eval "
                          f"call peaks at {later:.0f} MiB")
    print(f"(each model timed {repeats} times, the two in alternation: a machine's slow phase falls on both alike)")
    if cache_line:
        print(cache_line)
    dev = torch.cuda.get_device_name(device) if on_cuda else "CPU"
    print(f"\n{dev}, torch {torch.__version__}. CPU numbers say nothing about GPU speed; see benchmarks/.")
    return 0 if ok else 1
