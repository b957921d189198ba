"""A converted model trains under transformers.Trainer (CPU, a few steps) exactly like the unconverted one:
the same logged losses and the same final weights, to fp32 rounding (the converted loss sums in another order).
The README's Trainer lines are the ones used here: import upernet_fast, convert the model, train as before."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import Dataset

from tests.train_utils import one_thread  # noqa: F401  (fixture)
from upernet_fast.train.backbones import build_model
from upernet_fast.train.data import Augment, SyntheticShapes, TrainDataset

STEPS = 4


class _Pairs(Dataset):
    """The synthetic set as Trainer expects it: dicts of model inputs."""

    def __init__(self):
        self.inner = TrainDataset(SyntheticShapes(16, 32), Augment(crop=32), seed=0)

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        pixels, labels = self.inner[(0, index)]
        return {"pixel_values": pixels, "labels": labels}


def _train_with_trainer(model, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Pairs())
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
def test_converted_model_trains_under_trainer_like_the_unconverted_one(tmp_path, one_thread):
    torch.manual_seed(0)
    reference = build_model("convnext-test", 6)
    model = copy.deepcopy(reference)

    import upernet_fast

    # The eager backend: the weights below are compared after AdamW steps, and AdamW moves a weight by about lr
    # whatever its gradient's size, so the rounding noise in gradients that are zero in exact arithmetic (the
    # stage-1 LayerNorm bias here) would differ under the C++ kernels' other summation orders; the cpp backend's
    # gradients are checked against a float64 reference in tests/test_model.py.
    model = upernet_fast.convert(model, backend="eager")

    want = _train_with_trainer(reference, tmp_path / "reference")
    got = _train_with_trainer(model, tmp_path / "converted")
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=1e-5)
    assert got[-1] != want[0]  # it trained: the loss moved
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
