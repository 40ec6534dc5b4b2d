"""From human judgements to preference pairs: majority vote, agreement and position bias.

Each live judgement of an item is mapped from what the annotator saw (A = left, B = right) back to
the item's own order: `first` better, `second` better, or `tie`; skips are not ratings. An item
with at least `min_annotators` ratings is *rated*; it is exported when one of first/second has a
strict majority of its ratings (more than half), with the winner as `chosen`. A majority for tie,
or no majority at all, drops the item: a label that most annotators do not back is noise that DPO
would learn as signal.

Agreement is Krippendorff's alpha for nominal data (Krippendorff 2011, "Computing Krippendorff's
Alpha-Reliability"; Hayes & Krippendorff 2007) over the rated items, with the three categories.
Alpha rather than Fleiss' kappa because here items need not have the same number of ratings
(annotators skip, `--annotators-per-item` can change between sessions, `--min-annotators` can be
lower than it) and alpha takes any number of ratings per item; with equal counts the two differ only
by alpha's small-sample correction. 1 is perfect agreement, 0 is what chance gives.

Two alphas are reported, because which response is `first` is not arbitrary in a pairs file (it is
the file's `chosen`). `krippendorff_alpha` takes the categories in the item's order, as they are: it
asks whether annotators agree on *which items* the input got wrong, and when the input's chosen is
usually preferred it is near 0 however much the annotators agree (the prevalence effect of chance-
corrected coefficients; Feinstein & Cicchetti 1990, "High agreement but low kappa"). The comparison
itself is symmetric, so `krippendorff_alpha_symmetric` takes chance as the same for either response
(the first/second marginals pooled): it asks whether annotators agree on which response is better.
`observed_agreement` is the share of agreeing pairs of ratings within an item, before any correction.

Position bias is the share of left (A) picks among the ratings that picked a side: 0.5 when the
side does not matter. Sides are drawn at random per annotator and item, so a bias shows in this
share but cannot tilt the exported labels in a consistent direction.

A pairwise LLM judge (`label export --judge MODEL`, `preftune.collect.judge`) can be measured on
the same items: every item with a first/second majority is judged in both orders, and the judge
agrees when its P(first better) falls on the majority's side of 0.5 (exactly 0.5 agrees with
neither). Its agreement is comparable to an annotator's agreement with the majority, though a
little below it by construction: an annotator's own vote is part of the majority it is compared
with, the judge's is not. Its position figures are reported beside the annotators' left share.

Strength (asked with `--scale 5`) does not enter the vote or the agreement figures, which stay on the
three categories; it becomes each exported pair's `margin`, the mean strength towards the winner,
so training can weigh close calls less (`margin_weighting`) and `--min-strength` can drop them.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from preftune.data import MAX_MARGIN
from preftune.errors import PreftuneError, require
from preftune.io import write_atomic
from preftune.label.store import Judgement, LabelStore

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "category",
    "majority",
    "krippendorff_alpha",
    "coincidences",
    "symmetric_alpha",
    "observed_agreement",
    "agreement_report",
    "build_export",
    "export_labels",
    "format_agreement",
    "judge_agreement",
    "pair_margin",
    "pairs_csv",
    "pairs_jsonl",
]

CATEGORIES = ("first", "second", "tie")


def category(choice: str, shown_left: str) -> str | None:
    """The rating in the item's own order (first/second/tie), or None for a skip."""
    if choice == "skip":
        return None
    if choice == "tie":
        return "tie"
    other = "second" if shown_left == "first" else "first"
    return shown_left if choice == "A" else other


def majority(ratings: Sequence[str]) -> str | None:
    """The category held by more than half of the ratings, or None when there is none."""
    if not ratings:
        return None
    winner, count = Counter(ratings).most_common(1)[0]
    return winner if 2 * count > len(ratings) else None


def krippendorff_alpha(counts: Sequence[Sequence[int]]) -> float | None:
    """Nominal Krippendorff's alpha from an items x categories table of rating counts.

    None when it is undefined: fewer than two items with two or more ratings, or every rating in
    one category (no expected disagreement to compare with).
    """
    require("label", "krippendorff", what="the agreement report")
    import krippendorff
    import numpy as np

    table = np.asarray([row for row in counts if sum(row) >= 2], dtype=float)
    if len(table) < 2 or np.count_nonzero(table.sum(axis=0)) < 2:
        return None
    return float(krippendorff.alpha(value_counts=table, level_of_measurement="nominal"))


def coincidences(counts: Sequence[Sequence[int]]) -> np.ndarray:
    """Krippendorff's coincidence matrix o[c, k]: the pairs of values (c, k) from different raters of
    one item, each item's pairs weighted 1 / (ratings - 1); items with one rating pair with nothing."""
    import numpy as np

    size = len(counts[0]) if len(counts) else len(CATEGORIES)
    o = np.zeros((size, size))
    for row in counts:
        x = np.asarray(row, dtype=float)
        if x.sum() >= 2:
            o += (np.outer(x, x) - np.diag(x)) / (x.sum() - 1)
    return o


def symmetric_alpha(counts: Sequence[Sequence[int]]) -> float | None:
    """Nominal alpha of (first, second, tie) counts with chance the same for first and second.

    Alpha is 1 - (n - 1) * sum of the off-diagonal coincidences / sum over c != k of n_c * n_k
    (Krippendorff 2011, nominal metric). The observed disagreement does not depend on which
    response is called first; only the expected one does, through n_first and n_second, so both are
    replaced by their mean. Equals `krippendorff_alpha` when they are already equal.
    """
    import numpy as np

    o = coincidences(counts)
    n_c = o.sum(axis=1)
    n_c[0] = n_c[1] = (n_c[0] + n_c[1]) / 2
    n = n_c.sum()
    expected = n * n - float(np.sum(n_c * n_c))
    if n < 2 or expected <= 0 or sum(sum(row) >= 2 for row in counts) < 2:
        return None
    observed = n - float(np.trace(o))
    return 1.0 - (n - 1) * observed / expected


def observed_agreement(counts: Sequence[Sequence[int]]) -> float | None:
    """Share of agreeing pairs among the pairs of ratings within an item (no chance correction)."""
    import numpy as np

    o = coincidences(counts)
    return float(np.trace(o) / o.sum()) if o.sum() else None


def agreement_report(
    judgements: Sequence[Judgement], item_ids: Sequence[str], min_annotators: int = 3
) -> tuple[dict[str, Any], dict[str, str]]:
    """The agreement report, and the exported label (`first`/`second`) of each item that has one."""
    if min_annotators < 1:
        raise PreftuneError(f"--min-annotators must be at least 1, got {min_annotators}")
    ratings: dict[str, list[tuple[str, str]]] = defaultdict(list)  # item -> (annotator, category)
    per_annotator: dict[str, Counter] = defaultdict(Counter)
    for j in judgements:
        stats = per_annotator[j.annotator]
        rating = category(j.choice, j.shown_left)
        if rating is None:
            stats["skips"] += 1
            continue
        ratings[j.item_id].append((j.annotator, rating))
        stats["ratings"] += 1
        stats["ties"] += rating == "tie"
        if rating != "tie":
            stats["left" if j.choice == "A" else "right"] += 1

    rated = [i for i in item_ids if len(ratings.get(i, ())) >= min_annotators]
    labels: dict[str, str] = {}
    dropped = Counter()
    for item in rated:
        votes = [r for _, r in ratings[item]]
        winner = majority(votes)
        if winner is None:
            dropped["no_majority"] += 1
        elif winner == "tie":
            dropped["tie"] += 1
        else:
            labels[item] = winner
        if winner is not None:
            for annotator, rating in ratings[item]:
                per_annotator[annotator]["compared"] += 1
                per_annotator[annotator]["agreed"] += rating == winner

    counts = [[sum(r == c for _, r in ratings[item]) for c in CATEGORIES] for item in rated]
    left = sum(s["left"] for s in per_annotator.values())
    right = sum(s["right"] for s in per_annotator.values())
    report: dict[str, Any] = {
        "min_annotators": min_annotators,
        "items": len(item_ids),
        "items_rated": len(rated),
        "items_with_too_few_ratings": sum(0 < len(ratings.get(i, ())) < min_annotators for i in item_ids),
        "items_unrated": sum(not ratings.get(i) for i in item_ids),
        "exported": len(labels),
        "dropped_tie": dropped["tie"],
        "dropped_no_majority": dropped["no_majority"],
        "ratings": sum(len(ratings[i]) for i in rated),
        "krippendorff_alpha": krippendorff_alpha(counts),
        "krippendorff_alpha_symmetric": symmetric_alpha(counts),
        "observed_agreement": observed_agreement(counts),
        "position_bias": {"left": left, "right": right, "left_share": _share(left, left + right)},
        "annotators": {
            name: {
                "ratings": s["ratings"],
                "ties": s["ties"],
                "skips": s["skips"],
                "agreement_with_majority": _share(s["agreed"], s["compared"]),
                "compared_with_majority": s["compared"],
                "left_share": _share(s["left"], s["left"] + s["right"]),
            }
            for name, s in sorted(per_annotator.items())
        },
    }
    return report, labels


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


EXPORT_FORMATS = ("jsonl", "csv", "parquet", "datasets")
MAX_STRENGTH = int(MAX_MARGIN)  # "much better"; "slightly better" is 1, a tie 0


def pair_margin(strengths: Sequence[int | None]) -> float | None:
    """The mean strength of an item's ratings, signed towards the exported chosen response.

    Each rating counts +strength for the chosen side, -strength for the other and 0 for a tie, so
    dissent lowers the margin. None when a rating carries no strength (given on the 3-point scale).
    """
    if not strengths or any(s is None for s in strengths):
        return None
    return sum(strengths) / len(strengths)  # type: ignore[arg-type]


def judge_agreement(judge: Any, items: Sequence[Any], labels: dict[str, str]) -> dict[str, Any]:
    """How often a pairwise judge picks the majority's response on the items that have one."""
    voted = [item for item in items if item.id in labels]
    verdicts = judge.judge([i.prompt for i in voted], [i.first for i in voted], [i.second for i in voted])
    agreed = sum((v.p > 0.5) if labels[i.id] == "first" else (v.p < 0.5) for i, v in zip(voted, verdicts, strict=True))
    majority_p = [v.p if labels[i.id] == "first" else 1.0 - v.p for i, v in zip(voted, verdicts, strict=True)]
    disagree = sum(v.orders_disagree for v in verdicts)
    return {
        "name": judge.name,
        "prompt": judge.prompt.source,
        "compared_with_majority": len(voted),
        "agreement_with_majority": _share(agreed, len(voted)),
        "mean_p_majority": sum(majority_p) / len(majority_p) if majority_p else None,
        "orders_disagree": _share(disagree, len(voted)),
        "mean_p_answer_a": sum(v.p_answer_a for v in verdicts) / len(verdicts) if verdicts else None,
    }


def build_export(
    store: LabelStore, min_annotators: int = 3, min_strength: float | None = None, judge: Any = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The agreement report and the exported pairs, as `label export` writes them and the lead's
    dashboard shows them (one computation, so the two always agree).

    Each pair holds `prompt`, `chosen`, `rejected` in the original form, `votes` (ratings for chosen,
    rejected and tie), `margin` (see `pair_margin`; null without strengths), `rationales` (the
    comments annotators left on the item, with their rating), `item_id` and `source`. With
    `min_strength` a pair whose margin is below it, or who has none, is dropped as weak. With a
    `judge` (`collect.judge.PairwiseJudge`), `report["judge"]` is its agreement with the majority.
    """
    if min_strength is not None and not 0 <= min_strength <= MAX_STRENGTH:
        raise PreftuneError(
            f"--min-strength must be between 0 and {MAX_STRENGTH} (1 = slightly better, 2 = much better), got {min_strength}"
        )
    items = store.items()
    judgements = store.judgements()
    report, labels = agreement_report(judgements, [i.id for i in items], min_annotators)
    if min_strength is not None and labels and all(j.strength is None for j in judgements):
        raise PreftuneError("--min-strength needs strengths, and no judgement has one: serve with --scale 5 to ask for them")
    if judge is not None:
        report["judge"] = judge_agreement(judge, items, labels)
    by_item: dict[str, list[Judgement]] = defaultdict(list)
    for j in judgements:
        by_item[j.item_id].append(j)
    pairs: list[dict[str, Any]] = []
    weak = no_strength = 0
    for item in items:
        winner = labels.get(item.id)
        if winner is None:
            continue
        loser = "second" if winner == "first" else "first"
        count: Counter = Counter()
        signed: list[int | None] = []
        rationales = []
        for j in by_item[item.id]:
            rating = category(j.choice, j.shown_left)
            side = {winner: "chosen", loser: "rejected"}.get(rating or "", rating or "skip")
            if rating is not None:
                count[rating] += 1
                sign = {winner: 1, loser: -1}.get(rating, 0)
                signed.append(None if j.strength is None else sign * j.strength)
            if j.comment:
                rationales.append({"annotator": j.annotator, "rating": side, "strength": j.strength, "comment": j.comment})
        margin = pair_margin(signed)
        if min_strength is not None and (margin is None or margin < min_strength):
            weak += margin is not None
            no_strength += margin is None
            continue
        pairs.append({
            "prompt": item.prompt,
            "chosen": getattr(item, winner),
            "rejected": getattr(item, loser),
            "votes": {"chosen": count[winner], "rejected": count[loser], "tie": count["tie"]},
            "margin": margin,
            "rationales": rationales,
            "item_id": item.id,
            "source": item.source,
        })
    report["min_strength"] = min_strength
    report["dropped_weak"] = weak
    report["dropped_no_strength"] = no_strength
    report["exported"] = len(pairs)
    margins = [p["margin"] for p in pairs if p["margin"] is not None]
    report["mean_margin"] = sum(margins) / len(margins) if margins else None
    return report, pairs


CSV_COLUMNS = ("item_id", "source", "prompt", "chosen", "rejected", "votes_chosen", "votes_rejected", "votes_tie", "margin", "rationales")


def pairs_csv(pairs: Sequence[dict[str, Any]]) -> str:
    """The exported pairs as CSV for a spreadsheet: chat messages and rationales as JSON text."""
    import csv
    import io

    def cell(value: Any) -> Any:
        return value if isinstance(value, (str, int, float)) or value is None else json.dumps(value, ensure_ascii=False)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in pairs:
        votes = p["votes"]
        writer.writerow([cell(v) for v in (
            p["item_id"], p["source"], p["prompt"], p["chosen"], p["rejected"],
            votes["chosen"], votes["rejected"], votes["tie"], p["margin"], p["rationales"] or None,
        )])
    return buffer.getvalue()


def pairs_jsonl(pairs: Sequence[dict[str, Any]]) -> str:
    """The exported pairs as JSON Lines, the file `preftune train` reads."""
    return "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)


def _arrow_table(pairs: Sequence[dict[str, Any]]) -> Any:
    import pyarrow

    try:
        return pyarrow.Table.from_pylist(list(pairs))
    except (pyarrow.ArrowException, ValueError) as exc:
        raise PreftuneError(
            f"cannot write the pairs as a table ({str(exc).splitlines()[0]}): prompts or responses are text in "
            "some pairs and chat messages in others; use --format jsonl"
        ) from None


def write_pairs(pairs: Sequence[dict[str, Any]], out: Path, fmt: str) -> None:
    """Write the pairs in `fmt`, atomically: a file through a temp file, a dataset folder swapped in whole."""
    if fmt == "jsonl":
        write_atomic(out, pairs_jsonl(pairs))
    elif fmt == "csv":
        write_atomic(out, pairs_csv(pairs))
    elif fmt == "parquet":
        import pyarrow
        import pyarrow.parquet as pq

        sink = pyarrow.BufferOutputStream()
        pq.write_table(_arrow_table(pairs), sink)
        write_atomic(out, sink.getvalue().to_pybytes())
    elif fmt == "datasets":
        from datasets import Dataset

        from preftune.io import replace_dir

        if out.exists() and not out.is_dir():
            raise PreftuneError(f"cannot write {out}: a file is there, and --format datasets writes a folder")
        dataset = Dataset(_arrow_table(pairs))
        replace_dir(out, lambda folder: dataset.save_to_disk(str(folder)))
    else:
        raise PreftuneError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")


def export_labels(
    db_path: str | Path,
    out: str | Path,
    min_annotators: int = 3,
    report_path: str | Path | None = None,
    min_strength: float | None = None,
    fmt: str = "jsonl",
    judge: Any = None,
) -> dict[str, Any]:
    """Write the majority-labelled pairs (see `build_export`) and the agreement report as JSON;
    return the report.

    `fmt` is `jsonl` (the default), `csv`, `parquet` or `datasets` (a `save_to_disk` folder); every
    one of them but CSV trains as it is. The report goes to `report_path`, by default beside `out`
    with the suffix `.agreement.json`. `judge`: also report a pairwise judge's agreement with the
    majority vote (`judge_agreement`).
    """
    if fmt not in EXPORT_FORMATS:
        raise PreftuneError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")
    out = Path(out)
    report_path = Path(report_path) if report_path else out.with_suffix(".agreement.json")
    for path in (out, report_path):
        if not path.parent.is_dir():
            raise PreftuneError(f"cannot write {path}: folder {path.parent} does not exist")
    store = LabelStore(db_path, create=False)
    try:
        report, pairs = build_export(store, min_annotators, min_strength, judge)
    finally:
        store.close()
    report["output"] = str(out)
    report["format"] = fmt
    write_pairs(pairs, out, fmt)
    write_atomic(report_path, json.dumps(report, indent=2) + "\n")
    report["report"] = str(report_path)
    return report


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_agreement(report: dict[str, Any]) -> str:
    """The report as a few aligned lines for a terminal."""
    bias = report["position_bias"]
    rows = [
        ("items", f"{report['items']} ({report['items_rated']} with >= {report['min_annotators']} ratings, "
         f"{report['items_with_too_few_ratings']} with fewer, {report['items_unrated']} unrated)"),
        ("exported pairs", f"{report['exported']} (dropped: {report['dropped_tie']} tie majority, "
         f"{report['dropped_no_majority']} no majority"
         + (f", {report['dropped_weak']} below strength {report['min_strength']:g}, "
            f"{report['dropped_no_strength']} without strength" if report.get("min_strength") is not None else "")
         + ")"),
        ("Krippendorff's alpha", f"{_fmt(report['krippendorff_alpha_symmetric'])} either response first, "
         f"{_fmt(report['krippendorff_alpha'])} in the input's order (nominal, {report['ratings']} ratings of rated items)"),
        ("observed agreement", f"{_fmt(report['observed_agreement'])} of rating pairs within an item"),
        ("position bias", f"left picked {_fmt(bias['left_share'])} of {bias['left'] + bias['right']} side picks (0.5 = none)"),
    ]
    judge = report.get("judge")
    if judge:
        rows.insert(
            4,
            (
                "judge",
                f"{judge['name']} picks the majority's response on {_fmt(judge['agreement_with_majority'])} of "
                f"{judge['compared_with_majority']} voted pairs (mean P {_fmt(judge['mean_p_majority'])}; orders pick "
                f"different winners on {_fmt(judge['orders_disagree'])}, mean P(answer A) {_fmt(judge['mean_p_answer_a'])})",
            ),
        )
    if report.get("mean_margin") is not None:
        rows.insert(2, ("mean margin", f"{report['mean_margin']:.2f} of {MAX_STRENGTH} (strength towards chosen; 1 = slightly better)"))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}" for label, value in rows]
    if report["annotators"]:
        name_width = max(9, *(len(n) for n in report["annotators"])) + 2
        lines.append("")
        lines.append(f"{'annotator':<{name_width}}{'ratings':>8}{'ties':>6}{'skips':>7}{'agrees w/ majority':>20}{'left share':>12}")
        for name, s in report["annotators"].items():
            agree = _fmt(s["agreement_with_majority"])
            lines.append(
                f"{name:<{name_width}}{s['ratings']:>8}{s['ties']:>6}{s['skips']:>7}"
                f"{agree + ' of ' + str(s['compared_with_majority']):>20}{_fmt(s['left_share']):>12}"
            )
    return "\n".join(lines)
