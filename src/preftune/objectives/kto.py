"""KTO (Ethayarajh et al. 2024, arXiv:2402.01306) on unpaired examples."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from preftune.batching import collate_pairs, tokenize_unpaired
from preftune.config import KTOLoss
from preftune.data import load_unpaired_data
from preftune.logprobs import completion_logps
from preftune.losses import kto_kl, kto_loss
from preftune.objectives.base import Batch, Objective, Runtime, padded
from preftune.prepared import PreparedData, UnpairedItems
from preftune.quality import kto_balance_advice
from preftune.reference import eval_mode

log = logging.getLogger("preftune")


class KTO(Objective):
    """Preference pairs are split in two (chosen desirable, rejected not).

    The reference point z0 is the KL of policy from reference on mismatched pairs (each example's
    prompt with another example's completion, fixed at load time; see `mismatched_partners`),
    estimated in `begin` over the optimizer step's whole global batch with no gradient, then used by
    every micro-batch of the step. Metric names are TRL's KTOTrainer's (`kl`, `rewards/chosen`,
    `logps/rejected`, ...; chosen = desirable, rejected = undesirable), plus `count/*`.
    """

    name = "kto"
    needs_reference = True
    unit = "examples"
    data_kind = "unpaired"
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

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.section: KTOLoss = settings.loss
        self.seed = settings.optim.seed  # the mismatched partners are drawn with it

    def _advise(self, name: str, desirable: int, undesirable: int) -> None:
        if desirable and undesirable:
            advice = kto_balance_advice(desirable, undesirable, self.section.desirable_weight, self.section.undesirable_weight)
            if advice:
                log.warning("%s: %s", name, advice)

    def items(self, data: PreparedData, rows: np.ndarray, offset: int) -> tuple[Sequence[Any], str, list[str]]:
        if offset == 0:  # the training source: its class balance (as `load` reports it)
            labels = data.scalars("label")
            desirable = int(labels.sum())
            self._advise(data.name, desirable, len(labels) - desirable)
        d = self.data
        items = UnpairedItems(data, rows, offset, d.max_seq_length, d.max_prompt_length, self.seed)
        summary, truncated = items.summary()
        return items, summary, truncated

    def load(self, source: Any, split: str) -> list[Any]:
        examples = load_unpaired_data(source, split, self.data.layout)
        desirable = sum(e.label for e in examples)
        self._advise(source, desirable, len(examples) - desirable)
        return examples

    def tokenize(self, tokenizer: Any, examples: Sequence[Any]) -> tuple[list[Any], str, list[str]]:
        items, stats = tokenize_unpaired(tokenizer, examples, self.data.max_seq_length, self.data.max_prompt_length, self.seed)
        desirable = sum(i.label for i in items)
        summary = (
            f"{len(items)} examples tokenized ({desirable} desirable, {len(items) - desirable} undesirable); truncated: "
            f"{stats.prompts_truncated} prompts (from the left), {stats.chosen_truncated} completions (from the right); "
            f"longest prompt {stats.longest_prompt} tokens, longest completion {stats.longest_completion} tokens"
        )
        return items, summary, stats.examples

    def collate(self, items: Sequence[Any], pad_id: int) -> Batch:
        batch = collate_pairs(items, pad_id, self.share_prompt, slots=(0,))
        batch["label"] = torch.tensor([item.label for item in items], dtype=torch.bool)
        return batch

    def loss(self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor,
             kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses, rewards) per example from summed log-probs and the step's z0: pure."""
        s = self.section
        return kto_loss(policy_logps, ref_logps, labels, kl, beta=s.beta,
                        desirable_weight=s.desirable_weight, undesirable_weight=s.undesirable_weight)

    @torch.no_grad()
    def begin(self, rt: Runtime, module: nn.Module, chunks: Sequence[Sequence[Any]], active: bool,
              training: bool = True) -> torch.Tensor:
        """z0 for the step: sum of log-ratios on this process's mismatched pairs, summed over
        processes, over the step's example count; clamped at 0."""
        acc = rt.accelerator
        total = torch.zeros(2, dtype=torch.float64)
        with eval_mode(module):
            for chunk, real in padded(chunks, rt.forwards):
                batch = rt.to_device(collate_pairs(chunk, rt.pad_id, self.share_prompt, slots=(1,)))
                with acc.autocast():
                    policy = completion_logps(module, batch).sums.float()
                    ref = rt.reference.sequence_logps(batch).float()
                if active and real:
                    total += torch.tensor([float((policy - ref).sum()), float(len(chunk))], dtype=torch.float64)
        total = acc.reduce(total.to(acc.device), "sum").cpu()
        return kto_kl(total[:1].float(), torch.zeros(1), count=float(total[1]))

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scored = completion_logps(module, batch)
        sums = scored.sums
        with rt.accelerator.autocast():
            ref = rt.reference.sequence_logps(batch).float().detach()
        labels = batch["label"].bool()
        kl = context.to(sums.device)
        losses, rewards = self.loss(sums, ref, labels, kl)
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
