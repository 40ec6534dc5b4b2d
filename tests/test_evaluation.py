"""Before/after measures, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.evaluation import before_after, completion_logps, format_table, mean_stderr, paired_difference, win_rate


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
