"""Iterative DPO on the model's own samples: sample, score, pair, train, evaluate, round after round.

Offline DPO learns from samples of another model; iterating it on fresh samples of the policy being
trained keeps the pairs on-policy (Xiong et al. 2024, arXiv:2312.11456, "Iterative Preference
Learning from Human Feedback"; Yuan et al. 2024, arXiv:2401.10020, "Self-Rewarding Language
Models"). Round r (1-based):

1. sample `num_samples` completions per training prompt from the round's starting policy (the
   initial model in round 1, round r-1's policy after it), sample j of prompt i seeded from
   (seed + r, i, j), so each round draws fresh noise and a rerun draws the same;
2. score them with the reward (`preftune.collect.rewards`) and pair them, best against worst by default
   (`preftune.collect.pairs`), which is how Dong et al. 2024 (arXiv:2405.07863, "RLHF Workflow") build
   on-policy pairs from N samples;
3. train DPO (`preftune.training`) from the starting policy, the reference being the initial model
   (`reference: initial`, the KL-regularised objective of Xiong et al.) or the starting policy
   (`reference: previous`, as Yuan et al.: each round a fresh DPO problem around the last model);
4. evaluate the new policy against the initial model on held-out prompts (`_evaluate`): mean
   reward, win rate, KL to the initial model, mean length.

With a pairwise judge (`reward: judge:MODEL`, `preftune.collect.judge`) the rounds learn from AI
feedback: step 2 judges every two samples of a prompt and pairs by each sample's mean probability
of beating the others. `judge:self` is the round's starting policy judging its own samples, as in
Yuan et al. 2024. Evaluation then needs a yardstick that does not move with the rounds, so the
held-out "reward" of a sample is its mean judged probability of beating the initial model's samples
of the prompt (0.5 for the initial model itself), judged by the named model, or for `judge:self` by
the initial model; the win rate is the share of those comparisons the judge decides for the policy.

Everything a round writes lives in `output_dir/round-r/`; `eval.json` is written last, so a round
that has it is done and a rerun skips it. A half-done round continues: sampling appends to
`samples.jsonl` and skips the prompts already there (same seeds, same file), and training resumes
from its latest checkpoint. `summary.json` and the printed table gather the rounds, with the
initial model as round 0.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import random
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence, get_type_hints

import yaml

from preftune.config import TrainConfig, coerce, load_config, read_config_file, validate
from preftune.errors import PreftuneError, suggest
from preftune.eval.evaluation import sample_prompts
from preftune.collect.generation import (
    PromptRecord,
    Samples,
    SamplingSettings,
    chat_prompts,
    generate_file,
    load_generation_model,
    load_prompts,
    read_samples,
    scoring_rows,
)
from preftune.io import write_atomic, write_jsonl_atomic
from preftune.collect.pairs import STRATEGIES, build_pairs
from preftune.recipes.quickstart import bundled_data
from preftune.collect.judge import is_judge
from preftune.collect.rewards import RewardFunction, get_reward, score_groups, score_records

log = logging.getLogger("preftune")

REFERENCES = ("initial", "previous")


@dataclass
class IterateConfig:
    """The `iterate:` block of a training config: what each round samples, scores and pairs, and how
    it is evaluated. The rest of the config trains each round."""

    rounds: int = 3
    prompts: str | None = None  # null: the bundled sentiment task's 99 training prompts
    prompts_per_round: int | None = None  # null: every prompt; else a seeded draw, new each round
    eval_prompts: str | None = None  # null: the bundled sentiment task's 64 held-out prompts
    max_eval_prompts: int | None = None  # null: every held-out prompt; else the first N
    reward: str = "sentiment"
    judge_prompt: str | None = None  # a judging-prompt file for reward: judge:MODEL
    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 48
    pair_strategy: str = "best-worst"
    min_margin: float = 0.0
    reference: str = "previous"
    eval_samples: int = 2  # held-out samples per prompt, at `temperature`
    kl_samples: int = 1  # samples per held-out prompt at temperature 1 for the KL estimate
    generation_batch_size: int = 128  # sequences per generate call (prompts x samples)


ITERATE_KEYS = tuple(f.name for f in dataclasses.fields(IterateConfig))
# Settings that may change between a run and its continuation: more rounds extend the run.
_RESUMABLE_CHANGES = {"rounds", "progress_bar", "overwrite_output_dir", "resume_from_checkpoint"}


def iterate_from_dict(data: Any, where: str) -> IterateConfig:
    """The `iterate:` block, typed and checked; unknown keys name the closest known one."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PreftuneError(f"{where}: 'iterate' must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(IterateConfig)
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise PreftuneError(f"{where}: unknown key 'iterate.{key}'{suggest(str(key), ITERATE_KEYS)}")
        values[key] = coerce(f"iterate.{key}", value, hints[key], where)
    return check_iterate(IterateConfig(**values), where)


def check_iterate(it: IterateConfig, where: str) -> IterateConfig:
    def need(cond: bool, message: str) -> None:
        if not cond:
            raise PreftuneError(f"{where}: {message}")

    need(it.rounds >= 1, f"'iterate.rounds' must be >= 1, got {it.rounds}")
    need(it.num_samples >= 2, f"'iterate.num_samples' must be >= 2 (a pair needs two samples), got {it.num_samples}")
    need(it.prompts_per_round is None or it.prompts_per_round >= 1, "'iterate.prompts_per_round' must be >= 1 or null")
    need(it.max_eval_prompts is None or it.max_eval_prompts >= 1, "'iterate.max_eval_prompts' must be >= 1 or null")
    need(it.temperature > 0, f"'iterate.temperature' must be > 0 (greedy samples of a prompt are all alike), got {it.temperature}")
    need(0 < it.top_p <= 1, f"'iterate.top_p' must be in (0, 1], got {it.top_p}")
    need(it.max_new_tokens >= 1, f"'iterate.max_new_tokens' must be >= 1, got {it.max_new_tokens}")
    need(it.min_margin >= 0, f"'iterate.min_margin' must be >= 0, got {it.min_margin}")
    need(it.eval_samples >= 1, f"'iterate.eval_samples' must be >= 1, got {it.eval_samples}")
    need(it.kl_samples >= 1, f"'iterate.kl_samples' must be >= 1, got {it.kl_samples}")
    need(it.generation_batch_size >= 1, f"'iterate.generation_batch_size' must be >= 1, got {it.generation_batch_size}")
    if it.pair_strategy not in STRATEGIES:
        raise PreftuneError(
            f"{where}: 'iterate.pair_strategy' must be one of {', '.join(STRATEGIES)}; got {it.pair_strategy!r}"
            f"{suggest(it.pair_strategy, STRATEGIES)}"
        )
    if it.reference not in REFERENCES:
        raise PreftuneError(
            f"{where}: 'iterate.reference' must be one of {', '.join(REFERENCES)}; got {it.reference!r}"
            f"{suggest(it.reference, REFERENCES)}"
        )
    return it


def check_train(cfg: TrainConfig, it: IterateConfig, where: str) -> None:
    """The training keys that iterate decides itself, refused when given."""
    if cfg.dataset:
        raise PreftuneError(f"{where}: 'dataset' is not used by iterate: each round trains on the pairs it samples (remove it)")
    if cfg.ref_model_name:
        raise PreftuneError(
            f"{where}: 'ref_model_name' is not used by iterate: set 'iterate.reference' to initial or previous"
        )
    if it.reference == "initial" and cfg.reference == "adapter" and it.rounds > 1:
        raise PreftuneError(
            f"{where}: 'reference: adapter' is the round's starting policy, i.e. iterate.reference: previous; "
            "with iterate.reference: initial use reference auto, precomputed or copy"
        )


def load_iterate_config(
    path: str | Path, overrides: Sequence[str] = (), iterate_overrides: dict[str, Any] | None = None
) -> tuple[TrainConfig, IterateConfig]:
    """CONFIG (JSON or YAML) with its `iterate:` block, `--set` applied to the training keys and
    `iterate_overrides` (the command's flags; None values ignored) to the block."""
    data = read_config_file(path)
    block = data.pop("iterate", None)
    where = str(path)
    cfg = load_config(path, list(overrides), data=data)
    block = dict(block or {}) if isinstance(block, dict) or block is None else block
    if isinstance(block, dict):
        block.update({k: v for k, v in (iterate_overrides or {}).items() if v is not None})
    it = iterate_from_dict(block, where)
    check_train(cfg, it, where)
    return cfg, it


# --------------------------------------------------------------------------------------- paths


def chat_options(cfg: TrainConfig) -> dict[str, Any]:
    """The run's chat options for `load_generation_model`, so sampling renders as training does."""
    return {"template_kwargs": cfg.chat_template_kwargs, "fold_system": cfg.fold_system_message}


def round_dir(root: Path, r: int) -> Path:
    return root / f"round-{r}"


def policy_dir(root: Path, r: int, cfg: TrainConfig) -> Path:
    """The model folder of round r's policy.

    With LoRA each round's adapter is merged into full weights (`final_merged/`) and the next round
    trains a fresh adapter on that folder. The alternative, training one adapter on round after
    round, would leave no model that is the previous round: `reference: previous` would need a
    second copy of the policy, and sampling and the next round's start would both go through the
    adapter. A merged folder is an ordinary model every command loads (generate, train, vLLM),
    the disabled adapter of the next round is exactly the previous policy, and the reference of
    `initial` is the configured model. The cost is one full copy of the weights per round on disk.
    """
    train_dir = round_dir(root, r) / "train"
    return train_dir / ("final_merged" if cfg.use_lora else "final")


def start_model(root: Path, r: int, cfg: TrainConfig) -> str:
    """The policy round r starts from (and samples with)."""
    if r == 1:
        return cfg.model_name
    path = policy_dir(root, r - 1, cfg)
    if not (path / "config.json").is_file():
        raise PreftuneError(
            f"{path} is missing, but round {r} starts from it: "
            f"delete {round_dir(root, r - 1) / 'eval.json'} to rerun round {r - 1}"
        )
    return str(path)


def round_config(root: Path, r: int, cfg: TrainConfig, it: IterateConfig) -> TrainConfig:
    """Round r's training config: the user's, on this round's pairs, from its starting policy."""
    out = round_dir(root, r)
    return validate(
        dataclasses.replace(
            cfg,
            model_name=start_model(root, r, cfg),
            dataset=str(out / "pairs.jsonl"),
            output_dir=str(out / "train"),
            # `previous`: the starting policy itself (the disabled adapter, or a precomputed pass
            # over this round's pairs); `initial`: the configured model from round 2 on.
            ref_model_name=cfg.model_name if it.reference == "initial" and r > 1 else None,
            merge_lora=cfg.use_lora,
            resume_from_checkpoint="latest",
            task=cfg.task or f"iterate round {r}",
        ),
        f"round {r}",
    )


# --------------------------------------------------------------------------------------- settings file


def _settings(cfg: TrainConfig, it: IterateConfig) -> dict[str, Any]:
    return {"iterate": asdict(it), "train": cfg.to_dict()}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    changed = []
    for part in ("iterate", "train"):
        a, b = old.get(part) or {}, new[part]
        for key in sorted(set(a) | set(b)):
            if key not in _RESUMABLE_CHANGES and a.get(key) != b.get(key):
                changed.append(f"iterate.{key}" if part == "iterate" else key)
    return changed


def _prepare_output(root: Path, cfg: TrainConfig, it: IterateConfig, overwrite: bool) -> None:
    """A run continues only with the settings it started with (more rounds excepted); `overwrite`
    removes what an earlier run wrote here (its own files only) and starts afresh."""
    settings_file = root / "iterate.yaml"
    new = _settings(cfg, it)
    if settings_file.is_file():
        try:
            old = yaml.safe_load(settings_file.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        changed = _changed(old, new) if isinstance(old, dict) else ["everything"]
        if changed and not overwrite:
            raise PreftuneError(
                f"{root} holds an iterate run with other settings ({', '.join(changed[:6])}); "
                "pass --overwrite to replace it, or choose another output_dir"
            )
        if changed:
            log.info("--overwrite: removing the earlier iterate run in %s", root)
            for path in [*root.glob("round-*"), root / "initial", root / "summary.json"]:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    write_atomic(settings_file, yaml.safe_dump(new, sort_keys=False))


# --------------------------------------------------------------------------------------- one round


def round_prompts(prompts: list[PromptRecord], it: IterateConfig, seed: int, r: int) -> list[PromptRecord]:
    """The training prompts of round r: all, or `prompts_per_round` of them drawn with a seed of
    (seed, r), in file order."""
    k = it.prompts_per_round
    if k is None or k >= len(prompts):
        return prompts
    chosen = sorted(random.Random(f"{seed}:{r}").sample(range(len(prompts)), k))
    return [prompts[i] for i in chosen]


def _finished_samples(path: Path, count: int) -> list[dict[str, Any]] | None:
    """The records of a samples file that holds every prompt of the round, or None."""
    if not path.is_file() or not path.read_bytes().endswith(b"\n"):
        return None  # absent, empty, or cut in the middle of a line: generation repairs and continues it
    records = [record for _, record in read_samples(path)]
    return records if len(records) == count else None


def make_pairs(
    root: Path, r: int, cfg: TrainConfig, it: IterateConfig, prompts: list[PromptRecord], reward: RewardFunction, progress: bool
) -> dict[str, Any]:
    """Sample, score and pair round r's prompts into `pairs.jsonl`; returns the counts."""
    out = round_dir(root, r)
    samples_file, pairs_file = out / "samples.jsonl", out / "pairs.jsonl"
    todo = round_prompts(prompts, it, cfg.seed, r)
    records = _finished_samples(samples_file, len(todo))
    if records is None:
        model_name = start_model(root, r, cfg)
        log.info("round %d: sampling %d prompts x %d from %s", r, len(todo), it.num_samples, model_name)
        model, tokenizer = load_generation_model(model_name, **chat_options(cfg))
        sampling = SamplingSettings(it.num_samples, it.temperature, it.top_p, it.max_new_tokens, cfg.seed + r).check()
        generate_file(
            model,
            tokenizer,
            todo,
            samples_file,
            sampling,
            model_name=model_name,
            batch_size=max(1, it.generation_batch_size // it.num_samples),
            progress=progress,
        )
        del model
        records = [rec for _, rec in read_samples(samples_file)]
    if not all("scores" in rec for rec in records):
        if is_judge(reward) and reward.is_self:  # the policy that sampled judges its samples
            reward = reward.for_model(start_model(root, r, cfg), **chat_options(cfg))
        records = score_records(reward, records, progress=progress)
        write_jsonl_atomic(samples_file, records)
        if is_judge(reward):
            log.info("round %d: %s", r, reward.summary())
    located = [(f"{samples_file}:{i + 1}", rec) for i, rec in enumerate(records)]
    pairs, stats = build_pairs(located, it.pair_strategy, it.min_margin, cfg.seed)
    if not pairs:
        raise PreftuneError(f"round {r}: no pairs from {samples_file}: {stats.summary()}")
    write_jsonl_atomic(pairs_file, pairs)
    log.info("round %d: %s", r, stats.summary())
    scores = [s for rec in records for s in rec["scores"]]
    return {
        "pairs": stats.pairs,
        "pair_ties": stats.ties,
        "pair_below_margin": stats.below_margin,
        # a judge's scores are within-prompt win probabilities: their mean is 0.5 by construction
        "samples_reward": None if is_judge(reward) else statistics.fmean(scores),
    }


# --------------------------------------------------------------------------------------- evaluation


@dataclass
class EvalSamples:
    """Held-out samples of one model, per prompt."""

    completions: list[list[str]]
    scores: list[list[float]]
    lengths: list[list[int]]
    decided: list[float] | None = None  # a judge's share of comparisons decided for these samples, per prompt


def _eval_records(
    prompts: list[PromptRecord],
    ev: EvalSamples,
    kl_samples: list[Samples] | None = None,
    log_ratios: list[list[float]] | None = None,
) -> list[dict]:
    """One line per held-out prompt; a round's lines also hold the temperature-1 samples of the KL
    estimate (their token ids, EOS included, are what was scored) and their log-ratios."""
    rows = []
    for i, p in enumerate(prompts):
        row = {
            **p.extra,
            "index": p.index,
            "prompt": p.prompt,
            "completions": ev.completions[i],
            "scores": ev.scores[i],
            "lengths": ev.lengths[i],
        }
        if kl_samples is not None and log_ratios is not None:
            row["kl_completions"] = kl_samples[i].completions
            row["kl_token_ids"] = kl_samples[i].token_ids
            row["kl_log_ratios"] = log_ratios[i]
        rows.append(row)
    return rows


def _read_eval_samples(path: Path) -> EvalSamples:
    rows = [record for _, record in read_samples(path)]
    return EvalSamples([r["completions"] for r in rows], [r["scores"] for r in rows], [r["lengths"] for r in rows])


def _sample_and_score(
    model: Any,
    tokenizer: Any,
    prompts: list[PromptRecord],
    it: IterateConfig,
    seed: int,
    reward: RewardFunction,
    progress: bool,
    desc: str,
    initial: EvalSamples | None = None,
) -> EvalSamples:
    """Held-out samples scored by the reward; by a judge, each sample's mean P(better) against the
    initial model's samples of the prompt (`initial`; None: these are the initial model's)."""
    sampling = SamplingSettings(it.eval_samples, it.temperature, it.top_p, it.max_new_tokens, seed)
    samples = sample_prompts(
        model, tokenizer, prompts, sampling, rows=it.generation_batch_size, progress=progress, desc=desc
    )
    completions = [s.completions for s in samples]
    if not is_judge(reward):
        scores = score_groups(reward, [p.prompt for p in prompts], completions)
        return EvalSamples(completions, scores, [s.lengths for s in samples])
    from preftune.collect.judge import JudgedComparison

    against = initial.completions if initial is not None else completions
    judged = JudgedComparison(reward.compare_groups([p.prompt for p in prompts], completions, against, desc=f"judge vs initial ({reward.name})"))
    scores = [[statistics.fmean(row) for row in m] for m in judged.matrices]
    return EvalSamples(completions, scores, [s.lengths for s in samples], judged.decided)


def _evaluate(
    policy_name: str,
    initial_name: str,
    prompts: list[PromptRecord],
    initial: EvalSamples,
    it: IterateConfig,
    seed: int,
    reward: RewardFunction,
    progress: bool,
    cfg: TrainConfig,
) -> tuple[dict[str, Any], EvalSamples, list[Samples], list[list[float]]]:
    """Every measure of a policy against the initial model on the held-out prompts, through
    `preftune.eval.evaluation`: its samples at the sampling temperature with the initial model's seeds
    (common random numbers: a difference is the model's, not the dice's), scored by the same
    reward; and KL(policy || initial) from fresh samples of the policy at temperature 1, the mean of
    log p_policy(y|x) - log p_initial(y|x)."""
    from preftune.eval.evaluation import before_after, completion_logps

    model, tokenizer = load_generation_model(policy_name, **chat_options(cfg))
    tuned = _sample_and_score(model, tokenizer, prompts, it, seed, reward, progress, "sample policy (eval)", initial)
    kl_settings = SamplingSettings(it.kl_samples, 1.0, 1.0, it.max_new_tokens, seed)
    kl_samples = sample_prompts(
        model, tokenizer, prompts, kl_settings, rows=it.generation_batch_size, progress=progress, desc="sample policy (KL)"
    )
    prompt_rows, completion_rows = scoring_rows(tokenizer, prompts, kl_samples)
    policy_logps = completion_logps(model, prompt_rows, completion_rows, tokenizer.pad_token_id)
    del model
    reference, _ = load_generation_model(initial_name)
    initial_logps = completion_logps(reference, prompt_rows, completion_rows, tokenizer.pad_token_id)
    del reference
    k = it.kl_samples
    ratios = [a - b for a, b in zip(policy_logps, initial_logps, strict=True)]
    log_ratios = [ratios[i * k : (i + 1) * k] for i in range(len(prompts))]
    result = before_after(initial.scores, tuned.scores, initial.lengths, tuned.lengths, log_ratios)
    if tuned.decided is not None:  # a judge: comparisons with the initial's samples decided for the policy
        result["win_rate"] = statistics.fmean(tuned.decided)
    return result, tuned, kl_samples, log_ratios


# --------------------------------------------------------------------------------------- summary


def summary_row(r: int, result: dict[str, Any]) -> dict[str, Any]:
    return {
        "round": r,
        "reward": result["reward_after"],
        "reward_stderr": result["reward_after_stderr"],
        "kl": result["kl"],
        "kl_stderr": result["kl_stderr"],
        "win_rate": result["win_rate"],
        "length": result["length_after"],
        "pairs": result.get("pairs"),
        "samples_reward": result.get("samples_reward"),
    }


def reward_label(reward_name: str) -> str:
    """The reward column's title: a judge's held-out figure is a probability of beating the initial model."""
    return f"P(beats initial), {reward_name}" if reward_name.startswith("judge:") else f"mean {reward_name}"


def format_summary(rows: list[dict[str, Any]], reward_name: str) -> str:
    """The rounds as a table, the initial model as round 0."""
    table = [("round", "pairs", reward_label(reward_name), "KL to initial (nats)", "win rate vs initial", "mean length (tokens)")]
    for row in rows:
        table.append(
            (
                str(row["round"]),
                "" if row["pairs"] is None else str(row["pairs"]),
                f"{row['reward']:+.3f} ± {row['reward_stderr']:.3f}",
                f"{row['kl']:.2f} ± {row['kl_stderr']:.2f}",
                f"{row['win_rate']:.1%}",
                f"{row['length']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))) for line in table]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the run


def initial_samples(
    root: Path, cfg: TrainConfig, it: IterateConfig, prompts: list[PromptRecord], reward: RewardFunction, progress: bool
) -> EvalSamples:
    """Round 0: the initial model's held-out samples, the baseline every round is measured
    against; sampled once, then read from `initial/eval_samples.jsonl`."""
    path = root / "initial" / "eval_samples.jsonl"
    if path.is_file():
        return _read_eval_samples(path)
    log.info("initial model: sampling %d held-out prompts x %d", len(prompts), it.eval_samples)
    model, tokenizer = load_generation_model(cfg.model_name, **chat_options(cfg))
    initial = _sample_and_score(model, tokenizer, prompts, it, cfg.seed, reward, progress, "sample initial (eval)")
    write_jsonl_atomic(path, _eval_records(prompts, initial))
    return initial


def run_round(
    root: Path,
    r: int,
    cfg: TrainConfig,
    it: IterateConfig,
    prompts: list[PromptRecord],
    eval_prompts: list[PromptRecord],
    initial: EvalSamples,
    reward: RewardFunction,
    eval_reward: RewardFunction | None = None,
) -> tuple[dict[str, Any], EvalSamples]:
    """Round r from wherever it stopped: pairs, training, evaluation; returns `eval.json`'s
    contents and the policy's held-out samples. `eval_reward` scores the held-out samples (default:
    `reward`; for `judge:self` the initial model's judge)."""
    from preftune.training.recipe import run

    out = round_dir(root, r)
    progress = cfg.progress_bar
    started = time.perf_counter()
    counts = make_pairs(root, r, cfg, it, prompts, reward, progress)
    sample_seconds = time.perf_counter() - started

    round_cfg = round_config(root, r, cfg, it)
    policy = policy_dir(root, r, cfg)
    train_seconds = 0.0
    if not (policy / "config.json").is_file():
        log.info("round %d: DPO on %d pairs from %s, reference: %s", r, counts["pairs"], round_cfg.model_name, it.reference)
        started = time.perf_counter()
        run(round_cfg)
        train_seconds = time.perf_counter() - started
        gc.collect()  # the trainer's model and optimizer, before two models are loaded to evaluate

    started = time.perf_counter()
    result, tuned, kl_samples, log_ratios = _evaluate(
        str(policy), cfg.model_name, eval_prompts, initial, it, cfg.seed, eval_reward or reward, progress, cfg
    )
    result.update(counts)
    result.update(
        {
            "round": r,
            "reward": reward.name,
            "reference": it.reference,
            "start_model": round_cfg.model_name,
            "policy": str(policy),
            "sample_seconds": round(sample_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "eval_seconds": round(time.perf_counter() - started, 1),
        }
    )
    write_jsonl_atomic(out / "eval_samples.jsonl", _eval_records(eval_prompts, tuned, kl_samples, log_ratios))
    write_atomic(out / "eval.json", json.dumps(result, indent=2) + "\n")  # last: the round is done
    log.info(
        "round %d: mean %s %+.3f, KL %.2f, win rate %.1f%%",
        r, reward.name, result["reward_after"], result["kl"], 100 * result["win_rate"],
    )  # fmt: skip
    return result, tuned


def run_iterate(cfg: TrainConfig, it: IterateConfig, overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue) every round; returns the contents of `summary.json`."""
    from preftune.eval.evaluation import before_after, paired_difference
    from preftune.models import load_tokenizer, resolve_model_path

    started = time.perf_counter()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _prepare_output(root, cfg, it, overwrite)
    reward = get_reward(it.reward, judge_prompt=it.judge_prompt)
    eval_reward = reward
    if is_judge(reward) and reward.is_self:  # a fixed yardstick for every round: the initial model
        eval_reward = reward.for_model(cfg.model_name, **chat_options(cfg))
    resolve_model_path(cfg.model_name)  # converts an embedded GGUF once, before any round needs it
    prompts = load_prompts(it.prompts or bundled_data("prompts_train.jsonl"))
    eval_prompts = load_prompts(it.eval_prompts or bundled_data("prompts_heldout.jsonl"))[: it.max_eval_prompts]
    eval_prompts = chat_prompts(eval_prompts, load_tokenizer(cfg.model_name))

    initial = initial_samples(root, cfg, it, eval_prompts, eval_reward, cfg.progress_bar)
    zeros = [[0.0] * it.kl_samples for _ in eval_prompts]  # the initial model against itself
    rows = [summary_row(0, before_after(initial.scores, initial.scores, initial.lengths, initial.lengths, zeros))]
    scores: dict[int, list[list[float]]] = {}
    for r in range(1, it.rounds + 1):
        out = round_dir(root, r)
        if (out / "eval.json").is_file():
            log.info("round %d: done (%s), skipped", r, out / "eval.json")
            result = json.loads((out / "eval.json").read_text())
            scores[r] = _read_eval_samples(out / "eval_samples.jsonl").scores
        else:
            result, tuned = run_round(root, r, cfg, it, prompts, eval_prompts, initial, reward, eval_reward)
            scores[r] = tuned.scores
        rows.append(summary_row(r, result))

    summary: dict[str, Any] = {
        "reward": reward.name,
        "reference": it.reference,
        "model": cfg.model_name,
        "num_eval_prompts": len(eval_prompts),
        "eval_samples": it.eval_samples,
        "rounds": rows,
    }
    if it.rounds > 1:
        gain, gain_se = paired_difference(scores[it.rounds], scores[1])
        summary["last_vs_first"] = {"reward_gain": gain, "stderr": gain_se}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    write_atomic(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def format_iterate(summary: dict[str, Any]) -> str:
    """The table of `preftune iterate`, and the last round against the first when there are two."""
    text = format_summary(summary["rounds"], summary["reward"])
    change = summary.get("last_vs_first")
    if change:
        last = summary["rounds"][-1]["round"]
        text += (
            f"\nround {last} against round 1: {change['reward_gain']:+.3f} {reward_label(summary['reward'])} (standard error of the "
            f"paired difference {change['stderr']:.3f}, {summary['num_eval_prompts']} held-out prompts x "
            f"{summary['eval_samples']} samples)"
        )
    return text
