"""Before/after measures, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.eval.evaluation import before_after, completion_logps, format_table, mean_stderr, paired_difference, win_rate


def test_mean_and_standard_error():
    mean, se = mean_stderr([1.0, 2.0, 3.0, 4.0])
    # sample variance = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert mean_stderr([0.7]) == (0.7, 0.0)


def test_win_rate_counts_ties_as_half():
    # prompt 1: (1 vs 1) tie, (1 vs 0) win, (2 vs 1) win, (2 vs 0) win -> 3.5 / 4
    # prompt 2: (0 vs 1) loss -> 0
    assert win_rate([[1, 2], [0]], [[1, 0], [1]]) == pytest.approx((0.875 + 0.0) / 2)
    assert win_rate([[0.5]], [[0.5]]) == 0.5


def test_paired_difference():
    mean, se = paired_difference([[1.0, 3.0], [0.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # per-prompt differences: 2 - 0, 0 - 0.5, 1 - 0.5 -> 2, -0.5, 0.5
    assert mean == pytest.approx(2 / 3)
    assert se == pytest.approx(mean_stderr([2.0, -0.5, 0.5])[1])


def test_before_after_and_table():
    result = before_after(
        base_scores=[[0.0, 0.2], [-0.4, 0.0]],
        tuned_scores=[[0.6, 0.4], [0.2, 0.2]],
        base_lengths=[[10, 12], [8, 8]],
        tuned_lengths=[[14, 12], [9, 9]],
        log_ratios=[[1.0, 3.0], [0.5, 0.5]],
    )
    assert result["reward_before"] == pytest.approx((0.1 - 0.2) / 2)
    assert result["reward_after"] == pytest.approx((0.5 + 0.2) / 2)
    assert result["reward_stderr"] == pytest.approx(mean_stderr([0.4, 0.4])[1])  # both prompts gain 0.4
    assert result["reward_stderr"] == 0.0
    assert result["reward_before_stderr"] == pytest.approx(mean_stderr([0.1, -0.2])[1])
    assert result["win_rate"] == 1.0
    assert result["kl"] == pytest.approx((2.0 + 0.5) / 2) and result["kl_stderr"] == pytest.approx(0.75)
    assert (result["length_before"], result["length_after"]) == (9.5, 11.0)
    assert (result["num_prompts"], result["samples_per_prompt"]) == (2, 2)
    table = format_table(result, "sentiment")
    assert "mean sentiment" in table and "-0.050 ± 0.150" in table and "+0.350 ± 0.150" in table
    assert "100.0%" in table and "1.25 ± 0.75" in table


def test_completion_logps_match_a_full_forward(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [[5, 6, 7], [8]]
    completions = [[9, 10], [11, 12, 13, 2]]
    got = completion_logps(model, prompts, completions, pad_id=0, batch_size=2)
    expected = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected.append(sum(logps[len(p) + k - 1, token].item() for k, token in enumerate(c)))
    assert got == pytest.approx(expected, abs=1e-4)


# --------------------------------------------------------------------------------------- eval measures

import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from preftune.eval.evaluation import (  # noqa: E402
    best_of_n_kl,
    bootstrap_ci,
    expected_best_of_n,
    kl_terms,
    pair_measures,
    prompt_win_rates,
    sample_measures,
    summarize,
)


def test_bootstrap_interval_against_the_exact_bootstrap_distribution():
    # Resampling [0, 0, 3] with replacement: the mean is (number of 3s drawn), a Binomial(3, 1/3):
    # P(0) = 8/27, P(1) = 12/27, P(2) = 6/27, P(3) = 1/27. Cumulative: .296, .741, .963, 1.
    # The 10% quantile is 0 and the 90% quantile 2; the 2.5% quantile 0 and the 97.5% quantile 3.
    assert bootstrap_ci([0.0, 0.0, 3.0], level=0.8, resamples=20000) == (0.0, 2.0)
    assert bootstrap_ci([0.0, 0.0, 3.0], level=0.95, resamples=20000) == (0.0, 3.0)
    assert bootstrap_ci([0.25] * 5) == (0.25, 0.25)
    assert summarize([1.0, 0.0], level=0.95, resamples=5000) == {"mean": 0.5, "ci": [0.0, 1.0], "n": 2}
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_best_of_n_reward_and_kl():
    # all 6 two-subsets of [1, 2, 3, 4] have maxima 2, 3, 4, 3, 4, 4: mean 20 / 6
    assert expected_best_of_n([4.0, 1.0, 3.0, 2.0], 2) == pytest.approx(20 / 6)
    assert expected_best_of_n([4.0, 1.0, 3.0, 2.0], 1) == pytest.approx(2.5)
    assert expected_best_of_n([4.0, 1.0, 3.0, 2.0], 4) == pytest.approx(4.0)
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    with pytest.raises(ValueError):
        expected_best_of_n([1.0], 2)


def test_pair_measures_by_hand():
    # beta 0.5; implicit rewards chosen = 0.5 * (pc - rc), rejected = 0.5 * (pr - rr)
    # pair 1: chosen 0.5 * (-1 - -3) = 1, rejected 0.5 * (-4 - -4) = 0 -> margin 1 (right)
    # pair 2: chosen 0.5 * (-5 - -4) = -0.5, rejected 0.5 * (-2 - -3) = 0.5 -> margin -1 (wrong)
    # pair 3: chosen 0.5 * (-2 - -2) = 0, rejected 0.5 * (-6 - -2) = -2 -> margin 2 (right)
    m = pair_measures([-1, -5, -2], [-4, -2, -6], [-3, -4, -2], [-4, -3, -2], beta=0.5)
    assert m["accuracy"]["mean"] == pytest.approx(2 / 3)
    assert m["margin"]["mean"] == pytest.approx(2 / 3)
    assert m["chosen_reward"]["mean"] == pytest.approx(0.5 / 3)
    assert m["rejected_reward"]["mean"] == pytest.approx(-0.5)
    assert m["num_pairs"] == 3 and m["accuracy"]["ci"][0] <= 2 / 3 <= m["accuracy"]["ci"][1]


def test_sample_measures_by_hand():
    scores, base = [[1.0, 3.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 0.0]]
    # win rates: prompt 1: (1v1 tie, 1v1 tie, 3v1, 3v1) = 3/4; prompt 2: (0v1 loss, 0v0 tie) x2 = 1/4
    assert prompt_win_rates(scores, base) == [0.75, 0.25]
    m = sample_measures(scores, base, [[10, 20], [30, 30]], [[10, 10], [10, 10]], [[1.0, 3.0], [0.0, 0.0]], [[1.5, 1.5], [0.5, 0.5]])
    assert m["win_rate"]["mean"] == pytest.approx(0.5)
    # per-prompt means: model 2 and 0, baseline 1 and 0.5
    assert m["reward"]["mean"] == pytest.approx(1.0) and m["baseline_reward"]["mean"] == pytest.approx(0.75)
    assert m["reward_gain"]["mean"] == pytest.approx(0.25)  # (2 - 1) and (0 - 0.5), averaged
    assert m["kl_monte_carlo"]["mean"] == pytest.approx(1.0) and m["kl_per_token"]["mean"] == pytest.approx(1.0)
    assert m["length"] == pytest.approx(22.5) and m["baseline_length"] == 10
    assert m["length_ratio"] == pytest.approx(2.25) and m["length_warning"] is True


# --------------------------------------------------------------------------------------- KL estimators

VOCAB, LENGTH, PROMPT = 6, 3, [1, 2]


def _peaky_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.3,  # large weights: far-from-uniform distributions, a KL well above 0
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def enumerated():
    """Every completion of LENGTH tokens over the whole vocabulary, with both estimators' terms."""
    p, q = _peaky_model(0), _peaky_model(1)
    completions = [list(c) for c in itertools.product(range(VOCAB), repeat=LENGTH)]
    logp, logq, exact = (torch.tensor(v, dtype=torch.float64) for v in kl_terms(p, q, [PROMPT] * len(completions), completions, 0, 64))
    return p, q, completions, logp, logq, exact


def test_kl_terms_score_sequences_like_the_model(enumerated):
    p, _, completions, logp, _, _ = enumerated
    ids = torch.tensor([PROMPT + c for c in completions])
    with torch.no_grad():
        token = torch.log_softmax(p(ids).logits.float(), -1)[:, len(PROMPT) - 1 : -1].gather(-1, ids[:, len(PROMPT) :, None])
    assert torch.allclose(token[..., 0].sum(-1).double(), logp, atol=1e-5)
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # a distribution over all V^L completions


def test_both_kl_estimators_have_the_exact_kl_as_expectation(enumerated):
    _, _, _, logp, logq, exact = enumerated
    weights = logp.exp()
    kl = (weights * (logp - logq)).sum().item()  # KL(p || q) by enumerating every sequence
    assert kl > 0.5
    assert (weights * exact).sum().item() == pytest.approx(kl, abs=1e-5)  # chain rule: E[sum_t KL_t] = KL

    # Monte Carlo from draws y ~ p: both estimates within 4 standard errors; the per-token one
    # with a much smaller spread.
    draws = torch.multinomial(weights, 4000, replacement=True, generator=torch.Generator().manual_seed(0))
    for values in (logp - logq, exact):
        sample = values[draws]
        assert abs(sample.mean().item() - kl) < 4 * sample.std().item() / math.sqrt(len(draws))
    assert exact[draws].var().item() < 0.2 * (logp - logq)[draws].var().item()


def test_kl_against_the_disabled_adapter_equals_against_a_copy_of_the_base():
    import copy

    from peft import LoraConfig, get_peft_model

    base = _peaky_model(2)
    frozen = copy.deepcopy(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    completions = [[3, 4, 5], [0, 1], [5]]
    prompts = [PROMPT, [3], [2, 2, 2]]
    via_adapter = kl_terms(model, None, prompts, completions, 0)
    via_copy = kl_terms(model, frozen, prompts, completions, 0)
    for a, b in zip(via_adapter, via_copy):
        assert a == pytest.approx(b, abs=1e-5)
    assert all(k > 0 for k in via_adapter[2])


# --------------------------------------------------------------------------------------- the command


def test_eval_command_on_a_run_folder(tiny_sweep, tmp_path, capsys):
    from preftune.cli import main

    root, _, _ = tiny_sweep
    run = root / "sweep" / "beta=0.5"
    out = tmp_path / "eval.json"
    code = main(
        ["eval", "--model", str(run), "--pairs", str(root / "test.jsonl"), "--prompts", str(root / "prompts.jsonl"),
         "--reward", "length", "--num-samples", "3", "--max-new-tokens", "5", "--temperature", "0.7", "-o", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "preference accuracy" in table and "KL(model || ref), per-token" in table and "95% CI" in table
    result = json.loads(out.read_text())
    assert result["pairs"]["beta"] == 0.5  # the run's beta
    assert result["samples"]["samples_per_prompt"] == 3 and result["samples"]["temperature"] == 0.7
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["model"]) == 3 and len(r["baseline"]) == 3 for r in rows)
    # the KL estimates are the per-prompt means of the per-sample values written beside them
    kl = sum(sum(r["log_ratios"]) / 3 for r in rows) / 4
    assert result["samples"]["kl_monte_carlo"]["mean"] == pytest.approx(kl)
    # the length reward scores words; the mean reward is the mean over prompts of the samples' scores
    assert result["samples"]["reward"]["mean"] == pytest.approx(sum(sum(r["model_scores"]) / 3 for r in rows) / 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "P"], "--ref is needed: {model} is a full model"),
        ([], "nothing to evaluate"),
        (["--prompts", "P"], "--prompts needs --reward"),
    ],
)
def test_eval_command_errors(tiny_model_dir, capsys, args, message):
    from preftune.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"preftune: error: {message.format(model=tiny_model_dir)}" or message.format(model=tiny_model_dir) in err
    assert len(err.splitlines()) == 1


def test_sample_j_of_prompt_i_does_not_depend_on_how_many_are_drawn(tiny_model_dir):
    from preftune.eval.evaluation import load_eval_prompts, sample_prompts
    from preftune.collect.generation import SamplingSettings, load_generation_model
    from preftune.io import write_atomic

    model, tokenizer = load_generation_model(str(tiny_model_dir))
    path = tiny_model_dir.parent / "prompts.txt"
    write_atomic(path, "the sky is\nI loved this\nQuestion: what\n")
    prompts = load_eval_prompts(str(path), tokenizer, None)
    many = sample_prompts(model, tokenizer, prompts, SamplingSettings(6, 1.0, 1.0, 8, 3), progress=False)
    few = sample_prompts(model, tokenizer, prompts, SamplingSettings(2, 1.0, 1.0, 8, 3), rows=3, progress=False)
    assert [s.token_ids[:2] for s in many] == [s.token_ids for s in few]


def test_evaluation_scores_through_the_proven_path(tiny_tokenizer, monkeypatch):
    """A model whose output head the structural test takes for a plain projection while it is not
    (a head-scaling transform missing from the list): training's proof catches it, and evaluation,
    the quickstart and iterate, scoring through the same proof, use the model's own forward."""
    import zoo
    from preftune import logprobs
    from preftune.eval.evaluation import completion_logps, kl_terms
    from preftune.logprobs import own_forward_sums
    from preftune.sequences import collate_sequences
    from preftune.eval.evaluation import completion_rows

    model = zoo.build_model("falcon_h1 (SSM + attention, scaled head)", tiny_tokenizer).eval()
    monkeypatch.setattr(logprobs, "_LOGIT_TRANSFORMS", ("final_logit_softcapping",))  # a list that misses it
    assert logprobs.split_body_and_head(model) is not None
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [[12, 13, 14], [15, 16, 17, 18, 19]]
    with torch.no_grad():
        own = own_forward_sums(model, collate_sequences(completion_rows(prompts, completions), 0))
        fast = logprobs.completion_logps(logprobs.CompletionLogprobs(model), collate_sequences(completion_rows(prompts, completions), 0)).sums
    assert (fast.double() - own).abs().max() > 0.5  # the unproven fast head is wrong here
    assert completion_logps(model, prompts, completions, pad_id=0) == pytest.approx(own.tolist(), abs=1e-4)
    logp, logq, kl = kl_terms(model, model, prompts, completions, pad_id=0)
    assert logp == pytest.approx(own.tolist(), abs=1e-4) and kl == pytest.approx([0.0, 0.0], abs=1e-5)
