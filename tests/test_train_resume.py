"""Checkpoints and exact resume: a run of N steps interrupted after checkpoint K and resumed ends bitwise equal
to the uninterrupted run (weights and BN statistics, optimizer, scheduler, scaler, RNG: the whole checkpoint,
compared file by file: the manifests' sha256, and training_state.pt by content); corrupt, truncated and
half-written checkpoints are refused or passed over with an error naming the file.

Three kinds of interruption: the later checkpoints removed, a save that dies before its manifest (in process),
and a command-line run SIGKILLed mid-training. The uninterrupted 4-step runs (default and --deterministic)
are shared by the module's in-process tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train_utils import ONE_THREAD_ENV, assert_same_checkpoint, cli_args, metrics, one_thread, run_cli, tiny_config
from upernet_fast.train import checkpoint as ckpt
from upernet_fast.train.loop import train

STEPS, EVERY = 4, 2

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/train_utils.py


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, one_thread):
    """``full_runs(deterministic)``: the folder of the uninterrupted run, trained on first use."""
    folders = {}

    def get(deterministic: bool):
        if deterministic not in folders:
            out = tmp_path_factory.mktemp("deterministic" if deterministic else "default")
            train(tiny_config(out, steps=STEPS, save_every=EVERY, deterministic=deterministic))
            folders[deterministic] = out
        return folders[deterministic]

    return get


def _assert_same_as_full(out, full):
    assert_same_checkpoint(out / f"checkpoint-{STEPS}", full / f"checkpoint-{STEPS}")
    want = {e["step"]: e["loss"] for e in metrics(full)}
    got = {e["step"]: e["loss"] for e in metrics(out)}
    assert got[STEPS] == want[STEPS] and got[EVERY + 1] == want[EVERY + 1]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_resume_after_later_checkpoints_removed_is_bitwise_equal(full_runs, tmp_path, deterministic):
    full = full_runs(deterministic)
    out = tmp_path / "run"
    shutil.copytree(full, out)
    for name in (f"checkpoint-{STEPS}", "final"):
        shutil.rmtree(out / name)
    summary = train(tiny_config(out, steps=STEPS, save_every=EVERY, deterministic=deterministic, resume="auto"))
    assert summary["start_step"] == EVERY
    _assert_same_as_full(out, full)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_a_save_interrupted_mid_write_is_never_picked_and_resume_is_exact(full_runs, tmp_path, monkeypatch,
                                                                           deterministic):
    full = full_runs(deterministic)
    out = tmp_path / "run"
    real = ckpt.write_manifest

    def crash_at_last_save(folder, step):
        if step == STEPS:  # the process dies after the weights are written, before the manifest
            raise KeyboardInterrupt("killed")
        real(folder, step)

    monkeypatch.setattr(ckpt, "write_manifest", crash_at_last_save)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out, steps=STEPS, save_every=EVERY, deterministic=deterministic))
    monkeypatch.setattr(ckpt, "write_manifest", real)
    assert (out / f".tmp-checkpoint-{STEPS}" / "model.safetensors").is_file()
    assert [s for s, _ in ckpt.checkpoints(out)] == [EVERY]
    summary = train(tiny_config(out, steps=STEPS, save_every=EVERY, deterministic=deterministic, resume="auto"))
    assert summary["start_step"] == EVERY
    _assert_same_as_full(out, full)
    assert not list(out.glob(".tmp-*"))  # the half-written folder was cleaned up


def test_corrupt_truncated_or_incomplete_checkpoints_are_refused_by_name(full_runs, tmp_path):
    full = full_runs(False)
    out = tmp_path / "run"
    shutil.copytree(full, out)
    newest, older = out / f"checkpoint-{STEPS}", out / f"checkpoint-{EVERY}"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors does not match its sha256"):
        ckpt.verify(newest)
    warnings = []
    assert ckpt.find_resumable(out, warn=warnings.append) == older  # the newest that verifies
    assert "checkpoint-4" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match=r"model\.safetensors does not match"):  # named: refused
        train(tiny_config(out, steps=STEPS, resume=str(newest)))
    state = older / ckpt.TRAINING_STATE
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match=r"training_state\.pt is 100 bytes.*truncated"):
        ckpt.verify(older)
    (older / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="incomplete: no manifest.json"):
        ckpt.verify(older)
    assert ckpt.find_resumable(out, warn=warnings.append) is None


def test_resume_refuses_a_different_data_order(full_runs, tmp_path):
    full = full_runs(False)
    with pytest.raises(ckpt.CheckpointError, match=r"--batch-size is 3 but .* was trained with 2"):
        train(tiny_config(tmp_path, steps=STEPS, batch_size=3, resume=str(full / f"checkpoint-{EVERY}")))


@pytest.mark.slow
def test_cli_run_killed_mid_training_resumes_bitwise_equal(tmp_path):
    # Through the command line, with 2 DataLoader worker processes (their seeding must not matter): the process
    # is SIGKILLed as soon as checkpoint-2 exists, wherever it then is (training step 3 or writing checkpoint-3),
    # and the same command plus --resume must end where the uninterrupted run ends.
    steps = 5
    options = cli_args(backbone="convnext-test", crop=32, batch_size=2, workers=2, eval_images=1, log_every=1,
                       steps=steps, save_every=1)
    run_cli("train", "--out", tmp_path / "full", *options)
    command = [sys.executable, "-m", "upernet_fast.cli", "train", "--out", str(tmp_path / "part"), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, **ONE_THREAD_ENV}, start_new_session=True)
    deadline = time.monotonic() + 180
    while not (tmp_path / "part" / "checkpoint-2").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the trainer and its DataLoader workers, as a crash would
    assert process.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "part" / "final").exists()
    result = run_cli("train", "--out", tmp_path / "part", *options, "--resume")
    assert "resuming from" in result.stderr
    assert_same_checkpoint(tmp_path / "part" / f"checkpoint-{steps}", tmp_path / "full" / f"checkpoint-{steps}")
