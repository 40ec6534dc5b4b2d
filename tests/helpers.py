"""Helpers the tests share: synthetic preference data any model can learn, the settings of a quick
run on the tiny model, and reading a run's metrics back. Fixtures live in conftest.py."""

from __future__ import annotations

import json
import random
from typing import Any

from preftune.config import TrainConfig, validate


POSITIVE = ["good", "great", "happy", "yes", "wonderful"]
NEGATIVE = ["bad", "awful", "sad", "no", "terrible"]
SUBJECTS = ["the movie", "the film", "the sky", "the grass", "it", "this", "the answer", "the question"]


def synthetic_pairs(n: int, seed: int = 0) -> list[dict]:
    """A preference any model can learn: chosen answers are positive words, rejected negative."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        rows.append(
            {
                "prompt": f"Question: is {subject} {rng.choice(POSITIVE + NEGATIVE)}? Answer:",
                "chosen": f" {rng.choice(POSITIVE)}, {subject} was {rng.choice(POSITIVE)}.",
                "rejected": f" {rng.choice(NEGATIVE)}, {subject} was {rng.choice(NEGATIVE)}.",
            }
        )
    return rows


def quick_settings(tmp_path, **overrides) -> dict:
    """Settings of a quick run on the tiny model; the caller names the model and the data."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_steps=4,
        warmup_ratio=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_split=8,
        lora_r=0,
        max_seq_length=64,
        max_prompt_length=32,
        progress_bar=False,
        cache_dir=str(tmp_path / "cache"),
        seed=3,
    )
    base.update(overrides)
    if base.get("strategy") == "reward":
        base.pop("max_prompt_length")  # a reward model reads whole conversations: the key is refused there
    return base


def make_config(tmp_path, model_dir, pairs_file, **overrides) -> TrainConfig:
    return validate(TrainConfig(**quick_settings(tmp_path, model_name=str(model_dir), dataset=str(pairs_file), **overrides)))


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train(config: TrainConfig, **objects: Any) -> dict[str, float]:
    """A run started the one way runs start (`training.recipe.run`); its last logged metrics."""
    from preftune.training.recipe import run

    return run(config, **objects)[1]
