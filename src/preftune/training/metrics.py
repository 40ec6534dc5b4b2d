"""Where logged records go: `metrics.jsonl` (TRL's names), the experiment trackers of `report_to`
(`tracking.py`), and the user's callbacks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

from preftune.io import write_atomic
from preftune.training.tracking import RunTracking

log = logging.getLogger("preftune")


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """After a resume, records past the checkpoint's step are dropped so each step appears once."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash mid-write
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class MetricsLogger:
    """Every logged record, train or eval, to each place it goes. Callbacks may stop training: one
    that returns False ends the run after that step, every process agreeing (`main_says`)."""

    def __init__(self, output_dir: Path, is_main: bool, tracking: RunTracking, logging_steps: int,
                 callbacks: Sequence[Callable[[dict[str, Any]], Any]], main_says: Callable[[bool], bool]) -> None:
        self.file = MetricsLog(output_dir / "metrics.jsonl", is_main)
        self.is_main = is_main
        self.logging_steps = logging_steps
        self.callbacks = list(callbacks)
        self.main_says = main_says
        self.stopped_by_callback = False
        self.last_train: dict[str, Any] = {}  # the last logged records, for the model card
        self.last_eval: dict[str, Any] = {}
        self.tracking = tracking  # the trackers (none off the main process)

    def should_log(self, step: int, last_step: bool, finite: bool) -> bool:
        """The first step, every `logging_steps`, the last, and any step whose loss was not finite."""
        return step == 1 or step % self.logging_steps == 0 or last_step or not finite

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(record)
        if any(k.startswith("eval_") for k in record):
            self.last_eval = dict(record)
        else:
            self.last_train = dict(record)
        if self.callbacks:
            stop = self.is_main and any(callback(dict(record)) is False for callback in self.callbacks)
            if self.main_says(stop) and not self.stopped_by_callback:
                self.stopped_by_callback = True
                if self.is_main:
                    log.info("a callback stopped training after step %d", record["step"])
        self.tracking.log(record)

    def close(self) -> None:
        """Every tracker's files complete; safe to call twice (a run stopped early closes them too)."""
        self.tracking.finish()
