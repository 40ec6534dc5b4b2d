"""What every strategy answers for itself, and the defaults most of them share.

A strategy (objective) says how its data is read and tokenized, which model it trains and how that
model is loaded, whether it needs a reference, what constrains its steps, how a batch is collated,
and how a batch becomes per-item losses (through its pure `loss`) plus the sums its metrics are
made of. Everything else (devices, accumulation, clipping, schedule, checkpoints, logging) is the
recipe's (`training/`), the same for all; the recipe never names a strategy.

Conventions every objective keeps, so the loop stays generic and exact:

- `forward` returns per-item losses whose sum, divided by the step's total `units`, is the loss
  of the optimizer step (units: 1 per pair or example; trained tokens for SFT, so its loss is the
  token mean, as TRL's). The split into micro-batches and processes then never changes the update.
- `forward` also returns per-item values to sum for metrics; the loop sums them over the step and
  over processes, then `metrics(totals)` turns the totals into the logged means, named as TRL names
  them.
- `begin` may run a no-gradient pass over the step's items before the loop's forward/backward (KTO
  estimates its KL reference point there, over the whole global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from preftune import models
from preftune.batching import collate_pairs, tokenize_dataset, with_margin_weights
from preftune.config import ModelSettings, Settings
from preftune.data import load_preference_data
from preftune.logprobs import CompletionLogprobs, Scored
from preftune.prepared import PairItems, PreparedData, longest

Batch = dict[str, torch.Tensor]


@dataclass
class Runtime:
    """What an objective may use besides the batch: set up once by the recipe."""

    accelerator: Any
    reference: Any  # None for reference-free strategies
    pad_id: int
    world: int = 1
    forwards: int = 0  # forwards every process runs this step (sharded models: the same on all)

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


def with_pair_weights(batch: Batch, items: Sequence[Any]) -> Batch:
    """The batch plus each pair's loss weight, when its items carry one."""
    if items and hasattr(items[0], "weight"):
        batch["pair_weight"] = torch.tensor([item.weight for item in items], dtype=torch.float32)
    return batch


def weighted(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-pair losses times their weights (a no-op without `margin_weighting`)."""
    weight = batch.get("pair_weight")
    return losses if weight is None else losses * weight.to(losses.device, losses.dtype)


def padded(chunks: Sequence[Sequence[Any]], count: int) -> list[tuple[Sequence[Any], bool]]:
    """(chunk, real) for each chunk, then the first chunk again, not real, up to `count` forwards:
    a sharded model's forward is a collective, so every process runs the same number."""
    return [(c, True) for c in chunks] + [(chunks[0], False)] * max(0, count - len(chunks))


class Objective:
    """The default answers; each strategy overrides what differs."""

    name: ClassVar[str] = "base"
    needs_reference: ClassVar[bool] = False
    causal_lm: ClassVar[bool] = True  # False: a sequence classifier (reward models)
    lora_task_type: ClassVar[str] = "CAUSAL_LM"
    merges_adapter: ClassVar[bool] = False  # final_merged/ written whatever `merge_lora` says
    unit: ClassVar[str] = "pairs"  # what one training item is called, in lines and errors
    segments_text: ClassVar[str] = "the prompt once for both completions"  # the fast layout, as log lines say it
    stat_keys: tuple[str, ...] = ("loss",)
    # the family of records (`prepared.KINDS`) read into a token table; None: the objective reads
    # and tokenizes its examples itself (`load`, `tokenize`)
    data_kind: ClassVar[str | None] = "pairs"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.section = settings.loss  # this strategy's own settings (config.DPOLoss, ...)
        self.data = settings.data
        self.share_prompt = False  # rows hold one prompt and several completions (pairwise strategies)
        self.router_aux = False  # a MoE policy adds its router load-balancing loss (`enable_router_aux`)

    # -- state kept across steps, saved in the checkpoint (`trainer_state.json`)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # -- the model
    def load_model(self, name: str, model: ModelSettings, *, dtype: torch.dtype, device: Any, pad_id: int) -> nn.Module:
        """The model this strategy trains, loaded from `name` (the policy, or a reference copy)."""
        return models.load_model(
            name, dtype=dtype, use_4bit=model.use_4bit, device=device, attn_implementation=model.attn_implementation,
            gradient_checkpointing=model.gradient_checkpointing, provider=model.provider, use_liger_kernel=model.use_liger_kernel,
        )

    def wrap(self, model: nn.Module, fast_head: bool | None = None, router_aux: Any = None) -> nn.Module:
        """The module the recipe trains: the model's completion log-probs, through the output head
        proven for it (`fast_head`) and with a MoE model's router loss (`router_aux`)."""
        return CompletionLogprobs(model, fast_head=fast_head, router_aux=router_aux)

    # -- the step
    def check_step(self, global_batch: int, micro_batch: int) -> None:
        """Refuse a step layout the loss cannot be split over (a PreftuneError); most can be."""

    def row_unit(self) -> str:
        """What one training row is called (SFT's packed rows hold several examples)."""
        return self.unit

    # -- data
    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        """(items over the table's `rows`, a one-line summary, the first truncated examples)."""
        d = self.data
        items = PairItems(data, rows, offset, d.max_seq_length, d.max_prompt_length, weighted=getattr(self.section, "margin_weighting", False))
        summary, truncated = items.summary()
        return items, summary, truncated

    def load(self, source: Any, split: str) -> list[Any]:
        return load_preference_data(source, split, self.data.layout)

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        """(items, a one-line summary, locations of the first truncated examples)."""
        items, stats = tokenize_dataset(tokenizer, examples, self.data.max_seq_length, self.data.max_prompt_length)
        if getattr(self.section, "margin_weighting", False):
            items = with_margin_weights(items, examples)
        return items, stats.summary(), stats.examples

    def units(self, item: Any) -> int:
        return 1

    # -- batches and the fast paths
    def collate(self, items: Sequence[Any], pad_id: int) -> Batch:
        return with_pair_weights(collate_pairs(items, pad_id, self.share_prompt), items)

    def check_batches(self, items: Sequence[Any], pad_id: int) -> tuple[Batch, Batch | None, torch.Tensor | None] | None:
        """A few real items for `logprobs.check_paths`: one sequence a row, the same in the run's
        segment layout (or None), and which segmented output each plain output belongs to (None:
        the same order). None when the objective has no fast path to check."""
        sample = longest(items, 4)  # the longest reach any window
        if not sample:
            return None
        segmented = collate_pairs(sample, pad_id, True) if self.share_prompt else None
        return collate_pairs(sample, pad_id, False), segmented, None

    def refuse_segments(self) -> bool:
        """The model cannot take several segments a row: fall back to one sequence a row. True when
        the items must then be built again."""
        self.share_prompt = False
        return False

    def enable_router_aux(self, coef: float) -> None:
        """Train a MoE model with `coef` x its router load-balancing loss, logged as `aux_loss`."""
        if not self.router_aux:
            self.stat_keys = self.stat_keys + ("aux_loss",)
        self.router_aux, self.router_aux_coef = True, float(coef)

    def with_router_aux(
        self, scored: Scored, losses: torch.Tensor, values: dict[str, torch.Tensor], units: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Add coef x the batch's aux loss to the per-item losses, spread by each item's units, so
        the step's loss gains coef x the unit-weighted mean of its micro-batches' aux losses (one
        micro-batch: exactly the model's own `loss + coef * aux_loss`). Evaluation and reference
        passes run without gradients and compute none."""
        if not self.router_aux:
            return losses, values
        aux = scored.aux_loss if scored.aux_loss is not None else losses.new_zeros(())
        units = units.to(losses.dtype)
        losses = losses + self.router_aux_coef * aux * units
        return losses, {**values, "loss": losses.detach(), "aux_loss": aux.detach() * units}

    def begin(self, rt: Runtime, module: nn.Module, chunks: Sequence[Sequence[Any]], active: bool,
              training: bool = True) -> Any:
        return None

    def forward(
        self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    # -- metrics
    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Means of the summed values: per unit by default."""
        n = max(1.0, totals["units"])
        return {k: totals[k] / n for k in self.stat_keys}

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}"}


# ---------------------------------------------------------------------------------------------
# What the pairwise strategies (DPO's family, ORPO, SimPO, CPO) share

PAIR_STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def pair_values(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-pair values of TRL's pairwise metrics."""
    return {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


class PairwiseObjective(Objective):
    """Pairs of completions of one prompt, the prompt encoded once for both where the model allows."""

    stat_keys = PAIR_STATS

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.share_prompt = settings.data.share_prompt

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{means['loss']:.4f}",
            "acc": f"{means['rewards/accuracies']:.2f}",
            "margin": f"{means['rewards/margins']:.3f}",
        }
