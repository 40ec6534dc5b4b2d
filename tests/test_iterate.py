"""Iterative DPO on a tiny random model: rounds end to end, what each round starts from and is
measured against, resume of finished and half-done rounds, and bad input.

The real run (SmolLM2 on the bundled sentiment task, about 30 minutes on two CPU cores) is
`preftune iterate examples/iterate_sentiment.yaml`, reported in the README.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.recipes.iterate import IterateConfig, format_summary, load_iterate_config, round_prompts, run_iterate


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prompt_means(rows: list[dict], key: str) -> float:
    return statistics.fmean(statistics.fmean(r[key]) for r in rows)


@pytest.fixture()
def task(tmp_path, tiny_model_dir):
    """A config writer for a tiny iterate run: 6 training prompts, 3 held-out ones, the `length`
    reward (words), which a random model's samples vary in."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the film {i} was", "label": i % 2}) + "\n" for i in range(6)))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"the show {i} is"}) + "\n" for i in range(3)))

    def write(name: str = "cfg.yaml", **iterate_keys) -> Path:
        config = {
            "model_name": str(tiny_model_dir),
            "output_dir": str(tmp_path / "run"),
            "seed": 3,
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "learning_rate": 1e-12,
            "eval_split": 0,
            "save_steps": 1,
            "save_total_limit": None,
            "cache_dir": str(tmp_path / "cache"),
            "progress_bar": False,
            "iterate": {
                "rounds": 2,
                "prompts": str(prompts),
                "eval_prompts": str(held),
                "reward": "length",
                "num_samples": 3,
                "max_new_tokens": 6,
                **iterate_keys,
            },
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config))
        return path

    return write


def test_two_rounds_end_to_end(tmp_path, task, tiny_model_dir, capsys):
    # A learning rate of ~0 keeps every policy equal to the initial model: the held-out samples
    # (same seeds) are then the initial model's, so reward and length equal its own, win rate one
    # half and KL zero, exactly. What each round sampled with, paired and trained from is checked
    # on the files.
    assert main(["iterate", str(task())]) == 0
    run = tmp_path / "run"
    for r in (1, 2):
        out = run / f"round-{r}"
        for name in ("samples.jsonl", "pairs.jsonl", "eval.json", "eval_samples.jsonl", "train/metrics.jsonl"):
            assert (out / name).is_file(), name
        assert (out / "train" / "final" / "adapter_config.json").is_file()
        assert (out / "train" / "final_merged" / "config.json").is_file()

        samples = read_jsonl(out / "samples.jsonl")
        start = str(tiny_model_dir) if r == 1 else str(run / "round-1" / "train" / "final_merged")
        assert {s["sampling"]["model"] for s in samples} == {start}
        assert {s["sampling"]["seed"] for s in samples} == {3 + r}  # fresh noise each round
        assert [s["index"] for s in samples] == list(range(6))
        expected_pairs = []
        for s in samples:
            assert s["scores"] == [float(len(c.split())) for c in s["completions"]]
            assert s["prompt"] == [{"role": "user", "content": f"the film {s['index']} was"}]
            best, worst = max(s["scores"]), min(s["scores"])
            if best > worst:
                expected_pairs.append(
                    (s["completions"][s["scores"].index(best)], s["completions"][s["scores"].index(worst)], best, worst)
                )
        pairs = read_jsonl(out / "pairs.jsonl")
        assert [(p["chosen"], p["rejected"], p["chosen_score"], p["rejected_score"]) for p in pairs] == expected_pairs

        resolved = yaml.safe_load((out / "train" / "config.resolved.yaml").read_text())
        assert resolved["model_name"] == start
        assert resolved["dataset"] == str(out / "pairs.jsonl")
        assert resolved["ref_model_name"] is None  # reference: previous, the starting policy
        assert resolved["merge_lora"] is True

    initial = read_jsonl(run / "initial" / "eval_samples.jsonl")
    assert [r["prompt"][0]["content"] for r in initial] == [f"the show {i} is" for i in range(3)]
    summary = json.loads((run / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2]
    for r, row in enumerate(summary["rounds"]):
        if r:
            rows = read_jsonl(run / f"round-{r}" / "eval_samples.jsonl")
            assert [x["completions"] for x in rows] == [x["completions"] for x in initial]
            assert all(x["kl_log_ratios"] == pytest.approx([0.0], abs=1e-4) for x in rows)
            result = json.loads((run / f"round-{r}" / "eval.json").read_text())
            assert result["reward_before"] == pytest.approx(prompt_means(initial, "scores"))
            assert row["pairs"] == result["pairs"] == len(read_jsonl(run / f"round-{r}" / "pairs.jsonl"))
        assert row["reward"] == pytest.approx(prompt_means(initial, "scores"))
        assert row["length"] == pytest.approx(prompt_means(initial, "lengths"))
        assert row["win_rate"] == 0.5
        assert row["kl"] == pytest.approx(0.0, abs=1e-4)
    assert summary["last_vs_first"] == {"reward_gain": 0.0, "stderr": 0.0}
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["round", "pairs", "mean"]
    assert [line.split()[0] for line in printed.splitlines()[1:4]] == ["0", "1", "2"]
    assert "round 2 against round 1: +0.000 mean length" in printed


def test_reference_initial_and_kl_to_the_initial_model(tmp_path, task, tiny_model_dir):
    # A learning rate that moves the model: round 2 trains from round 1's merged policy against the
    # initial model, its policy is round 1's plus its own adapter, and its KL is measured against
    # the initial model (recomputed here from the stored samples).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preftune.batching import encode_prompt
    from preftune.eval.evaluation import completion_logps
    from preftune.models import load_tokenizer

    config = task(reference="initial")
    cfg, it = load_iterate_config(config, ["learning_rate=0.05"])
    run_iterate(cfg, it)
    run = tmp_path / "run"
    merged_1 = run / "round-1" / "train" / "final_merged"
    resolved = [yaml.safe_load((run / f"round-{r}" / "train" / "config.resolved.yaml").read_text()) for r in (1, 2)]
    assert resolved[0]["ref_model_name"] is None and resolved[1]["ref_model_name"] == str(tiny_model_dir)
    assert resolved[1]["model_name"] == str(merged_1)

    merged_by_hand = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(merged_1), run / "round-2" / "train" / "final"
    ).merge_and_unload()
    policy = AutoModelForCausalLM.from_pretrained(run / "round-2" / "train" / "final_merged")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for (name, a), b in zip(merged_by_hand.state_dict().items(), policy.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(policy.state_dict()["model.layers.0.self_attn.q_proj.weight"], initial.state_dict()["model.layers.0.self_attn.q_proj.weight"])

    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = read_jsonl(run / "round-2" / "eval_samples.jsonl")
    prompt_ids = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
    completion_ids = [r["kl_token_ids"][0] for r in rows]
    by_hand = [
        a - b
        for a, b in zip(
            completion_logps(policy, prompt_ids, completion_ids, tokenizer.pad_token_id),
            completion_logps(initial, prompt_ids, completion_ids, tokenizer.pad_token_id),
        )
    ]
    assert [r["kl_log_ratios"][0] for r in rows] == pytest.approx(by_hand, abs=1e-4)
    result = json.loads((run / "round-2" / "eval.json").read_text())
    assert result["kl"] == pytest.approx(statistics.fmean(by_hand), abs=1e-4)
    assert abs(result["kl"]) > 1e-3


def test_resume_skips_done_rounds_and_continues_a_half_done_one(tmp_path, task, monkeypatch):
    from preftune.training import recipe

    calls = []
    real_run = recipe.run

    def spy(config, **objects):
        calls.append(config.output_dir)
        return real_run(config, **objects)

    monkeypatch.setattr(recipe, "run", spy)
    config = task(reference="previous")
    overrides = ["learning_rate=0.05"]
    run = tmp_path / "run"
    assert main(["iterate", str(config), "--rounds", "1", *sum((["--set", o] for o in overrides), [])]) == 0
    done_1 = (run / "round-1" / "eval.json").stat().st_mtime_ns
    # More rounds extend the run: round 1 is not redone.
    assert main(["iterate", str(config), *sum((["--set", o] for o in overrides), [])]) == 0
    assert calls == [str(run / "round-1" / "train"), str(run / "round-2" / "train")]
    assert (run / "round-1" / "eval.json").stat().st_mtime_ns == done_1

    out = run / "round-2"
    before = {name: (out / name).read_text() for name in ("samples.jsonl", "pairs.jsonl", "eval_samples.jsonl")}
    eval_before = json.loads((out / "eval.json").read_text())
    metrics_before = read_jsonl(out / "train" / "metrics.jsonl")
    merged_before = (out / "train" / "final_merged" / "model.safetensors").read_bytes()

    # Interrupted in round 2: sampling stopped after the first prompt (and half a line), training
    # after step 1 of 2.
    lines = before["samples.jsonl"].splitlines(keepends=True)
    first = json.loads(lines[0])
    for key in ("scores", "reward"):
        first.pop(key)
    (out / "samples.jsonl").write_text(json.dumps(first) + "\n" + lines[1][:20])
    for name in ("pairs.jsonl", "eval.json", "eval_samples.jsonl"):
        (out / name).unlink()
    for name in ("final", "final_merged", "checkpoints/step-2"):
        shutil.rmtree(out / "train" / name)
    (run / "summary.json").unlink()
    calls.clear()

    assert main(["iterate", str(config), *sum((["--set", o] for o in overrides), [])]) == 0
    assert calls == [str(out / "train")]
    for name, text in before.items():
        assert (out / name).read_text() == text, name
    eval_after = json.loads((out / "eval.json").read_text())
    timing = {"sample_seconds", "train_seconds", "eval_seconds"}
    assert {k: v for k, v in eval_after.items() if k not in timing} == {k: v for k, v in eval_before.items() if k not in timing}
    metrics_after = read_jsonl(out / "train" / "metrics.jsonl")
    assert [m["step"] for m in metrics_after] == [m["step"] for m in metrics_before]
    assert [m["loss"] for m in metrics_after] == pytest.approx([m["loss"] for m in metrics_before], abs=1e-6)
    merged_after = (out / "train" / "final_merged" / "model.safetensors").read_bytes()
    assert merged_after == merged_before
    assert (run / "summary.json").is_file()


def test_other_settings_in_the_same_folder_are_refused(tmp_path, task, capsys):
    config = task(rounds=1)
    assert main(["iterate", str(config)]) == 0
    capsys.readouterr()
    assert main(["iterate", str(config), "--min-margin", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("preftune: error: ") and "other settings (iterate.min_margin)" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1
    # --overwrite starts afresh with the new settings.
    assert main(["iterate", str(config), "--min-margin", "0.5", "--overwrite"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "iterate.yaml").read_text())
    assert saved["iterate"]["min_margin"] == 0.5
    assert all(p["chosen_score"] - p["rejected_score"] >= 0.5 for p in read_jsonl(tmp_path / "run" / "round-1" / "pairs.jsonl"))


@pytest.mark.parametrize(
    "iterate_keys, train_keys, message",
    [
        ({"round": 2}, {}, "unknown key 'iterate.round' (did you mean 'rounds'?)"),
        ({"num_samples": 1}, {}, "'iterate.num_samples' must be >= 2"),
        ({"reference": "inital"}, {}, "'iterate.reference' must be one of initial, previous; got 'inital' (did you mean 'initial'?)"),
        ({"pair_strategy": "best"}, {}, "'iterate.pair_strategy' must be one of best-worst, all-pairs, random"),
        ({"temperature": 0}, {}, "'iterate.temperature' must be > 0"),
        ({"rounds": "three"}, {}, "'iterate.rounds' must be a whole number, got 'three'"),
        ({}, {"dataset": "pairs.jsonl"}, "'dataset' is not used by iterate"),
        ({}, {"ref_model_name": "other"}, "'ref_model_name' is not used by iterate"),
        ({"reference": "initial"}, {"reference": "adapter"}, "'reference: adapter' is the round's starting policy"),
        ({}, {"betaa": 0.1}, "unknown key 'betaa' (did you mean 'beta'?)"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(tmp_path, capsys, iterate_keys, train_keys, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), **train_keys, "iterate": iterate_keys}))
    assert main(["iterate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"preftune: error: {path}: {message}" or (err.startswith(f"preftune: error: {path}: ") and message in err)
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_flags_override_the_block(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"iterate": {"rounds": 5, "reward": "length", "min_margin": 0.1}}))
    cfg, it = load_iterate_config(path, ["beta=0.3"], {"rounds": 2, "min_margin": None, "reference": "initial"})
    assert (it.rounds, it.reward, it.min_margin, it.reference) == (2, "length", 0.1, "initial")
    assert cfg.beta == 0.3
    assert load_iterate_config(tmp_path / "c.json")[1].num_samples == IterateConfig().num_samples


def test_round_prompts_draw():
    from preftune.collect.generation import PromptRecord

    prompts = [PromptRecord(i, f"p{i}", f"f:{i + 1}") for i in range(10)]
    it = IterateConfig(prompts_per_round=4)
    one, two = round_prompts(prompts, it, 0, 1), round_prompts(prompts, it, 0, 2)
    assert len(one) == len(two) == 4
    assert [p.index for p in one] == sorted(p.index for p in one)
    assert [p.index for p in one] != [p.index for p in two]  # a new draw each round
    assert [p.index for p in round_prompts(prompts, it, 0, 1)] == [p.index for p in one]  # and the same on a rerun
    assert round_prompts(prompts, IterateConfig(), 0, 1) == prompts
    assert round_prompts(prompts, IterateConfig(prompts_per_round=50), 0, 1) == prompts


def test_format_summary():
    rows = [
        {"round": 0, "pairs": None, "reward": 0.1234, "reward_stderr": 0.05, "kl": 0.0, "kl_stderr": 0.0, "win_rate": 0.5, "length": 22.94},
        {"round": 1, "pairs": 58, "reward": 0.5, "reward_stderr": 0.041, "kl": 4.256, "kl_stderr": 0.3, "win_rate": 0.7375, "length": 23.0},
    ]
    lines = format_summary(rows, "sentiment").splitlines()
    assert lines[0].split("  ")[0] == "round"
    assert lines[1].split() == ["0", "+0.123", "±", "0.050", "0.00", "±", "0.00", "50.0%", "22.9"]
    assert lines[2].split() == ["1", "58", "+0.500", "±", "0.041", "4.26", "±", "0.30", "73.8%", "23.0"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_judge_self_rounds_learn_from_the_policys_own_judgements(tmp_path, task, tiny_model_dir, capsys):
    # AI feedback (Yuan et al. 2024): round 1's starting policy, the initial model, judges its own
    # samples, and pairs follow the mean win probabilities. A learning rate of ~0 keeps the policy
    # equal to the initial model, so its held-out samples are the initial's: judged against them,
    # every prompt comes out at one half.
    from test_judge import p_first_by_hand

    assert main(["iterate", str(task(reward="judge:self", rounds=1))]) == 0
    run = tmp_path / "run"
    samples = read_jsonl(run / "round-1" / "samples.jsonl")
    s = samples[0]
    text = s["prompt"][0]["content"]
    c = s["completions"]
    assert s["reward"] == "judge:self"
    if c[0] != c[1]:
        assert s["win_probabilities"][0][1] == pytest.approx(p_first_by_hand(tiny_model_dir, text, c[0], c[1]), abs=1e-6)
    for s in samples:
        m = s["win_probabilities"]
        assert s["scores"] == pytest.approx([(sum(row) - row[j]) / (len(row) - 1) for j, row in enumerate(m)])
    pairs = read_jsonl(run / "round-1" / "pairs.jsonl")
    assert pairs and all(p["chosen_score"] > p["rejected_score"] and "judge_probability" in p for p in pairs)

    initial = read_jsonl(run / "initial" / "eval_samples.jsonl")
    assert all(statistics.fmean(r["scores"]) == pytest.approx(0.5, abs=1e-6) for r in initial)
    result = json.loads((run / "round-1" / "eval.json").read_text())
    assert result["reward"] == "judge:self" and result["samples_reward"] is None
    assert result["reward_after"] == pytest.approx(0.5, abs=1e-6)
    assert result["win_rate"] == pytest.approx(0.5)
    assert "P(beats initial), judge:self" in capsys.readouterr().out
