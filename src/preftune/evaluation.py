"""Before/after measures of a tuned model against its base, on samples from held-out prompts.

- Mean reward and its standard error (sample standard deviation over sqrt(n), over prompts, each
  prompt's samples averaged first: samples of one prompt are not independent draws).
- `reward_stderr`: the standard error of the paired difference after - before, prompt by prompt;
  "after beats before by more than twice it" is the usual two-sided ~95% check.
- Win rate of tuned over base judged by the same reward: within each prompt every tuned sample is
  compared with every base sample, a tie counting half; averaged over prompts.
- KL estimate: the Monte Carlo mean over the tuned model's samples y ~ p_tuned(.|x) of
  log p_tuned(y|x) - log p_base(y|x), summed over the sampled completion tokens (EOS included),
  which estimates KL(p_tuned || p_base), the quantity DPO's objective keeps small (Rafailov et al.
  2023, arXiv:2305.18290, eq. 3). It is unbiased only for samples drawn at temperature 1 without
  top-p; with a warped sampler it is the mean log-ratio under that sampler.
- Mean completion length in tokens.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch

from preftune.logprobs import chunked_token_logps, split_body_and_head


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


def win_rate(tuned: Sequence[Sequence[float]], base: Sequence[Sequence[float]]) -> float:
    """Share of (tuned, base) sample comparisons of the same prompt won by tuned, ties half."""
    if len(tuned) != len(base) or not tuned:
        raise ValueError("tuned and base need scores for the same, non-empty list of prompts")
    rates = []
    for t_scores, b_scores in zip(tuned, base, strict=True):
        wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t in t_scores for b in b_scores)
        rates.append(wins / (len(t_scores) * len(b_scores)))
    return statistics.fmean(rates)


def paired_difference(tuned: Sequence[Sequence[float]], base: Sequence[Sequence[float]]) -> tuple[float, float]:
    """Mean over prompts of (tuned mean - base mean) and its standard error."""
    if len(tuned) != len(base):
        raise ValueError("tuned and base need scores for the same prompts")
    return mean_stderr([t - b for t, b in zip(_prompt_means(tuned), _prompt_means(base), strict=True)])


def collate_sequences(
    prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of prompt + completion: (input_ids, attention_mask, completion_mask)."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids, strict=True)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    completion_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, row) in enumerate(zip(prompt_ids, rows, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
        completion_mask[i, len(p) : len(row)] = True
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def completion_logps(
    model: torch.nn.Module,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Summed log-probability of each completion given its prompt, in the model's current state
    (call it inside `model.disable_adapter()` for a LoRA model's base). As in training, the output
    head runs over completion positions only, in chunks (`preftune.logprobs`)."""
    device = next(model.parameters()).device
    parts = split_body_and_head(model)
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        input_ids, attention_mask, completion_mask = (
            t.to(device)
            for t in collate_sequences(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size], pad_id)
        )
        scored = completion_mask[:, 1:]  # token t is predicted by the output at t - 1
        targets = input_ids[:, 1:][scored]
        if parts is not None:
            body, head = parts
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            token_logps = chunked_token_logps(head, hidden[:, :-1][scored], targets)
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_logps = torch.log_softmax(logits[:, :-1][scored].float(), dim=-1).gather(-1, targets[:, None])[:, 0]
        rows = scored.nonzero(as_tuple=True)[0]
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=device).index_add(0, rows, token_logps.float())
        out.extend(sums.cpu().tolist())
    return out


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
