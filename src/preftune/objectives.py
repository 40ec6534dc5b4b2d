"""What each training strategy computes; the loop in `trainer.py` runs any of them.

An objective says how a strategy's data is read and tokenized, how a batch is collated, which model
it trains (a causal LM, or a sequence classifier for `reward`), whether it needs a reference model,
and how a batch becomes per-example losses plus the sums its metrics are made of. Everything else
(devices, accumulation, clipping, schedule, checkpoints, logging) is the loop's, the same for all.

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

import logging
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from preftune.batching import TokenizedPair, collate_pairs, tokenize_dataset, tokenize_unpaired
from preftune.config import TrainConfig
from preftune.data import load_preference_data, load_sft_data, load_unpaired_data, margin_weight
from preftune.quality import kto_balance_advice
from preftune.logprobs import CompletionLogprobs, Scored, completion_logps
from preftune.prepared import PairItems, PreparedData, SequenceItems, UnpairedItems, item_lengths, longest
from preftune.losses import bradley_terry_loss, cpo_loss, kto_kl, kto_loss, orpo_loss, preference_loss, simpo_loss
from preftune.reference import eval_mode
from preftune.sequences import SequenceRow, collate_sequences, tokenize_sft

log = logging.getLogger("preftune")

Batch = dict[str, torch.Tensor]


@dataclass
class Runtime:
    """What an objective may use besides the batch: set up once by the trainer."""

    accelerator: Any
    reference: Any  # None for reference-free strategies
    pad_id: int
    share_prompt: bool
    world: int = 1
    forwards: int = 0  # forwards every process runs this step (sharded models: the same on all)

    def to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}


@dataclass
class WeightedPair(TokenizedPair):
    """A tokenized pair with its loss weight (`margin_weighting`; see `data.margin_weight`)."""

    weight: float = 1.0


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
    """The default behaviour; each strategy overrides what differs."""

    name = "base"
    needs_reference = False
    model_kind = "causal-lm"  # or "reward"
    stat_keys: tuple[str, ...] = ("loss",)

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.router_aux = False  # a MoE policy adds its router load-balancing loss (`enable_router_aux`)

    # state an objective keeps across steps, saved in the checkpoint (`trainer_state.json`)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # data: the family of records (`prepared.KINDS`) read into a token table; None: the objective
    # reads and tokenizes its examples itself (`load`, `tokenize`)
    data_kind: str | None = "pairs"

    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        """(items over the table's `rows`, a one-line summary, the first truncated examples)."""
        cfg = self.cfg
        items = PairItems(data, rows, offset, cfg.max_seq_length, cfg.max_prompt_length, weighted=cfg.margin_weighting)
        summary, truncated = items.summary()
        return items, summary, truncated

    def load(self, source: str, split: str) -> list[Any]:
        return load_preference_data(source, split, self.cfg.record_layout())

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        """(items, a one-line summary, locations of the first truncated examples)."""
        items, stats = tokenize_dataset(tokenizer, examples, self.cfg.max_seq_length, self.cfg.max_prompt_length)
        if self.cfg.margin_weighting:
            items = [
                WeightedPair(**{f.name: getattr(item, f.name) for f in fields(item)}, weight=margin_weight(example))
                for item, example in zip(items, examples)
            ]
        return items, stats.summary(), stats.examples

    def units(self, item: Any) -> int:
        return 1

    # model and batches
    def wrap(self, model: nn.Module) -> nn.Module:
        return CompletionLogprobs(model)

    def collate(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> Batch:
        return with_pair_weights(collate_pairs(items, pad_id, share_prompt), items)

    def check_batches(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> tuple[Batch, Batch | None, torch.Tensor | None] | None:
        """A few real items for `logprobs.check_paths`: one sequence a row, the same in the run's
        segment layout (or None), and which segmented output each plain output belongs to (None:
        the same order). None when the objective has no fast path to check."""
        sample = longest(items, 4)  # the longest reach any window
        if not sample:
            return None
        segmented = collate_pairs(sample, pad_id, True) if share_prompt else None
        return collate_pairs(sample, pad_id, False), segmented, None

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

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Means of the summed values: per unit by default."""
        n = max(1.0, totals["units"])
        return {k: totals[k] / n for k in self.stat_keys}

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}"}


# ---------------------------------------------------------------------------------------------
# Pairwise: DPO and its family, and the reference-free ORPO, SimPO and CPO

PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def _pair_values(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                 chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
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
    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{means['loss']:.4f}",
            "acc": f"{means['rewards/accuracies']:.2f}",
            "margin": f"{means['rewards/margins']:.3f}",
        }


class DPOObjective(PairwiseObjective):
    """DPO and every `loss_type` of its family (losses.preference_loss), against a reference."""

    name = "dpo"
    needs_reference = True
    stat_keys = PAIR_KEYS

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.bco_count = 0  # running mean of rewards for `bco_pair`, as TRL keeps it
        self.bco_mean = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"bco_count": self.bco_count, "bco_mean": self.bco_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bco_count = int(state.get("bco_count", 0))
        self.bco_mean = float(state.get("bco_mean", 0.0))

    def wrap(self, model: nn.Module) -> nn.Module:
        return CompletionLogprobs(model, wpo=self.cfg.use_weighting)

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        cfg = self.cfg
        scored = completion_logps(module, batch)
        sums, lengths = scored.sums, scored.counts
        half = sums.shape[0] // 2
        policy_chosen, policy_rejected = sums[:half], sums[half:]
        with rt.accelerator.autocast():
            ref_chosen, ref_rejected = rt.reference.logps(batch)
        ref_chosen, ref_rejected = ref_chosen.float().detach(), ref_rejected.float().detach()
        types, weights = cfg.loss_mix()
        bco_delta = context if context is not None else self.bco_mean
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            loss_type=types,
            loss_weights=weights,
            beta=cfg.beta,
            label_smoothing=cfg.label_smoothing,
            chosen_lengths=lengths[:half],
            rejected_lengths=lengths[half:],
            discopop_tau=cfg.discopop_tau,
            f_divergence_type=cfg.f_divergence_type,
            f_alpha=cfg.f_alpha,
            bco_delta=bco_delta,
        )
        if scored.wpo is not None:
            # WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2, as TRL's `use_weighting`): each pair's
            # loss times w(chosen) * w(rejected), w = exp(mean over tokens of log p(token) - log sum_v
            # p_v^2), the policy's probability of the completion relative to its own sampling; no gradient.
            weights = torch.exp(scored.wpo / lengths.clamp_min(1))
            losses = losses * weights[:half] * weights[half:]
        losses = weighted(losses, batch)
        values = _pair_values(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return self.with_router_aux(scored, losses, values, torch.ones_like(losses))

    @torch.no_grad()
    def begin(self, rt: Runtime, module: nn.Module, chunks: Sequence[Sequence[Any]], active: bool,
              training: bool = True) -> float | None:
        """`bco_pair`'s baseline delta for the step: TRL's running mean of all rewards seen, the
        current batch included. The batch is the optimizer step's whole global batch, scored here
        without gradient and summed over processes in one collective, so the mean (and the loss)
        does not depend on how the step is split into micro-batches and processes. Evaluation
        reads the mean without updating it."""
        if "bco_pair" not in self.cfg.loss_mix()[0]:
            return None
        if not training:
            return self.bco_mean
        acc = rt.accelerator
        total = torch.zeros(2, dtype=torch.float64)
        with eval_mode(module):
            for chunk, real in padded(chunks, rt.forwards):
                batch = rt.to_device(collate_pairs(chunk, rt.pad_id, rt.share_prompt))
                with acc.autocast():
                    policy = completion_logps(module, batch).sums.float()
                    ref = rt.reference.sequence_logps(batch).float()
                if active and real:
                    rewards = self.cfg.beta * (policy - ref)
                    total += torch.tensor([float(rewards.sum()), float(rewards.numel())], dtype=torch.float64)
        total = acc.reduce(total.to(acc.device), "sum").cpu()
        n = float(total[1])
        if n:
            count = self.bco_count + n
            self.bco_mean += (float(total[0]) / n - self.bco_mean) * n / count
            self.bco_count = int(count)
        return self.bco_mean


class ReferenceFreeObjective(PairwiseObjective):
    """ORPO, SimPO and CPO: pairwise losses of the policy's own log-probs; no reference is loaded.

    The NLL term (ORPO's L_SFT, CPO's and SimPO's `cpo_alpha` term) is each pair's mean per-token
    negative log-likelihood of the chosen completion, then averaged over pairs like the rest of the
    loss (TRL averages over the batch's tokens instead; per pair keeps the loss independent of how a
    step is split into micro-batches). `logps/*` are summed log-probs, as for DPO.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.name = cfg.strategy
        extra = ("nll_loss", "log_odds_ratio", "log_odds_chosen") if cfg.strategy == "orpo" else ("nll_loss",)
        self.stat_keys = PAIR_KEYS + extra

    def wrap(self, model: nn.Module) -> nn.Module:
        return CompletionLogprobs(model, wpo=self.cfg.use_weighting)

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        cfg = self.cfg
        scored = completion_logps(module, batch)
        sums, lengths = scored.sums, scored.counts
        half = sums.shape[0] // 2
        chosen, rejected = sums[:half], sums[half:]
        chosen_mean = chosen / lengths[:half].clamp(min=1)
        rejected_mean = rejected / lengths[half:].clamp(min=1)
        nll = -chosen_mean
        extra: dict[str, torch.Tensor] = {}
        if cfg.strategy == "orpo":
            odds_loss, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_mean, rejected_mean, beta=cfg.beta)
            losses = nll + odds_loss
            extra = {"log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds}
        elif cfg.strategy == "simpo":
            pref, chosen_rewards, rejected_rewards = simpo_loss(
                chosen_mean, rejected_mean, beta=cfg.beta, gamma=cfg.simpo_gamma, label_smoothing=cfg.label_smoothing
            )
            losses = pref + float(cfg.cpo_alpha or 0.0) * nll
        else:
            pref, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
            losses = pref + float(cfg.cpo_alpha or 0.0) * nll
        losses = weighted(losses, batch)
        values = _pair_values(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        values["nll_loss"] = nll.detach()
        values.update({k: v.detach() for k, v in extra.items()})
        return self.with_router_aux(scored, losses, values, torch.ones_like(losses))


# ---------------------------------------------------------------------------------------------
# KTO


class KTOObjective(Objective):
    """KTO on unpaired examples (preference pairs are split in two: chosen desirable, rejected not).

    The reference point z0 is the KL of policy from reference on mismatched pairs (each example's
    prompt with another example's completion, fixed at load time; see `mismatched_partners`),
    estimated in `begin` over the optimizer step's whole global batch with no gradient, then used by
    every micro-batch of the step. Metric names are TRL's KTOTrainer's (`kl`, `rewards/chosen`,
    `logps/rejected`, ...; chosen = desirable, rejected = undesirable), plus `count/*`.
    """

    name = "kto"
    needs_reference = True
    stat_keys = (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "count/chosen",
        "count/rejected",
        "kl",
    )

    data_kind = "unpaired"

    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        cfg = self.cfg
        if offset == 0:  # the training source: its class balance (as `load` reports it)
            labels = data.scalars("label")
            desirable = int(labels.sum())
            undesirable = len(labels) - desirable
            if desirable and undesirable:
                advice = kto_balance_advice(desirable, undesirable, cfg.desirable_weight, cfg.undesirable_weight)
                if advice:
                    log.warning("%s: %s", data.name, advice)
        items = UnpairedItems(data, rows, offset, cfg.max_seq_length, cfg.max_prompt_length, cfg.seed)
        summary, truncated = items.summary()
        return items, summary, truncated

    def load(self, source: str, split: str) -> list[Any]:
        examples = load_unpaired_data(source, split, self.cfg.record_layout())
        desirable = sum(e.label for e in examples)
        undesirable = len(examples) - desirable
        if desirable and undesirable:
            advice = kto_balance_advice(desirable, undesirable, self.cfg.desirable_weight, self.cfg.undesirable_weight)
            if advice:
                log.warning("%s: %s", source, advice)
        return examples

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        items, stats = tokenize_unpaired(tokenizer, examples, self.cfg.max_seq_length, self.cfg.max_prompt_length, self.cfg.seed)
        desirable = sum(i.label for i in items)
        summary = (
            f"{len(items)} examples tokenized ({desirable} desirable, {len(items) - desirable} undesirable); truncated: "
            f"{stats.prompts_truncated} prompts (from the left), {stats.chosen_truncated} completions (from the right); "
            f"longest prompt {stats.longest_prompt} tokens, longest completion {stats.longest_completion} tokens"
        )
        return items, summary, stats.examples

    def collate(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> Batch:
        batch = collate_pairs(items, pad_id, share_prompt, slots=(0,))
        batch["label"] = torch.tensor([item.label for item in items], dtype=torch.bool)
        return batch

    @torch.no_grad()
    def begin(self, rt: Runtime, module: nn.Module, chunks: Sequence[Sequence[Any]], active: bool,
              training: bool = True) -> torch.Tensor:
        """z0 for the step: sum of log-ratios on this process's mismatched pairs, summed over
        processes, over the step's example count; clamped at 0."""
        acc = rt.accelerator
        total = torch.zeros(2, dtype=torch.float64)
        with eval_mode(module):
            for chunk, real in padded(chunks, rt.forwards):
                batch = rt.to_device(collate_pairs(chunk, rt.pad_id, rt.share_prompt, slots=(1,)))
                with acc.autocast():
                    policy = completion_logps(module, batch).sums.float()
                    ref = rt.reference.sequence_logps(batch).float()
                if active and real:
                    total += torch.tensor([float((policy - ref).sum()), float(len(chunk))], dtype=torch.float64)
        total = acc.reduce(total.to(acc.device), "sum").cpu()
        return kto_kl(total[:1].float(), torch.zeros(1), count=float(total[1]))

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        cfg = self.cfg
        scored = completion_logps(module, batch)
        sums = scored.sums
        with rt.accelerator.autocast():
            ref = rt.reference.sequence_logps(batch).float().detach()
        labels = batch["label"].bool()
        kl = context.to(sums.device)
        losses, rewards = kto_loss(
            sums, ref, labels, kl, beta=cfg.beta,
            desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight,
        )
        good, bad = labels.float(), (~labels).float()
        values = {
            "loss": losses.detach(),
            "rewards/chosen": rewards * good,
            "rewards/rejected": rewards * bad,
            "logps/chosen": sums.detach() * good,
            "logps/rejected": sums.detach() * bad,
            "count/chosen": good,
            "count/rejected": bad,
            "kl": kl.expand_as(losses),  # the step's one value, logged as its mean
        }
        return self.with_router_aux(scored, losses, values, torch.ones_like(losses))

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        n = max(1.0, totals["units"])
        nc, nr = totals["count/chosen"], totals["count/rejected"]
        out = {"loss": totals["loss"] / n}
        for side, count in (("chosen", nc), ("rejected", nr)):
            if count:
                out[f"rewards/{side}"] = totals[f"rewards/{side}"] / count
                out[f"logps/{side}"] = totals[f"logps/{side}"] / count
        if nc and nr:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["kl"] = totals["kl"] / n
        out["count/chosen"], out["count/rejected"] = nc, nr
        if self.router_aux:
            out["aux_loss"] = totals["aux_loss"] / n
        return out

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}", "kl": f"{means['kl']:.3f}"}


# ---------------------------------------------------------------------------------------------
# SFT


class SFTObjective(Objective):
    """Supervised fine-tuning: the negative log-likelihood of the trained tokens (completion or
    assistant tokens, or all of them), averaged over those tokens across the whole step, as TRL's
    SFTTrainer; `mean_token_accuracy` is the share of them that were the model's top prediction."""

    name = "sft"
    stat_keys = ("loss", "mean_token_accuracy")

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.packing = cfg.packing  # turned off for models whose rows cannot hold several sequences

    data_kind = "sft"

    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        cfg = self.cfg
        items = SequenceItems(data, rows, offset, cfg.max_seq_length, cfg.max_prompt_length, cfg.completion_only_loss, self.packing)
        summary, truncated, no_loss = items.summary()
        if no_loss:
            log.warning("%d examples have no trained token left after truncation; raise max_seq_length", no_loss)
        return items, summary, truncated

    def load(self, source: str, split: str) -> list[Any]:
        return load_sft_data(source, split, self.cfg.record_layout())

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        cfg = self.cfg
        rows, stats = tokenize_sft(
            tokenizer, examples, cfg.max_seq_length, cfg.max_prompt_length, cfg.completion_only_loss, self.packing
        )
        if stats.no_loss_tokens:
            log.warning("%d examples have no trained token left after truncation; raise max_seq_length", stats.no_loss_tokens)
        return rows, stats.summary(), stats.locations

    def units(self, item: Any) -> int:
        return item.loss_tokens

    def wrap(self, model: nn.Module) -> nn.Module:
        return CompletionLogprobs(model, token_accuracy=True)

    def collate(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> Batch:
        return collate_sequences(items, pad_id)

    def check_batches(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> tuple[Batch, Batch | None, torch.Tensor | None] | None:
        """Packed rows are checked against their sequences one a row; unpacked rows alone."""
        groups = getattr(items, "groups", None)
        if groups is not None:  # a table view: rank its rows without building them
            sizes, lengths = np.array([len(g) for g in groups]), item_lengths(items)
            sample = [items[int(j)] for j in np.lexsort((np.arange(len(groups)), -lengths, -sizes))[:2]]
        else:
            sample = sorted(items, key=lambda row: (-len(row.sequences), -row.num_tokens))[:2]
        if not sample:
            return None
        singles = [SequenceRow(k, [seq]) for row in sample for k, seq in enumerate(row.sequences)]
        group = torch.tensor([r for r, row in enumerate(sample) for _ in row.sequences], dtype=torch.long)
        packed = any(len(row.sequences) > 1 for row in sample)
        return collate_sequences(singles, pad_id), collate_sequences(sample, pad_id) if packed else None, group

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scored = completion_logps(module, batch)
        losses = -scored.sums  # summed over each row's trained tokens; the loop divides by the step's tokens
        values = {"loss": losses.detach(), "mean_token_accuracy": scored.hits}
        return self.with_router_aux(scored, losses, values, scored.counts)

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}", "acc": f"{means['mean_token_accuracy']:.3f}"}


# ---------------------------------------------------------------------------------------------
# Reward model


@dataclass
class TokenizedRewardPair:
    """A pair as the reward model reads it: the whole conversation of each side (see
    `rewards.reward_input_ids`), so training and scoring see the same tokens."""

    index: int
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool = False
    weight: float = 1.0  # the loss weight under `margin_weighting`

    @property
    def num_tokens(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


class RewardScores(nn.Module):
    """A sequence classifier's scalar score per row, pooled by the model itself at the last token
    that is not padding, exactly as when its saved folder scores completions (`rewards.py`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()


def collate_reward_pairs(pairs: Sequence[TokenizedRewardPair], pad_id: int) -> Batch:
    """2B right-padded rows: the B chosen conversations, then the B rejected ones."""
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[r, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r) for r in rows)),
        "pair_weight": torch.tensor([p.weight for p in pairs], dtype=torch.float32),
    }


class RewardObjective(Objective):
    """A Bradley-Terry reward model on preference pairs: a one-output sequence-classification head
    on the base model, trained so the chosen completion outscores the rejected one. Metrics as TRL's
    RewardTrainer (`accuracy`, `margin`, `mean_reward`), plus the mean scores per side."""

    name = "reward"
    model_kind = "reward"
    data_kind = None  # scores whole conversations: reads and tokenizes its pairs itself
    stat_keys = ("loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected")

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        from preftune.collect.rewards import reward_input_ids

        limit = self.cfg.max_seq_length
        items, truncated, longest, locations = [], 0, 0, []
        for i, example in enumerate(examples):
            chosen = reward_input_ids(tokenizer, example.prompt, example.chosen)
            rejected = reward_input_ids(tokenizer, example.prompt, example.rejected)
            longest = max(longest, len(chosen), len(rejected))
            cut = len(chosen) > limit or len(rejected) > limit
            if cut:
                # The score is read at the end, so the beginning goes.
                chosen, rejected = chosen[-limit:], rejected[-limit:]
                truncated += 1
                if len(locations) < 3:
                    locations.append(example.location)
            weight = margin_weight(example) if self.cfg.margin_weighting else 1.0
            items.append(TokenizedRewardPair(i, chosen, rejected, cut, weight))
        summary = f"{len(items)} pairs tokenized as conversations; truncated (from the left): {truncated}; longest {longest} tokens"
        return items, summary, locations

    def wrap(self, model: nn.Module) -> nn.Module:
        return RewardScores(model)

    def check_batches(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> None:
        return None  # the classifier's own forward scores whole sequences: no fast path

    def collate(self, items: Sequence[Any], pad_id: int, share_prompt: bool) -> Batch:
        return collate_reward_pairs(items, pad_id)

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scores = module(batch["input_ids"], batch["attention_mask"])
        half = scores.shape[0] // 2
        chosen, rejected = scores[:half], scores[half:]
        losses = weighted(bradley_terry_loss(chosen, rejected), batch)
        c, r = chosen.detach(), rejected.detach()
        return losses, {
            "loss": losses.detach(),
            "accuracy": (c > r).float(),
            "margin": c - r,
            "mean_reward": (c + r) / 2,
            "rewards/chosen": c,
            "rewards/rejected": r,
        }

    def progress(self, means: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{means['loss']:.4f}", "acc": f"{means['accuracy']:.2f}", "margin": f"{means['margin']:.3f}"}


def make_objective(cfg: TrainConfig) -> Objective:
    """The objective of `cfg.strategy`."""
    if cfg.strategy == "dpo":
        return DPOObjective(cfg)
    if cfg.strategy in ("orpo", "simpo", "cpo"):
        return ReferenceFreeObjective(cfg)
    if cfg.strategy == "kto":
        return KTOObjective(cfg)
    if cfg.strategy == "sft":
        return SFTObjective(cfg)
    if cfg.strategy == "reward":
        return RewardObjective(cfg)
    raise ValueError(cfg.strategy)


__all__ = [
    "DPOObjective",
    "KTOObjective",
    "Objective",
    "RewardObjective",
    "ReferenceFreeObjective",
    "Runtime",
    "SFTObjective",
    "make_objective",
]
