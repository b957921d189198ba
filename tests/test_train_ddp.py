"""`upernet-fast train` under `torchrun --nproc_per_node 2` (DDP, gloo on CPU, SyncBatchNorm in the heads
through upernet_fast's BN) equals one process training on the combined batch.

Why the two should agree: rank r of 2 sees every second sample of the epoch's permutation, so a step's two
per-rank batches of 2 hold exactly the 4 images of the one-process batch (each augmented identically, being
seeded by sample); with --scale-range 1,1 and crops the size of the synthetic images there is no ignored
padding, so the mean of the two ranks' mean losses is the one-process mean loss, DDP's averaged gradient is
its gradient, and SyncBatchNorm gives the heads the whole batch's statistics (the ConvNeXt backbone has only
LayerNorms). What differs is summation order (gradient all-reduce, BN statistics), hence tolerances:

* losses: fp32 rounding, 1e-5 relative;
* weights that training really moves (more than lr / 2 from their initial value in the one-process run): within
  lr / 100 plus 1e-5 of their scale. AdamW moves a weight by about lr * g / |g| per step, so a rounding-level
  change of g shows in the update only where g itself is near zero;
* the other weights have a gradient that is zero in exact arithmetic (e.g. the biases of the LayerNorms whose
  outputs go through a convolution into BatchNorm, which removes any constant shift), so what moves them is
  rounding noise, amplified by AdamW's normalisation, and two runs' noise need not agree: they must stay
  near their initial values in both runs (within lr / 2, against lr * steps for a weight that trains);
* BatchNorm running statistics: 1e-3 of their scale, since the noise-driven biases above shift the
  activations they average by up to a few 1e-4.
"""

from __future__ import annotations

import json
import socket
import sys

import pytest
import torch

from tests.train_utils import cli_args, metrics, run_cli
from upernet_fast.train.backbones import build_model

OPTIONS = dict(backbone="convnext-test", crop=32, scale_range="1,1", steps=3, workers=0, eval_images=2,
               log_every=1, lr="1e-3", warmup=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_on_the_combined_batch(tmp_path):
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(_free_port()), "-m", "upernet_fast.cli")
    run_cli("train", "--out", tmp_path / "ddp", *cli_args(batch_size=2, **OPTIONS), launcher=torchrun)
    run_cli("train", "--out", tmp_path / "one", *cli_args(batch_size=4, **OPTIONS))

    start = [e for e in map(json.loads, (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())
             if e.get("event") == "start"]
    assert start[0]["world_size"] == 2  # really two processes
    for a, b in zip(metrics(tmp_path / "ddp"), metrics(tmp_path / "one"), strict=True):
        assert a["step"] == b["step"] and a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    ddp, one = _weights(tmp_path / "ddp" / "final"), _weights(tmp_path / "one" / "final")
    torch.manual_seed(0)  # the trainer's initial weights: seed, then build
    initial = {k: v.detach() for k, v in build_model("convnext-test", 6).state_dict().items()}
    assert ddp.keys() == one.keys()
    lr = float(OPTIONS["lr"])
    trained = 0
    for name in one:
        a, b = ddp[name].double(), one[name].double()
        if "running_" in name:
            bound = 1e-3 * b.abs().max().clamp_min(1e-3)
            assert (a - b).abs().max() <= bound, f"{name}: max difference {(a - b).abs().max():.3g} > {bound:.3g}"
            continue
        start = initial[name].double()
        moved = (b - start).abs().max() > lr / 2
        if moved:
            bound = 1e-5 * b.abs().max() + lr / 100
            assert (a - b).abs().max() <= bound, f"{name}: max difference {(a - b).abs().max():.3g} > {bound:.3g}"
        else:
            assert (a - start).abs().max() <= lr / 2, f"{name} trains under DDP only"
        trained += int(moved)
    assert trained > len(one) // 3  # most weights held to the tight bound
    assert any(name.endswith("running_mean") and one[name].abs().max() > 0 for name in one)  # BN statistics too
