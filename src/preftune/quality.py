"""The quality report of a dataset (`preftune data check`): duplicates, ties, length bias, prompt
diversity and truncation for pairs; shapes, duplicates, lengths and KTO's class balance for SFT and
KTO examples. Reading and validating the records is `preftune.data`'s."""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from preftune.data import FIELDS, PreferenceExample, SFTExample, Text, UnpairedExample, is_empty

__all__ = ["QualityCounter", "quality_report", "format_report", "examples_report", "format_examples_report", "kto_balance_advice"]

# Preference data where the chosen answer is usually the longer one teaches length rather than
# quality (Singhal et al. 2023, "A Long Way to Go: Investigating Length Correlations in RLHF").
# The band is a rule of thumb: shares outside it are flagged.
LENGTH_BIAS_BAND = (0.35, 0.65)




def _flat_text(value: Text) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def _key(value: Any) -> str:
    """A canonical string, so texts and message lists compare and hash alike."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "min": ordered[0],
        "mean": statistics.fmean(ordered),
        "median": statistics.median(ordered),
        "p95": _percentile(ordered, 0.95),
        "max": ordered[-1],
    }


def _distinct_n(texts: Iterable[str], n: int) -> float | None:
    """Distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
    Conversation Models"): unique n-grams / all n-grams, n-grams taken within each text."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else None


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%"


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


class QualityCounter:
    """The quality report's counts gathered one example at a time, so `data check` streams a source
    of any size in bounded memory: prompts and pairs are remembered by 8-byte digests, lengths as
    three integer arrays, and the word n-grams of each distinct prompt as sets."""

    def __init__(self) -> None:
        self.total = 0
        self.conversational = 0
        self.empty_prompts = 0
        self.ties = 0
        self.prompt_digests: set[bytes] = set()
        self.pair_digests: set[bytes] = set()
        self.words = (array("l"), array("l"), array("l"))
        self.grams: dict[int, set[tuple[str, ...]]] = {1: set(), 2: set()}
        self.gram_counts = {1: 0, 2: 0}

    def add(self, ex: PreferenceExample) -> None:
        self.total += 1
        self.conversational += ex.is_conversational
        self.empty_prompts += is_empty(ex.prompt)
        self.ties += _key(ex.chosen) == _key(ex.rejected)
        digest = _digest(_key(ex.prompt))
        if digest not in self.prompt_digests:
            self.prompt_digests.add(digest)
            words = _flat_text(ex.prompt).split()
            for n in (1, 2):
                grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
                self.grams[n].update(grams)
                self.gram_counts[n] += len(grams)
        self.pair_digests.add(_digest(_key([ex.prompt, ex.chosen, ex.rejected])))
        for column, value in zip(self.words, (ex.prompt, ex.chosen, ex.rejected)):
            column.append(len(_flat_text(value).split()))

    def distinct(self, n: int) -> float | None:
        return len(self.grams[n]) / self.gram_counts[n] if self.gram_counts[n] else None

    def report(
        self, lengths: Sequence[Sequence[int]] | None = None, max_seq_length: int | None = None, max_prompt_length: int | None = None
    ) -> dict[str, Any]:
        """The report (see `quality_report`); `lengths` are token counts as three columns or rows."""
        return _report(self, lengths, max_seq_length, max_prompt_length)


def quality_report(
    examples: Sequence[PreferenceExample],
    lengths: Sequence[tuple[int, int, int]] | None = None,
    max_seq_length: int | None = None,
    max_prompt_length: int | None = None,
) -> dict[str, Any]:
    """Numbers that reveal a broken or biased preference set before any compute is spent.

    `lengths` gives (prompt, chosen, rejected) token counts, one per example; without it lengths
    are whitespace words (`length_unit` says which). Truncation counts need token lengths and
    the limits: a prompt is truncated when longer than `max_prompt_length`, a pair when the
    (truncated) prompt plus the longer completion exceeds `max_seq_length`; otherwise they are
    None. Prompt diversity (`distinct_1`, `distinct_2`) is measured over the unique prompts, so
    it describes their wording while `unique_prompts` describes their repetition. The result is
    JSON-serialisable.
    """
    counter = QualityCounter()
    for ex in examples:
        counter.add(ex)
    if lengths is not None:
        lengths = [tuple(int(x) for x in row) for row in lengths]
        if len(lengths) != counter.total or any(len(row) != 3 for row in lengths):
            raise ValueError("lengths must hold one (prompt, chosen, rejected) triple per example")
        lengths = [[row[i] for row in lengths] for i in range(3)]
    return _report(counter, lengths, max_seq_length, max_prompt_length)


def _report(
    counter: QualityCounter, columns: Sequence[Sequence[int]] | None, max_seq_length: int | None, max_prompt_length: int | None
) -> dict[str, Any]:
    total = counter.total
    unit = "tokens" if columns is not None else "words"
    p, c, r = (np.asarray(col, dtype=np.int64) for col in (columns if columns is not None else counter.words))
    if not len(p) == len(c) == len(r) == total:
        raise ValueError("lengths must hold one (prompt, chosen, rejected) triple per example")
    chosen_longer = int((c > r).sum())
    rejected_longer = int((r > c).sum())
    unique_prompts = len(counter.prompt_digests)
    exact_duplicates = total - len(counter.pair_digests)
    ties = counter.ties

    report: dict[str, Any] = {
        "num_pairs": total,
        "conversational": counter.conversational,
        "empty_prompts": counter.empty_prompts,
        "exact_duplicates": exact_duplicates,
        "duplicate_prompts": total - unique_prompts,
        "chosen_equals_rejected": ties,
        "length_unit": unit,
        "lengths": {name: _stats(col.tolist()) for name, col in zip(FIELDS, (p, c, r))},
        "chosen_longer_share": chosen_longer / total if total else None,
        "rejected_longer_share": rejected_longer / total if total else None,
        "unique_prompts": unique_prompts,
        "distinct_1": counter.distinct(1),
        "distinct_2": counter.distinct(2),
        "max_prompt_length": max_prompt_length,
        "max_seq_length": max_seq_length,
        "truncated_prompts": None,
        "truncated_pairs": None,
        "warnings": [],
    }
    if columns is not None and max_prompt_length is not None:
        report["truncated_prompts"] = int((p > max_prompt_length).sum())
    if columns is not None and max_seq_length is not None:
        cap = max_prompt_length if max_prompt_length is not None else np.iinfo(np.int64).max
        report["truncated_pairs"] = int((np.minimum(p, cap) + np.maximum(c, r) > max_seq_length).sum())

    warnings: list[str] = report["warnings"]
    if total == 0:
        warnings.append("no pairs")
        return report
    if ties:
        warnings.append(
            f"{ties} pair(s) ({_percent(ties, total)}) have chosen identical to rejected: "
            "the preference loss gets no signal from them"
        )
    if exact_duplicates:
        warnings.append(
            f"{exact_duplicates} exact duplicate pair(s) ({_percent(exact_duplicates, total)}): "
            "duplicates weigh those pairs more and can leak between train and eval splits"
        )
    share = report["chosen_longer_share"]
    low, high = LENGTH_BIAS_BAND
    if share > high or share < low:
        warnings.append(
            f"chosen is longer than rejected in {_percent(chosen_longer, total)} of pairs "
            f"(rejected longer in {_percent(rejected_longer, total)}): "
            "the model may learn length instead of quality"
        )
    if report["truncated_prompts"]:
        n = report["truncated_prompts"]
        warnings.append(f"{n} prompt(s) ({_percent(n, total)}) exceed max_prompt_length={max_prompt_length}")
    if report["truncated_pairs"]:
        n = report["truncated_pairs"]
        warnings.append(
            f"{n} pair(s) ({_percent(n, total)}) exceed max_seq_length={max_seq_length}: "
            "their completions will be truncated"
        )
    return report


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for a terminal."""
    total = report["num_pairs"]

    def share(count: int | None) -> str:
        if count is None:
            return "-"
        return f"{count} ({_percent(count, total)})" if total else str(count)

    rows = [
        ("pairs", f"{total} ({report['conversational']} conversational)"),
        ("empty prompts", share(report["empty_prompts"])),
        ("exact duplicates", share(report["exact_duplicates"])),
        ("unique prompts", f"{report['unique_prompts']} ({report['duplicate_prompts']} repeated)"),
        ("chosen == rejected", share(report["chosen_equals_rejected"])),
        (
            "chosen longer than rejected",
            "-"
            if report["chosen_longer_share"] is None
            else f"{100 * report['chosen_longer_share']:.1f}% of pairs",
        ),
        ("prompt distinct-1/2", f"{_number(report['distinct_1'])} / {_number(report['distinct_2'])}"),
    ]
    if report.get("truncated_prompts") is not None:
        rows.append((f"prompts > {report['max_prompt_length']} tokens", share(report["truncated_prompts"])))
    if report.get("truncated_pairs") is not None:
        rows.append((f"pairs > {report['max_seq_length']} tokens", share(report["truncated_pairs"])))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]

    return "\n".join(_layout_lines(report) + lines + _length_table(report, width) + _warning_lines(report) + _example_lines(report))


def _layout_lines(report: dict[str, Any]) -> list[str]:
    """How the records were read: the layouts recognised, the mapping used, what was dropped."""
    lines = []
    for name, n in report.get("layouts", {}).items():
        lines.append(f"layout: {name} ({n} record{'s' if n != 1 else ''})")
    if "mapping" in report:
        lines.append(f"mapping: {report['mapping']}")
    for reason, n in report.get("skipped", {}).items():
        what = "ties (pairwise records that prefer neither response)" if reason == "tie" else reason
        lines.append(f"dropped: {n} {what}")
    if report.get("prompt_differs"):
        lines.append(
            f"note: in {report['prompt_differs']} record(s) the string 'prompt' differs from the conversation's "
            "last user turn; the conversation is what is trained on"
        )
    return lines + [""] if lines else []


def _example_lines(report: dict[str, Any]) -> list[str]:
    example = report.get("example")
    if not example:
        return []
    p, c, r = example["tokens"]
    return [
        "",
        f"example ({example['location']}) in the model's tokens, context | completion:",
        f"  chosen   ({p} + {c} tokens): {example['context']} | {example['chosen']}",
        f"  rejected ({p} + {r} tokens): {example['context']} | {example['rejected']}",
    ]


def _length_table(report: dict[str, Any], width: int) -> list[str]:
    columns = ("min", "mean", "median", "p95", "max")
    lines = ["", f"{'length (' + report['length_unit'] + ')':<{width}}" + "".join(f"{c:>9}" for c in columns)]
    for name, stats in report["lengths"].items():
        # counts are whole numbers; mean, median and p95 may fall between them
        cells = "".join(
            f"{_number(None if stats is None else stats[c], 0 if c in ('min', 'max') else 1):>9}"
            for c in columns
        )
        lines.append(f"  {name:<{width - 2}}{cells}")
    return lines


def _warning_lines(report: dict[str, Any]) -> list[str]:
    return ["", "warnings:"] + [f"  - {w}" for w in report["warnings"]] if report["warnings"] else []


# KTO's advice (Ethayarajh et al. 2024, section 4.2; TRL's KTOConfig docs): weigh the two classes so that
# desirable_weight * n_desirable / (undesirable_weight * n_undesirable) lies in [1, 4/3].
KTO_BALANCE_BAND = (1.0, 4 / 3)


def kto_balance_advice(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float) -> str | None:
    """A warning with a better `desirable_weight` when the weighted class balance is outside
    KTO's band, else None. Both classes must be present."""
    balance = desirable_weight * desirable / (undesirable_weight * undesirable)
    low, high = KTO_BALANCE_BAND
    if low <= balance <= high + 1e-9:
        return None
    hint = (low + high) / 2 * undesirable_weight * undesirable / desirable  # keeps undesirable_weight
    return (
        f"desirable_weight x {desirable} desirable / (undesirable_weight x {undesirable} undesirable) = "
        f"{balance:.2f}, outside KTO's advised [1, 1.33]: try desirable_weight {hint:.2f}"
    )


def examples_report(
    examples: Sequence[SFTExample | UnpairedExample], desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> dict[str, Any]:
    """The quality report of supervised (SFT) or unpaired (KTO) examples: shapes, duplicates,
    lengths in words, and for KTO the class balance that its weights should offset."""
    total = len(examples)
    unpaired = bool(examples) and isinstance(examples[0], UnpairedExample)

    def parts(ex: Any) -> tuple[str, str]:
        if isinstance(ex, UnpairedExample) or ex.kind == "completion":
            return _flat_text(ex.prompt or ""), _flat_text(ex.completion)
        if ex.kind == "messages":  # what is learned (assistant turns) against what is read
            said = [m for m in ex.messages if m["role"] == "assistant"]
            return _flat_text([m for m in ex.messages if m["role"] != "assistant"]), _flat_text(said)
        return "", ex.text

    texts = [parts(ex) for ex in examples]
    keys = Counter(
        _key([ex.prompt, ex.completion, ex.label]) if isinstance(ex, UnpairedExample)
        else _key([ex.prompt, ex.completion, ex.messages, ex.text])
        for ex in examples
    )
    report: dict[str, Any] = {
        "kind": "unpaired" if unpaired else "sft",
        "num_examples": total,
        "shapes": dict(Counter("completion" if isinstance(ex, UnpairedExample) else ex.kind for ex in examples)),
        "exact_duplicates": sum(n - 1 for n in keys.values()),
        "length_unit": "words",
        "lengths": {
            "prompt": _stats([len(p.split()) for p, _ in texts if p]),
            "completion": _stats([len(c.split()) for _, c in texts]),
        },
        "completion_distinct_1": _distinct_n((c for _, c in texts), 1),
        "completion_distinct_2": _distinct_n((c for _, c in texts), 2),
        "warnings": [],
    }
    warnings: list[str] = report["warnings"]
    if total == 0:
        warnings.append("no examples")
        return report
    if report["exact_duplicates"]:
        n = report["exact_duplicates"]
        warnings.append(f"{n} exact duplicate example(s) ({_percent(n, total)}): they weigh more and can leak into the eval split")
    if unpaired:
        desirable = sum(ex.label for ex in examples)
        undesirable = total - desirable
        report.update(desirable=desirable, undesirable=undesirable, desirable_weight=desirable_weight,
                      undesirable_weight=undesirable_weight)
        if desirable == 0 or undesirable == 0:
            warnings.append(f"only {'undesirable' if desirable == 0 else 'desirable'} examples: KTO needs both")
            report["weighted_balance"] = None
        else:
            report["weighted_balance"] = desirable_weight * desirable / (undesirable_weight * undesirable)
            advice = kto_balance_advice(desirable, undesirable, desirable_weight, undesirable_weight)
            if advice:
                warnings.append(advice)
    return report


def format_examples_report(report: dict[str, Any]) -> str:
    """`examples_report` as aligned lines for a terminal."""
    total = report["num_examples"]
    shapes = ", ".join(f"{n} {shape}" for shape, n in sorted(report["shapes"].items()))
    rows = [
        ("examples" if report["kind"] == "sft" else "unpaired examples", f"{total}" + (f" ({shapes})" if shapes else "")),
        ("exact duplicates", f"{report['exact_duplicates']} ({_percent(report['exact_duplicates'], total)})" if total else "0"),
        ("completion distinct-1/2", f"{_number(report['completion_distinct_1'])} / {_number(report['completion_distinct_2'])}"),
    ]
    if report["kind"] == "unpaired":
        rows.append(("desirable / undesirable", f"{report['desirable']} / {report['undesirable']}"))
        rows.append(("weighted balance", f"{_number(report['weighted_balance'])} (KTO advises 1 to 1.33)"))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    return "\n".join(_layout_lines(report) + lines + _length_table(report, width) + _warning_lines(report) + _example_lines(report))
