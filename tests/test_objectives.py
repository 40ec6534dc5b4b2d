"""Each strategy end to end on a tiny seeded model: the loss the loop logs is the formula of its
paper on the model's own log-probs, KTO's KL estimate, exact gradient accumulation, reference-free
runs load no reference, and a reward model learns a preference and loads as a `--reward`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from preftune.batching import collate_pairs
from preftune.config import TrainConfig
from preftune.errors import PreftuneError
from preftune.logprobs import CompletionLogprobs, completion_logps
from preftune.losses import kto_kl
from preftune.training.recipe import Trainer
from helpers import make_config, read_metrics, synthetic_pairs, train

pytestmark = pytest.mark.usefixtures("_propagate_logs")


def trainer_for(tmp_path, model_dir, data, **overrides) -> Trainer:
    trainer = Trainer(make_config(tmp_path, model_dir, data, **overrides))
    trainer.setup()
    return trainer


def base_module(model_dir) -> CompletionLogprobs:
    from transformers import AutoModelForCausalLM

    return CompletionLogprobs(AutoModelForCausalLM.from_pretrained(model_dir).eval())


@pytest.mark.parametrize("strategy", ["orpo", "simpo", "cpo"])
def test_reference_free_losses_on_the_models_own_logps(tmp_path, tiny_model_dir, pairs_file, strategy):
    gamma = {"simpo_gamma": 0.3} if strategy == "simpo" else {}  # a SimPO key: refused by the others
    trainer = trainer_for(tmp_path, tiny_model_dir, pairs_file, strategy=strategy, beta=0.5, **gamma)
    assert trainer.reference_kind == "none" and trainer.reference is None
    assert not (tmp_path / "cache" / "reference").exists()  # nothing precomputed (the data table is cached there too)
    result = trainer.evaluate()
    with torch.no_grad():
        sums, lengths, *_ = completion_logps(base_module(tiny_model_dir), collate_pairs(trainer.eval_items, trainer.pad_id))
    n = len(trainer.eval_items)
    c, r = sums[:n].double(), sums[n:].double()
    cm, rm = c / lengths[:n], r / lengths[n:]
    nll = -cm
    if strategy == "orpo":  # nll + lambda * -log sigmoid(log odds ratio), lambda = beta
        log_odds = (cm - rm) - (torch.log1p(-cm.exp()) - torch.log1p(-rm.exp()))
        expected = nll - 0.5 * F.logsigmoid(log_odds)
        assert result["eval_log_odds_chosen"] == pytest.approx(float(log_odds.mean()), rel=1e-4)
    elif strategy == "simpo":  # cpo_alpha defaults to 0: no NLL term
        expected = -F.logsigmoid(0.5 * (cm - rm) - 0.3)
    else:  # cpo_alpha defaults to 1
        expected = -F.logsigmoid(0.5 * (c - r)) + nll
    assert result["eval_loss"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert result["eval_nll_loss"] == pytest.approx(float(nll.mean()), rel=1e-4)
    assert result["eval_logps/chosen"] == pytest.approx(float(c.mean()), rel=1e-4)


def test_kto_first_step_kl_estimate_and_accumulation(tmp_path, tiny_model_dir, pairs_file):
    # Policy = reference at step 1: every reward and the KL are 0, so every loss is 1 - sigmoid(0).
    trainer = trainer_for(tmp_path / "one", tiny_model_dir, pairs_file, strategy="kto", max_steps=3, adam_epsilon=1.0)
    assert len(trainer.train_items) == 2 * 48 - 8 and trainer.reference_kind == "precomputed"
    trainer.train()
    records = [r for r in read_metrics(tmp_path / "one" / "run") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6) and records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert key in records[0], key

    # The KL estimate is the clamped mean log-ratio of the mismatched pairs, policy against the
    # reference (here the untouched base model), over the items given.
    items = trainer.train_items[:6]
    kl = trainer.objective.begin(trainer.runtime, trainer.inner, [items[:4], items[4:]], active=True)
    separate = collate_pairs(items, trainer.pad_id, share_prompt=False, slots=(1,))
    with torch.no_grad():
        policy = completion_logps(trainer.inner, separate)[0]
        reference = completion_logps(base_module(tiny_model_dir), separate)[0]
    assert float(kl) == pytest.approx(float(kto_kl(policy, reference)), abs=1e-5)
    assert float((policy - reference).mean()) != pytest.approx(0.0, abs=1e-4)  # training moved the policy

    # z0 comes from the whole optimizer step, so 4 micro-batches of 1 give the update of 1 batch of 4.
    train(make_config(tmp_path / "acc", tiny_model_dir, pairs_file, strategy="kto", max_steps=3, adam_epsilon=1.0,
                      per_device_train_batch_size=1, gradient_accumulation_steps=4))
    other = [r for r in read_metrics(tmp_path / "acc" / "run") if "loss" in r]
    for x, y in zip(records, other):
        for key in ("loss", "kl", "grad_norm"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key
    wa = load_file(str(tmp_path / "one" / "run" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "acc" / "run" / "final" / "model.safetensors"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_sft_loss_is_the_token_mean_and_accumulation_is_exact(tmp_path, tiny_model_dir, pairs_file):
    trainer = trainer_for(tmp_path / "eval", tiny_model_dir, pairs_file, strategy="sft")
    result = trainer.evaluate()
    module = CompletionLogprobs(base_module(tiny_model_dir).model, token_accuracy=True)
    with torch.no_grad():
        sums, counts, correct, *_ = completion_logps(module, trainer.objective.collate(trainer.eval_items, trainer.pad_id))
    # SFT on a pair file learns the chosen completions; the loss is averaged over their tokens.
    assert result["eval_loss"] == pytest.approx(float(-sums.sum() / counts.sum()), rel=1e-5)
    assert result["eval_mean_token_accuracy"] == pytest.approx(float(correct.sum() / counts.sum()), rel=1e-5)

    kwargs = dict(strategy="sft", max_steps=3, adam_epsilon=1.0, packing=True)
    train(make_config(tmp_path / "a", tiny_model_dir, pairs_file, per_device_train_batch_size=4, **kwargs))
    train(make_config(tmp_path / "b", tiny_model_dir, pairs_file, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4, **kwargs))
    a = [r for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]
    b = [r for r in read_metrics(tmp_path / "b" / "run") if "loss" in r]
    assert set(a[0]) >= {"loss", "mean_token_accuracy", "grad_norm", "learning_rate", "tokens_per_second"}
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def test_sft_learns_the_completions(tmp_path, tiny_model_dir, pairs_file):
    train(make_config(tmp_path, tiny_model_dir, pairs_file, strategy="sft", max_steps=20, eval_steps=10, learning_rate=3e-3))
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    first = read_metrics(tmp_path / "run")[0]
    assert evals[-1]["eval_loss"] < 0.65 * first["loss"]
    assert evals[-1]["eval_mean_token_accuracy"] > 2 * first["mean_token_accuracy"]


def test_reward_model_learns_a_preference_and_scores_as_a_reward_folder(tmp_path, tiny_model_dir, pairs_file):
    from preftune.collect.rewards import get_reward

    held_out = synthetic_pairs(40, seed=99)
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    result = train(make_config(tmp_path / "full", tiny_model_dir, pairs_file, strategy="reward", max_steps=24,
                               learning_rate=2e-3, eval_dataset=str(test_file), eval_steps=12))
    first = read_metrics(tmp_path / "full" / "run")[0]
    assert set(first) >= {"loss", "accuracy", "margin", "mean_reward", "rewards/chosen", "rewards/rejected"}
    assert result["eval_accuracy"] >= 0.9
    # The saved folder is a `--reward`: it ranks the held-out pairs as the run's evaluation did.
    reward = get_reward(str(tmp_path / "full" / "run" / "final"))
    chosen = reward([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    rejected = reward([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held_out)
    assert accuracy >= 0.9 and accuracy == pytest.approx(result["eval_accuracy"])
    assert sum(c - r for c, r in zip(chosen, rejected)) / len(held_out) == pytest.approx(result["eval_margin"], rel=1e-3)

    # With LoRA, final/ is the adapter and final_merged/ the reward folder (score head included).
    lora = train(make_config(tmp_path / "lora", tiny_model_dir, pairs_file, strategy="reward", max_steps=3, lora_r=4,
                             lora_alpha=8, eval_dataset=str(test_file)))
    run = tmp_path / "lora" / "run"
    assert (run / "final" / "adapter_config.json").is_file()
    merged = get_reward(str(run / "final_merged"))
    c = merged([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
    r = merged([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
    assert sum(a - b for a, b in zip(c, r)) / len(held_out) == pytest.approx(lora["eval_margin"], rel=1e-3, abs=1e-5)
    assert math.isfinite(lora["eval_loss"])


def test_margin_weighting_weighs_each_pair_by_its_label_strength(tmp_path, tiny_model_dir, pairs_file):
    # Before any update the policy is the reference: every sigmoid loss is -log sigmoid(0) = log 2,
    # so the mean loss is log 2 times the mean weight. Margins 2, 1, none, -0.5 weigh 1, 0.5, 1, 0.
    margins = [2, 1, None, -0.5]
    rows = [{**pair, "margin": m} for pair, m in zip(synthetic_pairs(4), margins)]
    rows[2].pop("margin")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = trainer_for(tmp_path, tiny_model_dir, pairs_file, eval_dataset=str(labelled), margin_weighting=True)
    assert [item.weight for item in trainer.eval_items] == [1.0, 0.5, 1.0, 0.0]
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2) * 2.5 / 4, abs=1e-5)
    plain = trainer_for(tmp_path / "plain", tiny_model_dir, pairs_file, eval_dataset=str(labelled))
    assert plain.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_margin_weighting_names_a_bad_margin_and_the_strategies_it_fits(tmp_path, tiny_model_dir, pairs_file):
    from preftune.errors import PreftuneError

    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**p, "margin": m}) + "\n" for p, m in zip(synthetic_pairs(2), [1.5, "strong"])))
    with pytest.raises(PreftuneError, match=r"^bad.jsonl:2: field 'margin' must be a finite number, got str 'strong'$"):
        trainer_for(tmp_path, tiny_model_dir, pairs_file, eval_dataset=str(bad), margin_weighting=True)
    bad.write_text(json.dumps({**synthetic_pairs(1)[0], "margin": 3}) + "\n")
    with pytest.raises(PreftuneError, match=r"bad.jsonl:1: field 'margin' must be between -2 and 2 \(label export's mean strength\), got 3"):
        trainer_for(tmp_path / "b", tiny_model_dir, pairs_file, eval_dataset=str(bad), margin_weighting=True)
    with pytest.raises(PreftuneError, match="'margin_weighting' weighs preference pairs; strategy 'kto' has none"):
        make_config(tmp_path, tiny_model_dir, pairs_file, strategy="kto", margin_weighting=True)


def test_bco_pair_does_not_depend_on_how_a_step_is_split(tmp_path, tiny_model_dir, pairs_file):
    """BCO's running reward mean is taken over the optimizer step's whole batch, once: 1 x 8 and
    4 x 2 micro-batches give the same losses."""
    runs = {}
    for batch, accumulation in ((8, 1), (2, 4)):
        out = tmp_path / f"b{batch}"
        trainer = Trainer(make_config(out, tiny_model_dir, pairs_file, loss_type="bco_pair", max_steps=3,
                                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation))
        trainer.setup()
        trainer.train()
        runs[batch] = [r["loss"] for r in read_metrics(out / "run") if "loss" in r]
    assert len(runs[8]) == 3 and all(abs(a - b) < 1e-6 for a, b in zip(runs[8], runs[2])), runs


def test_aot_refuses_a_split_step(tmp_path, tiny_model_dir, pairs_file):
    """AOT sorts across the batch: with accumulation its update would depend on the split, so it is
    refused in one line; one micro-batch a step trains."""
    from preftune.errors import PreftuneError

    cfg = make_config(tmp_path / "split", tiny_model_dir, pairs_file, loss_type="aot", gradient_accumulation_steps=2)
    with pytest.raises(PreftuneError, match=r"^loss_type aot sorts log-ratios across the whole batch, so a step split into"):
        train(cfg)
    train(make_config(tmp_path / "whole", tiny_model_dir, pairs_file, loss_type="aot_unpaired", max_steps=2))
    assert [r["step"] for r in read_metrics(tmp_path / "whole" / "run") if "loss" in r] == [1, 2]


# ---------------------------------------------------------------------------------------------
# Each strategy's `loss`: pure, no model, no accelerator, against numbers computed by hand


def _strategy(strategy: str, **keys):
    from preftune.config import resolve
    from preftune.objectives import REGISTRY

    return REGISTRY[strategy](resolve(TrainConfig(strategy=strategy, **keys)))


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


T = torch.tensor


def test_dpo_loss_is_pure_and_matches_the_hand_computation():
    dpo = _strategy("dpo", beta=0.1, label_smoothing=0.1)
    # log-ratios: chosen -1 - (-2) = 1, rejected -3 - (-2) = -1; z = beta * (1 - (-1)) = 0.2
    losses, chosen, rejected = dpo.loss(T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0]))
    z = 0.2
    assert losses.item() == pytest.approx(-0.9 * _log_sigmoid(z) - 0.1 * _log_sigmoid(-z), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((0.1, -0.1), abs=1e-7)


def test_orpo_loss_is_pure_and_matches_the_hand_computation():
    orpo = _strategy("orpo", beta=0.5)
    # summed log-probs -2 over 4 tokens and -6 over 3: means -0.5 and -2
    losses, chosen, rejected, extra = orpo.loss(T([-2.0]), T([-6.0]), T([4]), T([3]))
    cm, rm = -0.5, -2.0
    log_odds = (cm - math.log(1 - math.exp(cm))) - (rm - math.log(1 - math.exp(rm)))
    assert losses.item() == pytest.approx(0.5 - 0.5 * _log_sigmoid(log_odds), abs=1e-6)
    assert extra["log_odds_chosen"].item() == pytest.approx(log_odds, abs=1e-6)
    assert extra["nll_loss"].item() == pytest.approx(0.5)
    assert (chosen.item(), rejected.item()) == pytest.approx((-0.25, -1.0))


def test_simpo_loss_is_pure_and_matches_the_hand_computation():
    simpo = _strategy("simpo", beta=2.0, simpo_gamma=0.5)
    losses, chosen, rejected, extra = simpo.loss(T([-2.0]), T([-6.0]), T([4]), T([3]))
    # cpo_alpha resolves to 0 for SimPO: no NLL term; x = 2 * (-0.5 - (-2)) - 0.5 = 2.5
    assert simpo.section.cpo_alpha == 0.0
    assert losses.item() == pytest.approx(-_log_sigmoid(2.5), abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-1.0, -4.0))
    with_nll = _strategy("simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.2)
    assert with_nll.loss(T([-2.0]), T([-6.0]), T([4]), T([3]))[0].item() == pytest.approx(-_log_sigmoid(2.5) + 0.2 * 0.5, abs=1e-6)


def test_cpo_loss_is_pure_and_matches_the_hand_computation():
    cpo = _strategy("cpo", beta=0.1)
    losses, chosen, rejected, extra = cpo.loss(T([-2.0]), T([-6.0]), T([4]), T([3]))
    # cpo_alpha resolves to 1 for CPO: -log sigmoid(0.1 * (-2 - (-6))) + 1 * 0.5
    assert cpo.section.cpo_alpha == 1.0
    assert losses.item() == pytest.approx(-_log_sigmoid(0.4) + 0.5, abs=1e-6)
    assert (chosen.item(), rejected.item()) == pytest.approx((-0.2, -0.6))


def test_kto_loss_is_pure_and_matches_the_hand_computation():
    kto = _strategy("kto", beta=0.5, desirable_weight=2.0, undesirable_weight=1.0)
    # log-ratios 1 (desirable) and -1 (undesirable); z0 = 0.3
    losses, rewards = kto.loss(T([-1.0, -3.0]), T([-2.0, -2.0]), T([True, False]), T(0.3))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([2.0 * (1 - sigmoid(0.5 * 0.7)), 1 - sigmoid(0.5 * 1.3)], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.5, -0.5])


def test_sft_loss_is_pure_and_matches_the_hand_computation():
    sft = _strategy("sft")
    assert sft.loss(T([-3.5, -0.25])).tolist() == [3.5, 0.25]  # the recipe divides by the step's trained tokens


def test_reward_loss_is_pure_and_matches_the_hand_computation():
    reward = _strategy("reward")
    assert reward.loss(T([1.5, 0.0]), T([0.5, 2.0])).tolist() == pytest.approx([-_log_sigmoid(1.0), -_log_sigmoid(-2.0)], abs=1e-6)


def test_a_trainer_given_an_unchecked_config_resolves_it(tmp_path, tiny_model_dir, pairs_file):
    """Every way of starting a run checks its config: a CPO config never passed through
    `validate` still trains with its NLL term (cpo_alpha 1), and a key CPO does not read is refused."""
    cfg = TrainConfig(strategy="cpo", model_name=str(tiny_model_dir), dataset=str(pairs_file), output_dir=str(tmp_path / "run"))
    assert cfg.cpo_alpha is None
    assert Trainer(cfg).objective.section.cpo_alpha == 1.0
    cfg.desirable_weight = 2.0
    with pytest.raises(PreftuneError, match=r"^config: 'desirable_weight' applies to strategy kto, not 'cpo'$"):
        Trainer(cfg)
