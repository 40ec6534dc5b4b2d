"""The quickstart recipe: DPO with LoRA on the bundled sentiment pairs, then base against tuned.

The task is the controlled-sentiment generation of the DPO paper (Rafailov et al. 2023,
arXiv:2305.18290, section 6.1) built small and offline: prompts ask to complete the beginning of a
real movie-review sentence, the reward is VADER's sentiment of the completion, and the pairs were
sampled from the embedded SmolLM2-135M-Instruct and ranked by that reward (see
`resources/sentiment/README.md`). The recipe:

1. sample the base model on held-out prompts (prompts of neither the train nor the test pairs);
2. train DPO (sigmoid loss, beta 0.1) with LoRA r=16 on every linear layer;
3. sample the tuned model on the same prompts with the same per-sample seeds (common random
   numbers: a difference between the two is the model's, not the dice's), at the temperature the
   data was sampled at (0.7), and once more at temperature 1 for the KL estimate;
4. score both with the same reward and write `eval.json` with the measures of
   `preftune.eval.evaluation`, plus `eval_samples.jsonl` with every completion and score.

Sizes are chosen to finish within 10 minutes on two CPU cores, GGUF conversion included; on a
CUDA GPU the trainer runs in bf16 and the recipe trains and samples more.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from preftune.errors import PreftuneError
from preftune.eval.evaluation import sample_prompts
from preftune.collect.generation import (
    PromptRecord,
    Samples,
    SamplingSettings,
    chat_prompts,
    load_prompts,
    scoring_rows,
)
from preftune.io import write_atomic, write_jsonl_atomic

log = logging.getLogger("preftune")

DATA_PACKAGE = "preftune"
DATA_FOLDER = ("resources", "sentiment")


def bundled_data(name: str) -> Path:
    """Path of a file of the bundled sentiment data (`train.jsonl`, `test.jsonl`,
    `prompts_heldout.jsonl`), from the installed package."""
    path = resources.files(DATA_PACKAGE).joinpath(*DATA_FOLDER, name)
    if not path.is_file():
        raise PreftuneError(f"bundled data file missing: {path} (reinstall preftune)")
    return Path(str(path))


@dataclass
class QuickstartSettings:
    """Every knob of the recipe; `for_device` picks the sizes."""

    output_dir: str = "runs/quickstart"
    model_name: str = "smollm2-135m-instruct"
    reward: str = "sentiment"
    # data: None means the bundled files
    train_data: str | None = None
    test_data: str | None = None
    heldout_prompts: str | None = None
    seed: int = 0
    # training
    max_steps: int = 24  # on CPU: ~5 minutes; more steps raise the reward further but also the KL and length
    batch_size: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    lora_r: int = 16
    max_seq_length: int = 192
    test_pairs: int | None = 32  # test pairs the trainer evaluates at the end; None: all
    # evaluation: rewards of samples at the data's temperature, KL from samples at temperature 1
    eval_prompts: int = 64
    eval_samples: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 48
    kl_samples: int = 1
    generation_batch_size: int = 128  # rows per generate call: wide batches amortise each decoding step
    progress: bool = True
    overwrite: bool = False  # replace a run with other settings in output_dir (as `train --overwrite`)

    @classmethod
    def for_device(cls, cuda: bool, **overrides: Any) -> QuickstartSettings:
        """CPU sizes fit the 10-minute budget on two cores; a GPU trains and samples more."""
        base = cls(max_steps=150, test_pairs=None, eval_prompts=10_000, eval_samples=4, kl_samples=4) if cuda else cls()
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(base, **given)


def _sample(
    model: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    settings: QuickstartSettings,
    desc: str,
    num_samples: int,
    temperature: float,
) -> list[Samples]:
    sampling = SamplingSettings(num_samples, temperature, 1.0, settings.max_new_tokens, settings.seed)
    rows = settings.generation_batch_size
    return sample_prompts(model, tokenizer, prompts, sampling, rows=rows, progress=settings.progress, desc=desc)


def _test_subset(settings: QuickstartSettings, output_dir: Path) -> str:
    """The test pairs the trainer evaluates: all, or the first `test_pairs` written beside the run
    (evaluating all 125 on a CPU would cost about as much as the sampling)."""
    source = Path(settings.test_data or bundled_data("test.jsonl"))
    if settings.test_pairs is None:
        return str(source)
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    subset = output_dir / "test_pairs.jsonl"
    write_atomic(subset, "".join(line + "\n" for line in lines[: settings.test_pairs]))
    return str(subset)


def _kl(model: Any, tokenizer: Any, prompts: list[PromptRecord], settings: QuickstartSettings) -> list[list[float]]:
    """log p_tuned(y|x) - log p_base(y|x) of fresh samples y of the tuned model at temperature 1
    (an unbiased Monte Carlo estimate of the KL needs draws from the model itself), per prompt."""
    from preftune.eval.evaluation import completion_logps

    samples = _sample(model, tokenizer, prompts, settings, "sample tuned, T=1 (KL)", settings.kl_samples, 1.0)
    prompt_rows, completion_rows = scoring_rows(tokenizer, prompts, samples)
    tuned = completion_logps(model, prompt_rows, completion_rows, tokenizer.pad_token_id)
    with model.disable_adapter():
        base = completion_logps(model, prompt_rows, completion_rows, tokenizer.pad_token_id)
    k = settings.kl_samples
    ratios = [t - b for t, b in zip(tuned, base, strict=True)]
    return [ratios[i * k : (i + 1) * k] for i in range(len(prompts))]


def run_quickstart(settings: QuickstartSettings) -> dict[str, Any]:
    """Run the recipe; returns the contents of `eval.json`."""
    from preftune.config import from_dict
    from preftune.eval.evaluation import before_after
    from preftune.collect.generation import load_generation_model
    from preftune.models import resolve_model_path
    from preftune.collect.rewards import get_reward, score_groups
    from preftune.training.recipe import run

    started = time.perf_counter()
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    reward = get_reward(settings.reward)
    resolve_model_path(settings.model_name)  # converts the embedded GGUF once, with its own log line
    n = settings.eval_samples

    # 1. the base model on held-out prompts
    model, tokenizer = load_generation_model(settings.model_name)
    prompts = load_prompts(settings.heldout_prompts or bundled_data("prompts_heldout.jsonl"))[: settings.eval_prompts]
    prompts = chat_prompts(prompts, tokenizer)
    log.info("sampling the base model: %d held-out prompts x %d samples", len(prompts), n)
    base = _sample(model, tokenizer, prompts, settings, "sample base", n, settings.temperature)
    del model

    # 2. DPO with LoRA on the bundled pairs
    config = from_dict(
        {
            "model_name": settings.model_name,
            "dataset": str(settings.train_data or bundled_data("train.jsonl")),
            "eval_dataset": _test_subset(settings, output_dir),
            "output_dir": str(output_dir),
            "overwrite_output_dir": settings.overwrite,
            "loss_type": "sigmoid",
            "beta": settings.beta,
            "lora_r": settings.lora_r,
            "lora_alpha": 2 * settings.lora_r,
            "lora_target_modules": "all-linear",
            # The base model through the disabled adapter: no pass over pairs the run never sees.
            "reference": "adapter",
            "learning_rate": settings.learning_rate,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.1,
            "max_steps": settings.max_steps,
            "per_device_train_batch_size": settings.batch_size,
            "max_seq_length": settings.max_seq_length,
            "seed": settings.seed,
            "logging_steps": 4,
            "save_steps": max(1, settings.max_steps),
            "save_total_limit": 1,
            "progress_bar": settings.progress,
            "task": "quickstart: controlled sentiment (DPO paper, section 6.1) on bundled movie-review prompts",
        },
        where="quickstart",
    )
    train_started = time.perf_counter()
    _, final_metrics = run(config)
    train_seconds = time.perf_counter() - train_started

    # 3. the tuned model on the same prompts and seeds, and its KL from the base
    model, tokenizer = load_generation_model(str(output_dir / "final"))
    tuned = _sample(model, tokenizer, prompts, settings, "sample tuned", n, settings.temperature)
    log_ratios = _kl(model, tokenizer, prompts, settings)
    del model

    # 4. the same reward for both, and the measures
    def rewards_of(samples: list[Samples]) -> list[list[float]]:
        return score_groups(reward, [p.prompt for p in prompts], [s.completions for s in samples])

    base_scores, tuned_scores = rewards_of(base), rewards_of(tuned)
    result = before_after(
        base_scores, tuned_scores, [s.lengths for s in base], [s.lengths for s in tuned], log_ratios
    )
    result.update(
        {
            "reward": reward.name,
            "eval_rewards/accuracies": final_metrics.get("eval_rewards/accuracies"),
            "eval_loss": final_metrics.get("eval_loss"),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "settings": asdict(settings),
        }
    )
    write_jsonl_atomic(
        output_dir / "eval_samples.jsonl",
        [
            {
                **p.extra,
                "index": p.index,
                "prompt": p.prompt,
                "base": b.completions,
                "base_scores": bs,
                "base_lengths": b.lengths,
                "tuned": t.completions,
                "tuned_scores": ts,
                "tuned_lengths": t.lengths,
            }
            for p, b, t, bs, ts in zip(prompts, base, tuned, base_scores, tuned_scores, strict=True)
        ],
    )
    write_atomic(output_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
