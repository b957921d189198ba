"""Atomic, verified training checkpoints.

Layout of ``OUT/checkpoint-STEP/``: ``config.json`` + ``model.safetensors`` (``save_pretrained``: transformers
loads the folder as is), ``training_state.pt`` (optimizer, scheduler, GradScaler, step, data order),
``rng-rank{R}.pt`` (each process's torch / CUDA / numpy / Python RNG states), and ``manifest.json`` last.

Writing goes to ``OUT/.tmp-checkpoint-STEP/``; the manifest (every other file with its size and sha256) is
written after all of them, then the folder is renamed into place. So a folder named ``checkpoint-STEP`` only
exists once it is complete, and a truncated or altered file no longer matches its manifest entry: ``--resume``
picks the newest checkpoint that verifies, and a checkpoint named explicitly that does not verify is refused
with the name of the bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from upernet_fast.train.errors import UsageError

MANIFEST = "manifest.json"
TRAINING_STATE = "training_state.pt"
PREFIX = "checkpoint-"
_NAME = re.compile(r"^checkpoint-(\d+)$")
FORMAT_VERSION = 1


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: incomplete, corrupt, or from an incompatible run."""


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    # Files and the folder entry itself: after the rename, a power loss must not leave a manifest whose files
    # were never flushed.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        _fsync(path)
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(folder / MANIFEST)
    _fsync(folder)


def verify(folder: Path) -> dict:
    """The manifest of a complete checkpoint; raises CheckpointError naming the first missing or bad file."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: no {MANIFEST} (written last, so the save was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint file {manifest_path} is corrupt: {exc}") from None
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"checkpoint file {path} is {path.stat().st_size} bytes, the manifest says "
                                  f"{entry['size']}: truncated or overwritten")
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its sha256 in {MANIFEST}: corrupt")
    return manifest


def checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-STEP`` folder in ``out_dir``, newest first (not verified)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def find_resumable(out_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint in ``out_dir`` that verifies; those that do not are reported through ``warn``."""
    for _, folder in checkpoints(out_dir):
        try:
            verify(folder)
            return folder
        except CheckpointError as exc:
            warn(f"skipping {folder.name}: {exc}")
    return None


def remove_partial_saves(out_dir: Path) -> list[Path]:
    """Delete the temporary folders of saves that never completed (a run killed while saving); returns them."""
    out_dir = Path(out_dir)
    stale = sorted(p for p in out_dir.glob(".tmp-*") if p.is_dir()) if out_dir.is_dir() else []
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts (tensors and numbers)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _save_pretrained(model, folder: Path) -> None:
    from transformers.utils import logging

    # transformers draws a "Writing model shards" bar per save: noise in our logs, the trainer reports saves.
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        logging.enable_progress_bar()


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():  # saving the same step again (a resumed run passing a step it had saved before)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def save_checkpoint(out_dir: Path, step: int, model, training_state: dict, rank: int = 0) -> Path:
    """Write ``out_dir/checkpoint-{step}`` atomically; every process calls it (each writes its RNG state).

    ``model`` is the unwrapped model (no DDP / compile wrapper); only rank 0 writes it and the training state.
    """
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"{PREFIX}{step}", out_dir / f".tmp-{PREFIX}{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted save of this step
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / rng_file(rank))
    if rank == 0:
        _save_pretrained(model, tmp)
        torch.save(training_state, tmp / TRAINING_STATE)
    _barrier()
    if rank == 0:
        write_manifest(tmp, step)
        _replace_dir(tmp, final)
    _barrier()
    return final


def save_final(out_dir: Path, model, rank: int = 0) -> Path:
    """``out_dir/final``: a plain ``save_pretrained`` folder, written to a temporary folder and renamed."""
    out_dir = Path(out_dir)
    final, tmp = out_dir / "final", out_dir / ".tmp-final"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        _save_pretrained(model, tmp)
        _replace_dir(tmp, final)
    _barrier()
    return final


def load_model_weights(folder: Path, model) -> None:
    """Load every ``*.safetensors`` file of a ``save_pretrained`` folder into ``model``, strictly."""
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(path)))
    if not state:
        raise CheckpointError(f"checkpoint {folder} holds no *.safetensors weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {folder} do not fit this model (other --backbone or "
                              f"--num-labels?): {str(exc).splitlines()[0]} ...") from None


def load_checkpoint(folder: Path, model, rank: int = 0) -> dict:
    """Verify ``folder``, load the weights into ``model``, restore this rank's RNG; return the training state."""
    folder = Path(folder)
    verify(folder)
    if not (folder / rng_file(rank)).is_file():
        raise CheckpointError(f"checkpoint {folder} has no {rng_file(rank)}: it was written by fewer processes "
                              "than this run has (resume with the same number of processes)")
    load_model_weights(folder, model)
    state = torch.load(folder / TRAINING_STATE, map_location="cpu", weights_only=True)
    set_rng_state(torch.load(folder / rng_file(rank), map_location="cpu", weights_only=True))
    return state


def resolve_resume(resume: str, out_dir: Path, warn: Callable[[str], None] = print) -> Path | None:
    """``--resume`` (``auto``): the newest verified checkpoint in ``out_dir``, or None when there is none yet;
    ``--resume PATH``: that checkpoint, which must verify (CheckpointError naming the bad file otherwise)."""
    if resume == "auto":
        return find_resumable(out_dir, warn)
    folder = Path(resume)
    verify(folder)
    return folder
