"""`max_train_samples`: a seeded nested subset of the training rows, taken after the eval split, and
a run that trains on exactly those rows."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import yaml

from preftune.config import from_dict, load_config
from preftune.errors import PreftuneError
from preftune.prepared import split_rows, subset_rows, take_train_samples
from preftune.training.recipe import Trainer


@pytest.fixture(autouse=True)
def _propagate_logs():
    logging.getLogger("preftune").propagate = True


def test_subsets_are_seeded_and_nested():
    n = 50
    sizes = [1, 3, 10, 25, 50]
    subsets = [subset_rows(n, k, seed=7) for k in sizes]
    for small, large in zip(subsets, subsets[1:]):
        assert set(small) < set(large)  # each inside every larger one
    assert [len(s) for s in subsets] == sizes and all((np.diff(s) > 0).all() for s in subsets)
    assert np.array_equal(subset_rows(n, 10, seed=7), subsets[2])  # same seed, same rows
    assert not np.array_equal(subset_rows(n, 10, seed=8), subsets[2])  # another seed, others
    assert np.array_equal(subsets[-1], np.arange(n))
    assert np.array_equal(subset_rows(n, None, seed=7), np.arange(n))


def test_a_fraction_is_the_count_it_rounds_to():
    assert np.array_equal(subset_rows(50, 0.2, seed=3), subset_rows(50, 10, seed=3))
    assert np.array_equal(subset_rows(50, 1.0, seed=3), np.arange(50))
    assert len(subset_rows(50, 0.001, seed=3)) == 1  # never empty
    assert np.array_equal(subset_rows(7, 0.5, seed=3), subset_rows(7, round(3.5), seed=3))


def test_take_train_samples_cuts_a_list_or_a_table_view_the_same_way():
    rows = np.array([10, 11, 13, 14, 17, 19, 20])
    (table, kept), pool = take_train_samples(("table", rows), 3, seed=5)
    assert table == "table" and pool == 7 and np.array_equal(kept, rows[subset_rows(7, 3, seed=5)])
    examples, pool = take_train_samples(list(rows), 3, seed=5)
    assert examples == kept.tolist() and pool == 7


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "config: 'max_train_samples' must be a count >= 1 or a fraction in (0, 1], got 0"),
        (-4, "config: 'max_train_samples' must be a count >= 1 or a fraction in (0, 1], got -4"),
        (1.5, "config: 'max_train_samples' must be a count >= 1 (a whole number) or a fraction in (0, 1], got 1.5"),
        (-0.5, "config: 'max_train_samples' must be a count >= 1 (a whole number) or a fraction in (0, 1], got -0.5"),
        (True, "config: 'max_train_samples' must be a whole number or a number or null, got True"),
    ],
)
def test_bad_values_are_one_line_errors(value, message):
    with pytest.raises(PreftuneError) as exc:
        from_dict({"max_train_samples": value})
    assert str(exc.value) == message


def test_a_count_and_a_fraction_keep_their_kind():
    assert from_dict({"max_train_samples": 3}).max_train_samples == 3
    one = load_config(None, ["max_train_samples=1.0"]).max_train_samples
    assert one == 1.0 and isinstance(one, float)  # the whole data, not one pair
    with pytest.raises(PreftuneError, match=r"unknown key 'max_train_sample' \(did you mean 'max_train_samples'\?\)"):
        from_dict({"max_train_sample": 3})


def test_more_than_the_training_data_is_an_error():
    with pytest.raises(PreftuneError) as exc:
        subset_rows(20, 21, seed=0)
    assert str(exc.value) == (
        "'max_train_samples' 21 is more than the 20 training pairs (after the eval split); use at most 20, or a fraction such as 0.5"
    )


def numbered_pairs(n: int) -> list[dict]:
    """Pairs whose prompt carries its line number, so a batch says which records it holds."""
    return [{"prompt": f"Question {i} : is it good?", "chosen": " yes, good.", "rejected": " no, bad."} for i in range(n)]


def test_a_run_trains_on_exactly_the_subset_and_evaluates_on_the_whole_split(tmp_path, tiny_model_dir, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in numbered_pairs(20)))
    cfg = from_dict(
        dict(
            model_name=str(tiny_model_dir), dataset=str(data), output_dir=str(tmp_path / "run"), max_train_samples=3,
            eval_split=5, seed=11, max_steps=2, per_device_train_batch_size=4, lora_r=0, logging_steps=1,
            max_seq_length=64, progress_bar=False, cache_dir=str(tmp_path / "cache"),
        )
    )
    trainer = Trainer(cfg)
    seen: list[int] = []
    device_batch = trainer._device_batch

    def recording(items):
        if trainer.inner.training:  # training steps only, not evaluation
            seen.extend(int(re.search(r"Question (\d+)", trainer.tokenizer.decode(item.prompt_ids)).group(1)) for item in items)
        return device_batch(items)

    trainer._device_batch = recording
    with caplog.at_level(logging.INFO, logger="preftune"):
        trainer.setup()
        trainer.train()
    train_rows, eval_rows = split_rows(20, 5, 11)
    chosen = train_rows[subset_rows(15, 3, 11)]
    assert sorted(trainer.train_items.rows.tolist()) == chosen.tolist()
    assert trainer.eval_items.rows.tolist() == eval_rows.tolist()  # the eval split is unchanged
    assert sorted(seen) == sorted(chosen.tolist() * 2)  # two steps, each the whole subset (batch 4 > 3)
    assert "dpo: training on 3 of 15 pairs (max_train_samples) (5 eval)" in caplog.text
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["max_train_samples"] == 3
