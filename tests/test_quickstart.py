"""The quickstart's pieces on a tiny model, the collection commands end to end, and the bundled data.

The full quickstart on SmolLM2 takes minutes: it is run as `time preftune quickstart` (README), not
in the unit suite.
"""

from __future__ import annotations

import json
import statistics

import pytest

from preftune.cli import main
from preftune.data import load_preference_data
from preftune.quality import quality_report
from preftune.eval.evaluation import format_table
from preftune.collect.generation import load_prompts
from preftune.recipes.quickstart import QuickstartSettings, bundled_data, run_quickstart
from preftune.collect.rewards import get_reward


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def small_task(tmp_path):
    pairs = [
        {"prompt": f"Complete: the film {i}", "chosen": "was great and wonderful", "rejected": "was awful and bad"}
        for i in range(8)
    ]
    prompts = [{"prompt": f"Complete: the show {i}", "label": "pos" if i % 2 else "neg"} for i in range(3)]
    return {
        "train_data": str(write_jsonl(tmp_path / "train.jsonl", pairs)),
        "test_data": str(write_jsonl(tmp_path / "test.jsonl", pairs[:2])),
        "heldout_prompts": str(write_jsonl(tmp_path / "heldout.jsonl", prompts)),
    }


def test_quickstart_on_a_tiny_model(tmp_path, tiny_model_dir, small_task, capsys):
    # A learning rate of ~0 keeps the tuned model equal to the base, so with the same per-sample
    # seeds both sample the same completions: no reward change, win rate one half, KL zero.
    settings = QuickstartSettings(
        output_dir=str(tmp_path / "qs"),
        model_name=str(tiny_model_dir),
        max_steps=2,
        batch_size=4,
        learning_rate=1e-12,
        eval_prompts=3,
        eval_samples=2,
        max_new_tokens=5,
        progress=False,
        **small_task,
    )
    result = run_quickstart(settings)
    out = tmp_path / "qs"
    saved = json.loads((out / "eval.json").read_text())
    for key in ("reward_before", "reward_after", "reward_stderr", "win_rate", "kl", "length_before", "length_after"):
        assert saved[key] == result[key]
    assert (out / "final" / "adapter_config.json").is_file() and (out / "metrics.jsonl").is_file()

    rows = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["neg", "pos", "neg"]
    assert all(r["tuned"] == r["base"] for r in rows)
    sentiment = get_reward("sentiment")
    for r in rows:
        assert r["base_scores"] == sentiment([r["prompt"]] * 2, r["base"])
    assert saved["reward_before"] == pytest.approx(statistics.fmean(statistics.fmean(r["base_scores"]) for r in rows))
    assert saved["reward_after"] == saved["reward_before"] and saved["reward_stderr"] == 0.0
    assert saved["win_rate"] == 0.5
    assert saved["kl"] == pytest.approx(0.0, abs=1e-4)
    assert saved["length_before"] == saved["length_after"] == pytest.approx(
        statistics.fmean(statistics.fmean(r["base_lengths"]) for r in rows)
    )
    assert capsys.readouterr().out == ""  # a library function prints nothing; `preftune quickstart` prints the table
    printed = format_table(result, result["reward"])
    assert "win rate of tuned over base" in printed and "50.0%" in printed


def test_collection_commands_end_to_end(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The sky is\nI loved this\n")
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    common = ["--model", str(tiny_model_dir), "--num-samples", "3", "--max-new-tokens", "6", "--seed", "1"]
    assert main(["generate", str(prompts), "-o", str(samples), *common]) == 0
    first = samples.read_text()
    assert main(["generate", str(prompts), "-o", str(samples), *common]) == 0  # everything done: a no-op
    assert samples.read_text() == first

    assert main(["score", str(samples), "--reward", "length"]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["scores"] for r in records] == [[float(len(c.split())) for c in r["completions"]] for r in records]
    assert {r["reward"] for r in records} == {"length"}

    assert main(["pairs", str(samples), "-o", str(pairs), "--strategy", "all-pairs"]) == 0
    built = [json.loads(line) for line in pairs.read_text().splitlines()]
    for pair in built:
        assert pair["chosen_score"] > pair["rejected_score"]
        assert pair["chosen_score"] == len(pair["chosen"].split())
    assert len(load_preference_data(pairs)) == len(built)


@pytest.mark.parametrize(
    "argv, content, message",
    [
        (["generate", "{path}", "-o", "{out}"], '{"prompt": "a"}\n{"text": "b"}\n', "p.jsonl:2: field 'prompt' is missing"),
        (["pairs", "{path}", "-o", "{out}"], '{"prompt": "a", "completions": ["x", "y"]}\n', "p.jsonl:1: field 'scores' is missing"),
        (["score", "{path}", "--reward", "length"], '{"prompt": "a", "completions": "x"}\n', "p.jsonl:1: field 'completions' must be a list of strings"),
        (["score", "{path}", "--reward", "lenght"], '{"prompt": "a", "completions": ["x"]}\n', "unknown reward 'lenght' (did you mean 'length'?)"),
        (["generate", "{path}", "-o", "{out}", "--temperature", "-1"], '{"prompt": "a"}\n', "--temperature must be >= 0"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    code = main([a.format(path=path, out=tmp_path / "out.jsonl") for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("preftune: error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err


def test_bundled_data_is_valid_and_split_by_prompt():
    train = load_preference_data(bundled_data("train.jsonl"))
    test = load_preference_data(bundled_data("test.jsonl"))
    heldout = load_prompts(bundled_data("prompts_heldout.jsonl"))
    assert len(train) >= 200 and len(test) >= 50 and len(heldout) == 64
    assert quality_report(train)["exact_duplicates"] == 0 and quality_report(test)["exact_duplicates"] == 0
    texts = {ex.prompt[-1]["content"] for ex in train}, {ex.prompt[-1]["content"] for ex in test}, {p.prompt for p in heldout}
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    sentiment = get_reward("sentiment")
    for ex in train[:50] + test[:20]:
        chosen, rejected = ex.chosen[0]["content"], ex.rejected[0]["content"]
        assert sentiment([ex.prompt], [chosen, rejected]) == [ex.extra["chosen_score"], ex.extra["rejected_score"]]
        assert ex.extra["chosen_score"] - ex.extra["rejected_score"] >= 0.25
