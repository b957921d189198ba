"""Shared pieces of the training tests: a tiny, fast training configuration and folder comparisons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Small enough for a few seconds per run on 2 shared cores: the 180k-parameter ConvNeXt test backbone, 32-pixel
# crops, 2 images a step, 2 validation images.
TINY = dict(backbone="convnext-test", crop=32, batch_size=2, workers=0, eval_images=2, log_every=1)


# 2 cores shared by several jobs: with 2 intra-op threads each, OpenMP's spinning barriers make a tiny
# forward pass 50-100x slower (1.2 s instead of 15 ms measured here). The training tests run single-threaded,
# their subprocesses too (ONE_THREAD_ENV); results do not depend on it (the resume tests compare runs made alike).
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(out, **overrides):
    from upernet_fast.train.loop import TrainConfig

    return TrainConfig(out=str(out), **{**TINY, **overrides})


def cli_args(**options) -> list[str]:
    """``--name value`` pairs (``True`` -> a bare flag) for ``upernet-fast train``."""
    args = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def run_cli(*args, launcher=(sys.executable, "-m", "upernet_fast.cli"), timeout=240, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **ONE_THREAD_ENV, **(env or {})})
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def manifest_files(folder) -> dict:
    """File name -> {size, sha256} of a checkpoint: equal manifests mean bitwise-equal checkpoints."""
    return json.loads((Path(folder) / "manifest.json").read_text())["files"]


def assert_bitwise_equal(a, b, path="") -> None:
    """Nested dicts / lists of tensors and numbers: same structure, tensors equal bit for bit."""
    import torch

    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                          b.view(-1).view(torch.uint8)), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_checkpoint(a, b) -> None:
    """Bitwise-equal checkpoints. Weights (safetensors), RNG states and config are compared by their sha256;
    ``training_state.pt`` by content, because torch.save stamps each file with a random serialization id."""
    import torch

    files_a, files_b = manifest_files(a), manifest_files(b)
    state = "training_state.pt"
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        if name != state:
            assert files_a[name] == files_b[name], f"{name} differs between {a} and {b}"
    load = lambda folder: torch.load(Path(folder) / state, weights_only=True)  # noqa: E731
    assert_bitwise_equal(load(a), load(b), state)


def metrics(out, split="train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("split") == split]


def write_png(path, array) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
