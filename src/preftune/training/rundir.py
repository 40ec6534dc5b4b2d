"""The run directory: writable, held by one run at a time (a lock), and never mixed with another
run's files unless resuming it or told to overwrite. Pipelines ask it the same questions."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from preftune import checkpoint
from preftune.errors import PreftuneError
from preftune.io import write_atomic

log = logging.getLogger("preftune")

# Keys that do not change what a run computes: a rerun may differ in them.
NOT_COMPARED = {"resume_from_checkpoint", "overwrite_output_dir", "progress_bar", "output_dir", "num_threads"}
RESOLVED = "config.resolved.yaml"


def comparable(values: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the keys that do not change what a run computes."""
    return {k: v for k, v in values.items() if k not in NOT_COMPARED}


def read_resolved(output_dir: Path) -> dict[str, Any] | None:
    """The earlier run's `config.resolved.yaml` as keys, or None when it cannot be read."""
    try:
        return yaml.safe_load((output_dir / RESOLVED).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None


class RunDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = checkpoint.OutputDirLock(path)

    def check_writable(self) -> None:
        probe = self.path / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PreftuneError(f"output_dir {self.path} is not writable ({exc.strerror or exc})") from None

    @staticmethod
    def check_resume_path(spec: str | None) -> None:
        if spec and spec != "latest" and not Path(spec).is_dir():
            raise PreftuneError(f"resume_from_checkpoint: {spec} does not exist")

    def check_fresh(self, config: dict[str, Any], overwrite: bool, is_main: bool) -> None:
        """A new run does not silently mix its files with another run's."""
        if overwrite or not (self.path / RESOLVED).is_file():
            return
        old = read_resolved(self.path)
        old = comparable(old) if old is not None else None
        new = comparable(config)
        if old != new:
            if is_main:
                for line in config_differences(self.path, old, new):
                    log.error("%s", line)
            raise PreftuneError(
                f"output_dir {self.path} already holds a run with a different config; resume it with "
                "resume_from_checkpoint: latest, pass --overwrite to replace it, or choose another output_dir"
            )

    def claim(self, config: dict[str, Any], resuming: bool, overwrite: bool, is_main: bool) -> None:
        """Writable, locked by this run (the main process holds the lock until `release`), and not
        another run's unless resuming."""
        self.check_writable()
        if is_main:
            self._lock.acquire()
        if not resuming:
            self.check_fresh(config, overwrite, is_main)

    def release(self) -> None:
        self._lock.release()

    def write_resolved(self, text: str) -> None:
        write_atomic(self.path / RESOLVED, text)


def config_differences(output_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What a refused run into `output_dir` is told before the error: each key whose value differs
    from the earlier run's, both values, and the two ways out (a refusal that names nothing sends
    the user diffing YAML files by hand)."""
    if old is None:
        lines = [f"output_dir {output_dir} holds a run whose config.resolved.yaml cannot be read"]
    else:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
        lines = [f"output_dir {output_dir} holds a run with another config ({len(keys)} {'key differs' if len(keys) == 1 else 'keys differ'}):"]
        for key in keys:
            lines.append(f"  {key}: {_shown(old.get(key, _ABSENT))} in that run, {_shown(new.get(key, _ABSENT))} in this one")
    lines.append(
        "to keep that run, choose a new output_dir; to replace it, set overwrite_output_dir: true "
        "(--overwrite on the command line)"
    )
    return lines


_ABSENT = object()


def _shown(value: Any) -> str:
    """A config value as it would be written in YAML or after --set (JSON is YAML)."""
    return "(not set)" if value is _ABSENT else json.dumps(value, default=str)
