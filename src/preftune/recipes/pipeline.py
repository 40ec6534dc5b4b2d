"""Training stages run as one pipeline: typically SFT, then DPO from the SFT result.

Two ways to write one, equivalent:

- one config with `stages:`, a list of mappings; the keys outside `stages` are shared by every
  stage and each stage overrides them; stage i writes to `<output_dir>/<i>-<strategy>` unless it
  sets its own `output_dir`;
- several config files, `preftune pipeline sft.yaml dpo.yaml`, one stage each.

Each stage after the first starts from the previous stage's result, which is also its reference
(DPO's and KTO's reference is the model it starts from): `final/` for a full fine-tune, or
`final_merged/` for LoRA, which a LoRA stage followed by another therefore always writes. A reward
model ends a pipeline (it is not a language model to train further).

A rerun is cheap: a stage whose folder holds a finished run (`final/`) of the same resolved config is
skipped; one that holds an unfinished run of it resumes from its latest checkpoint; a different
config there is refused unless `--overwrite`. Once a stage runs, every later stage starts afresh,
since what it starts from has changed.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

from preftune.config import (
    ALIASES, STRATEGIES, TrainConfig, applicable, apply_overrides, from_dict, parse_override, read_config_file,
)
from preftune.errors import PreftuneError
from preftune.training.rundir import comparable, read_resolved

log = logging.getLogger("preftune")


def has_stages(path: str | Path) -> bool:
    """Whether a config file describes a pipeline (`stages:`)."""
    return "stages" in read_config_file(path)


def result_folder(cfg: TrainConfig) -> Path:
    """Where a stage's model ends up, as a folder the next stage loads."""
    return Path(cfg.output_dir) / ("final_merged" if cfg.use_lora else "final")


def load_pipeline(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """The validated configs of every stage, chained: from one file with `stages:`, or one stage per
    file. `--set` overrides apply to every stage. All are validated before anything trains."""
    if not paths:
        raise PreftuneError("pipeline: give a config with 'stages:', or two or more stage configs")
    raw: list[tuple[str, dict[str, Any], bool]] = []  # (where, keys, model_name given by the user)
    if len(paths) == 1:
        data = read_config_file(paths[0])
        stages = data.pop("stages", None)
        where = str(paths[0])
        if not isinstance(stages, list) or not stages:
            raise PreftuneError(f"{where}: 'stages' must be a non-empty list of stage settings (or give several config files)")
        root = Path(str(data.get("output_dir", TrainConfig.output_dir)))
        for i, stage in enumerate(stages, start=1):
            if not isinstance(stage, dict):
                raise PreftuneError(f"{where}: stages[{i - 1}] must be a mapping of keys to values, got {type(stage).__name__}")
            if "stages" in stage:
                raise PreftuneError(f"{where}: stages[{i - 1}]: a stage cannot hold 'stages'")
            strategy = stage.get("strategy", data.get("strategy", TrainConfig.strategy))
            # A shared key reaches the stages whose strategy reads it (a shared `beta` is for the
            # DPO stage, not the SFT one); a stage's own keys are checked as a config's are.
            shared = applicable(data, strategy) if strategy in STRATEGIES else data
            left = sorted(set(data) - set(shared))
            if left:
                log.info("%s: stages[%d] (%s) does not use the shared key%s %s", where, i - 1, strategy,
                         "s" if len(left) > 1 else "", ", ".join(left))
            # `--set` overrides are shared keys too.
            mine = [o for o in overrides if strategy not in STRATEGIES or applicable({parse_override(o)[0]: None}, strategy)]
            merged = apply_overrides({**shared, **stage}, mine)
            if "output_dir" not in stage:
                merged["output_dir"] = str(root / f"{i}-{merged.get('strategy', 'dpo')}")
            given = i > 1 and any(ALIASES.get(k, k) == "model_name" for k in stage)
            raw.append((f"{where}: stages[{i - 1}]", merged, given))
    else:
        for path in paths:
            data = read_config_file(path)
            if "stages" in data:
                raise PreftuneError(f"{path}: a stage config cannot hold 'stages' when several configs are given")
            raw.append((str(path), apply_overrides(data, overrides), False))

    configs: list[TrainConfig] = []
    for i, (where, data, given) in enumerate(raw):
        data = copy.deepcopy(data)
        last = i == len(raw) - 1
        if configs:
            previous = configs[-1]
            if given:
                raise PreftuneError(
                    f"{where}: 'model_name' of a later stage is the previous stage's result ({result_folder(previous)}); remove it"
                )
            start = str(result_folder(previous))
            for alias, target in ALIASES.items():
                if target == "model_name":
                    data.pop(alias, None)
            if len(paths) > 1 and data.get("model_name") not in (None, start):
                log.info("stage %d (%s) starts from stage %d's result %s, not its model_name", i + 1, where, i, start)
            data["model_name"] = start
        cfg = from_dict(data, where)
        if not last:
            if cfg.strategy == "reward":
                raise PreftuneError(f"{where}: a reward model ends a pipeline; it cannot be the start of a later stage")
            if cfg.use_lora:
                cfg.merge_lora = True  # the next stage loads full weights
        configs.append(cfg)
    folders = [str(Path(c.output_dir).resolve()) for c in configs]
    if len(set(folders)) != len(folders):
        raise PreftuneError("pipeline: two stages write to the same output_dir; give each its own")
    return configs


def stage_status(cfg: TrainConfig) -> str:
    """`fresh` (nothing there), `done` (finished with this config), `partial` (this config, not
    finished) or `conflict` (another config's run)."""
    out = Path(cfg.output_dir)
    if not (out / "config.resolved.yaml").is_file():
        return "fresh"
    old = read_resolved(out)
    if old is None:
        return "conflict"
    old, new = comparable(old), comparable(cfg.to_dict())
    if new.get("bf16") is None:  # resolved at setup from the device; the old file says what it was
        new["bf16"] = old.get("bf16")
    if old != new:
        return "conflict"
    finished = (out / "final").is_dir() and (not (cfg.use_lora and cfg.merge_lora) or (out / "final_merged").is_dir())
    return "done" if finished else "partial"


def run_pipeline(configs: Sequence[TrainConfig], overwrite: bool = False) -> list[dict[str, Any]]:
    """Run the stages in order (see the module docstring for skipping and resuming); one summary
    per stage: its strategy, folder, what happened and its last metrics."""
    from preftune.training.recipe import run

    summaries: list[dict[str, Any]] = []
    upstream_ran = False
    for i, cfg in enumerate(configs, start=1):
        status = stage_status(cfg)
        label = f"stage {i}/{len(configs)} ({cfg.strategy}, {cfg.output_dir})"
        if upstream_ran and status != "fresh":
            cfg.overwrite_output_dir = True  # what it starts from changed: its old run is stale
            action = "rerun"
        elif status == "done":
            log.info("%s: already finished with this config; skipped", label)
            summaries.append({"stage": i, "strategy": cfg.strategy, "output_dir": cfg.output_dir, "action": "skipped"})
            continue
        elif status == "partial":
            cfg.resume_from_checkpoint = cfg.resume_from_checkpoint or "latest"
            action = "resumed"
        elif status == "conflict":
            if not overwrite and not cfg.overwrite_output_dir:
                raise PreftuneError(
                    f"{label}: the folder holds a run with a different config; pass --overwrite to replace it, "
                    "or choose another output_dir"
                )
            cfg.overwrite_output_dir = True
            action = "rerun"
        else:
            action = "trained"
        log.info("%s: %s", label, "starting" if action in ("trained", "rerun") else "resuming")
        _, result = run(cfg)
        upstream_ran = True
        summaries.append({"stage": i, "strategy": cfg.strategy, "output_dir": cfg.output_dir, "action": action, **result})
    return summaries
