"""Did preference tuning help, and how far did the model move? Measures and the `preftune eval` run.

On preference pairs (the implicit reward of DPO, r = beta * (log p_model - log p_ref)):
- preference accuracy, the share of pairs whose chosen completion gets the higher implicit reward,
  and the reward margin, each with a percentile-bootstrap confidence interval over pairs.

On samples from held-out prompts, scored by a reward function:
- mean reward, per prompt first (samples of one prompt are not independent draws), with intervals
  bootstrapped over prompts, and the gain over a baseline (the reference, or another model);
- win rate against the baseline's samples: within each prompt every sample is compared with every
  baseline sample, a tie counting half; averaged over prompts;
- KL(model || reference) from samples y ~ p_model(.|x) at temperature 1, two ways
  (Rafailov et al. 2023, arXiv:2305.18290, eq. 3 is the quantity DPO keeps small):
  the Monte Carlo log-ratio log p(y|x) - log q(y|x), and the sum over the sampled positions of the
  exact next-token KL(p(.|x,y<t) || q(.|x,y<t)). Both have the sequence KL as expectation (chain
  rule), the second with lower variance because the sum over the vocabulary replaces one draw;
- with a pairwise judge (`--reward judge:MODEL`, `preftune.collect.judge`) instead of a reward: the
  judged win rate, every sample against every baseline sample of the prompt judged in both orders,
  the mean P(model's sample better) per prompt, averaged over prompts; beside it the share of
  comparisons the judge decides for the model and its position figures;
- length drift: mean sample length against the baseline's; DPO is known to exploit length
  (Park et al. 2024, arXiv:2403.19159), so a ratio above `LENGTH_WARNING` is flagged.

With `--by FIELD` every measure is also given per value of a record field (`eval.groups`): the
same functions over each group's per-record values, which are computed once.

Best-of-N sampling from the reference is the baseline of the reward-vs-KL frontier: its expected
reward is estimated without bias from K >= N samples per prompt (`expected_best_of_n`) and its KL
is log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024, arXiv:2401.01879).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import yaml

from preftune.batching import TokenizedPair, collate_pairs, encode_prompt
from preftune.config import TrainConfig
from preftune.data import RecordLayout
from preftune.prepared import PairItems, prepare
from preftune.errors import PreftuneError
from preftune.sequences import SequenceRow, TokenizedSequence, collate_sequences
from preftune.collect.generation import (
    PromptRecord,
    Samples,
    SamplingSettings,
    as_chat,
    iter_samples,
    load_generation_model,
    load_prompts,
)
from preftune.eval.groups import (
    MISSING,
    check_field,
    compare_groups,
    format_groups,
    group_name,
    pair_correct,
    per_group,
    prompt_gains,
    record_groups,
)
from preftune.io import write_atomic, write_jsonl_atomic
from preftune.logprobs import CompletionLogprobs, proven_head, split_body_and_head
from preftune.logprobs import completion_logps as batch_logps
from preftune.collect.rewards import as_reward, score_groups
from preftune.collect.judge import is_judge, judged_measures, judged_win_rates


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample sd / sqrt(n)); the error is 0 for fewer than 2 values."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def _prompt_means(per_prompt: Sequence[Sequence[float]]) -> list[float]:
    return [statistics.fmean(v) for v in per_prompt]


def prompt_win_rates(tuned: Sequence[Sequence[float]], base: Sequence[Sequence[float]]) -> list[float]:
    """Per prompt, the share of (tuned, base) sample comparisons won by tuned, ties half."""
    if len(tuned) != len(base) or not tuned:
        raise ValueError("tuned and base need scores for the same, non-empty list of prompts")
    rates = []
    for t_scores, b_scores in zip(tuned, base, strict=True):
        wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t in t_scores for b in b_scores)
        rates.append(wins / (len(t_scores) * len(b_scores)))
    return rates


def win_rate(tuned: Sequence[Sequence[float]], base: Sequence[Sequence[float]]) -> float:
    """Share of (tuned, base) sample comparisons of the same prompt won by tuned, ties half,
    averaged over prompts."""
    return statistics.fmean(prompt_win_rates(tuned, base))


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean: resample the values with replacement
    `resamples` times and take the (1 - level) / 2 and (1 + level) / 2 quantiles of the means.
    Makes no normality assumption, which matters for accuracies near 0 or 1 and few prompts."""
    if not values:
        raise ValueError("no values")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarize(values: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{"mean", "ci": [low, high], "n"}: how every measure of `eval.json` is written."""
    low, high = bootstrap_ci(values, level, resamples, seed)
    return {"mean": statistics.fmean(values), "ci": [low, high], "n": len(values)}


def expected_best_of_n(scores: Sequence[float], n: int) -> float:
    """E[max of n i.i.d. draws] estimated without bias from K >= n draws: the mean of the max over
    all n-subsets of the K, which is sum_i s_(i) C(i - 1, n - 1) / C(K, n) with s sorted ascending
    (the i-th smallest is the max of exactly C(i - 1, n - 1) subsets)."""
    k = len(scores)
    if not 1 <= n <= k:
        raise ValueError(f"best-of-{n} needs at least {n} scores, got {k}")
    ordered = sorted(scores)
    total = math.comb(k, n)
    return sum(s * math.comb(i, n - 1) for i, s in enumerate(ordered)) / total


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n, the analytic value for continuous rewards
    (an upper bound in general; Beirami et al. 2024, arXiv:2401.01879)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def paired_difference(tuned: Sequence[Sequence[float]], base: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean over prompts of (tuned mean - base mean) and its standard error."""
    if len(tuned) != len(base):
        raise ValueError("tuned and base need scores for the same prompts")
    return mean_stderr([t - b for t, b in zip(_prompt_means(tuned), _prompt_means(base), strict=True)])


def completion_rows(prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]) -> list[SequenceRow]:
    """Prompt + completion sequences, the completion tokens scored: the rows training collates."""
    return [
        SequenceRow(i, [TokenizedSequence(list(p) + list(c), [False] * len(p) + [True] * len(c))])
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True))
    ]


def _batches(
    prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int, batch_size: int, device: torch.device
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of `completion_rows`, collated as training collates them (`sequences.collate_sequences`)."""
    rows = completion_rows(prompt_ids, completion_ids)
    for start in range(0, len(rows), batch_size):
        yield {k: v.to(device) for k, v in collate_sequences(rows[start : start + batch_size], pad_id).items()}


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Summed log-probability of each completion given its prompt, in the model's current state
    (call it inside `model.disable_adapter()` for a LoRA model's base): training's own path,
    `logprobs.CompletionLogprobs`, over training's collation."""
    device = next(model.parameters()).device
    out: list[float] = []
    for batch in _batches(prompt_ids, completion_ids, pad_id, batch_size, device):
        scorer = CompletionLogprobs(model, fast_head=proven_head(model, batch))
        out.extend(batch_logps(scorer, batch).sums.cpu().tolist())
    return out


def _scored_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.nn.Module | None]:
    """Hidden states at the positions that predict completion tokens and the output head; or,
    for a model whose head is not a plain projection, its logits there and None. (The KL needs
    whole distributions, which `CompletionLogprobs` does not return.) The split into body and head
    is used only where it is proven equal to the model's own forward, as in training."""
    parts = split_body_and_head(model) if proven_head(model, batch) is None else None
    where = (batch["score_row"], batch["score_src"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if parts is not None:
        body, head = parts
        return body(**inputs, use_cache=False)[0][where], head
    return model(**inputs, use_cache=False).logits[where].float(), None


def _chunk_logprobs(values: torch.Tensor, head: torch.nn.Module | None) -> torch.Tensor:
    logits = head(values).float() if head is not None else values
    return torch.log_softmax(logits, dim=-1)


@contextlib.contextmanager
def as_reference(policy: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The reference model: a separate one, or (None) the policy with its LoRA adapter disabled."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy


@torch.no_grad()
def kl_terms(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 8,
    chunk_size: int = 256,
) -> tuple[list[float], list[float], list[float]]:
    """Per sequence: log p(y|x), log q(y|x) and sum_t KL(p(.|x,y<t) || q(.|x,y<t)), where p is the
    policy and q the reference (None: the policy's disabled adapter). For y drawn from p at
    temperature 1, log p - log q and the summed exact KL are the two KL estimators of the module
    docstring. Full-vocabulary distributions exist for `chunk_size` positions at a time."""
    device = next(policy.parameters()).device
    out_p: list[float] = []
    out_q: list[float] = []
    out_kl: list[float] = []
    for batch in _batches(prompt_ids, completion_ids, pad_id, batch_size, device):
        targets, rows = batch["input_ids"][batch["score_row"], batch["score_tgt"]], batch["score_out"]
        p_values, p_head = _scored_outputs(policy, batch)
        with as_reference(policy, reference) as ref:
            q_values, q_head = _scored_outputs(ref, batch)
        token_p, token_q, token_kl = [], [], []
        for c in range(0, targets.shape[0], chunk_size):
            t = targets[c : c + chunk_size, None]
            logp = _chunk_logprobs(p_values[c : c + chunk_size], p_head)
            with as_reference(policy, reference):  # a LoRA adapter may sit on the head too
                logq = _chunk_logprobs(q_values[c : c + chunk_size], q_head)
            token_p.append(logp.gather(-1, t)[:, 0])
            token_q.append(logq.gather(-1, t)[:, 0])
            token_kl.append((logp.exp() * (logp - logq)).sum(-1))
        for out, parts in ((out_p, token_p), (out_q, token_q), (out_kl, token_kl)):
            values = torch.cat(parts) if parts else torch.zeros(0, device=device)
            sums = torch.zeros(batch["input_ids"].shape[0], dtype=torch.float64, device=device).index_add(0, rows, values.double())
            out.extend(sums.cpu().tolist())
    return out_p, out_q, out_kl


def before_after(
    base_scores: Sequence[Sequence[float]],
    tuned_scores: Sequence[Sequence[float]],
    base_lengths: Sequence[Sequence[int]],
    tuned_lengths: Sequence[Sequence[int]],
    log_ratios: Sequence[Sequence[float]],
) -> dict[str, Any]:
    """Every measure of the module docstring, per prompt lists in, one JSON-ready dict out.

    `log_ratios[i][j]` is log p_tuned - log p_base of tuned sample j of prompt i.
    """
    before, before_se = mean_stderr(_prompt_means(base_scores))
    after, after_se = mean_stderr(_prompt_means(tuned_scores))
    _, diff_se = paired_difference(tuned_scores, base_scores)
    kl, kl_se = mean_stderr(_prompt_means(log_ratios))
    return {
        "reward_before": before,
        "reward_after": after,
        "reward_stderr": diff_se,
        "reward_before_stderr": before_se,
        "reward_after_stderr": after_se,
        "win_rate": win_rate(tuned_scores, base_scores),
        "kl": kl,
        "kl_stderr": kl_se,
        "length_before": statistics.fmean(_prompt_means(base_lengths)),
        "length_after": statistics.fmean(_prompt_means(tuned_lengths)),
        "num_prompts": len(base_scores),
        "samples_per_prompt": len(base_scores[0]) if base_scores else 0,
    }


def format_table(result: dict[str, Any], reward_name: str = "reward") -> str:
    """The before/after table printed at the end of a run."""
    rows = [
        ("", "base", "tuned"),
        (
            f"mean {reward_name}",
            f"{result['reward_before']:+.3f} ± {result['reward_before_stderr']:.3f}",
            f"{result['reward_after']:+.3f} ± {result['reward_after_stderr']:.3f}",
        ),
        ("mean length (tokens)", f"{result['length_before']:.1f}", f"{result['length_after']:.1f}"),
        ("win rate of tuned over base", "", f"{result['win_rate']:.1%}"),
        ("KL(tuned || base), nats", "", f"{result['kl']:.2f} ± {result['kl_stderr']:.2f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    gain = result["reward_after"] - result["reward_before"]
    lines.append(
        f"change in mean {reward_name}: {gain:+.3f} (standard error of the paired difference {result['reward_stderr']:.3f}, "
        f"{result['num_prompts']} held-out prompts x {result['samples_per_prompt']} samples)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- `preftune eval`

LENGTH_WARNING = 1.2  # model samples this much longer than the baseline's: a length-exploitation warning


@dataclass
class EvalSettings:
    """What `preftune eval` measures and how (the command's flags)."""

    model: str
    ref: str | None = None
    baseline: str | None = None
    pairs: Any = None  # a file, or records in memory (data.InMemoryRecords)
    prompts: Any = None
    reward: Any = None  # a spec for rewards.get_reward, or a reward function
    judge_prompt: str | None = None  # a judging-prompt file for a judge:MODEL reward
    num_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    max_prompts: int | None = None
    seed: int = 0
    beta: float | None = None
    batch_size: int = 16
    level: float = 0.95
    resamples: int = 2000
    output: str | None = None
    progress: bool = True
    chat_template_kwargs: dict | None = None  # None: the run's own (a run folder), else none
    columns: dict | None = None  # the pairs file's column mapping; None: the run's own
    by: str | None = None  # a record field: every measure per value of it as well (`eval.groups`)


@dataclass
class EvalTarget:
    """The model to evaluate and its reference, resolved from a run folder, an adapter or a model."""

    model: str  # what `load_generation_model` loads
    reference: str | None  # a separate reference model; None: the model's own disabled LoRA adapter
    beta: float
    max_seq_length: int
    max_prompt_length: int | None
    run_dir: Path | None = None
    # how the run read its data and rendered conversations (its config's keys of those names)
    chat_template_kwargs: dict | None = None
    fold_system_message: bool = False
    columns: dict | None = None
    system_prompt: str | None = None


def _read_run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.resolved.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise PreftuneError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise PreftuneError(f"{path}: not a mapping of settings")
    return data


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def model_folder(name: str) -> str:
    """What to load for a model named like `--model`: a training run folder's `final/`, anything
    else as given (so `--baseline runs/sft` compares with that run's model)."""
    path = Path(name).expanduser()
    if (path / "config.resolved.yaml").is_file():
        if not (path / "final").is_dir():
            raise PreftuneError(f"{path}: the run has no final/ model yet (is it finished? resume it with resume_from_checkpoint: latest)")
        return str(path / "final")
    return name


def resolve_target(model: str, ref: str | None = None, beta: float | None = None) -> EvalTarget:
    """A training run folder (its `final/`, with the reference and beta its config used), a PEFT
    adapter folder (reference: the base with the adapter off), or any model preftune loads (then
    `--ref` names the reference)."""
    path = Path(model).expanduser()
    defaults = TrainConfig()
    if (path / "config.resolved.yaml").is_file():
        cfg = _read_run_config(path)
        final = path / "final"
        if not final.is_dir():
            raise PreftuneError(f"{path}: the run has no final/ model yet (is it finished? resume it with resume_from_checkpoint: latest)")
        if ref is None and not _is_adapter(final):
            ref = cfg.get("ref_model_name") or cfg.get("model_name")
        elif ref is None and cfg.get("ref_model_name"):
            ref = cfg["ref_model_name"]
        return EvalTarget(
            model=str(final),
            reference=ref,
            beta=float(beta if beta is not None else cfg.get("beta", defaults.beta)),
            max_seq_length=int(cfg.get("max_seq_length") or defaults.max_seq_length),
            max_prompt_length=cfg.get("max_prompt_length"),
            run_dir=path,
            chat_template_kwargs=cfg.get("chat_template_kwargs"),
            fold_system_message=bool(cfg.get("fold_system_message")),
            columns=cfg.get("columns"),
            system_prompt=cfg.get("system_prompt"),
        )
    if ref is None and not _is_adapter(path):
        raise PreftuneError(
            f"--ref is needed: {model} is a full model with no record of its reference "
            "(give a run folder or a LoRA adapter folder, or name the reference with --ref)"
        )
    return EvalTarget(
        model=model,
        reference=ref,
        beta=float(beta if beta is not None else defaults.beta),
        max_seq_length=defaults.max_seq_length,
        max_prompt_length=defaults.max_prompt_length,
    )


@torch.no_grad()
def pair_logps(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    batch_size: int = 16,
) -> tuple[list[float], list[float], list[float], list[float]]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) summed log-probs of
    each pair, scored exactly as in training (`preftune.logprobs`)."""
    device = next(policy.parameters()).device
    out: tuple[list[float], list[float], list[float], list[float]] = ([], [], [], [])
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id, share_prompt=False).items()}
        sums = batch_logps(CompletionLogprobs(policy, fast_head=proven_head(policy, batch)), batch).sums
        with as_reference(policy, reference) as ref:
            ref_sums = batch_logps(CompletionLogprobs(ref, fast_head=proven_head(ref, batch)), batch).sums
        half = sums.shape[0] // 2
        for values, part in zip(out, (sums[:half], sums[half:], ref_sums[:half], ref_sums[half:])):
            values.extend(part.double().cpu().tolist())
    return out


def pair_measures(
    policy_chosen: Sequence[float],
    policy_rejected: Sequence[float],
    ref_chosen: Sequence[float],
    ref_rejected: Sequence[float],
    beta: float,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy, margin and chosen/rejected implicit rewards, each with its bootstrap interval."""
    chosen = [beta * (p - r) for p, r in zip(policy_chosen, ref_chosen, strict=True)]
    rejected = [beta * (p - r) for p, r in zip(policy_rejected, ref_rejected, strict=True)]
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {
        "num_pairs": len(margins),
        "beta": beta,
        "accuracy": summarize([1.0 if m > 0 else 0.0 for m in margins], level, resamples, seed),
        "margin": summarize(margins, level, resamples, seed),
        "chosen_reward": summarize(chosen, level, resamples, seed),
        "rejected_reward": summarize(rejected, level, resamples, seed),
    }


def sample_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    sampling: SamplingSettings,
    rows: int = 128,
    progress: bool = True,
    desc: str = "sample",
) -> list[Samples]:
    """Samples of every prompt, in order; sample j of prompt i is seeded from (seed, i, j), so two
    models sampled with the same settings are compared on the same random numbers. About `rows`
    sequences per generate call: wide batches amortise each decoding step."""
    out: list[Samples] = []
    per_call = max(1, rows // sampling.num_samples)
    for _, results in iter_samples(model, tokenizer, prompts, sampling, batch_size=per_call, progress=progress, desc=desc):
        out.extend(results)
    return out


def _score_samples(reward: Any, prompts: Sequence[PromptRecord], samples: Sequence[Samples]) -> list[list[float]]:
    return score_groups(reward, [p.prompt for p in prompts], [s.completions for s in samples])


def _kl_samples(
    policy: Any, reference: Any, tokenizer: Any, prompts: Sequence[PromptRecord], samples: Sequence[Samples], batch_size: int
) -> tuple[list[list[float]], list[list[float]]]:
    prompt_rows, completion_rows, owner = [], [], []
    for i, (p, s) in enumerate(zip(prompts, samples, strict=True)):
        ids = encode_prompt(tokenizer, p.prompt)
        for tokens in s.token_ids:
            prompt_rows.append(ids)
            completion_rows.append(tokens)
            owner.append(i)
    logp, logq, exact = kl_terms(policy, reference, prompt_rows, completion_rows, tokenizer.pad_token_id, batch_size)
    ratios: list[list[float]] = [[] for _ in prompts]
    per_token: list[list[float]] = [[] for _ in prompts]
    for i, a, b, k in zip(owner, logp, logq, exact, strict=True):
        ratios[i].append(a - b)
        per_token[i].append(k)
    return ratios, per_token


def sample_measures(
    scores: Sequence[Sequence[float]] | None,
    baseline_scores: Sequence[Sequence[float]] | None,
    lengths: Sequence[Sequence[int]],
    baseline_lengths: Sequence[Sequence[int]],
    log_ratios: Sequence[Sequence[float]],
    exact_kls: Sequence[Sequence[float]],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every sample measure of the module docstring; intervals are bootstrapped over prompts.
    `scores` None (a pairwise judge scores no sample alone): the reward measures are left out."""
    length, base_length = statistics.fmean(_prompt_means(lengths)), statistics.fmean(_prompt_means(baseline_lengths))
    ratio = length / base_length if base_length > 0 else float("inf")
    rewards: dict[str, Any] = {}
    if scores is not None and baseline_scores is not None:
        model_means, base_means = _prompt_means(scores), _prompt_means(baseline_scores)
        rewards = {
            "reward": summarize(model_means, level, resamples, seed),
            "baseline_reward": summarize(base_means, level, resamples, seed),
            "reward_gain": summarize([m - b for m, b in zip(model_means, base_means, strict=True)], level, resamples, seed),
            "win_rate": summarize(prompt_win_rates(scores, baseline_scores), level, resamples, seed),
        }
    return {
        "num_prompts": len(lengths),
        "samples_per_prompt": len(lengths[0]) if lengths else 0,
        **rewards,
        "kl_monte_carlo": summarize(_prompt_means(log_ratios), level, resamples, seed),
        "kl_per_token": summarize(_prompt_means(exact_kls), level, resamples, seed),
        "length": length,
        "baseline_length": base_length,
        "length_ratio": ratio,
        "length_warning": ratio > LENGTH_WARNING,
    }


def grouped_pair_measures(
    names: Sequence[str], logps: Sequence[Sequence[float]], beta: float, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """`pair_measures` over each group's pairs (`names[i]` is pair i's group; `logps` what
    `pair_logps` returns) and the groups' preference accuracies compared (`groups.compare_groups`)."""
    stats = {"level": level, "resamples": resamples, "seed": seed}
    return {
        "groups": per_group(names, logps, partial(pair_measures, beta=beta, **stats)),
        "comparison": compare_groups(names, pair_correct(*logps), "accuracy", **stats),
    }


def grouped_sample_measures(
    names: Sequence[str],
    columns: Sequence[Sequence[Any]],
    baseline: str,
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """`sample_measures` over each group's prompts (`columns` are its first six arguments, one
    entry per prompt) and the groups' reward gains over the baseline compared."""
    stats = {"level": level, "resamples": resamples, "seed": seed}
    return {
        "baseline": baseline,
        "groups": per_group(names, columns, partial(sample_measures, **stats)),
        "comparison": compare_groups(names, prompt_gains(columns[0], columns[1]), "reward_gain", **stats),
    }


def load_eval_prompts(path: str, tokenizer: Any, max_prompts: int | None) -> list[PromptRecord]:
    """Held-out prompts in the form the model sees (a string goes to a chat model as a user turn)."""
    prompts = load_prompts(path)[:max_prompts] if max_prompts else load_prompts(path)
    return [PromptRecord(p.index, as_chat(p.prompt, tokenizer, None), p.location, p.extra) for p in prompts]


def run_eval(settings: EvalSettings, baseline_samples: Sequence[Samples] | None = None) -> dict[str, Any]:
    """Evaluate as the settings say; writes `eval.json` and, with prompts, `eval_samples.jsonl`
    beside it, and returns the contents of `eval.json`. `baseline_samples` (drawn with the same
    sampling settings and seeds) spares sampling the baseline again, as a sweep does."""
    if not settings.pairs and not settings.prompts:
        raise PreftuneError("nothing to evaluate: give --pairs (preference accuracy, margins) and/or --prompts with --reward")
    if settings.prompts and not settings.reward:
        raise PreftuneError("--prompts needs --reward to score the samples (sentiment, length, a reward-model folder, module:function)")
    if not 0 < settings.level < 1:
        raise PreftuneError(f"--confidence must be between 0 and 1, got {settings.level}")
    if settings.resamples < 100:
        raise PreftuneError(f"--bootstrap must be at least 100 resamples, got {settings.resamples}")
    sampling = SamplingSettings(settings.num_samples, settings.temperature, settings.top_p, settings.max_new_tokens, settings.seed).check()
    target = resolve_target(settings.model, settings.ref, settings.beta)
    reward = as_reward(settings.reward, judge_prompt=settings.judge_prompt) if settings.reward else None
    output = Path(settings.output) if settings.output else (target.run_dir or Path(".")) / "eval.json"
    # A bad --by fails before any model is loaded; each source must have the field somewhere.
    pair_groups = record_groups(settings.pairs, "test", settings.by) if settings.by and settings.pairs else None
    if settings.by and settings.prompts:
        check_field(({"prompt": p.prompt, **p.extra} for p in load_prompts(settings.prompts)), settings.by, Path(str(settings.prompts)).name)
    template_kwargs = settings.chat_template_kwargs if settings.chat_template_kwargs is not None else target.chat_template_kwargs
    policy, tokenizer = load_generation_model(target.model, template_kwargs=template_kwargs, fold_system=target.fold_system_message)
    reference = load_generation_model(target.reference)[0] if target.reference else None
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise PreftuneError(f"{target.model}: not a LoRA adapter, so its reference must be named with --ref")
    if is_judge(reward) and reward.is_self:  # judge:self: the evaluated model judges
        reward = reward.bind(policy, tokenizer)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "model": target.model,
        "reference": target.reference or "the base model (adapter disabled)",
        "confidence": settings.level,
    }
    by: dict[str, Any] = {"field": settings.by, "missing": MISSING}  # eval.json's `by` section, with --by

    if settings.pairs:
        columns = settings.columns if settings.columns is not None else target.columns
        # The pairs' token table, as training prepares it (mapped from the cache when it did).
        data = prepare(settings.pairs, "test", "pairs", tokenizer, RecordLayout.make(columns, target.system_prompt),
                       progress=settings.progress)
        pairs = PairItems(data, np.arange(len(data)), 0, target.max_seq_length, target.max_prompt_length)
        logps = pair_logps(policy, reference, pairs, tokenizer.pad_token_id, settings.batch_size)
        result["pairs"] = {"file": str(settings.pairs), **pair_measures(*logps, target.beta, settings.level, settings.resamples, settings.seed)}
        if pair_groups is not None:
            names = [pair_groups.get(str(location), MISSING) for location in data.scalars("location")[pairs.rows]]
            by["pairs"] = grouped_pair_measures(names, logps, target.beta, settings.level, settings.resamples, settings.seed)

    if settings.prompts:
        prompts = load_eval_prompts(settings.prompts, tokenizer, settings.max_prompts)
        samples = sample_prompts(policy, tokenizer, prompts, sampling, progress=settings.progress, desc="sample model")
        if baseline_samples is None:
            if settings.baseline:
                base_model = load_generation_model(model_folder(settings.baseline))[0]
                baseline_samples = sample_prompts(base_model, tokenizer, prompts, sampling, progress=settings.progress, desc="sample baseline")
                del base_model
            else:
                with as_reference(policy, reference) as ref:
                    baseline_samples = sample_prompts(ref, tokenizer, prompts, sampling, progress=settings.progress, desc="sample reference")
        if len(baseline_samples) != len(prompts):
            raise PreftuneError(f"baseline samples cover {len(baseline_samples)} prompts, the evaluation {len(prompts)}")
        # The KL estimators need draws from the model itself at temperature 1, without top-p.
        kl_samples = samples
        if settings.temperature != 1.0 or settings.top_p != 1.0:
            kl_sampling = SamplingSettings(settings.num_samples, 1.0, 1.0, settings.max_new_tokens, settings.seed)
            kl_samples = sample_prompts(policy, tokenizer, prompts, kl_sampling, progress=settings.progress, desc="sample model, T=1 (KL)")
        ratios, exact = _kl_samples(policy, reference, tokenizer, prompts, kl_samples, settings.batch_size)
        judged = None
        if is_judge(reward):
            judged = judged_win_rates(reward, [p.prompt for p in prompts], [s.completions for s in samples],
                                      [b.completions for b in baseline_samples])
            scores = base_scores = None
        else:
            scores, base_scores = _score_samples(reward, prompts, samples), _score_samples(reward, prompts, baseline_samples)
        result["samples"] = {
            "prompts_file": str(settings.prompts),
            "reward_function": reward.name,
            "baseline": settings.baseline or "reference",
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            **sample_measures(
                scores,
                base_scores,
                [s.lengths for s in samples],
                [s.lengths for s in baseline_samples],
                ratios,
                exact,
                settings.level,
                settings.resamples,
                settings.seed,
            ),
            **(judged_measures(reward, judged, settings.level, settings.resamples, settings.seed) if judged else {}),
        }
        if judged:  # per sample, its mean judged P(better) against the other side's samples
            scores = [[statistics.fmean(row) for row in m] for m in judged.matrices]
            base_scores = [[1.0 - statistics.fmean(col) for col in zip(*m)] for m in judged.matrices]
        prompt_names = [group_name({"prompt": p.prompt, **p.extra}, settings.by) for p in prompts] if settings.by else None
        if prompt_names:
            # With a judge, a sample's score is its mean judged probability of beating the other
            # side's samples of its prompt: the groups then compare judged gains.
            by["samples"] = grouped_sample_measures(
                prompt_names,
                (scores, base_scores, [s.lengths for s in samples], [s.lengths for s in baseline_samples], ratios, exact),
                settings.baseline or "reference",
                settings.level,
                settings.resamples,
                settings.seed,
            )
        write_jsonl_atomic(
            output.with_name("eval_samples.jsonl"),
            [
                {
                    "index": p.index,
                    "prompt": p.prompt,
                    "model": s.completions,
                    "model_scores": sc,
                    "model_lengths": s.lengths,
                    "baseline": b.completions,
                    "baseline_scores": bs,
                    "baseline_lengths": b.lengths,
                    "log_ratios": r,
                    "exact_kls": k,
                    **({"win_probabilities": judged.matrices[i]} if judged else {}),
                    **({"group": prompt_names[i]} if prompt_names else {}),
                }
                for i, (p, s, b, sc, bs, r, k) in enumerate(zip(prompts, samples, baseline_samples, scores, base_scores, ratios, exact, strict=True))
            ],
        )
    if settings.by:
        result["by"] = by
    result["seconds"] = round(time.perf_counter() - started, 1)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(output, json.dumps(result, indent=2) + "\n")
    return result


def _interval(measure: dict[str, Any], fmt: str) -> tuple[str, str]:
    low, high = measure["ci"]
    return format(measure["mean"], fmt), f"[{format(low, fmt)}, {format(high, fmt)}]"


def format_eval(result: dict[str, Any]) -> str:
    """The terminal table of `preftune eval`."""
    level = f"{result['confidence']:.0%} CI"
    rows: list[tuple[str, str, str]] = []
    if "pairs" in result:
        p = result["pairs"]
        rows.append((f"pairs: {p['num_pairs']} from {Path(p['file']).name}, beta {p['beta']:g}", "", ""))
        rows.append(("  preference accuracy", *_interval(p["accuracy"], ".3f")))
        rows.append(("  reward margin", *_interval(p["margin"], "+.4f")))
        rows.append(("  chosen reward", *_interval(p["chosen_reward"], "+.4f")))
        rows.append(("  rejected reward", *_interval(p["rejected_reward"], "+.4f")))
    if "samples" in result:
        s = result["samples"]
        rows.append(
            (
                f"samples: {s['num_prompts']} prompts x {s['samples_per_prompt']}, {s['reward_function']}, "
                f"T={s['temperature']:g}, baseline: {s['baseline']}",
                "",
                "",
            )
        )
        if "reward" in s:
            rows.append(("  mean reward, model", *_interval(s["reward"], "+.3f")))
            rows.append(("  mean reward, baseline", *_interval(s["baseline_reward"], "+.3f")))
            rows.append(("  reward gain over baseline", *_interval(s["reward_gain"], "+.3f")))
            rows.append(("  win rate over baseline", *_interval(s["win_rate"], ".3f")))
        if "judged_win_rate" in s:
            rows.append(("  judged win rate over baseline", *_interval(s["judged_win_rate"], ".3f")))
            rows.append(("  comparisons decided for model", *_interval(s["judged_decisions"], ".3f")))
            j = s["judge"]
            if j["pairs"]:
                rows.append(("  judge: orders pick different winners", f"{j['orders_disagree']:.3f}",
                             f"mean P(answer A) {j['mean_p_answer_a']:.3f} (0.5 = no position bias), {j['pairs']} pairs"))
        rows.append(("  KL(model || ref), log-ratio", *_interval(s["kl_monte_carlo"], ".3f")))
        rows.append(("  KL(model || ref), per-token", *_interval(s["kl_per_token"], ".3f")))
        rows.append(
            ("  mean length (tokens)", f"{s['length']:.1f}", f"baseline {s['baseline_length']:.1f}, x{s['length_ratio']:.2f}")
        )
    widths = [max(len(r[i]) for r in rows + [("", "mean", level)]) for i in range(3)]
    lines = [f"{'':<{widths[0]}}  {'mean':>{widths[1]}}  {level:<{widths[2]}}"]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}".rstrip() for a, b, c in rows]
    if result.get("samples", {}).get("length_warning"):
        s = result["samples"]
        lines.append(
            f"warning: samples are {s['length_ratio']:.2f}x as long as the baseline's: the reward may be "
            "rewarding length (DPO's known length exploitation); compare rewards at equal length"
        )
    if "by" in result:
        lines.append(format_groups(result))
    return "\n".join(lines)
