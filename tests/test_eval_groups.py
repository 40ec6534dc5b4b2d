"""`preftune eval --by FIELD`: per-group figures are those of a standalone evaluation of each
group's records, the between-group comparison, the printed tables, eval.json's `by` section, the
report's table and plot, and the one-line error for a field no record has."""

from __future__ import annotations

import io
import json
import re
import statistics

import pytest

from conftest import build_tiny_model, task_pairs
from preftune.cli import main
from preftune.eval.groups import (
    MISSING,
    bootstrap_difference_ci,
    compare_groups,
    group_name,
    group_rows,
    per_group,
    prompt_gains,
)

FAST = {"num_samples": 2, "max_new_tokens": 6, "bootstrap": 200, "progress": False}


def _close(a, b, path="") -> None:
    """Nested results equal, floats to 1e-6 (log-probs of differently padded batches differ in
    the last bits)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_tokenizer, tmp_path_factory):
    """Policy (the tiny model), a reference and a baseline: three differently seeded tiny models."""
    out = {"model": str(tiny_model_dir)}
    for name, seed in (("ref", 1), ("baseline", 2)):
        path = tmp_path_factory.mktemp(name)
        build_tiny_model(len(tiny_tokenizer), seed=seed).save_pretrained(path)
        tiny_tokenizer.save_pretrained(path)
        out[name] = str(path)
    return out


def _pairs() -> list[dict]:
    """Pairs in three groups: topic a, topic b, and no topic at all."""
    rows = task_pairs(12, seed=3)
    for i, row in enumerate(rows):
        if i % 3 != 2:
            row["topic"] = "a" if i % 3 == 0 else "b"
    return rows


PROMPTS = {
    "a": [{"prompt": "Question: is it good? Answer:", "topic": "a"}, {"prompt": "I loved this", "topic": "a"}],
    "b": [{"prompt": "The sky is", "topic": "b"}, {"prompt": "I hated this film", "topic": "b"}, {"prompt": "hello hi", "topic": "b"}],
    MISSING: [{"prompt": "Question: what is two plus two? Answer:"}],
}


# --------------------------------------------------------------------------------------- by hand


def test_group_names_order_and_per_group_measure():
    assert [group_name(r, "k") for r in ({"k": "x"}, {"k": 3}, {"k": True}, {"k": None}, {}, {"k": ""})] == [
        "x", "3", "true", MISSING, MISSING, '""'
    ]
    assert list(group_rows(["b", MISSING, "10", "a", "9", "b"])) == ["9", "10", "a", "b", MISSING]
    got = per_group(["x", "y", "x"], [[1.0, 2.0, 3.0], [10, 20, 30]], lambda v, w: {"sum": sum(v), "w": w})
    assert got == {"x": {"sum": 4.0, "w": [10, 30]}, "y": {"sum": 2.0, "w": [20]}}


def test_compare_groups_by_hand():
    # means: a 1.0, b 0.0, c 0.5
    names = ["a", "a", "b", "b", "c", "c"]
    values = [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    c = compare_groups(names, values, "accuracy", resamples=500)
    assert c["ranking"] == ["a", "c", "b"] and (c["best"], c["worst"]) == ("a", "b")
    # constant groups: every resample has the same difference
    assert c["best_minus_worst"] == {"mean": 1.0, "ci": [1.0, 1.0]}
    # a against b and c pooled: 1 - 1/4
    assert c["vs_rest"]["a"]["mean"] == pytest.approx(0.75)
    assert c["vs_rest"]["c"]["mean"] == pytest.approx(0.5 - 0.5)
    assert compare_groups(["a", "a"], [1.0, 2.0], "x") is None
    # the two-sample interval: [0, 2] against [0]: resampled means of the first are 0, 1 or 2
    # with probabilities 1/4, 1/2, 1/4, so the 95% interval is [0, 2]
    assert bootstrap_difference_ci([0.0, 2.0], [0.0], resamples=4000) == (0.0, 2.0)
    assert prompt_gains([[1.0, 3.0], [0.0]], [[1.0, 1.0], [1.0]]) == [1.0, -1.0]


# --------------------------------------------------------------------------------------- against standalone runs


def test_pair_groups_equal_standalone_evaluations(models, tmp_path):
    from preftune import evaluate

    pairs = _pairs()
    result = evaluate(models["model"], ref=models["ref"], pairs=pairs, by="topic", output=tmp_path / "all" / "eval.json", **FAST)
    groups = result["by"]["pairs"]["groups"]
    assert list(groups) == ["a", "b", MISSING]
    assert [g["num_pairs"] for g in groups.values()] == [4, 4, 4]
    for name, group in groups.items():
        records = [r for r in pairs if group_name(r, "topic") == name]
        alone = evaluate(models["model"], ref=models["ref"], pairs=records, output=tmp_path / name / "eval.json", **FAST)
        _close({k: v for k, v in alone["pairs"].items() if k != "file"}, group)
    # the overall figures are those of a run without --by
    plain = evaluate(models["model"], ref=models["ref"], pairs=pairs, output=tmp_path / "plain" / "eval.json", **FAST)
    _close({k: v for k, v in plain.items() if k != "seconds"}, {k: v for k, v in result.items() if k not in ("seconds", "by")})
    comparison = result["by"]["pairs"]["comparison"]
    accuracy = {name: g["accuracy"]["mean"] for name, g in groups.items()}
    assert comparison["measure"] == "accuracy" and comparison["best"] == max(accuracy, key=lambda k: (accuracy[k], -list(groups).index(k)))
    assert comparison["best_minus_worst"]["mean"] == pytest.approx(accuracy[comparison["best"]] - accuracy[comparison["worst"]])


@pytest.mark.parametrize("first", ["a", "b", MISSING])
def test_prompt_groups_equal_standalone_evaluations(models, tmp_path, first):
    """Sample j of prompt i is seeded by (seed, i, j), i its position: with the group's prompts
    first in the file, a standalone run over them draws the very same samples."""
    from preftune import evaluate
    from preftune.eval.evaluation import sample_measures

    prompts = PROMPTS[first] + [p for name, group in PROMPTS.items() if name != first for p in group]
    kwargs = dict(ref=models["ref"], baseline=models["baseline"], reward="length", **FAST)
    result = evaluate(models["model"], prompts=prompts, by="topic", output=tmp_path / "all" / "eval.json", **kwargs)
    by = result["by"]["samples"]
    assert by["baseline"] == models["baseline"] and list(by["groups"]) == ["a", "b", MISSING]
    alone = evaluate(models["model"], prompts=PROMPTS[first], output=tmp_path / "alone" / "eval.json", **kwargs)
    expected = {k: v for k, v in alone["samples"].items() if k in by["groups"][first]}
    _close(expected, by["groups"][first])
    assert by["groups"][first]["num_prompts"] == len(PROMPTS[first])

    # every group is the ungrouped measure over its prompts' per-prompt values, written beside
    rows = [json.loads(line) for line in (tmp_path / "all" / "eval_samples.jsonl").read_text().splitlines()]
    for name, group in by["groups"].items():
        mine = [r for r in rows if r["group"] == name]
        columns = [[r[k] for r in mine] for k in ("model_scores", "baseline_scores", "model_lengths", "baseline_lengths", "log_ratios", "exact_kls")]
        _close(sample_measures(*columns, resamples=200), group)
    gains = {name: g["reward_gain"]["mean"] for name, g in by["groups"].items()}
    assert by["comparison"]["ranking"] == sorted(gains, key=lambda k: -gains[k]) or len(set(gains.values())) < 3
    assert by["comparison"]["best_minus_worst"]["mean"] == pytest.approx(max(gains.values()) - min(gains.values()))
    rest = [g for r in rows if r["group"] != "a" for g in [statistics.fmean(r["model_scores"]) - statistics.fmean(r["baseline_scores"])]]
    assert by["comparison"]["vs_rest"]["a"]["mean"] == pytest.approx(gains["a"] - statistics.fmean(rest))


# --------------------------------------------------------------------------------------- the command and the report


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _pairs()))
    prompts = [p for group in PROMPTS.values() for p in group]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    return root


@pytest.fixture(scope="module")
def runs(files, tiny_model_dir):
    """Two short training runs of the tiny model: full SFT, and DPO with LoRA (its reference: the
    base with the adapter off) - the `--model runs/dpo --baseline runs/sft` of the command."""
    from preftune import train
    from test_trainer import quick_settings

    common = dict(model_name=str(tiny_model_dir), dataset=str(files / "pairs.jsonl"), max_steps=2, eval_split=0)
    train(quick_settings(files, strategy="sft", output_dir=str(files / "sft"), **common))
    train(quick_settings(files, strategy="dpo", output_dir=str(files / "dpo"), lora_r=4, lora_alpha=8, **common))
    return files / "dpo", files / "sft"


def test_eval_by_command_table_json_and_report(runs, files, tmp_path, capsys):
    """DPO against SFT, which groups of prompts improved most: one command."""
    from preftune.eval.report import build_report

    dpo, sft = runs
    out = tmp_path / "run" / "eval.json"
    code = main(
        ["eval", "--model", str(dpo), "--baseline", str(sft),
         "--pairs", str(files / "pairs.jsonl"), "--prompts", str(files / "prompts.jsonl"), "--reward", "length",
         "--num-samples", "2", "--max-new-tokens", "6", "--bootstrap", "200", "--by", "topic", "-o", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert list(result) == ["model", "reference", "confidence", "pairs", "samples", "by", "seconds"]
    by = result["by"]
    assert (by["field"], by["missing"]) == ("topic", MISSING)
    assert {n: g["num_pairs"] for n, g in by["pairs"]["groups"].items()} == {"a": 4, "b": 4, MISSING: 4}
    assert {n: g["num_prompts"] for n, g in by["samples"]["groups"].items()} == {"a": 2, "b": 3, MISSING: 1}
    for group in by["samples"]["groups"].values():
        assert set(group) >= {"reward", "baseline_reward", "reward_gain", "win_rate", "kl_monte_carlo", "kl_per_token", "length_ratio"}
    comparison = by["samples"]["comparison"]
    assert comparison["measure"] == "reward_gain" and sorted(comparison["ranking"]) == sorted(["a", "b", MISSING])
    assert set(comparison["vs_rest"]) == {"a", "b", MISSING}

    # the printed tables: one row per group, samples most improved first, with the intervals
    assert "pairs by topic (3 groups; mean [95% CI])" in printed
    assert result["samples"]["baseline"] == by["samples"]["baseline"] == str(sft)
    assert f"samples by topic (3 groups, most improved first; baseline: {sft}; mean [95% CI])" in printed
    lines = printed.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("samples by topic")))
    assert re.match(r"\s+group\s+prompts\s+reward\s+gain over baseline\s+gain minus the rest's\s+win rate\s+KL\s+length", lines[start + 1])
    table = [line.split()[0] for line in lines[start + 2 : start + 5]]
    assert table == comparison["ranking"]
    gain = by["samples"]["groups"][comparison["ranking"][0]]["reward_gain"]
    assert f"{gain['mean']:+.3f} [{gain['ci'][0]:+.3f}, {gain['ci'][1]:+.3f}]" in lines[start + 2]
    best, worst = comparison["best"], comparison["worst"]
    assert f"  reward gain: highest {best}, lowest {worst}; {best} minus {worst} {comparison['best_minus_worst']['mean']:+.3f} [" in printed
    pair_rows = [line.split() for line in lines if re.match(r"\s+(a|b|\(missing\))\s+4\s", line)]
    assert [r[0] for r in pair_rows] == ["a", "b", MISSING]

    # the report: the per-group tables and one embedded plot of the groups
    page = build_report(out.parent).read_text()
    assert "Evaluation by topic" in page and "<td>(missing)</td>" in page and "gain minus the rest" in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)"', page)
    assert len(images) == 1 and "per topic" in images[0][1]
    import base64

    import matplotlib.image

    height, width, _ = matplotlib.image.imread(io.BytesIO(base64.b64decode(images[0][0]))).shape
    assert width > 600 and height > 200


@pytest.mark.parametrize(
    "source, field, message",
    [
        ("prompts.jsonl", "nosuchfield", "--by nosuchfield: no record of prompts.jsonl has a field 'nosuchfield'; their fields: prompt, topic"),
        ("prompts.jsonl", "topc", "--by topc: no record of prompts.jsonl has a field 'topc' (did you mean 'topic'?); their fields: prompt, topic"),
        ("pairs.jsonl", "Topic", "--by Topic: no record of pairs.jsonl has a field 'Topic' (did you mean 'topic'?); "
                                 "their fields: chosen, prompt, rejected, topic"),
    ],
)
def test_eval_by_a_field_no_record_has(models, files, tmp_path, capsys, source, field, message):
    flag = "--prompts" if source.startswith("prompts") else "--pairs"
    code = main(["eval", "--model", models["model"], "--ref", models["ref"], flag, str(files / source), "--reward", "length",
                 "--by", field, "-o", str(tmp_path / "eval.json")])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err == f"preftune: error: {message}\n"
    assert not (tmp_path / "eval.json").exists()


def test_bundled_sentiment_data_has_a_field_to_group_by():
    from preftune.data import load_records
    from preftune.recipes.quickstart import bundled_data

    for name in ("prompts_heldout.jsonl", "prompts_train.jsonl", "test.jsonl", "train.jsonl"):
        records = [r for _, r in load_records(bundled_data(name))]
        assert all(r["prefix_length"] == ("short" if len(r["prefix"].split()) <= 5 else "long") for r in records)
        assert {r["label"] for r in records} == {"neg", "pos"}
    heldout = [r for _, r in load_records(bundled_data("prompts_heldout.jsonl"))]
    assert {g: len(rows) for g, rows in group_rows([r["prefix_length"] for r in heldout]).items()} == {"long": 31, "short": 33}
