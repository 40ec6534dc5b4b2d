"""Reward functions: the built-ins, reward-model folders, user callables, and the checks around them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.collect.rewards import get_reward, register_reward, reward_names, score, score_groups, score_records


def test_sentiment_is_vaders_compound_score_of_the_completion():
    reward = get_reward("sentiment")
    # VADER's compound is s / sqrt(s^2 + 15) of the summed word valences: "good" has valence 1.9,
    # "bad" -2.5; a text with no sentiment word scores 0. The prompt plays no part.
    got = reward(["Say something", [{"role": "user", "content": "terrible awful"}], "x"], ["good", "bad", "The movie"])
    assert got == pytest.approx([1.9 / math.sqrt(1.9**2 + 15), -2.5 / math.sqrt(2.5**2 + 15), 0.0], abs=1e-4)
    assert reward.name == "sentiment"


def test_length_counts_words():
    assert get_reward("length")(["p", "p", "p"], ["a b  c", "", " one\ntwo "]) == [3.0, 0.0, 2.0]


def test_python_callable_from_a_file_and_a_module(tmp_path, monkeypatch):
    source = "def exclaim(prompts, completions):\n    return [c.count('!') - len(p) for p, c in zip(prompts, completions)]\n"
    (tmp_path / "my_reward.py").write_text(source)
    reward = get_reward(f"{tmp_path / 'my_reward.py'}:exclaim")
    assert score(reward, ["ab", "a"], ["hi!!", "!"]) == [0.0, 0.0]
    assert score(reward, ["", "a"], ["hi!!", "!!!"]) == [2.0, 2.0]

    monkeypatch.syspath_prepend(str(tmp_path))
    reward = get_reward("my_reward:exclaim")
    assert reward.name == "my_reward:exclaim"
    assert score(reward, ["x"], ["!!!"]) == [2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentimnt", "--reward: unknown reward 'sentimnt' (did you mean 'sentiment'?)"),
        ("no_such_module_xyz:f", "--reward no_such_module_xyz:f: cannot import module 'no_such_module_xyz'"),
        ("math:no_such_function", "--reward math:no_such_function: 'math' has no attribute 'no_such_function'"),
        ("math:pi", "--reward math:pi: 'pi' is not callable"),
        ("missing_file.py:f", "--reward missing_file.py:f: file not found: missing_file.py"),
    ],
)
def test_bad_reward_specs(spec, message):
    with pytest.raises(PreftuneError) as err:
        get_reward(spec)
    assert str(err.value).startswith(message)


def test_wrong_answers_from_a_reward_are_one_line_errors(tmp_path):
    (tmp_path / "r.py").write_text(
        "def short(p, c):\n    return [1.0]\n"
        "def nan(p, c):\n    return [float('nan')] * len(c)\n"
        "def words(p, c):\n    return ['good'] * len(c)\n"
        "def boom(p, c):\n    raise RuntimeError('model offline')\n"
    )
    cases = {
        "short": "returned 1 scores for 2 completions",
        "nan": "returned a non-finite score (nan) for completion 0",
        "words": "must return a list of numbers",
        "boom": "failed: RuntimeError: model offline",
    }
    for name, message in cases.items():
        with pytest.raises(PreftuneError, match=re.escape(message)):
            score(get_reward(f"{tmp_path / 'r.py'}:{name}"), ["a", "b"], ["x", "y"])


def test_registered_names_plug_in():
    class Shouting:
        name = "shouting"

        def __call__(self, prompts, completions):
            return [float(sum(ch.isupper() for ch in c)) for c in completions]

    register_reward("shouting", Shouting)
    assert "shouting" in reward_names()
    assert get_reward("shouting")(["p"], ["HEllo"]) == [2.0]


def _classifier_folder(tmp_path, tiny_tokenizer, num_labels: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    )
    folder = tmp_path / f"rm{num_labels}"
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("num_labels", [1, 2])
def test_reward_model_folder_scores_the_conversation(tmp_path, tiny_tokenizer, num_labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _classifier_folder(tmp_path, tiny_tokenizer, num_labels)
    reward = get_reward(str(folder))
    prompts = ["The sky is", [{"role": "user", "content": "Hi"}]]
    completions = ["blue.", "hello, I loved this movie and it was wonderful"]
    got = reward(prompts, completions)

    # By hand, one unpadded conversation at a time.
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = []
    for prompt, completion in zip(prompts, completions):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
        with torch.no_grad():
            logits = model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0]
        expected.append(float(logits[0]) if num_labels == 1 else float(logits[1] - logits[0]))
    assert got == pytest.approx(expected, abs=1e-5)


def test_reward_model_with_many_labels_or_no_model_is_refused(tmp_path, tiny_tokenizer):
    folder = _classifier_folder(tmp_path, tiny_tokenizer, 3)
    with pytest.raises(PreftuneError, match="it has 3 labels; a reward model has one"):
        get_reward(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreftuneError, match="the folder has no config.json"):
        get_reward(str(tmp_path / "empty"))


def test_score_records_adds_scores_per_completion():
    records = [
        {"prompt": "a", "completions": ["one two", "one"], "index": 0},
        {"prompt": "b", "completions": ["x y z"], "index": 1},
    ]
    out = score_records(get_reward("length"), records, batch_size=2, progress=False)
    assert out == [
        {"prompt": "a", "completions": ["one two", "one"], "index": 0, "scores": [2.0, 1.0], "reward": "length"},
        {"prompt": "b", "completions": ["x y z"], "index": 1, "scores": [3.0], "reward": "length"},
    ]


def test_score_groups_keeps_each_prompts_completions_together():
    seen = []

    def reward(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [float(len(c)) for c in completions]

    register_reward("chars-for-groups", lambda: reward)
    groups = score_groups(get_reward("chars-for-groups"), ["p", "q", "r"], [["ab", "c"], [], ["def"]])
    assert groups == [[2.0, 1.0], [], [3.0]]
    assert seen == [(["p", "p", "r"], ["ab", "c", "def"])]  # one call, each completion beside its prompt
