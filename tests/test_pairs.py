"""Pair building rules: best-worst, all pairs, random; ties and margins skipped; fields kept."""

from __future__ import annotations

import json

import pytest

from preftune.data import load_preference_data
from preftune.errors import PreftuneError
from preftune.io import write_jsonl_atomic
from preftune.collect.pairs import build_pairs


def record(scores, texts=None, index=0, **extra):
    texts = texts or [f"c{i}" for i in range(len(scores))]
    return (f"s.jsonl:{index + 1}", {"index": index, "prompt": f"p{index}", "completions": texts, "scores": scores, **extra})


def chosen_rejected(pairs):
    return [(p["chosen"], p["rejected"]) for p in pairs]


def test_best_worst_takes_the_extremes_first_on_ties():
    pairs, stats = build_pairs([record([0.1, 0.9, -0.5, 0.9, -0.5])], "best-worst")
    assert chosen_rejected(pairs) == [("c1", "c2")]
    assert (pairs[0]["chosen_score"], pairs[0]["rejected_score"]) == (0.9, -0.5)
    assert (stats.pairs, stats.ties, stats.below_margin) == (1, 0, 0)


def test_ties_are_skipped():
    pairs, stats = build_pairs([record([0.3, 0.3, 0.3]), record([0.5, 0.5], index=1)], "best-worst")
    assert pairs == [] and stats.ties == 2
    # Identical texts are a tie whatever their scores say (a noisy reward).
    pairs, stats = build_pairs([record([0.1, 0.8], texts=["same", "same"])], "all-pairs")
    assert pairs == [] and stats.ties == 1


def test_min_margin():
    pairs, stats = build_pairs([record([0.0, 0.1]), record([0.0, 0.3], index=1)], "best-worst", min_margin=0.2)
    assert chosen_rejected(pairs) == [("c1", "c0")] and pairs[0]["prompt"] == "p1"
    assert stats.below_margin == 1
    # A difference equal to the margin is kept.
    pairs, _ = build_pairs([record([0.0, 0.25])], "best-worst", min_margin=0.25)
    assert len(pairs) == 1


def test_all_pairs():
    scores = [0.5, 0.2, 0.5, -0.1]
    pairs, stats = build_pairs([record(scores)], "all-pairs")
    # (0,1) (0,2)=tie (0,3) (1,2) (1,3) (2,3); the higher score is chosen
    assert chosen_rejected(pairs) == [("c0", "c1"), ("c0", "c3"), ("c2", "c1"), ("c1", "c3"), ("c2", "c3")]
    assert stats.ties == 1
    pairs, stats = build_pairs([record(scores)], "all-pairs", min_margin=0.35)
    assert chosen_rejected(pairs) == [("c0", "c3"), ("c2", "c3")]
    assert (stats.ties, stats.below_margin) == (1, 3)


def test_random_is_seeded_per_prompt():
    a = record([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], index=3)
    other = record([1.0, 2.0], index=0)
    alone, _ = build_pairs([a], "random", seed=5)
    together, _ = build_pairs([other, a], "random", seed=5)
    assert chosen_rejected(alone) == chosen_rejected(together[1:])
    draws = {tuple(chosen_rejected(build_pairs([a], "random", seed=s)[0])[0]) for s in range(30)}
    assert len(draws) > 5
    for chosen, rejected in draws:
        assert chosen != rejected and int(chosen[1]) > int(rejected[1])  # scores rise with the index


def test_fields_kept_and_output_trains(tmp_path):
    messages = [{"role": "user", "content": "Complete: the film"}]
    entry = ("s.jsonl:1", {
        "index": 0, "prompt": messages, "completions": ["was great", "was awful"], "scores": [0.6, -0.5],
        "lengths": [2, 2], "stopped": [True, True], "reward": "sentiment", "label": "pos", "sampling": {"seed": 0},
    })  # fmt: skip
    pairs, _ = build_pairs([entry], "best-worst")
    assert pairs == [
        {
            "prompt": messages,
            "chosen": "was great",
            "rejected": "was awful",
            "chosen_score": 0.6,
            "rejected_score": -0.5,
            "index": 0,
            "reward": "sentiment",
            "label": "pos",
            "sampling": {"seed": 0},
        }
    ]
    path = tmp_path / "pairs.jsonl"
    write_jsonl_atomic(path, pairs)
    (example,) = load_preference_data(path)
    assert example.chosen == [{"role": "assistant", "content": "was great"}]
    assert example.extra["chosen_score"] == 0.6
    assert json.loads(path.read_text())["rejected"] == "was awful"


def test_a_completion_sampled_twice_gives_its_pairs_once():
    pairs, stats = build_pairs([record([0.9, 0.1, 0.1], texts=["great", "meh", "meh"])], "all-pairs")
    assert chosen_rejected(pairs) == [("great", "meh")]
    assert (stats.pairs, stats.ties, stats.repeats) == (1, 1, 1)


def test_too_few_completions_are_counted():
    pairs, stats = build_pairs([record([0.5])], "best-worst")
    assert pairs == [] and stats.too_few == 1


@pytest.mark.parametrize(
    "entry, kwargs, message",
    [
        (record([0.1, 0.2]), {"strategy": "best_worst"}, "--strategy must be one of best-worst, all-pairs, random, got 'best_worst' (did you mean 'best-worst'?)"),
        (record([0.1, 0.2]), {"min_margin": -1}, "--min-margin must be >= 0"),
        (("s.jsonl:4", {"prompt": "p", "completions": ["a", "b"]}), {}, "s.jsonl:4: field 'scores' is missing: score the samples first (preftune score)"),
        (("s.jsonl:2", {"prompt": "p", "completions": ["a", "b"], "scores": [1]}), {}, "s.jsonl:2: field 'scores' must be a list of 2 numbers"),
        (("s.jsonl:3", {"completions": ["a", "b"], "scores": [1, 2]}), {}, "s.jsonl:3: field 'prompt' is missing"),
    ],
)
def test_bad_input(entry, kwargs, message):
    with pytest.raises(PreftuneError) as err:
        build_pairs([entry], **kwargs)
    assert str(err.value).startswith(message)


def test_samples_at_several_temperatures_give_each_sides_temperature():
    pairs, _ = build_pairs([record([0.1, 0.9, -0.5, 0.3], temperatures=[0.7, 0.7, 1.0, 1.0])], "best-worst")
    assert chosen_rejected(pairs) == [("c1", "c2")]
    assert (pairs[0]["chosen_temperature"], pairs[0]["rejected_temperature"]) == (0.7, 1.0)
    assert "temperatures" not in pairs[0]
    (plain,), _ = build_pairs([record([0.1, 0.9])], "best-worst")
    assert "chosen_temperature" not in plain
    with pytest.raises(PreftuneError) as err:
        build_pairs([record([0.1, 0.9], temperatures=[0.7])])
    assert str(err.value) == "s.jsonl:1: field 'temperatures' must be a list of 2 numbers, one per completion"
