"""Preference pairs from scored samples: which two completions of a prompt become chosen/rejected.

Strategies, per prompt:
- `best-worst`: the highest-scored completion against the lowest (the first one in sample order
  wins a tie for either place); one pair per prompt, the widest margin it has.
- `all-pairs`: every two completions with different scores, the higher one chosen; k samples give
  up to k(k-1)/2 pairs, as in the DPO paper's sentiment task (Rafailov et al. 2023,
  arXiv:2305.18290, appendix C: 4 samples, 6 pairs per prefix).
- `random`: two completions drawn at random (seeded by the seed and the prompt's index, so the
  draw does not depend on the other prompts); one pair per prompt.

Rules for all: a pair whose scores are equal is a tie and is skipped (it says nothing about which
is better), as is a pair of identical texts; a pair whose score difference is below `min_margin` is
skipped (small differences are mostly reward noise); a prompt's pair is written once even when a
completion was sampled twice (a repeat would weigh it double). The output keeps the scores as
`chosen_score` / `rejected_score` and the sample record's other fields, minus the per-sample lists;
samples drawn at several temperatures also give `chosen_temperature` / `rejected_temperature`.

Samples judged by a pairwise judge (`--reward judge:MODEL`, `preftune.collect.judge`) carry as
scores each completion's mean probability of beating the prompt's other completions, and the
strategies rank by it; each pair also gets `judge_probability`, the judge's own P(chosen better
than rejected) for that pair, from the record's `win_probabilities`.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from preftune.collect.generation import check_samples_record
from preftune.errors import PreftuneError

STRATEGIES = ("best-worst", "all-pairs", "random")

# Per-sample lists of a samples record: they describe all completions, not the two of a pair.
_PER_SAMPLE_FIELDS = ("completions", "scores", "lengths", "stopped", "temperatures", "win_probabilities")


@dataclass
class PairStats:
    prompts: int = 0
    pairs: int = 0
    ties: int = 0  # candidate pairs skipped for equal scores or identical texts
    below_margin: int = 0  # candidate pairs skipped for a score difference below min_margin
    too_few: int = 0  # prompts with fewer than two completions
    repeats: int = 0  # pairs of a prompt already written (a completion sampled twice)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.prompts} prompts; skipped {self.ties} ties and "
            f"{self.below_margin} below the margin and {self.repeats} repeated; "
            f"{self.too_few} prompts had fewer than two completions"
        )


def _candidates(strategy: str, scores: Sequence[float], rng: random.Random) -> Iterator[tuple[int, int]]:
    """Index pairs (a, b) to consider, in a fixed order; which one is chosen is decided later."""
    n = len(scores)
    if strategy == "best-worst":
        best = max(range(n), key=lambda i: (scores[i], -i))
        worst = min(range(n), key=lambda i: (scores[i], i))
        yield best, worst
    elif strategy == "all-pairs":
        yield from itertools.combinations(range(n), 2)
    else:
        a, b = rng.sample(range(n), 2)
        yield a, b


def build_pairs(
    records: Sequence[tuple[str, dict[str, Any]]],
    strategy: str = "best-worst",
    min_margin: float = 0.0,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], PairStats]:
    """Pairs from (location, scored samples record) entries, with counts of what was skipped."""
    if strategy not in STRATEGIES:
        from preftune.errors import suggest

        raise PreftuneError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}{suggest(strategy, STRATEGIES)}")
    if min_margin < 0:
        raise PreftuneError(f"--min-margin must be >= 0, got {min_margin}")
    stats = PairStats()
    pairs: list[dict[str, Any]] = []
    for position, (location, record) in enumerate(records):
        completions, scores = check_samples_record(location, record, scored=True)
        stats.prompts += 1
        if len(completions) < 2:
            stats.too_few += 1
            continue
        index = record.get("index", position)
        rng = random.Random(f"{seed}:{index}")
        kept = {k: v for k, v in record.items() if k not in _PER_SAMPLE_FIELDS and k != "prompt"}
        temperatures = record.get("temperatures")
        if temperatures is not None and (not isinstance(temperatures, list) or len(temperatures) != len(completions)):
            raise PreftuneError(f"{location}: field 'temperatures' must be a list of {len(completions)} numbers, one per completion")
        judged = record.get("win_probabilities")
        if judged is not None and (not isinstance(judged, list) or len(judged) != len(completions)
                                   or not all(isinstance(row, list) and len(row) == len(completions) for row in judged)):
            raise PreftuneError(f"{location}: field 'win_probabilities' must be a {len(completions)} x {len(completions)} matrix")
        written: set[tuple[str, str]] = set()
        for a, b in _candidates(strategy, scores, rng):
            if scores[a] == scores[b] or completions[a] == completions[b]:
                stats.ties += 1
                continue
            if abs(scores[a] - scores[b]) < min_margin:
                stats.below_margin += 1
                continue
            chosen, rejected = (a, b) if scores[a] > scores[b] else (b, a)
            if (completions[chosen], completions[rejected]) in written:
                stats.repeats += 1
                continue
            written.add((completions[chosen], completions[rejected]))
            pairs.append(
                {
                    "prompt": record["prompt"],
                    "chosen": completions[chosen],
                    "rejected": completions[rejected],
                    "chosen_score": scores[chosen],
                    "rejected_score": scores[rejected],
                    **({"chosen_temperature": temperatures[chosen], "rejected_temperature": temperatures[rejected]} if temperatures else {}),
                    **({"judge_probability": judged[chosen][rejected]} if judged is not None else {}),
                    **kept,
                }
            )
            stats.pairs += 1
    return pairs, stats
