"""When to save, and saving: `checkpoints/step-N/` (everything to resume exactly), resuming from
one, and the run's `final/` folder with its model card."""

from __future__ import annotations

import copy
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune import checkpoint, modelcard, sharding
from preftune.errors import PreftuneError
from preftune.io import replace_dir
from preftune.training.distributed import Distributed

log = logging.getLogger("preftune")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    nonfinite_skips: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient, in all
    nonfinite_in_a_row: int = 0
    evaluated: bool = False  # this step's evaluation is already logged (resume must not repeat it)


class Checkpointer:
    """Saves and restores what the loop holds: the model (`inner.model`), optimizer, schedule, RNG,
    the loop's state and the objective's own state."""

    def __init__(self, output_dir: Path, dist: Distributed, save_steps: int, save_total_limit: int | None) -> None:
        self.output_dir = output_dir
        self.dist = dist
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit

    def should_save(self, step: int, last_step: bool, finite: bool, stopping: bool) -> bool:
        """Every `save_steps`, and when asked to stop; the last step's checkpoint is written with
        `final/`, and a step whose update was skipped for a NaN/Inf is not one to resume from."""
        return (step % self.save_steps == 0 or stopping) and not last_step and finite

    def save(self, policy: Any, inner: Any, optimizer: Any, scheduler: Any, state: TrainState, extra: dict[str, Any]) -> Path:
        """Everything needed to resume exactly (see checkpoint.py): written to a temporary folder,
        sealed with a manifest of checksums, then renamed, so `checkpoints/step-N` exists only once
        complete. `extra` is what the run adds to the state (its batch, the objective's state)."""
        acc, is_main = self.dist.accelerator, self.dist.is_main
        root = self.output_dir / "checkpoints"
        final = root / f"step-{state.step}"
        tmp = root / f".tmp-step-{state.step}"
        try:
            if is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            torch.save(checkpoint.rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
            if self.dist.sharded:  # each process writes its shards of weights and optimizer state
                sharding.save_sharded(policy, optimizer, tmp / "sharded")
            if is_main:
                values = {
                    "step": state.step,
                    **extra,
                    "evaluated": state.evaluated,
                    "nonfinite_skips": state.nonfinite_skips,
                    "nonfinite_in_a_row": state.nonfinite_in_a_row,
                }
                checkpoint.save_main_files(tmp, inner.model, optimizer, scheduler, values, self.dist.sharded)
            acc.wait_for_everyone()
            if is_main:
                checkpoint.seal(tmp, final, state.step)
                checkpoint.prune(self.output_dir, self.save_total_limit)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = checkpoint.list_checkpoints(self.output_dir)
            kept = f"; the last complete checkpoint is {previous[-1][1]}" if previous else ""
            raise PreftuneError(
                f"could not write checkpoint {final} ({exc.strerror or exc}){kept}; free disk space or "
                "choose another output_dir, then resume with resume_from_checkpoint: latest"
            ) from None
        acc.wait_for_everyone()
        return final

    def find(self, spec: str | None) -> Path | None:
        """The checkpoint `resume_from_checkpoint` names (None: start afresh)."""
        if not spec:
            return None
        path = checkpoint.find_checkpoint(self.output_dir, spec)
        if path is None and self.dist.is_main:
            log.info("resume_from_checkpoint: latest, but %s has no checkpoint yet: starting from step 0", self.output_dir)
        return path

    def resume(self, path: Path, policy: Any, inner: Any, optimizer: Any, scheduler: Any, global_batch: int) -> tuple[TrainState, dict[str, Any]]:
        """Restore a checkpoint into the run's objects: (the loop's state, the saved state's values)."""
        state = checkpoint.read_trainer_state(path)
        if state.get("global_batch") != global_batch:
            raise PreftuneError(
                f"checkpoint {path} was trained with global batch {state.get('global_batch')}, this run has "
                f"{global_batch}: keep per_device_train_batch_size x gradient_accumulation_steps x processes equal to resume exactly"
            )
        if (path / "sharded").is_dir() != self.dist.sharded:
            written = "with" if (path / "sharded").is_dir() else "without"
            raise PreftuneError(
                f"checkpoint {path} was written {written} fsdp sharding; resume it with the fsdp setting it was trained with"
            )
        if self.dist.sharded:
            sharding.load_sharded(policy, optimizer, path / "sharded")
        checkpoint.load_main_files(path, inner.model, optimizer, scheduler, self.dist.sharded, self.dist.accelerator.process_index)
        loop = TrainState(
            step=state["step"],
            nonfinite_skips=state.get("nonfinite_skips", 0),
            nonfinite_in_a_row=state.get("nonfinite_in_a_row", 0),
            evaluated=state.get("evaluated", False),
        )
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, loop.step)
        return loop, state

    def save_final(self, policy: Any, inner: Any, tokenizer: Any, card: str, merged_card: str | None) -> Path:
        """`final/`: the adapter (LoRA) or the full model, with the tokenizer beside it; with
        `merged_card`, also `final_merged/`, the adapter merged into full weights."""
        acc = self.dist.accelerator
        acc.wait_for_everyone()
        final = self.output_dir / "final"
        # Sharded: full weights gathered from every process (a collective), written by the main one.
        state = sharding.consolidated_state_dict(policy) if self.dist.sharded else None
        if self.dist.is_main:
            replace_dir(
                final,
                lambda tmp: (
                    checkpoint.save_weights(inner.model, tmp, state),
                    tokenizer.save_pretrained(tmp),
                    (tmp / "README.md").write_text(card, encoding="utf-8"),  # after peft's own card
                ),
            )
            if merged_card is not None:
                # Merged from a copy: the trained PeftModel stays whole for whoever holds it.
                merged = copy.deepcopy(inner.model).merge_and_unload()
                replace_dir(
                    self.output_dir / "final_merged",
                    lambda tmp: (
                        merged.save_pretrained(tmp, safe_serialization=True),
                        tokenizer.save_pretrained(tmp),
                        (tmp / "README.md").write_text(merged_card, encoding="utf-8"),
                    ),
                )
            log.info("saved %s", final)
        acc.wait_for_everyone()
        return final


def model_card(cfg: Any, origin: str | None, output_dir: Path, train_data: Any, eval_data: Any,
               last_train: dict[str, Any], last_eval: dict[str, Any], merged: bool = False) -> str:
    """`final/README.md`; a run from files is reproduced by its resolved config."""
    from preftune.data import dataset_names

    origin = origin or f"preftune train {output_dir / 'config.resolved.yaml'}"
    names = dataset_names(train_data if train_data is not None else cfg.dataset)
    evals = dataset_names(eval_data if eval_data is not None else cfg.eval_dataset)
    names += [n for n in evals if n not in names]
    return modelcard.render(cfg, train_metrics=last_train, eval_metrics=last_eval, origin=origin, datasets=names, merged=merged)
