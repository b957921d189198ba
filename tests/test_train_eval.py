"""Metrics, sliding-window inference, `upernet-fast eval` / `predict` on our folders and on plain transformers
folders, transformers loading our `final/` unchanged, a short training run whose loss decreases, and the
errors of bad options."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import UperNetForSemanticSegmentation as HFUperNet

from tests.train_utils import metrics, one_thread, tiny_config, write_png
from upernet_fast import cli
from upernet_fast.train import checkpoint as ckpt
from upernet_fast.train.evaluate import load_for_inference, sliding_window_logits
from upernet_fast.train.loop import train
from upernet_fast.train.metrics import ConfusionMatrix

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/train_utils.py


def test_confusion_matrix_scores():
    matrix = ConfusionMatrix(3)
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])  # ignored pixels' predictions do not count
    matrix.update(predicted, labels)
    scores = matrix.scores()
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2
    assert scores["per_class_iou"] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert scores["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 6) and scores["pixels"] == 6
    empty = ConfusionMatrix(4)
    empty.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert empty.scores()["per_class_iou"] == [None, 1.0, None, None] and empty.scores()["mIoU"] == 1.0
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([5]))


def test_sliding_windows_cover_the_image_and_average_overlaps():
    # A per-pixel model: any tiling and averaging of windows must give the one-pass logits exactly.
    conv = torch.nn.Conv2d(3, 4, 1)
    model = lambda pixel_values: SimpleNamespace(logits=conv(pixel_values))  # noqa: E731
    pixels = torch.randn(1, 3, 45, 70)
    whole = sliding_window_logits(model, pixels, window=100, stride=100)
    tiled = sliding_window_logits(model, pixels, window=32, stride=20)
    torch.testing.assert_close(tiled, whole, rtol=1e-6, atol=1e-6)
    calls = []
    sliding_window_logits(lambda pixel_values: calls.append(pixel_values.shape) or SimpleNamespace(
        logits=conv(pixel_values)), pixels, window=32, stride=20)
    assert len(calls) == 2 * 3 and all(s[-2:] == (32, 32) for s in calls)  # rows at 0, 13; columns at 0, 20, 38


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("run")
    summary = train(tiny_config(out, steps=10, batch_size=4, lr=3e-3, warmup=0, eval_images=4))
    return out, summary


def test_short_training_run_lowers_the_loss_and_writes_metrics(trained):
    out, summary = trained
    losses = [e["loss"] for e in metrics(out)]
    assert len(losses) == 10 and all(np.isfinite(losses))
    # Random init starts near ln(6) * 1.4 (main + 0.4 auxiliary cross-entropy over 6 classes) = 2.5; ten steps at
    # lr 3e-3 bring it down by more than the batch-to-batch noise (about 0.05 here).
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    val = metrics(out, "val")[-1]
    assert val["step"] == 10 and 0 <= val["mIoU"] <= 1 and len(val["per_class_iou"]) == 6
    assert summary["val"]["mIoU"] == val["mIoU"]


def test_transformers_loads_final_unchanged_and_eval_predict_accept_both_kinds_of_folder(trained, tmp_path):
    out, _ = trained
    final = out / "final"
    plain = HFUperNet.from_pretrained(final)  # plain transformers: strict load, no conversion
    assert type(plain) is HFUperNet
    ours, _ = load_for_inference(str(final), backend="eager", device="cpu")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values=pixels).logits, plain.eval()(pixel_values=pixels).logits,
                                   rtol=1e-4, atol=1e-5)
    plain_dir = tmp_path / "transformers"
    plain.save_pretrained(plain_dir)  # a folder that never saw upernet_fast

    for model_dir in (final, plain_dir):
        report = tmp_path / f"{model_dir.name}.json"
        assert cli.main(["eval", "--model", str(model_dir), "--data", "synthetic", "--crop", "32", "--limit", "3",
                         "--json", str(report)]) == 0
        scores = json.loads(report.read_text())
        assert scores["images"] == 3 and 0 <= scores["mIoU"] <= 1 and len(scores["per_class_iou"]) == 6

    images = tmp_path / "images"
    write_png(images / "small.png", np.random.default_rng(0).integers(0, 255, (20, 24, 3)))
    write_png(tmp_path / "large.png", np.random.default_rng(1).integers(0, 255, (40, 70, 3)))  # > window: slides
    predictions = tmp_path / "predictions"
    assert cli.main(["predict", "--model", str(plain_dir), str(images), str(tmp_path / "large.png"),
                     "--out", str(predictions), "--window", "32"]) == 0
    from PIL import Image

    for stem, size in (("small", (24, 20)), ("large", (70, 40))):
        with Image.open(predictions / f"{stem}.png") as classes:
            assert classes.size == size and classes.mode == "L" and np.asarray(classes).max() < 6
        with Image.open(predictions / f"{stem}_overlay.png") as overlay:
            assert overlay.size == size and overlay.mode == "RGB"


def test_eval_refuses_a_corrupt_checkpoint_and_bad_options(trained, tmp_path, capsys):
    out, _ = trained
    checkpoint = out / "checkpoint-10"
    bad = tmp_path / "checkpoint-10"
    import shutil

    shutil.copytree(checkpoint, bad)
    (bad / "config.json").write_text((bad / "config.json").read_text() + " ")

    def refused(argv, pattern):  # the command line: one line naming the problem, exit status 2
        assert cli.main(argv) == 2
        err = capsys.readouterr().err  # also holds transformers' weight-loading progress bar
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and re.search(pattern, errors[0]) and "Traceback" not in err, err

    refused(["eval", "--model", str(bad), "--limit", "1"], r"config\.json is .* bytes")
    refused(["eval", "--model", str(checkpoint), "--window", "16", "--stride", "17"],
            "--stride must be between 1 and --window")
    refused(["predict", "--model", str(checkpoint), str(tmp_path / "missing.jpg"), "--out", str(tmp_path)],
            "neither an image file nor a folder")
    refused(["eval", "--model", str(tmp_path)], "--model must be a folder with config.json")
    # The library raises them as exceptions: UsageError (a ValueError), InputNotFound (also a FileNotFoundError).
    from upernet_fast.train.evaluate import check_window, collect_images

    with pytest.raises(ValueError, match="--stride must be between 1 and --window"):
        check_window(16, 17)
    with pytest.raises(FileNotFoundError, match="neither an image file nor a folder"):
        collect_images([str(tmp_path / "missing.jpg")])

    for options, message in ((["--steps", "0"], "--steps must be >= 1"), (["--data", "folder:a,b"], "--num-labels is required"),
                             (["--scale-range", "2,1"], "--scale-range must be MIN,MAX"),
                             (["--backbone", "convnext-test", "--data", "nope"], "--data must be")):
        refused(["train", "--out", str(tmp_path / "o"), "--workers", "0", *options], message)
    with pytest.raises(SystemExit):  # argparse: an unknown backbone name lists the choices
        cli.main(["train", "--out", str(tmp_path / "o"), "--backbone", "vit-huge"])


@pytest.mark.parametrize("backbone", ["swin-test", "resnet-test"])
def test_other_tiny_backbones_train(tmp_path, backbone):
    summary = train(tiny_config(tmp_path, backbone=backbone, steps=2, eval_images=1))
    assert np.isfinite(summary["loss"]) and (tmp_path / "final" / "model.safetensors").is_file()


def test_speed_options_run_together(tmp_path):
    # bf16 autocast, channels_last, 2 micro-batches per step, cosine schedule, DataLoader workers: one short run.
    summary = train(tiny_config(tmp_path, steps=2, amp="bf16", channels_last=True, grad_accum=2, schedule="cosine",
                                workers=1, eval_images=1))
    assert np.isfinite(summary["loss"])
    assert [e["step"] for e in metrics(tmp_path)] == [1, 2]


def test_fp16_uses_loss_scaling_and_its_state_is_checkpointed(tmp_path):
    train(tiny_config(tmp_path, steps=1, amp="fp16", eval_images=1))
    scaler = torch.load(tmp_path / "checkpoint-1" / ckpt.TRAINING_STATE, weights_only=True)["scaler"]
    assert scaler["scale"] > 1  # GradScaler was enabled (its state is empty when disabled)


def test_trains_on_an_ade20k_folder(tmp_path):
    # Two 40x48 images per split with classes 1..3 in ADE's numbering (0 = "other", ignored).
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for i in range(2):
            write_png(tmp_path / "ade" / "images" / split / f"ADE_{i}.jpg", rng.integers(0, 255, (40, 48, 3)))
            write_png(tmp_path / "ade" / "annotations" / split / f"ADE_{i}.png", rng.integers(0, 4, (40, 48)))
    summary = train(tiny_config(tmp_path / "out", data=f"ade20k:{tmp_path / 'ade'}", num_labels=3, steps=2))
    assert np.isfinite(summary["loss"]) and summary["val"]["images"] == 2
    assert len(summary["val"]["per_class_iou"]) == 3


def test_pretrained_folder_starts_training_and_new_num_labels_replace_the_classifier(trained, tmp_path):
    out, _ = trained
    final = out / "final"
    summary = train(tiny_config(tmp_path, pretrained=str(final), num_labels=4, steps=1, eval_images=1))
    assert len(summary["val"]["per_class_iou"]) == 4
    from safetensors.torch import load_file

    before, after = load_file(str(final / "model.safetensors")), load_file(str(tmp_path / "final" / "model.safetensors"))
    assert after["decode_head.classifier.weight"].shape[0] == 4
    # backbone weights came from the folder: one AdamW step at lr 1e-3 moves each by about 1e-3 at most
    name = "backbone.embeddings.patch_embeddings.weight"
    assert (after[name] - before[name]).abs().max() < 2e-3
    with pytest.raises(FileNotFoundError, match="--pretrained must be a local folder"):
        train(tiny_config(tmp_path / "x", pretrained=str(tmp_path / "nothing"), steps=1))


def test_learning_rate_schedules():
    from upernet_fast.train.loop import lr_factor

    for schedule in ("poly", "cosine"):
        factors = [lr_factor(step, 100, 10, schedule) for step in range(101)]
        assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warmup to 1
        assert factors[10] == 1.0 and factors[100] == 0.0
        assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # then decays monotonically
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert lr_factor(55, 100, 10, "poly") == pytest.approx(0.5**0.9)
