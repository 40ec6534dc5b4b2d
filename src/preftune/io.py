"""Durable writes: every file or folder the project writes appears whole or not at all.

A writer puts its bytes beside the target, syncs them, renames them over the target and syncs the
folder, so neither a crash nor a power cut leaves a half file under the real name (the rename is
atomic on POSIX; the folder sync makes the rename itself durable). JSONL helpers live here too,
because every JSONL file the project writes goes through the same path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def fsync_dir(folder: str | Path) -> None:
    """Make a rename (or a new entry) in `folder` durable. Some filesystems cannot sync a
    folder; there the rename is still atomic, only not yet on disk, which is all they offer."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """Sync every file under `folder` and the folders themselves, before the folder is renamed."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(folder)


def replace(src: str | Path, dst: str | Path) -> None:
    """`os.replace`, then a sync of the destination's folder so the rename survives a crash."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (safetensors, torch):
    on a clean exit the file is synced and renamed over `path`; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a whole file atomically and durably: a reader (or a later run) never sees half of it."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)


def jsonl_lines(records: Iterable[Any]) -> str:
    """Records as JSONL text, one object a line, non-ASCII kept as is."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl_atomic(path: str | Path, records: Iterable[Any]) -> None:
    """A whole JSONL file, one record a line, written atomically."""
    write_atomic(path, jsonl_lines(records))


def append_jsonl(path: str | Path, records: Iterable[Any], *, sync: bool = True) -> None:
    """Append whole lines in one write: an interruption leaves at most one torn line at the end,
    which a reader drops. `sync` makes them durable before returning (resumable outputs)."""
    payload = jsonl_lines(records).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(target: Path, write: Callable[[Path], Any]) -> None:
    """Write a folder beside `target`, sync it, then swap it in: readers never see a half one."""
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    old = target.with_name(f".old-{target.name}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
