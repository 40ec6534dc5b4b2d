"""Checkpoints that a crash cannot corrupt, and that a later run can check before trusting.

A checkpoint is a folder `checkpoints/step-N/` holding the weights (adapter or full model, as
`save_pretrained` writes them, so a checkpoint is also a loadable model), `optimizer.pt`,
`scheduler.pt`, one `rng_state_<rank>.pt` per process and `trainer_state.json`. It is written under a
temporary name; `manifest.json`, holding the SHA-256 of every file, is written last; then the folder
is renamed into place. So `step-N` either does not exist or is complete, and a file damaged later (a
bad disk, a partial copy) is caught by its checksum: `find_checkpoint("latest")` then falls back to
the previous checkpoint with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.errors import PreftuneError
from preftune.io import fsync_tree, replace, write_atomic

log = logging.getLogger("preftune")

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, step: int) -> None:
    """The completion marker: checksums of every file, written (atomically) after all of them."""
    manifest = {"step": step, "files": {str(p.relative_to(folder)): _sha256(p) for p in _files(folder)}}
    write_atomic(folder / MANIFEST, json.dumps(manifest, indent=1))


def verify(folder: Path) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (incomplete)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest.json"
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum"
    if "trainer_state.json" not in files:
        return "no trainer_state.json"
    return None


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `checkpoints/step-N`, oldest first (intact or not)."""
    root = Path(output_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                found.append((int(p.name[5:]), p))
    return sorted(found)


def find_checkpoint(output_dir: Path, spec: str) -> Path | None:
    """The checkpoint to resume from: the newest intact one for `latest` (None when there is
    none), or the given folder, which must be intact."""
    if spec == "latest":
        for step, path in reversed(list_checkpoints(output_dir)):
            problem = verify(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); trying the one before it", path, problem)
        return None
    path = Path(spec)
    if not path.is_dir():
        raise PreftuneError(f"resume_from_checkpoint: {spec} does not exist")
    problem = verify(path)
    if problem is not None:
        raise PreftuneError(f"resume_from_checkpoint: {spec} is not a usable checkpoint: {problem}")
    return path


def prune(output_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` intact checkpoints; damaged ones older than them go too."""
    if keep is None:
        return
    intact = [(s, p) for s, p in list_checkpoints(output_dir) if verify(p) is None]
    if len(intact) <= keep:
        return
    oldest_kept = intact[-keep][0]
    for step, path in list_checkpoints(output_dir):
        if step < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values only, so that `load_state` can read it
    back without unpickling arbitrary objects (numpy's key array becomes a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path) -> Any:
    """A checkpoint's optimizer, scheduler or RNG file, read with `weights_only=True`: tensors and
    plain values only. Unpickling anything else runs code chosen by whoever wrote the file, so a
    checkpoint folder from elsewhere is refused in one line instead."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = " ".join(str(exc).split("\n")[0].split())[:160]
        raise PreftuneError(
            f"checkpoint file {path} holds more than tensors and plain values, so it is not loaded "
            f"(unpickling it could run code): {detail}"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise PreftuneError(f"could not read checkpoint file {path}: {str(exc).splitlines()[0][:160]}") from None


def save_weights(model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Adapter (PEFT) or full model via `save_pretrained`: a checkpoint is also a loadable model.
    `state_dict`: the weights to write instead of the model's own (a sharded model's, gathered)."""
    if state_dict is None:
        model.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PreftuneError(f"checkpoint {folder} holds no weights")
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        for f in files:
            set_peft_model_state_dict(model, load_file(str(f)))
        return
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise PreftuneError(f"checkpoint {folder} does not match the model (unexpected weights {unexpected[:3]})")
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.tie_weights()


def save_main_files(
    folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any], sharded: bool
) -> None:
    """The main process's part of a checkpoint: the weights (or adapter) and optimizer unless
    sharded (then each process has written its shards), the scheduler and the trainer state."""
    if not sharded:
        save_weights(model, folder / "model")
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(scheduler.state_dict(), folder / "scheduler.pt")
    write_atomic(folder / TRAINER_STATE, json.dumps(state, indent=2))


def seal(tmp: Path, final: Path, step: int) -> None:
    """Finish a checkpoint written in `tmp`: the manifest of checksums, everything synced, then
    renamed to `final`, so `final` exists only once complete."""
    write_manifest(tmp, step)
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    replace(tmp, final)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text())


def load_main_files(folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, sharded: bool, process_index: int) -> None:
    """Restore what `save_main_files` wrote (sharded weights and optimizer are loaded apart),
    and this process's RNG states."""
    if not sharded:
        load_weights(model, folder / "model")
        optimizer.load_state_dict(load_state(folder / "optimizer.pt"))
    scheduler.load_state_dict(load_state(folder / "scheduler.pt"))
    rng_file = folder / f"rng_state_{process_index}.pt"
    if rng_file.is_file():
        set_rng_state(load_state(rng_file))


class OutputDirLock:
    """An exclusive advisory lock on `output_dir/.lock`, held while one run writes there.

    Two processes training into one folder interleave their metrics and checkpoints, and the damage
    shows only later. `flock` is released by the kernel when the holder exits, however it exits, so a
    crash never leaves a stale lock behind; the pid inside is only for the message.
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = Path(output_dir) / ".lock"
        self._file: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock, as before
            return
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise PreftuneError(
                f"output_dir {self.path.parent} is in use by another training run (pid {holder}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None
