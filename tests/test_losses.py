"""Preference losses against values worked out by hand with `math`, one loss type at a time.

One small batch of three pairs is used throughout. Its summed log-probs give

    chosen log-ratios   c = pc - rc = [ 1, -1,  2]
    rejected log-ratios r = pr - rr = [-1,  2, -3]
    DPO margins         m = c - r   = [ 2, -3,  5]

so every expectation below is a short formula in c, r and m.
"""

from __future__ import annotations

import math

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.losses import F_DIVERGENCE_TYPES, LOSS_TYPES, preference_loss, validate_loss_types

PC = [-10.0, -20.0, -5.0]
PR = [-12.0, -18.0, -9.0]
RC = [-11.0, -19.0, -7.0]
RR = [-11.0, -20.0, -6.0]
C = [1.0, -1.0, 2.0]
R = [-1.0, 2.0, -3.0]
M = [2.0, -3.0, 5.0]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > -30 else x - math.log1p(math.exp(x))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def run(**kwargs):
    return preference_loss(t(PC), t(PR), t(RC), t(RR), **kwargs)


def approx(values: list[float]):
    return pytest.approx(values, rel=1e-5, abs=1e-6)


# -- sigmoid / cDPO / robust -------------------------------------------------------------------


def test_sigmoid_all_zero_is_ln2():
    z = torch.zeros(3)
    losses, chosen, rejected = preference_loss(z, z, z, z)
    assert losses.tolist() == approx([math.log(2.0)] * 3)
    assert math.log(2.0) == pytest.approx(0.693147, abs=1e-6)
    assert chosen.tolist() == [0.0, 0.0, 0.0] and rejected.tolist() == [0.0, 0.0, 0.0]


def test_sigmoid_values_and_rewards():
    losses, chosen, rejected = run(loss_type="sigmoid", beta=0.1)
    assert losses.tolist() == approx([-logsig(0.1 * m) for m in M])
    assert chosen.tolist() == approx([0.1, -0.1, 0.2])
    assert rejected.tolist() == approx([-0.1, 0.2, -0.3])
    for out in (losses, chosen, rejected):
        assert out.shape == (3,) and out.dtype == torch.float32
    assert not chosen.requires_grad and not rejected.requires_grad


def test_cdpo_label_smoothing():
    eps = 0.1
    losses, _, _ = run(loss_type="sigmoid", beta=0.5, label_smoothing=eps)
    # m = [2, -3, 5], beta 0.5: x = [1, -1.5, 2.5]
    expected = [-(1 - eps) * logsig(x) - eps * logsig(-x) for x in (1.0, -1.5, 2.5)]
    assert losses.tolist() == approx(expected)
    # smoothing raises the loss of a pair the model already ranks right
    plain, _, _ = run(loss_type="sigmoid", beta=0.5)
    assert losses[2] > plain[2]


def test_robust():
    eps = 0.2
    losses, _, _ = run(loss_type="robust", beta=0.1, label_smoothing=eps)
    expected = [(-(1 - eps) * logsig(0.1 * m) + eps * logsig(-0.1 * m)) / (1 - 2 * eps) for m in M]
    assert losses.tolist() == approx(expected)
    # without noise it is plain DPO
    clean, _, _ = run(loss_type="robust", beta=0.1)
    assert clean.tolist() == approx([-logsig(0.1 * m) for m in M])


# -- hinge / ipo ----------------------------------------------------------------------------------


def test_hinge():
    losses, _, _ = run(loss_type="hinge", beta=0.25)
    # beta * m = [0.5, -0.75, 1.25] -> relu(1 - .) = [0.5, 1.75, 0]
    assert losses.tolist() == approx([0.5, 1.75, 0.0])


def test_ipo_without_lengths():
    losses, _, _ = run(loss_type="ipo", beta=0.1)
    # (m - 1/(2*0.1))^2 = (m - 5)^2
    assert losses.tolist() == approx([9.0, 64.0, 0.0])


def test_ipo_with_lengths_normalises_log_ratios():
    losses, chosen, rejected = run(loss_type="ipo", beta=0.5, chosen_lengths=t([2, 4, 1]), rejected_lengths=t([4, 1, 5]))
    # c/lc = [0.5, -0.25, 2], r/lr = [-0.25, 2, -0.6] -> margins [0.75, -2.25, 2.6]; target 1/(2*0.5) = 1
    assert losses.tolist() == approx([0.0625, 10.5625, 2.56])
    # rewards stay those of the summed log-probs
    assert chosen.tolist() == approx([0.5, -0.5, 1.0])
    assert rejected.tolist() == approx([-0.5, 1.0, -1.5])


def test_lengths_accept_integer_tensors_and_clamp_zero():
    losses, _, _ = run(
        loss_type="ipo", beta=0.5, chosen_lengths=torch.tensor([2, 4, 0]), rejected_lengths=torch.tensor([4, 1, 5])
    )
    # a zero length counts as 1 (no division by zero): same as the test above
    assert losses.tolist() == approx([0.0625, 10.5625, 2.56])


# -- exo / nca / bco / sppo -------------------------------------------------------------------


def _exo(x: float, eps: float) -> float:
    return sig(x) * (logsig(x) - math.log(1 - eps)) + sig(-x) * (logsig(-x) - math.log(eps))


def test_exo_pair_default_epsilon():
    losses, _, _ = run(loss_type="exo_pair", beta=0.1)
    assert losses.tolist() == approx([_exo(0.1 * m, 1e-3) for m in M])
    # all-zero margins: 0.5*(ln 0.5 - ln 0.999) + 0.5*(ln 0.5 - ln 0.001)
    z = torch.zeros(1)
    zero, _, _ = preference_loss(z, z, z, z, loss_type="exo_pair")
    assert zero.item() == pytest.approx(0.5 * (math.log(0.5) - math.log(0.999)) + 0.5 * (math.log(0.5) - math.log(1e-3)))


def test_exo_pair_with_label_smoothing():
    losses, _, _ = run(loss_type="exo_pair", beta=0.5, label_smoothing=0.05)
    assert losses.tolist() == approx([_exo(0.5 * m, 0.05) for m in M])


def test_nca_pair():
    losses, _, _ = run(loss_type="nca_pair", beta=0.5)
    expected = [-logsig(0.5 * c) - 0.5 * logsig(-0.5 * c) - 0.5 * logsig(-0.5 * r) for c, r in zip(C, R)]
    assert losses.tolist() == approx(expected)


def test_bco_pair_with_delta():
    delta = 0.05
    losses, _, _ = run(loss_type="bco_pair", beta=0.1, bco_delta=delta)
    expected = [-logsig(0.1 * c - delta) - logsig(-(0.1 * r - delta)) for c, r in zip(C, R)]
    assert losses.tolist() == approx(expected)
    as_tensor, _, _ = run(loss_type="bco_pair", beta=0.1, bco_delta=torch.tensor(delta))
    assert as_tensor.tolist() == approx(expected)
    no_delta, _, _ = run(loss_type="bco_pair", beta=0.1)
    assert no_delta.tolist() == approx([-logsig(0.1 * c) - logsig(-0.1 * r) for c, r in zip(C, R)])


def test_sppo_hard():
    losses, _, _ = run(loss_type="sppo_hard", beta=0.5)
    # (c - 1)^2 + (r + 1)^2 with 0.5/beta = 1
    assert losses.tolist() == approx([0.0, 13.0, 5.0])


# -- aot ------------------------------------------------------------------------------------------


def test_aot_sorts_policy_and_reference_margins():
    losses, _, _ = run(loss_type="aot", beta=0.5)
    # policy margins pc - pr = [2, -2, 4] -> sorted [-2, 2, 4]; reference rc - rr = [0, 1, -1] -> [-1, 0, 1]
    deltas = [-1.0, 2.0, 3.0]
    assert losses.tolist() == approx([-logsig(0.5 * d) for d in deltas])
    unsorted = [-logsig(0.5 * m) for m in M]
    assert losses.tolist() != approx(unsorted)


def test_aot_with_label_smoothing():
    eps = 0.1
    losses, _, _ = run(loss_type="aot", beta=0.5, label_smoothing=eps)
    deltas = [-1.0, 2.0, 3.0]
    assert losses.tolist() == approx([-(1 - eps) * logsig(0.5 * d) - eps * logsig(-0.5 * d) for d in deltas])


def test_aot_unpaired_sorts_chosen_and_rejected_ratios():
    losses, _, _ = run(loss_type="aot_unpaired", beta=0.5)
    # sorted c = [-1, 1, 2], sorted r = [-3, -1, 2] -> deltas [2, 2, 0]
    assert losses.tolist() == approx([-logsig(1.0), -logsig(1.0), math.log(2.0)])
    assert losses.tolist() != approx([-logsig(0.5 * m) for m in M])


# -- apo / discopop / sigmoid_norm / sft -----------------------------------------------------


def test_apo_zero():
    losses, _, _ = run(loss_type="apo_zero", beta=0.5)
    assert losses.tolist() == approx([(1 - sig(0.5 * c)) + sig(0.5 * r) for c, r in zip(C, R)])


def test_apo_down():
    losses, _, _ = run(loss_type="apo_down", beta=0.5)
    assert losses.tolist() == approx([sig(0.5 * c) + 1 - sig(0.5 * (c - r)) for c, r in zip(C, R)])


def _discopop(x: float, tau: float) -> float:
    mod = sig(x / tau)
    return -logsig(x) * (1 - mod) + math.exp(-x) * mod


def test_discopop():
    losses, _, _ = run(loss_type="discopop", beta=0.1)
    assert losses.tolist() == approx([_discopop(0.1 * m, 0.05) for m in M])
    other_tau, _, _ = run(loss_type="discopop", beta=0.1, discopop_tau=1.0)
    assert other_tau.tolist() == approx([_discopop(0.1 * m, 1.0) for m in M])
    # zero margin: 0.5 * ln 2 + 0.5 * 1
    z = torch.zeros(1)
    zero, _, _ = preference_loss(z, z, z, z, loss_type="discopop")
    assert zero.item() == pytest.approx(0.5 * math.log(2.0) + 0.5)


def test_discopop_stays_finite_for_a_very_wrong_margin():
    # beta * margin = -200: exp(200) overflows float32, but its mixing weight is sigmoid(-4000) = 0
    losses, _, _ = preference_loss(t([-2000.0]), t([0.0]), t([0.0]), t([0.0]), loss_type="discopop", beta=0.1)
    assert losses.item() == pytest.approx(200.0)


def test_sigmoid_norm_with_lengths():
    losses, _, _ = run(loss_type="sigmoid_norm", beta=0.5, chosen_lengths=t([2, 4, 1]), rejected_lengths=t([4, 1, 5]))
    # length-normalised margins [0.75, -2.25, 2.6]
    assert losses.tolist() == approx([-logsig(0.5 * x) for x in (0.75, -2.25, 2.6)])
    without, _, _ = run(loss_type="sigmoid_norm", beta=0.5)
    assert without.tolist() == approx([-logsig(0.5 * m) for m in M])


def test_sft():
    losses, chosen, _ = run(loss_type="sft", chosen_lengths=t([4, 5, 2]), rejected_lengths=t([1, 1, 1]))
    # -pc / length = [10/4, 20/5, 5/2]
    assert losses.tolist() == approx([2.5, 4.0, 2.5])
    assert chosen.tolist() == approx([0.1, -0.1, 0.2])
    summed, _, _ = run(loss_type="sft")
    assert summed.tolist() == approx([10.0, 20.0, 5.0])


def test_mix_sigmoid_and_sft_is_rpo():
    losses, chosen, rejected = run(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1)
    assert losses.tolist() == approx([-logsig(0.1 * m) + 0.5 * nll for m, nll in zip(M, [10.0, 20.0, 5.0])])
    assert chosen.tolist() == approx([0.1, -0.1, 0.2])
    assert rejected.tolist() == approx([-0.1, 0.2, -0.3])


def test_mix_default_weights_are_one():
    losses, _, _ = run(loss_type=["hinge", "sppo_hard"], beta=0.5)
    # hinge at beta 0.5: relu(1 - [1, -1.5, 2.5]) = [0, 2.5, 0]; sppo_hard: [0, 13, 5]
    assert losses.tolist() == approx([0.0, 15.5, 5.0])


# -- f-divergences ----------------------------------------------------------------------------


def test_f_divergence_reverse_kl_is_standard_dpo():
    losses, _, _ = run(loss_type="sigmoid", beta=0.1, f_divergence_type="reverse_kl")
    assert losses.tolist() == approx([-logsig(0.1 * m) for m in M])


def test_f_divergence_js():
    losses, _, _ = run(loss_type="sigmoid", beta=0.1, f_divergence_type="js_divergence")
    h = [m - (softplus(c) - softplus(r)) for m, c, r in zip(M, C, R)]
    assert losses.tolist() == approx([-logsig(0.1 * x) for x in h])


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_f_divergence_alpha(alpha):
    losses, _, _ = run(loss_type="sigmoid", beta=0.1, f_divergence_type="alpha_divergence", f_alpha=alpha)
    h = [(math.exp(-alpha * r) - math.exp(-alpha * c)) / alpha for c, r in zip(C, R)]
    assert losses.tolist() == approx([-logsig(0.1 * x) for x in h])


def test_f_divergence_forward_kl_is_alpha_one():
    losses, _, _ = run(loss_type="sigmoid", beta=0.1, f_divergence_type="forward_kl", f_alpha=0.3)
    h = [math.exp(-r) - math.exp(-c) for c, r in zip(C, R)]  # f'(u) = -1/u, f_alpha ignored
    assert losses.tolist() == approx([-logsig(0.1 * x) for x in h])


def test_f_divergence_applies_to_hinge_and_length_normalised_ipo():
    hinge, _, _ = run(loss_type="hinge", beta=0.1, f_divergence_type="forward_kl")
    h = [math.exp(-r) - math.exp(-c) for c, r in zip(C, R)]
    assert hinge.tolist() == approx([max(0.0, 1 - 0.1 * x) for x in h])
    ipo, _, _ = run(
        loss_type="ipo",
        beta=0.5,
        f_divergence_type="forward_kl",
        chosen_lengths=t([2, 4, 1]),
        rejected_lengths=t([4, 1, 5]),
    )
    h_norm = [math.exp(-r) - math.exp(-c) for c, r in zip([0.5, -0.25, 2.0], [-0.25, 2.0, -0.6])]
    assert ipo.tolist() == approx([(x - 1.0) ** 2 for x in h_norm])


def test_f_divergence_leaves_ratio_based_losses_alone():
    for loss_type in ("nca_pair", "apo_zero", "sppo_hard", "aot"):
        plain, _, _ = run(loss_type=loss_type, beta=0.5)
        fkl, _, _ = run(loss_type=loss_type, beta=0.5, f_divergence_type="forward_kl")
        assert fkl.tolist() == approx(plain.tolist())


def test_alpha_divergence_exponent_is_capped():
    pc = torch.tensor([-400.0], requires_grad=True)
    losses, _, _ = preference_loss(
        pc, t([0.0]), t([0.0]), t([0.0]), loss_type="sigmoid", beta=0.1, f_divergence_type="alpha_divergence"
    )
    # exp(-0.5 * -400) = exp(200) would be inf; the exponent is capped at ln(float32 max) = 88.7228
    # (TRL's cap), less ln 2 so that the division by alpha = 0.5 stays finite too
    cap = math.floor(math.log(torch.finfo(torch.float32).max) * 1e4) / 1e4
    assert cap == pytest.approx(88.7228)
    h = (1.0 - math.exp(cap + math.log(0.5))) / 0.5
    assert losses.item() == pytest.approx(-0.1 * h, rel=1e-4)
    assert math.isfinite(losses.item())
    losses.sum().backward()
    assert torch.isfinite(pc.grad).all()


def test_forward_kl_exponent_is_capped():
    losses, _, _ = preference_loss(
        t([-400.0]), t([0.0]), t([0.0]), t([0.0]), loss_type="hinge", beta=0.1, f_divergence_type="forward_kl"
    )
    cap = math.floor(math.log(torch.finfo(torch.float32).max) * 1e4) / 1e4
    assert losses.item() == pytest.approx(1 - 0.1 * (1.0 - math.exp(cap)), rel=1e-4)


# -- gradients, dtypes ------------------------------------------------------------------------


def test_sigmoid_gradient_sign_and_value():
    pc = t(PC).requires_grad_(True)
    pr = t(PR).requires_grad_(True)
    losses, _, _ = preference_loss(pc, pr, t(RC), t(RR), loss_type="sigmoid", beta=0.1)
    losses.sum().backward()
    # d/dpc [-log s(beta m)] = -beta * s(-beta m): raising the chosen log-prob lowers the loss
    assert pc.grad.tolist() == approx([-0.1 * sig(-0.1 * m) for m in M])
    assert pr.grad.tolist() == approx([0.1 * sig(-0.1 * m) for m in M])
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_sigmoid_loss_falls_when_chosen_logp_rises():
    low, _, _ = run(loss_type="sigmoid")
    pc = [p + 1.0 for p in PC]
    high, _, _ = preference_loss(t(pc), t(PR), t(RC), t(RR), loss_type="sigmoid")
    assert (high < low).all()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_backpropagates(loss_type):
    pc = t(PC).requires_grad_(True)
    pr = t(PR).requires_grad_(True)
    losses, _, _ = preference_loss(
        pc, pr, t(RC), t(RR), loss_type=loss_type, chosen_lengths=t([2, 4, 1]), rejected_lengths=t([4, 1, 5])
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(pc.grad).all() and pc.grad.abs().sum() > 0
    if loss_type == "sft":
        assert pr.grad is None  # the NLL term sees only the chosen completion
    else:
        assert torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCE_TYPES)
def test_every_f_divergence_backpropagates(f_divergence_type):
    pc = t(PC).requires_grad_(True)
    losses, _, _ = preference_loss(pc, t(PR), t(RC), t(RR), loss_type="sigmoid", f_divergence_type=f_divergence_type)
    losses.sum().backward()
    assert (pc.grad < 0).all()  # every f-DPO variant still prefers a likelier chosen completion


def test_bf16_inputs_give_float32_outputs():
    bf = [torch.tensor(v, dtype=torch.bfloat16) for v in (PC, PR, RC, RR)]  # these values are exact in bf16
    losses, chosen, rejected = preference_loss(*bf, loss_type="sigmoid", beta=0.1)
    assert losses.dtype == chosen.dtype == rejected.dtype == torch.float32
    assert losses.tolist() == approx([-logsig(0.1 * m) for m in M])


# -- errors ---------------------------------------------------------------------------------------


def test_unknown_loss_type_suggests_closest_and_lists_valid():
    with pytest.raises(PreftuneError) as err:
        run(loss_type="sigmod")
    msg = str(err.value)
    assert "did you mean 'sigmoid'" in msg and "apo_zero" in msg and "\n" not in msg
    with pytest.raises(PreftuneError, match="did you mean 'ipo'"):
        run(loss_type=["sigmoid", "ipoo"])


def test_weight_count_mismatch():
    with pytest.raises(PreftuneError, match="'loss_weights' has 1 value"):
        run(loss_type=["sigmoid", "sft"], loss_weights=[1.0])


def test_validate_loss_types():
    assert validate_loss_types("ipo", None) == (["ipo"], [1.0])
    assert validate_loss_types(["sigmoid", "sft"], [1, 0.25]) == (["sigmoid", "sft"], [1.0, 0.25])
    assert set(LOSS_TYPES) >= {"sigmoid", "sft", "sigmoid_norm", "aot_unpaired"} and len(LOSS_TYPES) == 15
    for bad_types, bad_weights in (([], None), (["sigmoid"], [float("nan")]), (["sigmoid"], ["x"]), (3, None)):
        with pytest.raises(PreftuneError):
            validate_loss_types(bad_types, bad_weights)


def test_bad_arguments_raise_preftune_error():
    with pytest.raises(PreftuneError, match="did you mean 'js_divergence'"):
        run(f_divergence_type="js_divergance")
    with pytest.raises(PreftuneError, match="shape"):
        preference_loss(t(PC), t(PR[:2]), t(RC), t(RR))
    with pytest.raises(PreftuneError, match="both"):
        run(loss_type="ipo", chosen_lengths=t([1, 1, 1]))
    with pytest.raises(PreftuneError, match="label_smoothing"):
        run(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(PreftuneError, match="beta"):
        run(beta=0.0)


# -- the other strategies' losses ----------------------------------------------------------------

from preftune.losses import bradley_terry_loss, cpo_loss, kto_kl, kto_loss, log1mexp, orpo_loss, simpo_loss  # noqa: E402

CM = [-1.0, -0.5, -2.0]  # per-token mean log-probs of the chosen completions
RM = [-1.5, -0.25, -3.0]


def test_log1mexp_matches_the_naive_formula_and_stays_finite_near_zero():
    xs = [-5.0, -1.0, -0.7, -0.5, -1e-3]
    assert log1mexp(t(xs)).tolist() == approx([math.log(1 - math.exp(x)) for x in xs])
    assert math.isfinite(float(log1mexp(t([-1e-7]))[0]))


def test_orpo_odds_ratio_term():
    losses, chosen, rejected, log_odds = orpo_loss(t(CM), t(RM), beta=0.1)

    def log_odds_of(lp):
        return lp - math.log(1 - math.exp(lp))

    expected_odds = [log_odds_of(c) - log_odds_of(r) for c, r in zip(CM, RM)]
    assert log_odds.tolist() == approx(expected_odds)
    assert losses.tolist() == approx([-0.1 * logsig(x) for x in expected_odds])
    assert chosen.tolist() == approx([0.1 * c for c in CM]) and rejected.tolist() == approx([0.1 * r for r in RM])
    # Equal likelihoods: odds ratio 1, the term is lambda * ln 2.
    z = t([-1.0, -1.0])
    assert orpo_loss(z, z, beta=0.2)[0].tolist() == approx([0.2 * math.log(2)] * 2)


def test_simpo_margin_and_length_normalised_rewards():
    losses, chosen, rejected = simpo_loss(t(CM), t(RM), beta=2.0, gamma=0.5)
    assert losses.tolist() == approx([-logsig(2.0 * (c - r) - 0.5) for c, r in zip(CM, RM)])
    assert chosen.tolist() == approx([2.0 * c for c in CM]) and rejected.tolist() == approx([2.0 * r for r in RM])
    smoothed, _, _ = simpo_loss(t(CM), t(RM), beta=2.0, gamma=0.5, label_smoothing=0.1)
    x = [2.0 * (c - r) - 0.5 for c, r in zip(CM, RM)]
    assert smoothed.tolist() == approx([-0.9 * logsig(v) - 0.1 * logsig(-v) for v in x])


def test_cpo_is_dpo_without_a_reference():
    losses, chosen, rejected = cpo_loss(t(PC), t(PR), beta=0.1)
    assert losses.tolist() == approx([-logsig(0.1 * (c - r)) for c, r in zip(PC, PR)])
    assert chosen.tolist() == approx([0.1 * c for c in PC])
    # The same number as DPO's sigmoid loss with a reference that gives every completion log-prob 0.
    z = torch.zeros(3)
    assert losses.tolist() == approx(preference_loss(t(PC), t(PR), z, z)[0].tolist())


def test_kto_kl_is_the_clamped_mean_log_ratio_of_mismatched_pairs():
    policy, ref = t([-10.0, -12.0, -7.0, -9.0]), t([-11.0, -12.5, -8.0, -8.0])  # log-ratios 1, 0.5, 1, -1
    assert float(kto_kl(policy, ref)) == pytest.approx(1.5 / 4)
    assert float(kto_kl(ref, policy)) == 0.0  # negative mean: clamped
    assert float(kto_kl(policy, ref, count=6)) == pytest.approx(1.5 / 6)  # a mean shared with others


def test_kto_loss_desirable_and_undesirable():
    policy, ref = t([-10.0, -12.0, -7.0]), t([-11.0, -10.0, -8.0])  # ratios 1, -2, 1
    labels = torch.tensor([True, False, False])
    losses, rewards = kto_loss(policy, ref, labels, 0.25, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    assert losses.tolist() == approx([
        1 - sig(0.5 * (1 - 0.25)),
        2.0 * (1 - sig(0.5 * (0.25 - -2))),
        2.0 * (1 - sig(0.5 * (0.25 - 1))),
    ])
    assert rewards.tolist() == approx([0.5, -1.0, 0.5])


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = t([2.0, -1.0, 0.0]), t([1.0, 1.0, 0.0])
    assert bradley_terry_loss(chosen, rejected).tolist() == approx([-logsig(1.0), -logsig(-2.0), math.log(2)])
    assert bradley_terry_loss(chosen, rejected, margin=t([0.5, 0.0, 1.0])).tolist() == approx(
        [-logsig(0.5), -logsig(-2.0), -logsig(-1.0)]
    )
