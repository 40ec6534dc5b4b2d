"""`preftune sweep`: the grid, the frontier against hand-computed baselines, and resume."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import statistics

import pytest

from preftune.errors import PreftuneError
from preftune.eval.evaluation import expected_best_of_n
from preftune.eval.sweep import parse_grid, read_frontier, run_name, run_sweep


@pytest.fixture(autouse=True)
def _propagate_logs():
    logging.getLogger("preftune").propagate = True


def test_grid_is_every_combination_with_values_parsed_as_yaml():
    combos = parse_grid(["beta=0.1, 0.5", "loss_type=sigmoid,ipo"])
    assert combos == [
        {"beta": 0.1, "loss_type": "sigmoid"},
        {"beta": 0.1, "loss_type": "ipo"},
        {"beta": 0.5, "loss_type": "sigmoid"},
        {"beta": 0.5, "loss_type": "ipo"},
    ]
    assert run_name(combos[1]) == "beta=0.1,loss_type=ipo"
    with pytest.raises(PreftuneError, match="expected KEY=VALUE1,VALUE2"):
        parse_grid(["beta"])
    with pytest.raises(PreftuneError, match="given twice"):
        parse_grid(["beta=0.1", "beta=0.2"])


def test_frontier_rows_and_baselines_by_hand(tiny_sweep):
    root, settings, rows = tiny_sweep
    sweep = root / "sweep"
    assert [r["label"] for r in rows] == ["reference", "best-of-2", "best-of-4", "beta=0.1", "beta=0.5"]
    # The reference's 4 samples per prompt, scored by the length reward, are the baselines' data.
    lines = (sweep / "reference_samples.jsonl").read_text().splitlines()
    scores = [json.loads(line)["scores"] for line in lines[1:]]
    assert len(scores) == 4 and all(len(s) == 4 for s in scores)
    assert rows[0]["reward"] == pytest.approx(statistics.fmean(statistics.fmean(s) for s in scores))
    assert rows[0]["kl"] == 0.0
    best2 = statistics.fmean(expected_best_of_n(s, 2) for s in scores)
    assert rows[1]["reward"] == pytest.approx(best2) and rows[1]["kl"] == pytest.approx(math.log(2) - 0.5)
    assert rows[2]["reward"] == pytest.approx(statistics.fmean(max(s) for s in scores))
    # Each run's row is its eval.json, whose baseline is the reference's first 2 samples of each prompt.
    for row in rows[3:]:
        result = json.loads((sweep / row["label"] / "eval.json").read_text())
        assert row["reward"] == result["samples"]["reward"]["mean"]
        assert row["kl"] == result["samples"]["kl_per_token"]["mean"] and row["kl"] > 0
        assert result["samples"]["baseline_reward"]["mean"] == pytest.approx(statistics.fmean(statistics.fmean(s[:2]) for s in scores))
        assert 0.0 <= result["pairs"]["accuracy"]["mean"] <= 1.0 and result["pairs"]["num_pairs"] == 8
    # frontier.csv holds the same rows; frontier.png is a PNG
    with (sweep / "frontier.csv").open() as f:
        assert [r["label"] for r in csv.DictReader(f)] == [r["label"] for r in rows]
    assert read_frontier(sweep / "frontier.csv")[3]["reward"] == pytest.approx(rows[3]["reward"], rel=1e-5)
    assert (sweep / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_resumes_finished_and_interrupted_runs(tiny_sweep, tmp_path, caplog):
    root, settings, rows = tiny_sweep
    sweep = tmp_path / "sweep"
    shutil.copytree(root / "sweep", sweep)
    settings.output_dir = str(sweep)
    # beta=0.1 is finished and evaluated; beta=0.5 lost its final model and evaluation: it was
    # cut short after its step-2 checkpoint.
    shutil.rmtree(sweep / "beta=0.5" / "final")
    shutil.rmtree(sweep / "beta=0.5" / "checkpoints" / "step-3")
    (sweep / "beta=0.5" / "eval.json").unlink()
    final_before = (sweep / "beta=0.1" / "final" / "adapter_model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="preftune"):
        again = run_sweep(settings)
    log = caplog.text
    assert "beta=0.1: trained already" in log and "beta=0.1: evaluated already" in log
    assert "reusing" in log and "reference_samples.jsonl" in log
    assert "resumed from" in log and "step-2" in log and "beta=0.5: evaluating" in log
    assert (sweep / "beta=0.1" / "final" / "adapter_model.safetensors").stat().st_mtime_ns == final_before
    assert [r["label"] for r in again] == [r["label"] for r in rows]
    assert again[3] == {**rows[3], "run_dir": str(sweep / "beta=0.1")}
    settings.output_dir = None


def test_the_sweep_command_says_where_it_wrote_the_frontier(tiny_sweep, tmp_path, capsys):
    from preftune.cli import main

    root, settings, rows = tiny_sweep
    sweep = tmp_path / "sweep"
    shutil.copytree(root / "sweep", sweep)  # finished: the command only rereads and rewrites the frontier
    code = main([
        "sweep", str(root / "config.yaml"), "--set-grid", "beta=0.1,0.5", "--prompts", str(root / "prompts.jsonl"),
        "--reward", "length", "--pairs", str(root / "test.jsonl"), "--num-samples", "2", "--best-of", "1,2,4",
        "--max-new-tokens", "6", "--output-dir", str(sweep),
    ])
    out, err = capsys.readouterr()
    assert code == 0
    assert err.splitlines()[-2:] == [
        f"[preftune] frontier -> {sweep / 'frontier.csv'}",
        f"[preftune] plot -> {sweep / 'frontier.png'}",
    ]
    assert "beta=0.5" in out  # the table itself goes to stdout
    print(err.splitlines()[-2:])


# -- learning curves: --set-grid max_train_samples=...


@pytest.fixture(scope="module")
def tiny_curve(tmp_path_factory, tiny_model_dir):
    """A learning curve on the tiny model: runs on 4 and 12 of the 16 training pairs."""
    from conftest import task_pairs

    from preftune.eval.sweep import SweepSettings

    root = tmp_path_factory.mktemp("curve")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_pairs(20)))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_pairs(6, seed=1)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in task_pairs(3, seed=2)))
    (root / "config.yaml").write_text(
        f"model_name: {tiny_model_dir}\ndataset: {root / 'train.jsonl'}\noutput_dir: {root / 'curve'}\n"
        "lora_r: 4\nlora_alpha: 8\nlearning_rate: 0.01\nmax_steps: 2\nper_device_train_batch_size: 4\n"
        "eval_split: 4\nlogging_steps: 1\nprogress_bar: false\n"
    )
    settings = SweepSettings(
        config=str(root / "config.yaml"), grid=["max_train_samples=12,4"], prompts=str(root / "prompts.jsonl"),
        reward="length", pairs=str(root / "test.jsonl"), num_samples=2, best_of=(1, 2), max_new_tokens=4, progress=False,
    )
    return root, settings, run_sweep(settings)


def test_learning_curve_csv_has_the_swept_key_and_the_base_at_zero(tiny_curve):
    root, settings, rows = tiny_curve
    with (root / "curve" / "frontier.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:2] == ["max_train_samples", "kind"]
    assert [(r["label"], r["max_train_samples"]) for r in table] == [
        ("reference", "0"), ("best-of-2", ""), ("max_train_samples=12", "12"), ("max_train_samples=4", "4"),
    ]
    read = read_frontier(root / "curve" / "frontier.csv")
    assert [r["max_train_samples"] for r in read] == [0, "", 12, 4]
    # each run trained on its subset: its start line is in its config and its first metrics record
    for n in (4, 12):
        run = root / "curve" / f"max_train_samples={n}"
        assert "max_train_samples: " + str(n) in (run / "config.resolved.yaml").read_text()
        result = json.loads((run / "eval.json").read_text())
        assert read[2 if n == 12 else 3]["preference_accuracy"] == pytest.approx(result["pairs"]["accuracy"]["mean"], rel=1e-5)


def test_learning_curve_plot_points_are_the_base_then_each_run_in_order(tiny_curve):
    from preftune.eval.sweep import curve_figure, curve_series

    root, settings, rows = tiny_curve
    assert (root / "curve" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    read = read_frontier(root / "curve" / "frontier.csv")
    by_n = {r["max_train_samples"]: r for r in read if r["kind"] == "dpo"}
    for metric, base in (("reward", read[0]["reward"]), ("preference_accuracy", 0.0)):
        lines, base_point = curve_series(read, ["max_train_samples"], metric)
        assert base_point == {"x": 0, "y": pytest.approx(base)}
        assert [(line.x, line.y) for line in lines] == [([4, 12], [by_n[4][metric], by_n[12][metric]])]
        fig = curve_figure(read, ["max_train_samples"], metric)
        ax = fig.axes[0]
        (data,) = [c.lines[0] for c in ax.containers]  # the errorbar line: base first, then 4 and 12 pairs
        assert data.get_xdata().tolist() == [0, 4, 12]
        assert data.get_ydata().tolist() == pytest.approx([base, by_n[4][metric], by_n[12][metric]])
        assert ax.get_xlabel() == "max_train_samples (training pairs)"
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_a_curve_over_several_keys_has_a_line_per_other_value_and_a_level_for_the_base():
    from preftune.eval.sweep import FRONTIER_COLUMNS, curve_figure, curve_series

    def row(kind, n, beta, reward):
        blank = dict.fromkeys(FRONTIER_COLUMNS, "")
        return {**blank, "max_train_samples": n, "beta": beta, "kind": kind, "reward": reward, "reward_low": reward - 0.1, "reward_high": reward + 0.1}

    rows = [row("reference", 0, "", 0.1)] + [
        row("dpo", n, beta, 0.2 + n / 100 + beta) for n in (8, 2) for beta in (0.1, 0.5)
    ]
    lines, base = curve_series(rows, ["max_train_samples", "beta"], "reward")
    assert [(line.label, line.x) for line in lines] == [("beta=0.1", [2, 8]), ("beta=0.5", [2, 8])]
    assert lines[1].y == pytest.approx([0.72, 0.78]) and base == {"x": 0, "y": 0.1}
    # swept beta first: no "nothing trained" value, so the base model is a dashed level
    lines, base = curve_series(rows, ["beta", "max_train_samples"], "reward")
    assert [(line.label, line.x) for line in lines] == [("max_train_samples=8", [0.1, 0.5]), ("max_train_samples=2", [0.1, 0.5])]
    assert base == {"x": None, "y": 0.1}
    ax = curve_figure(rows, ["beta", "max_train_samples"], "reward").axes[0]
    assert [list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == "--"] == [[0.1, 0.1]]


def test_the_metric_is_checked_before_anything_trains(tmp_path):
    from preftune.eval.sweep import SweepSettings

    settings = SweepSettings(config=str(tmp_path / "none.yaml"), grid=["max_train_samples=2"], prompts="p", reward="length", metric="acuracy")
    with pytest.raises(PreftuneError, match=r"^--metric must be one of reward, preference_accuracy, .*, got 'acuracy' \(did you mean 'preference_accuracy'\?\)$"):
        run_sweep(settings)
    settings.metric = "preference_accuracy"
    with pytest.raises(PreftuneError, match="--metric preference_accuracy needs --pairs"):
        run_sweep(settings)
