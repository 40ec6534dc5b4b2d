"""Experiment trackers (`report_to`) through accelerate's tracker classes.

Every `metrics.jsonl` record, train and eval alike, goes to each tracker at its step under the same
names, and the resolved config goes once as the run's hyperparameters. Only the main process
tracks: the other processes get a `RunTracking` with no trackers, so they import no tracker
package and write nothing.

Why accelerate's classes rather than `Accelerator(log_with=...)`: the run's `Accelerator` is made
before the output folder is claimed and is shared by every run of a process (its state outlives
one run), while a tracker belongs to one run and writes under its `output_dir`; and
`log_with` silently drops a tracker whose package is missing (a debug message), where a run asked
to report should stop before it trains. So the tracker classes that `Accelerator.init_trackers`
would build (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`) are built here, with the same arguments,
and driven the same way: `start`, `store_init_configuration`, `log(values, step=)`, `finish`.

Where each tracker keeps its data unless its own settings say otherwise:
- tensorboard: `output_dir/tensorboard/RUN_NAME/` (event files; hyperparameters in a subfolder);
- wandb: `output_dir/wandb/` (`WANDB_DIR` wins; `WANDB_MODE=offline` keeps it local);
- mlflow: `sqlite:///output_dir/mlflow.db`, artifacts in `output_dir/mlartifacts/` (a set
  `MLFLOW_TRACKING_URI`, or `mlflow.set_tracking_uri` in the caller's process, wins); MLflow 3 refuses
  its old file store, so the store is its SQLite one;
- trackio: its own folder, `TRACKIO_DIR` (default `$HF_HOME/trackio`), which its dashboard
  (`trackio show`) reads every project from;
- aim: an Aim repository in `output_dir`; dvclive: `output_dir/dvclive/`; comet_ml, swanlab and
  clearml: their services, as their own settings say.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from preftune.config import TRACKERS, TrainConfig
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")

# The package each tracker imports, and the `pip install` that brings it.
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "trackio": ("trackio", "trackio"),
    "aim": ("aim", "aim"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "swanlab": ("swanlab", "swanlab"),
    "clearml": ("clearml", "clearml"),
    "dvclive": ("dvclive", "dvclive"),
}
IN_EXTRA = ("tensorboard", "wandb", "mlflow", "trackio")  # preftune[track]


def tracker_names(report_to: str | Sequence[str]) -> list[str]:
    """The trackers `report_to` asks for. `none` is none; `all` is every tracker whose package is
    installed, as accelerate's `log_with="all"` and transformers' `report_to="all"` read it."""
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names == ["none"]:
        return []
    if "all" in names:
        named = [n for n in names if n != "all"]
        return named + [n for n in TRACKERS if n not in named and _installed(n)]
    return names


def _installed(name: str) -> bool:
    """accelerate's own availability test, then the import the tracker's `start` makes."""
    import accelerate.tracking

    if not getattr(accelerate.tracking, f"is_{name}_available")():
        return False
    # accelerate's TensorBoardTracker takes torch's writer (needs the tensorboard package) or tensorboardX.
    modules = ("torch.utils.tensorboard", "tensorboardX") if name == "tensorboard" else (PACKAGES[name][0],)
    for module in modules:
        try:
            importlib.import_module(module)
            return True
        except ImportError:
            continue
    return False


def missing_packages(report_to: str | Sequence[str]) -> list[str]:
    """One line per tracker of `report_to` that this install cannot start, naming the `pip install`:
    checked before data is read or a model loaded."""
    problems = []
    for name in tracker_names(report_to):
        if not _installed(name):
            module, pip_name = PACKAGES[name]
            fix = "pip install 'preftune[track]'" if name in IN_EXTRA else f"pip install {pip_name}"
            problems.append(f"report_to: {name} needs the {module} package, which is not installed: {fix}")
    return problems


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The config as flat scalars every tracker takes: a mapping becomes `key.sub` entries (an empty
    one the string `{}`), a list its JSON text; None stays None (TensorBoard skips it, MLflow writes
    `None`)."""
    flat: dict[str, Any] = {}

    def add(key: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for sub, inner in value.items():
                add(f"{key}.{sub}", inner)
        elif isinstance(value, (dict, list, tuple)):
            flat[key] = json.dumps(value, default=str)
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[key] = value
        else:
            flat[key] = str(value)

    for key, value in config.items():
        add(key, value)
    return flat


def metric_values(record: dict[str, Any]) -> dict[str, float | int]:
    """A metrics record's numbers, without `step` (it is the tracker's step)."""
    return {
        k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class RunTracking:
    """The trackers of one run (none off the main process or with `report_to: none`)."""

    def __init__(self, trackers: Sequence[Any] = (), restore: Sequence[Any] = ()) -> None:
        self.trackers = list(trackers)
        self._restore = list(restore)  # undo steps for process-wide settings made at start

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.trackers]

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record at its step, under the names `metrics.jsonl` has."""
        if not self.trackers:
            return
        values = metric_values(record)
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def finish(self) -> None:
        """Close every tracker (each run's files complete); safe to call twice."""
        trackers, self.trackers = self.trackers, []
        try:
            for tracker in trackers:
                tracker.finish()
        finally:
            for undo in self._restore:
                undo()
            self._restore = []


def start(cfg: TrainConfig, output_dir: Path, is_main: bool) -> RunTracking:
    """Start the run in each tracker of `cfg.report_to` with the config as hyperparameters.

    A tracker that fails to start (no account, a server that does not answer) stops the run with one
    line, after closing those already started."""
    names = tracker_names(cfg.report_to)
    if not is_main or not names:
        return RunTracking()
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    output_dir = Path(output_dir).absolute()
    run_name = cfg.run_name or output_dir.name
    params = hyperparameters(cfg.to_dict())
    tracking = RunTracking()
    for name in names:
        kwargs = dict((cfg.tracker_init_kwargs or {}).get(name) or {})
        try:
            tracker, store_config = _build(LOGGER_TYPE_TO_CLASS[name], name, cfg.tracker_project, run_name, output_dir, kwargs, params, tracking)
            tracker.start()
            tracking.trackers.append(tracker)
            if store_config:
                tracker.store_init_configuration(params)
        except Exception as exc:  # noqa: BLE001 - any tracker's failure becomes one line
            tracking.finish()
            if isinstance(exc, PreftuneError):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            hint = " (set WANDB_MODE=offline to log without an account)" if name == "wandb" else ""
            raise PreftuneError(f"report_to: {name} could not start: {first}{hint}") from exc
    log.info("trackers: %s (run %s, project %s)", ", ".join(tracking.names), run_name, cfg.tracker_project)
    return tracking


def _build(
    cls: Any, name: str, project: str, run_name: str, output_dir: Path, kwargs: dict[str, Any],
    params: dict[str, Any], tracking: RunTracking,
) -> tuple[Any, bool]:
    """accelerate's tracker class built as `Accelerator.init_trackers` would (project first, the
    logging folder second where it takes one), with preftune's defaults for where data goes and
    the run's name; `tracker_init_kwargs` override them. Returns (tracker, whether the config is
    stored through `store_init_configuration`)."""
    if name == "tensorboard":
        return cls(run_name, str(output_dir / "tensorboard"), **kwargs), True
    if name == "wandb":
        kwargs.setdefault("name", run_name)
        if not os.environ.get("WANDB_DIR"):
            kwargs.setdefault("dir", str(output_dir))
        return cls(project, **kwargs), True
    if name == "mlflow":
        _mlflow_store(output_dir, kwargs, tracking)
        kwargs.setdefault("run_name", run_name)
        return cls(project, **kwargs), True
    if name == "trackio":
        # accelerate's TrackioTracker.store_init_configuration passes `allow_val_change` to the
        # run's plain-dict config, which keeps it as a key: the config goes to trackio.init instead.
        kwargs.setdefault("name", run_name)
        kwargs.setdefault("config", params)
        return cls(project, **kwargs), False
    if name == "aim":
        return cls(run_name, str(output_dir), **kwargs), True
    if name == "dvclive":
        kwargs.setdefault("dir", str(output_dir / "dvclive"))
        return cls(run_name, **kwargs), True
    if name == "clearml":
        kwargs.setdefault("task_name", run_name)
        return cls(project, **kwargs), True
    if name == "swanlab":
        kwargs.setdefault("experiment_name", run_name)
        return cls(project, **kwargs), True
    if name == "comet_ml":
        return cls(project, **kwargs), True
    raise PreftuneError(f"report_to: unknown tracker {name!r}")


def _mlflow_store(output_dir: Path, kwargs: dict[str, Any], tracking: RunTracking) -> None:
    """MLflow's SQLite store in `output_dir` unless the process already names a tracking URI; the
    process-wide URI is set back when the run finishes."""
    import mlflow

    try:
        from mlflow.tracking._tracking_service.utils import is_tracking_uri_set
    except ImportError:  # an MLflow without it: the environment variable alone decides

        def is_tracking_uri_set() -> bool:
            return bool(os.environ.get("MLFLOW_TRACKING_URI"))

    if is_tracking_uri_set():
        return
    mlflow.set_tracking_uri(f"sqlite:///{output_dir / 'mlflow.db'}")
    kwargs.setdefault("logging_dir", (output_dir / "mlartifacts").as_uri())
    tracking._restore.append(lambda: mlflow.set_tracking_uri(None))
