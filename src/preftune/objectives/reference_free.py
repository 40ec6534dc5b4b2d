"""ORPO, SimPO and CPO: pairwise losses of the policy's own log-probs; no reference is loaded.

The NLL term (ORPO's L_SFT, CPO's and SimPO's `cpo_alpha` term) is each pair's mean per-token
negative log-likelihood of the chosen completion, then averaged over pairs like the rest of the
loss (TRL averages over the batch's tokens instead; per pair keeps the loss independent of how a
step is split into micro-batches). `logps/*` are summed log-probs, as for DPO.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from preftune.logprobs import completion_logps
from preftune.losses import cpo_loss, orpo_loss, simpo_loss
from preftune.objectives.base import PAIR_STATS, Batch, PairwiseObjective, Runtime, pair_values, weighted

Losses = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class ReferenceFree(PairwiseObjective):
    """The forward the three share: the policy's summed and per-token mean log-probs, into `loss`."""

    stat_keys = PAIR_STATS + ("nll_loss",)

    def loss(self, chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths: torch.Tensor,
             rejected_lengths: torch.Tensor) -> Losses:
        """(losses, chosen rewards, rejected rewards, extra per-pair values) from summed log-probs
        and completion lengths: pure."""
        raise NotImplementedError

    def forward(self, rt: Runtime, module: nn.Module, batch: Batch, context: Any, training: bool):
        scored = completion_logps(module, batch)
        sums, lengths = scored.sums, scored.counts
        half = sums.shape[0] // 2
        chosen, rejected = sums[:half], sums[half:]
        losses, chosen_rewards, rejected_rewards, extra = self.loss(chosen, rejected, lengths[:half], lengths[half:])
        losses = weighted(losses, batch)
        values = pair_values(losses, chosen_rewards, rejected_rewards, chosen, rejected)
        values.update({k: v.detach() for k, v in extra.items()})
        return self.with_router_aux(scored, losses, values, torch.ones_like(losses))


def _means(chosen: torch.Tensor, rejected: torch.Tensor, chosen_lengths: torch.Tensor,
           rejected_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)


class ORPO(ReferenceFree):
    """Hong et al. 2024 (arXiv:2403.07691): the chosen NLL plus beta x -log sigmoid(log odds ratio)."""

    name = "orpo"
    stat_keys = PAIR_STATS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def loss(self, chosen, rejected, chosen_lengths, rejected_lengths) -> Losses:
        chosen_mean, rejected_mean = _means(chosen, rejected, chosen_lengths, rejected_lengths)
        nll = -chosen_mean
        odds_loss, chosen_rewards, rejected_rewards, log_odds = orpo_loss(chosen_mean, rejected_mean, beta=self.section.beta)
        extra = {"nll_loss": nll, "log_odds_ratio": F.logsigmoid(log_odds), "log_odds_chosen": log_odds}
        return nll + odds_loss, chosen_rewards, rejected_rewards, extra


class SimPO(ReferenceFree):
    """Meng et al. 2024 (arXiv:2405.14734): length-normalised rewards and a target margin, plus
    `cpo_alpha` x the chosen NLL (0 by default)."""

    name = "simpo"

    def loss(self, chosen, rejected, chosen_lengths, rejected_lengths) -> Losses:
        s = self.section
        chosen_mean, rejected_mean = _means(chosen, rejected, chosen_lengths, rejected_lengths)
        nll = -chosen_mean
        pref, chosen_rewards, rejected_rewards = simpo_loss(
            chosen_mean, rejected_mean, beta=s.beta, gamma=s.simpo_gamma, label_smoothing=s.label_smoothing
        )
        return pref + s.cpo_alpha * nll, chosen_rewards, rejected_rewards, {"nll_loss": nll}


class CPO(ReferenceFree):
    """Xu et al. 2024 (arXiv:2401.08417): DPO's sigmoid loss on the policy's summed log-probs, plus
    `cpo_alpha` x the chosen NLL (1 by default)."""

    name = "cpo"

    def loss(self, chosen, rejected, chosen_lengths, rejected_lengths) -> Losses:
        s = self.section
        nll = -_means(chosen, rejected, chosen_lengths, rejected_lengths)[0]
        pref, chosen_rewards, rejected_rewards = cpo_loss(chosen, rejected, beta=s.beta, label_smoothing=s.label_smoothing)
        return pref + s.cpo_alpha * nll, chosen_rewards, rejected_rewards, {"nll_loss": nll}
