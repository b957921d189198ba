"""A short synthetic training run (tiny ConvNeXt, CPU) reaches a stated mIoU.

Threshold: 60% mIoU on 16 validation images after 150 steps of 8 images at 32x32, lr 5e-3. Predicting
background everywhere scores about 12% (background is ~70% of the pixels: IoU 0.7 for one class of six, 0 for
the five shape classes), so 60% needs most shapes found and classified by colour and texture. Measured when
the test was written with seeds 1 and 2: 78% and 75% (and 82% after 200 steps), so the margin absorbs
seed-to-seed variation. About 60 s single-threaded on a shared 2-core CPU.
"""

from __future__ import annotations

import pytest

from tests.train_utils import one_thread, tiny_config  # noqa: F401  (fixture)
from upernet_fast.train.loop import train

MIN_MIOU = 0.60


@pytest.mark.slow
def test_synthetic_training_reaches_the_stated_miou(tmp_path, one_thread):
    summary = train(tiny_config(tmp_path, steps=150, batch_size=8, lr=5e-3, warmup=10, eval_images=16, log_every=50))
    print(f"val mIoU {summary['val']['mIoU']:.4f}")
    assert summary["val"]["images"] == 16
    assert summary["val"]["mIoU"] >= MIN_MIOU, summary["val"]
