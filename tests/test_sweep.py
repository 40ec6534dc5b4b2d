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
