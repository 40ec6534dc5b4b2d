"""Pairwise preference losses of the DPO family, as pure vectorised functions.

Every loss here maps four per-example sequence log-probabilities (policy and reference, for the
chosen and the rejected completion) to a per-example loss. The names and formulas are those of
TRL's `DPOTrainer` (`loss_type`), so a config written for TRL means the same thing here. Nothing
here holds state: the one loss that needs a running statistic (`bco_pair`) takes it as an
argument, and the trainer keeps it.

References (arXiv ids):
    DPO          Rafailov et al. 2023, 2305.18290
    cDPO         Mitchell 2023, "A note on DPO with noisy preferences" (conservative DPO)
    robust       Chowdhury et al. 2024, "Provably Robust DPO", 2403.00409
    hinge        Zhao et al. 2023, SLiC-HF, 2305.10425
    ipo          Azar et al. 2023, 2310.12036
    exo_pair     Ji et al. 2024, EXO, 2402.00856
    nca_pair     Chen et al. 2024, Noise Contrastive Alignment, 2402.05369
    bco_pair     Jung et al. 2024, Binary Classifier Optimization, 2404.04656
    sppo_hard    Wu et al. 2024, Self-Play Preference Optimization, 2405.00675
    aot          Melnyk et al. 2024, Alignment via Optimal Transport, 2406.05882
    apo_*        D'Oosterlinck et al. 2024, Anchored Preference Optimization, 2408.06266
    discopop     Lu et al. 2024, DiscoPOP, 2406.08414
    sigmoid_norm Meng et al. 2024, SimPO, 2405.14734 (length normalisation, kept with a reference)
    sft (RPO)    Pang et al. 2024, Iterative Reasoning Preference Optimization, 2404.19733
    f-DPO        Wang et al. 2023, "Beyond Reverse KL", 2309.16240

Losses of the other training strategies (one function each, same conventions: per-example values in,
per-example losses out; the trainer averages):
    KTO          Ethayarajh et al. 2024, Kahneman-Tversky Optimization, 2402.01306
    ORPO         Hong et al. 2024, Monolithic Preference Optimization without Reference Model, 2403.07691
    SimPO        Meng et al. 2024, Simple Preference Optimization with a Reference-Free Reward, 2405.14734
    CPO          Xu et al. 2024, Contrastive Preference Optimization, 2401.08417
    reward model Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT, 2203.02155 (Eq. 1)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.config import LOSS_TYPES, validate_loss_types
from preftune.errors import PreftuneError, suggest

__all__ = [
    "F_DIVERGENCE_TYPES",
    "LOSS_TYPES",
    "bradley_terry_loss",
    "cpo_loss",
    "kto_kl",
    "kto_loss",
    "log1mexp",
    "orpo_loss",
    "preference_loss",
    "simpo_loss",
    "validate_loss_types",
]

F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# EXO needs log(eps) and log(1 - eps): a zero label smoothing would be log(0). TRL substitutes the
# value the EXO paper recommends.
EXO_DEFAULT_EPSILON = 1e-3

# Largest x with exp(x) finite in float32, floored to 4 decimals (88.7228), as TRL's `cap_exp`.
_EXP_CAP = math.floor(math.log(torch.finfo(torch.float32).max) * 1e4) / 1e4


@dataclass
class _Batch:
    """The per-batch quantities the individual losses are written in terms of (all float32)."""

    policy_chosen_logps: Tensor  # summed over completion tokens
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None
    beta: float
    label_smoothing: float
    f_divergence_type: str
    f_alpha: float

    @property
    def chosen_logratios(self) -> Tensor:
        """log pi(y_w|x) - log pi_ref(y_w|x)."""
        return self.policy_chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected_logps - self.ref_rejected_logps

    def logits(self, normalise: bool = False) -> Tensor:
        """The DPO "logits" h = f'(chosen ratio) - f'(rejected ratio), per f-DPO (Wang et al. 2023).

        With `normalise`, the log-ratios are first averaged over completion tokens (IPO and
        `sigmoid_norm`), which is what TRL gets by averaging the log-probs before taking ratios.
        """
        c, r = self.chosen_logratios, self.rejected_logratios
        if normalise and self.chosen_lengths is not None and self.rejected_lengths is not None:
            c, r = c / self.chosen_lengths, r / self.rejected_lengths
        kind = self.f_divergence_type
        if kind == "reverse_kl":  # f'(u) = log u + 1: the standard DPO margin
            return c - r
        if kind == "js_divergence":  # f'(u) = log(2u / (1 + u)); log 2 cancels in the difference
            return (c - r) - (F.softplus(c) - F.softplus(r))
        # alpha-divergence: f'(u) = (1 - u^-a) / a, so h = (u_l^-a - u_w^-a) / a. Forward KL
        # (f(u) = -log u, f'(u) = -1/u) gives the same h as a = 1. As TRL's `cap_exp`, the exponent is
        # capped so a very negative log-ratio gives a huge finite value, not inf; lowered by log(a)
        # for a < 1 so that dividing by a cannot overflow either.
        a = 1.0 if kind == "forward_kl" else self.f_alpha
        cap = _EXP_CAP + min(0.0, math.log(a))
        return (torch.exp(torch.clamp(-a * r, max=cap)) - torch.exp(torch.clamp(-a * c, max=cap))) / a


def _smoothed_sigmoid(x: Tensor, eps: float) -> Tensor:
    """-(1-eps) log s(x) - eps log s(-x): DPO's loss against labels flipped with probability eps."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _one_loss(name: str, b: _Batch, discopop_tau: float, bco_delta: Tensor) -> Tensor:
    """The per-example loss of one `loss_type` (formulas as in TRL's `DPOTrainer`)."""
    beta, eps = b.beta, b.label_smoothing
    c, r = b.chosen_logratios, b.rejected_logratios

    if name == "sigmoid":
        # DPO Eq. 7; with eps > 0 the conservative (cDPO) variant of the original DPO code.
        return _smoothed_sigmoid(beta * b.logits(), eps)
    if name == "robust":
        # rDPO (Chowdhury et al.): an unbiased estimate of the clean-label loss under flip rate eps.
        x = beta * b.logits()
        return (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    if name == "hinge":
        # SLiC's calibration hinge on the margin, with beta as 1/delta (the required margin).
        return torch.relu(1.0 - beta * b.logits())
    if name == "ipo":
        # IPO Eq. 17, beta playing the paper's tau; regresses the margin onto 1/(2 tau).
        return (b.logits(normalise=True) - 1.0 / (2.0 * beta)) ** 2
    if name == "exo_pair":
        # EXO Eq. 16: KL(p_theta || p_label) over {chosen, rejected} with label dist. (1-eps, eps).
        e = eps if eps > 0 else EXO_DEFAULT_EPSILON
        x = beta * b.logits()
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-e)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(e)
        )
    if name == "nca_pair":
        cr, rr = beta * c, beta * r
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if name == "bco_pair":
        # BCO with the running mean of the rewards as the baseline delta (kept by the caller).
        return -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
    if name == "sppo_hard":
        # SPPO Eq. 4.7 with hard probabilities: P = 1 for the winner, 0 for the loser.
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if name == "aot":
        # AOT (paired): the sorted policy margins must dominate the sorted reference margins across the
        # batch (a 1-D optimal-transport penalty), so per-example values are by rank, not input position.
        policy_margins = torch.sort(b.policy_chosen_logps - b.policy_rejected_logps, dim=0).values
        ref_margins = torch.sort(b.ref_chosen_logps - b.ref_rejected_logps, dim=0).values
        return _smoothed_sigmoid(beta * (policy_margins - ref_margins), eps)
    if name == "aot_unpaired":
        # AOT (unpaired): the sorted chosen log-ratios must dominate the sorted rejected ones.
        delta = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if name == "apo_zero":
        # APO Eq. 7: chosen better than the model's own outputs; push chosen up and rejected down.
        return (1.0 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    if name == "apo_down":
        # APO Eq. 8: chosen worse than the model's own outputs; push both down, rejected more.
        return torch.sigmoid(beta * c) + (1.0 - torch.sigmoid(beta * (c - r)))
    if name == "discopop":
        # DiscoPOP Eq. 5 (log-ratio modulated loss): mix the logistic and exponential losses with
        # weight sigmoid(x / tau). The exponential term is formed as exp(-x + log s(x / tau)), equal to
        # exp(-x) * s(x / tau) but finite where exp(-x) alone would overflow and meet a zero weight.
        x = beta * (c - r)
        mod = torch.sigmoid(x / discopop_tau)
        return -F.logsigmoid(x) * (1.0 - mod) + torch.exp(-x + F.logsigmoid(x / discopop_tau))
    if name == "sigmoid_norm":
        # DPO on per-token log-ratios: SimPO's length normalisation, keeping the reference model.
        return -F.logsigmoid(beta * b.logits(normalise=True))
    if name == "sft":
        # RPO's NLL term: per-token mean NLL of the chosen completion when lengths are known.
        nll = -b.policy_chosen_logps
        return nll / b.chosen_lengths if b.chosen_lengths is not None else nll
    raise PreftuneError(f"unknown 'loss_type' {name!r}{suggest(name, LOSS_TYPES)}; valid: {', '.join(LOSS_TYPES)}")


def _as_batch_vector(t: Tensor, name: str, shape: torch.Size | None) -> Tensor:
    if not isinstance(t, Tensor):
        raise PreftuneError(f"preference_loss: '{name}' must be a tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise PreftuneError(f"preference_loss: '{name}' must have shape (batch,), got {tuple(t.shape)}")
    if shape is not None and t.shape != shape:
        raise PreftuneError(
            f"preference_loss: '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)} like 'policy_chosen_logps'"
        )
    return t.float()


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    loss_weights: Sequence[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha: float = 0.5,
    bco_delta: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example preference losses and implicit rewards for a batch of pairs.

    Inputs are the summed completion log-probs, shape `(batch,)`. A list of `loss_type`s gives the
    `loss_weights`-weighted sum of their per-example losses (TRL's loss mixing; RPO is
    `["sigmoid", "sft"]` with weights `[1, alpha]`). `chosen_lengths`/`rejected_lengths` (completion
    token counts) length-normalise `ipo`, `sigmoid_norm` and `sft`. `f_divergence_type` reshapes the
    margin of the margin-based losses (sigmoid, robust, hinge, ipo, exo_pair, sigmoid_norm) per
    f-DPO. `bco_delta` is `bco_pair`'s baseline, the running mean reward the caller keeps.

    Returns float32 `(losses, chosen_rewards, rejected_rewards)`, each `(batch,)`, with rewards
    `beta * (policy_logps - ref_logps)` of the summed log-probs (detached), whatever the loss.

    Example::

        import torch
        losses, chosen, rejected = preftune.preference_loss(
            torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.1
        )
        # losses = -log sigmoid(0.1 * ((-10 + 11) - (-12 + 11))) = [0.598]; chosen = [0.1], rejected = [-0.1]
    """
    types, weights = validate_loss_types(loss_type, loss_weights)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise PreftuneError(
            f"unknown 'f_divergence_type' {f_divergence_type!r}{suggest(f_divergence_type, F_DIVERGENCE_TYPES)}; "
            f"valid: {', '.join(F_DIVERGENCE_TYPES)}"
        )
    if not (math.isfinite(beta) and beta > 0):
        raise PreftuneError(f"'beta' must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise PreftuneError(f"'label_smoothing' must be in [0, 0.5), got {label_smoothing}")
    if f_divergence_type == "alpha_divergence" and not (math.isfinite(f_alpha) and f_alpha > 0):
        raise PreftuneError(f"'f_alpha' must be > 0, got {f_alpha}")
    if "discopop" in types and not (math.isfinite(discopop_tau) and discopop_tau > 0):
        raise PreftuneError(f"'discopop_tau' must be > 0, got {discopop_tau}")
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise PreftuneError("preference_loss: give both 'chosen_lengths' and 'rejected_lengths', or neither")

    pc = _as_batch_vector(policy_chosen_logps, "policy_chosen_logps", None)
    shape = policy_chosen_logps.shape
    # references may come from a cache on another device; the policy's device is where gradients live
    pr = _as_batch_vector(policy_rejected_logps, "policy_rejected_logps", shape).to(pc.device)
    rc = _as_batch_vector(ref_chosen_logps, "ref_chosen_logps", shape).to(pc.device)
    rr = _as_batch_vector(ref_rejected_logps, "ref_rejected_logps", shape).to(pc.device)
    cl = rl = None
    if chosen_lengths is not None and rejected_lengths is not None:
        # clamp: an empty completion must not turn the loss into inf/NaN (TRL clamps the same way)
        cl = _as_batch_vector(chosen_lengths, "chosen_lengths", shape).to(pc.device).clamp(min=1.0)
        rl = _as_batch_vector(rejected_lengths, "rejected_lengths", shape).to(pc.device).clamp(min=1.0)

    batch = _Batch(
        policy_chosen_logps=pc,
        policy_rejected_logps=pr,
        ref_chosen_logps=rc,
        ref_rejected_logps=rr,
        chosen_lengths=cl,
        rejected_lengths=rl,
        beta=float(beta),
        label_smoothing=float(label_smoothing),
        f_divergence_type=f_divergence_type,
        f_alpha=float(f_alpha),
    )
    delta = torch.as_tensor(bco_delta, dtype=torch.float32, device=pc.device).detach()

    losses = torch.zeros_like(pc)
    for name, weight in zip(types, weights):
        losses = losses + weight * _one_loss(name, batch, float(discopop_tau), delta)

    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    return losses, chosen_rewards, rejected_rewards



# ---------------------------------------------------------------------------------------------
# Losses of the other strategies


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: switch at -ln 2)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: Tensor, rejected_mean_logps: Tensor, *, beta: float = 0.1
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, Eqs. 4-7), per example, to add to the chosen NLL.

    Inputs are per-token mean log-probs (the paper's P(y|x) is the length-normalised likelihood), so
    odds(y|x) = P / (1 - P) and log odds = logp - log(1 - exp(logp)). The term is
    `-beta * log sigmoid(log odds(y_w) - log odds(y_l))`, `beta` being the paper's lambda (TRL's
    ORPOConfig names it `beta` too). Returns (losses, chosen_rewards, rejected_rewards, log_odds):
    rewards are `beta * mean logp` as in TRL, and `log_odds` is the log odds ratio (TRL logs its mean
    as `log_odds_chosen`, and that of its log sigmoid as `log_odds_ratio`).
    """
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return -beta * F.logsigmoid(log_odds), (beta * c).detach(), (beta * r).detach(), log_odds.detach()


def simpo_loss(
    chosen_mean_logps: Tensor,
    rejected_mean_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, Eq. 6): -log sigmoid(beta * (mean logp_w - mean logp_l) - gamma).

    The implicit reward is the length-normalised log-likelihood scaled by beta, and gamma is the
    target reward margin; no reference model. With `label_smoothing` eps the conservative form
    (labels flipped with probability eps), as TRL's CPOTrainer. Returns (losses, chosen_rewards,
    rejected_rewards) with rewards `beta * mean logp`.
    """
    c, r = chosen_mean_logps.float(), rejected_mean_logps.float()
    x = beta * (c - r) - gamma
    return _smoothed_sigmoid(x, label_smoothing), (beta * c).detach(), (beta * r).detach()


def cpo_loss(
    chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """CPO's preference term (Xu et al. 2024, Eq. 3): DPO with the reference dropped,
    -log sigmoid(beta * (logp_w - logp_l)) on summed log-probs. The paper adds the NLL of the chosen
    completion (the caller does, weighted by `cpo_alpha`). Rewards are `beta * logp`."""
    c, r = chosen_logps.float(), rejected_logps.float()
    return _smoothed_sigmoid(beta * (c - r), label_smoothing), (beta * c).detach(), (beta * r).detach()


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor, count: Tensor | float | None = None) -> Tensor:
    """KTO's reference point z0 (Ethayarajh et al. 2024, Eq. 6 and Sec. 4.1): the KL of policy from
    reference estimated on mismatched pairs (x_i, y_j), i != j, as max(0, mean log-ratio), detached.

    `count` divides the summed log-ratios instead of their number, for a mean over a batch that other
    processes or micro-batches share (pass the sum of everyone's terms and the total count).
    """
    diff = (policy_kl_logps.float() - ref_kl_logps.float()).detach()
    n = diff.numel() if count is None else count
    return (diff.sum() / max(float(n), 1.0)).clamp(min=0.0)


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, Eq. 7), per example: with the implicit reward
    r = logp - ref_logp and the reference point z0 (`kl`),

        desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))

    `desirable` is a boolean tensor (the label). Returns (losses, rewards) with rewards `beta * r`.
    """
    ratio = policy_logps.float() - ref_logps.float()
    z0 = torch.as_tensor(kl, dtype=torch.float32, device=ratio.device).detach()
    good = 1.0 - torch.sigmoid(beta * (ratio - z0))
    bad = 1.0 - torch.sigmoid(beta * (z0 - ratio))
    desirable = desirable.to(device=ratio.device, dtype=torch.bool)
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, (beta * ratio).detach()


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | None = None) -> Tensor:
    """A reward model's pairwise loss: -log sigmoid(r(x, y_w) - r(x, y_l) [- margin]), the negative
    log-likelihood of the preference under the Bradley-Terry model (InstructGPT Eq. 1; TRL's
    RewardTrainer, whose optional per-pair `margin` is the Llama 2 variant)."""
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin.float().to(diff.device)
    return -F.logsigmoid(diff)
