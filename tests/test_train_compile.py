"""`upernet-fast train --compile`: the converted model under torch.compile (Inductor, CPU) trains like eager.

Crop 192: the last feature map (stride 32) is then 6x6, as large as the largest pool scale; smaller maps meet
an Inductor CPU limit on the backward of adaptive pooling with more bins than inputs (transformers' model hits
it too; see tests/test_model_compile.py). Two steps: the first step's loss is the same model on the same batch
(Inductor reassociates fp32 sums: relative 1e-4), the second shows the compiled backward and optimizer step
moved the weights as eager's did.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.train_utils import one_thread, tiny_config  # noqa: F401  (fixture)
from upernet_fast.train.loop import train


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row.get("split") == "train"]


@pytest.mark.slow
def test_compiled_training_follows_eager(tmp_path, one_thread):
    # As in a fresh `upernet-fast train --compile` process: without a reset, the same code objects compiled by
    # earlier tests at other sizes would be recompiled with dynamic shapes here, a different (and, in torch
    # 2.13's Inductor on these channels_last maps, failing: "cannot determine truth value of Relational")
    # compilation from the one the command line makes.
    torch._dynamo.reset()
    settings = dict(steps=2, crop=192, batch_size=2, eval_images=1, log_every=1, save_every=0)
    train(tiny_config(tmp_path / "eager", **settings))
    train(tiny_config(tmp_path / "compiled", compile=True, **settings))
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 2, (eager, compiled)
    for step, (a, b) in enumerate(zip(eager, compiled), start=1):
        assert abs(a - b) <= 1e-4 * abs(a), f"step {step}: eager loss {a}, compiled {b}"
