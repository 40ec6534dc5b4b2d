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
import stat
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
    """Sync every file under `folder` and the folders themselves, before the folder is renamed.
    Their modes become those of `open()` and `mkdir` first: some writers (safetensors, mkstemp)
    make files 0600, which would keep a shared run folder from its group."""
    folder = Path(folder)
    ordinary_modes(folder)
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


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (`os.umask` can only
    be read by setting it, which races with threads creating files meanwhile)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode an ordinary `open(path, "w")` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode `mkdir` gives a new folder: 0777 less the umask."""
    return 0o777 & ~umask()


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh, uniquely named folder in `parent` with an ordinary folder's mode (mkdtemp makes
    it 0700, which would stay on the folder it is renamed into)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, folder_mode())
    return tmp


def ordinary_modes(folder: str | Path) -> None:
    """Give a freshly written folder, and everything in it, the modes `open()` and `mkdir` would
    under the umask. Executable files and links are left as they are."""
    folder = Path(folder)
    files, folders = file_mode(), folder_mode()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            wanted = folders
        elif path.is_file() and not mode & 0o111:
            wanted = files
        else:
            continue
        if mode != wanted:
            os.chmod(path, wanted)


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
        # mkstemp makes the file 0600 (so do some writers that replace it, safetensors among them),
        # and the rename keeps that: give it the mode open() would.
        os.chmod(tmp, file_mode())
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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does
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
