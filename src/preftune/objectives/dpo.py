"""DPO and every `loss_type` of its family (`losses.preference_loss`), against a reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from preftune.batching import collate_pairs
from preftune.config import DPOLoss
from preftune.errors import PreftuneError
from preftune.logprobs import CompletionLogprobs, completion_logps
from preftune.losses import preference_loss
from preftune.objectives.base import Batch, PairwiseObjective, Runtime, padded, pair_values, weighted
from preftune.reference import eval_mode


class DPO(PairwiseObjective):
    """Rafailov et al. 2023 (arXiv:2305.18290) and the losses TRL's DPOTrainer names."""

    name = "dpo"
    needs_reference = True

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.section: DPOLoss = settings.loss
        self.bco_count = 0  # running mean of rewards for `bco_pair`, as TRL keeps it
        self.bco_mean = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"bco_count": self.bco_count, "bco_mean": self.bco_mean}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bco_count = int(state.get("bco_count", 0))
        self.bco_mean = float(state.get("bco_mean", 0.0))

    def wrap(self, model: nn.Module, fast_head: bool | None = None, router_aux: Any = None) -> nn.Module:
        return CompletionLogprobs(model, wpo=self.section.use_weighting, fast_head=fast_head, router_aux=router_aux)

    def check_step(self, global_batch: int, micro_batch: int) -> None:
        sorting = [t for t in self.section.loss_type if t in ("aot", "aot_unpaired")]
        if sorting and global_batch != micro_batch:
            # AOT pairs the k-th smallest chosen log-ratio with the k-th smallest rejected one across
            # the batch: split into micro-batches, a step would sort each part alone.
            raise PreftuneError(
                f"loss_type {sorting[0]} sorts log-ratios across the whole batch, so a step split into micro-batches "
                "or processes would not be the same update: use gradient_accumulation_steps: 1 on one process, "
                "or another loss_type"
            )

    def loss(
        self,
        policy_chosen: torch.Tensor,
        policy_rejected: torch.Tensor,
        ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor,
        chosen_lengths: torch.Tensor | None = None,
        rejected_lengths: torch.Tensor | None = None,
        bco_delta: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(losses, chosen rewards, rejected rewards) of summed log-probs, per pair: pure."""
        s = self.section
        return preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected,
            loss_type=list(s.loss_type), loss_weights=list(s.loss_weights), beta=s.beta, label_smoothing=s.label_smoothing,
            chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, discopop_tau=s.discopop_tau,
            f_divergence_type=s.f_divergence_type, f_alpha=s.f_alpha, bco_delta=bco_delta,
        )

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scored = completion_logps(module, batch)
        sums, lengths = scored.sums, scored.counts
        half = sums.shape[0] // 2
        policy_chosen, policy_rejected = sums[:half], sums[half:]
        with rt.accelerator.autocast():
            ref_chosen, ref_rejected = rt.reference.logps(batch)
        ref_chosen, ref_rejected = ref_chosen.float().detach(), ref_rejected.float().detach()
        bco_delta = context if context is not None else self.bco_mean
        losses, chosen_rewards, rejected_rewards = self.loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, lengths[:half], lengths[half:], bco_delta
        )
        if scored.wpo is not None:
            # WPO (Zhou et al. 2024, arXiv:2406.11827, eq. 2, as TRL's `use_weighting`): each pair's
            # loss times w(chosen) * w(rejected), w = exp(mean over tokens of log p(token) - log sum_v
            # p_v^2), the policy's probability of the completion relative to its own sampling; no gradient.
            weights = torch.exp(scored.wpo / lengths.clamp_min(1))
            losses = losses * weights[:half] * weights[half:]
        losses = weighted(losses, batch)
        values = pair_values(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
        return self.with_router_aux(scored, losses, values, torch.ones_like(losses))

    @torch.no_grad()
    def begin(self, rt: Runtime, module: nn.Module, chunks: Sequence[Sequence[Any]], active: bool,
              training: bool = True) -> float | None:
        """`bco_pair`'s baseline delta for the step: TRL's running mean of all rewards seen, the
        current batch included. The batch is the optimizer step's whole global batch, scored here
        without gradient and summed over processes in one collective, so the mean (and the loss)
        does not depend on how the step is split into micro-batches and processes. Evaluation
        reads the mean without updating it."""
        if "bco_pair" not in self.section.loss_type:
            return None
        if not training:
            return self.bco_mean
        acc = rt.accelerator
        total = torch.zeros(2, dtype=torch.float64)
        with eval_mode(module):
            for chunk, real in padded(chunks, rt.forwards):
                batch = rt.to_device(collate_pairs(chunk, rt.pad_id, self.share_prompt))
                with acc.autocast():
                    policy = completion_logps(module, batch).sums.float()
                    ref = rt.reference.sequence_logps(batch).float()
                if active and real:
                    rewards = self.section.beta * (policy - ref)
                    total += torch.tensor([float(rewards.sum()), float(rewards.numel())], dtype=torch.float64)
        total = acc.reduce(total.to(acc.device), "sum").cpu()
        n = float(total[1])
        if n:
            count = self.bco_count + n
            self.bco_mean += (float(total[0]) / n - self.bco_mean) * n / count
            self.bco_count = int(count)
        return self.bco_mean
