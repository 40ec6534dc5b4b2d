"""`preftune eval --by FIELD`: every measure per value of a record field, and how the groups differ.

The evaluation computes its per-record values once (each pair's four log-probs, each prompt's
sample scores, lengths and KL terms); grouping is a layer over those lists. A group's figures are
the same measure function run on that group's records alone, with the same bootstrap seed, so they
equal a standalone evaluation of those records: nothing is sampled or scored again per group.

Records without the field form the group `MISSING`. Between groups, one per-record value (a
prompt's reward gain over the baseline, a pair's correctness) is compared: the ranking of the
groups, the best minus the worst group and each group minus all the others, each with a bootstrap
interval that resamples every group's records independently (a two-sample bootstrap).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from preftune.config import suggest
from preftune.data import InMemoryRecords, iter_entries
from preftune.errors import PreftuneError

MISSING = "(missing)"  # the group of records that lack the field


def group_name(record: Any, field: str) -> str:
    """The group of one record: its field's value as text (JSON for non-strings), or `MISSING`."""
    value = record.get(field) if isinstance(record, dict) else None
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value if value else '""'
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _no_field(field: str, what: str, fields: set[str]) -> PreftuneError:
    """The one-line error of `--by` when no record has the field, naming the fields they have."""
    known = sorted(fields)
    return PreftuneError(
        f"--by {field}: no record of {what} has a field '{field}'{suggest(field, known)}; "
        f"their fields: {', '.join(known) if known else 'none'}"
    )


def check_field(records: Iterable[Any], field: str, what: str) -> None:
    """Raise `_no_field` unless some record has the field."""
    fields: set[str] = set()
    for record in records:
        if group_name(record, field) != MISSING:
            return
        if isinstance(record, dict):
            fields.update(k for k, v in record.items() if v is not None)
    raise _no_field(field, what, fields)


def record_groups(source: str | Path | InMemoryRecords, split: str, field: str) -> dict[str, str]:
    """Each record's group by its location (what a prepared table's rows keep), streamed from the
    records as stored: the field is the file's own, before any column mapping."""
    groups: dict[str, str] = {}
    fields: set[str] = set()
    found = False
    for location, record in iter_entries(source, split):
        name = group_name(record, field)
        groups[location] = name
        if not found and name == MISSING and isinstance(record, dict):
            fields.update(k for k, v in record.items() if v is not None)
        found = found or name != MISSING
    if not found:
        raise _no_field(field, Path(str(source)).name, fields)
    return groups


def _order(name: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text, `MISSING` last."""
    if name == MISSING:
        return (2, 0.0, "")
    try:
        number = float(name)
    except ValueError:
        return (1, 0.0, name)
    return (0, number, name) if math.isfinite(number) else (1, 0.0, name)


def group_rows(names: Sequence[str]) -> dict[str, list[int]]:
    """Record positions of each group, groups in a stable order (`_order`)."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return {name: rows[name] for name in sorted(rows, key=_order)}


def per_group(names: Sequence[str], columns: Sequence[Sequence[Any]], measure: Callable[..., dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`measure(*columns)` over each group's records alone: the function an ungrouped evaluation
    calls on all records, so a group's figures are exactly those of a run over its records."""
    for column in columns:
        if len(column) != len(names):
            raise ValueError(f"{len(names)} group names for a column of {len(column)} records")
    return {name: measure(*([column[i] for i in rows] for column in columns)) for name, rows in group_rows(names).items()}


def bootstrap_difference_ci(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of mean(a) - mean(b) for two independent samples: each is
    resampled with replacement on its own, as its records were drawn apart."""
    if not a or not b:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diffs = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1) - y[rng.integers(0, len(y), size=(resamples, len(y)))].mean(axis=1)
    low, high = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _difference(a: Sequence[float], b: Sequence[float], level: float, resamples: int, seed: int) -> dict[str, Any]:
    low, high = bootstrap_difference_ci(a, b, level, resamples, seed)
    return {"mean": statistics.fmean(a) - statistics.fmean(b), "ci": [low, high]}


def compare_groups(
    names: Sequence[str], values: Sequence[float], measure: str, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> dict[str, Any] | None:
    """Which groups moved most on one per-record value: the groups ranked by its mean, the best
    minus the worst, and each group minus the rest. None with a single group.

    The best and worst are picked by the same data their difference is measured on, so with many
    small groups that interval is optimistic; a group-against-the-rest interval is the one to
    read for a group named before looking."""
    rows = group_rows(names)
    if len(rows) < 2:
        return None
    by_group = {name: [values[i] for i in r] for name, r in rows.items()}
    means = {name: statistics.fmean(v) for name, v in by_group.items()}
    ranking = sorted(means, key=lambda name: (-means[name], _order(name)))
    best, worst = ranking[0], ranking[-1]
    rest = {
        name: [values[i] for other, r in rows.items() if other != name for i in r]
        for name in rows
    }
    return {
        "measure": measure,
        "ranking": ranking,
        "best": best,
        "worst": worst,
        "best_minus_worst": _difference(by_group[best], by_group[worst], level, resamples, seed),
        "vs_rest": {name: _difference(by_group[name], rest[name], level, resamples, seed) for name in rows},
    }


def pair_correct(
    policy_chosen: Sequence[float], policy_rejected: Sequence[float], ref_chosen: Sequence[float], ref_rejected: Sequence[float]
) -> list[float]:
    """1 where the chosen completion has the higher implicit reward (beta > 0 does not change it)."""
    return [
        1.0 if (pc - rc) - (pr - rr) > 0 else 0.0
        for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected, strict=True)
    ]


def prompt_gains(scores: Sequence[Sequence[float]], baseline_scores: Sequence[Sequence[float]]) -> list[float]:
    """Each prompt's mean reward minus the baseline's mean reward on it."""
    return [statistics.fmean(s) - statistics.fmean(b) for s, b in zip(scores, baseline_scores, strict=True)]


# --------------------------------------------------------------------------------------- the table


def _ci(measure: dict[str, Any], fmt: str) -> str:
    low, high = measure["ci"]
    return f"{format(measure['mean'], fmt)} [{format(low, fmt)}, {format(high, fmt)}]"


def _grid(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths))).rstrip()  # noqa: E731
    return [line(header), *(line(r) for r in rows)]


def _comparison_lines(comparison: dict[str, Any] | None, what: str, fmt: str) -> list[str]:
    if not comparison:
        return []
    best, worst = comparison["best"], comparison["worst"]
    return [f"  {what}: highest {best}, lowest {worst}; {best} minus {worst} {_ci(comparison['best_minus_worst'], fmt)}"]


def format_groups(result: dict[str, Any]) -> str:
    """The per-group tables `preftune eval --by` prints below the overall one."""
    by = result["by"]
    level = f"{result.get('confidence', 0.95):.0%} CI"
    lines: list[str] = []
    if "pairs" in by:
        groups = by["pairs"]["groups"]
        lines.append(f"pairs by {by['field']} ({len(groups)} groups; mean [{level}])")
        rows = [
            (name, str(g["num_pairs"]), _ci(g["accuracy"], ".3f"), _ci(g["margin"], "+.4f"))
            for name, g in groups.items()
        ]
        lines += ["  " + line for line in _grid(("group", "pairs", "accuracy", "reward margin"), rows)]
        lines += _comparison_lines(by["pairs"].get("comparison"), "preference accuracy", "+.3f")
    if "samples" in by:
        s = by["samples"]
        groups = s["groups"]
        ranking = (s.get("comparison") or {}).get("ranking") or list(groups)
        lines.append(
            f"samples by {by['field']} ({len(groups)} groups, most improved first; baseline: {s['baseline']}; mean [{level}])"
        )
        vs_rest = (s.get("comparison") or {}).get("vs_rest", {})
        rows = [
            (
                name,
                str(groups[name]["num_prompts"]),
                format(groups[name]["reward"]["mean"], "+.3f"),
                _ci(groups[name]["reward_gain"], "+.3f"),
                _ci(vs_rest[name], "+.3f") if name in vs_rest else "",
                _ci(groups[name]["win_rate"], ".3f"),
                format(groups[name]["kl_per_token"]["mean"], ".2f"),
                f"x{groups[name]['length_ratio']:.2f}",
            )
            for name in ranking
        ]
        header = ("group", "prompts", "reward", "gain over baseline", "gain minus the rest's", "win rate", "KL", "length")
        lines += ["  " + line for line in _grid(header, rows)]
        lines += _comparison_lines(s.get("comparison"), "reward gain", "+.3f")
    return "\n".join(lines)
