"""`preftune sweep`: one training run per value of a grid, each evaluated the same way, the
reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023, figure 2), and a curve of one metric
against the swept key (a learning curve when the key is `max_train_samples`).

beta sets how far DPO may move from the reference; the frontier shows what each beta bought in
reward for the KL it spent. Two baselines go on the same axes: the reference itself (the SFT or
base model, KL 0) and best-of-N sampling from it, the simplest way to spend KL on reward
(`evaluation.expected_best_of_n`, `evaluation.best_of_n_kl`).

The curve (`curve.png`) puts the grid's first key on x and `--metric` on y, one line per value of
the other keys, with the base model as the first point where the key has a "nothing trained" value
(0 pairs, steps or epochs), else as a dashed level.

Resumable: a run with `final/` is not trained again (a run cut short resumes from its last
checkpoint), a run with `eval.json` is not evaluated again, and the reference's samples are drawn
once into `reference_samples.jsonl`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from preftune.config import TrainConfig, load_config, parse_override
from preftune.errors import suggest
from preftune.errors import PreftuneError, require
from preftune.eval.evaluation import (
    EvalSettings,
    best_of_n_kl,
    bootstrap_ci,
    expected_best_of_n,
    load_eval_prompts,
    run_eval,
    sample_prompts,
)
from preftune.collect.generation import Samples, SamplingSettings, load_generation_model
from preftune.io import write_atomic, write_jsonl_atomic
from preftune.collect.rewards import get_reward, score

log = logging.getLogger("preftune")

FRONTIER_COLUMNS = (
    "kind",
    "label",
    "kl",
    "kl_low",
    "kl_high",
    "kl_monte_carlo",
    "reward",
    "reward_low",
    "reward_high",
    "win_rate",
    "length",
    "preference_accuracy",
    "preference_accuracy_low",
    "preference_accuracy_high",
    "run_dir",
)
# What `--metric` may plot against the swept key, and each one's interval columns where it has them.
CURVE_METRICS = {
    "reward": ("reward_low", "reward_high"),
    "preference_accuracy": ("preference_accuracy_low", "preference_accuracy_high"),
    "win_rate": None,
    "kl": ("kl_low", "kl_high"),
    "kl_monte_carlo": None,
    "length": None,
}
# Keys whose value 0 means the base model itself: nothing trained. The base is then the curve's first point.
ZERO_IS_BASE = ("max_train_samples", "max_steps", "num_train_epochs")


@dataclass
class SweepSettings:
    """The command's flags."""

    config: str
    grid: list[str]
    prompts: str
    reward: str
    overrides: list[str] = field(default_factory=list)
    pairs: str | None = None
    num_samples: int = 4
    best_of: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_new_tokens: int = 48
    max_prompts: int | None = None
    seed: int = 0
    batch_size: int = 16
    output_dir: str | None = None
    progress: bool = True
    metric: str = "reward"  # the curve's y (CURVE_METRICS)


def parse_grid(specs: Sequence[str]) -> list[dict[str, Any]]:
    """`KEY=V1,V2,...` (repeatable) into the list of every combination, values parsed as YAML."""
    axes: list[tuple[str, list[Any]]] = []
    for spec in specs:
        if "=" not in spec:
            raise PreftuneError(f"--set-grid {spec}: expected KEY=VALUE1,VALUE2,...")
        key, raw = spec.split("=", 1)
        values = [parse_override(f"{key}={v.strip()}")[1] for v in raw.split(",") if v.strip()]
        if not values:
            raise PreftuneError(f"--set-grid {spec}: no values")
        if key.strip() in (k for k, _ in axes):
            raise PreftuneError(f"--set-grid: '{key.strip()}' is given twice")
        axes.append((key.strip(), values))
    if not axes:
        raise PreftuneError("--set-grid is required, e.g. --set-grid beta=0.05,0.1,0.25,0.5,1.0")
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]


def run_name(combo: dict[str, Any]) -> str:
    """The folder of one run: `beta=0.1`, or `beta=0.1,loss_type=ipo` for several keys."""
    return ",".join(f"{k}={v}" for k, v in combo.items())


def grid_keys(specs: Sequence[str]) -> list[str]:
    """The swept keys in the order the flags give them (the first is the curve's x)."""
    return list(parse_grid(specs)[0])


def _reference_name(cfg: TrainConfig) -> str:
    return cfg.ref_model_name or cfg.model_name


def reference_samples(settings: SweepSettings, cfg: TrainConfig, sweep_dir: Path) -> tuple[list[Samples], list[list[float]]]:
    """max(best_of, num_samples) samples per prompt from the reference, scored; drawn once and
    kept in `reference_samples.jsonl` with the settings that made them, reused while they match."""
    k = max(max(settings.best_of), settings.num_samples)
    sampling = SamplingSettings(k, 1.0, 1.0, settings.max_new_tokens, settings.seed).check()
    key = {
        "reference": _reference_name(cfg),
        "prompts": str(settings.prompts),
        "max_prompts": settings.max_prompts,
        "reward": settings.reward,
        "sampling": sampling.__dict__,
    }
    path = sweep_dir / "reference_samples.jsonl"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and json.loads(lines[0]).get("settings") == key:
            records = [json.loads(line) for line in lines[1:]]
            log.info("reusing %s (%d prompts x %d samples)", path, len(records), k)
            samples = [Samples(r["completions"], r["lengths"], r["stopped"], r["token_ids"]) for r in records]
            return samples, [r["scores"] for r in records]
        log.info("%s was drawn with other settings: sampling the reference again", path)
    model, tokenizer = load_generation_model(_reference_name(cfg))
    prompts = load_eval_prompts(settings.prompts, tokenizer, settings.max_prompts)
    samples = sample_prompts(model, tokenizer, prompts, sampling, progress=settings.progress, desc="sample reference")
    del model
    reward = get_reward(settings.reward)
    flat = score(reward, [p.prompt for p in prompts for _ in range(k)], [c for s in samples for c in s.completions])
    scores = [flat[i * k : (i + 1) * k] for i in range(len(samples))]
    write_jsonl_atomic(
        path,
        [{"settings": key}]
        + [
            {
                "index": p.index,
                "prompt": p.prompt,
                "completions": s.completions,
                "lengths": s.lengths,
                "stopped": s.stopped,
                "token_ids": s.token_ids,
                "scores": sc,
            }
            for p, s, sc in zip(prompts, samples, scores, strict=True)
        ],
    )
    return samples, scores


def best_of_n_rows(scores: Sequence[Sequence[float]], lengths: Sequence[Sequence[int]], best_of: Sequence[int], seed: int = 0) -> list[dict[str, Any]]:
    """The reference point (N = 1) and best-of-N points, intervals bootstrapped over prompts."""
    rows = []
    for n in sorted(best_of):
        per_prompt = [expected_best_of_n(s, n) for s in scores]
        low, high = bootstrap_ci(per_prompt, seed=seed)
        kl = best_of_n_kl(n)
        rows.append(
            {
                "kind": "reference" if n == 1 else "best-of-n",
                "label": "reference" if n == 1 else f"best-of-{n}",
                "kl": kl,
                "kl_low": kl,
                "kl_high": kl,
                "kl_monte_carlo": "",
                "reward": statistics.fmean(per_prompt),
                "reward_low": low,
                "reward_high": high,
                "win_rate": "",
                "length": statistics.fmean(statistics.fmean(x) for x in lengths) if n == 1 else "",
                "preference_accuracy": "",
                "preference_accuracy_low": "",
                "preference_accuracy_high": "",
                "run_dir": "",
            }
        )
    return rows


def _run_row(name: str, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    s = result["samples"]
    accuracy = result.get("pairs", {}).get("accuracy", {})
    return {
        "kind": "dpo",
        "label": name,
        "kl": s["kl_per_token"]["mean"],
        "kl_low": s["kl_per_token"]["ci"][0],
        "kl_high": s["kl_per_token"]["ci"][1],
        "kl_monte_carlo": s["kl_monte_carlo"]["mean"],
        "reward": s["reward"]["mean"],
        "reward_low": s["reward"]["ci"][0],
        "reward_high": s["reward"]["ci"][1],
        "win_rate": s["win_rate"]["mean"],
        "length": s["length"],
        "preference_accuracy": accuracy.get("mean", ""),
        "preference_accuracy_low": accuracy.get("ci", ["", ""])[0],
        "preference_accuracy_high": accuracy.get("ci", ["", ""])[1],
        "run_dir": str(run_dir),
    }


def run_sweep(settings: SweepSettings) -> list[dict[str, Any]]:
    """Train and evaluate every grid point, then write `frontier.csv` and `frontier.png`."""
    from preftune.training.recipe import run

    combos = parse_grid(settings.grid)
    if isinstance(settings.reward, str) and settings.reward.strip().startswith("judge:"):
        raise PreftuneError(
            f"--reward {settings.reward}: a sweep plots mean reward against KL and ranks best-of-N by reward, and a "
            "pairwise judge gives no reward per sample; evaluate runs with 'preftune eval --reward judge:MODEL' instead"
        )
    if settings.metric not in CURVE_METRICS:
        raise PreftuneError(f"--metric must be one of {', '.join(CURVE_METRICS)}, got {settings.metric!r}{suggest(settings.metric, list(CURVE_METRICS))}")
    if settings.metric.startswith("preference_accuracy") and not settings.pairs:
        raise PreftuneError("--metric preference_accuracy needs --pairs (the held-out pairs it is measured on)")
    if settings.num_samples < 1 or any(n < 1 for n in settings.best_of):
        raise PreftuneError("--num-samples and every --best-of value must be >= 1")
    base = load_config(settings.config, settings.overrides)
    sweep_dir = sweep_folder(settings, base)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    # Every run is checked before the first one trains: a bad value fails now, not an hour in.
    configs = []
    for combo in combos:
        run_dir = sweep_dir / run_name(combo)
        overrides = [*settings.overrides, *(f"{k}={json.dumps(v)}" for k, v in combo.items())]
        overrides += [f"output_dir={json.dumps(str(run_dir))}", "resume_from_checkpoint=latest"]
        configs.append((combo, run_dir, load_config(settings.config, overrides)))
    if len({_reference_name(c) for _, _, c in configs}) > 1:
        raise PreftuneError("--set-grid: every run of a sweep must share one reference model (model_name / ref_model_name)")

    ref_samples, ref_scores = reference_samples(settings, base, sweep_dir)
    rows = best_of_n_rows(ref_scores, [s.lengths for s in ref_samples], settings.best_of, settings.seed)
    keys = list(combos[0])
    for row in rows:  # the reference is the base model: 0 pairs (steps, epochs) trained, where the key says so
        row.update({k: (0 if k in ZERO_IS_BASE and row["kind"] == "reference" else "") for k in keys})
    k = settings.num_samples
    baseline = [Samples(s.completions[:k], s.lengths[:k], s.stopped[:k], s.token_ids[:k]) for s in ref_samples]
    for i, (combo, run_dir, cfg) in enumerate(configs, start=1):
        name = run_name(combo)
        if (run_dir / "final").is_dir():
            log.info("[%d/%d] %s: trained already", i, len(configs), name)
        else:
            log.info("[%d/%d] %s: training", i, len(configs), name)
            run(cfg)
        eval_file = run_dir / "eval.json"
        if eval_file.is_file():
            log.info("[%d/%d] %s: evaluated already (%s)", i, len(configs), name, eval_file)
            result = json.loads(eval_file.read_text(encoding="utf-8"))
        else:
            log.info("[%d/%d] %s: evaluating", i, len(configs), name)
            result = run_eval(
                EvalSettings(
                    model=str(run_dir),
                    pairs=settings.pairs,
                    prompts=settings.prompts,
                    reward=settings.reward,
                    num_samples=k,
                    max_new_tokens=settings.max_new_tokens,
                    max_prompts=settings.max_prompts,
                    seed=settings.seed,
                    batch_size=settings.batch_size,
                    output=str(eval_file),
                    progress=settings.progress,
                ),
                baseline_samples=baseline,
            )
        rows.append({**combo, **_run_row(name, run_dir, result)})
    write_frontier(rows, sweep_dir, keys)
    write_atomic(curve_file(sweep_dir), curve_png(rows, keys, settings.metric))
    return rows


def sweep_folder(settings: SweepSettings, base: TrainConfig | None = None) -> Path:
    """The sweep's folder: --output-dir, else the config's output_dir."""
    if settings.output_dir:
        return Path(settings.output_dir)
    return Path((base or load_config(settings.config, settings.overrides)).output_dir)


def frontier_files(sweep_dir: Path) -> tuple[Path, Path]:
    """Where a sweep writes its frontier: the table and the plot."""
    return sweep_dir / "frontier.csv", sweep_dir / "frontier.png"


def curve_file(sweep_dir: Path) -> Path:
    """Where a sweep writes the curve of `--metric` against the swept key."""
    return sweep_dir / "curve.png"


def write_frontier(rows: Sequence[dict[str, Any]], sweep_dir: Path, keys: Sequence[str] = ()) -> None:
    """`frontier.csv` (the swept keys' columns first) and `frontier.png`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*keys, *FRONTIER_COLUMNS], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    table, plot = frontier_files(sweep_dir)
    write_atomic(table, buffer.getvalue())
    write_atomic(plot, frontier_png(rows))


def read_frontier(path: Path) -> list[dict[str, Any]]:
    """Rows of a `frontier.csv`, numbers as floats (empty cells stay empty strings); a swept key's
    cells are parsed as `--set-grid` values are (YAML), so `0.5` is a number and `ipo` a string."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    numeric = set(FRONTIER_COLUMNS) - {"kind", "label", "run_dir"}

    def cell(key: str, value: str) -> Any:
        if value == "":
            return value
        if key in numeric:
            return float(value)
        if key in FRONTIER_COLUMNS:
            return value
        return parse_override(f"{key}={value}")[1]

    return [{k: cell(k, v) for k, v in row.items()} for row in rows]


def frontier_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The swept keys of rows read from a `frontier.csv` (its columns before the frontier's)."""
    return [k for k in (rows[0] if rows else {}) if k not in FRONTIER_COLUMNS]


@dataclass
class CurveSeries:
    """One line of the curve: its label and points (x, y, interval low, interval high)."""

    label: str
    x: list[Any]
    y: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


def curve_series(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> tuple[list[CurveSeries], dict[str, Any] | None]:
    """The curve's lines and the base model's point. x is the first swept key; each combination of
    the other keys is a line, its points in the order of x. The base model's value is the
    reference row's for `reward` and `length` (measured on its samples) and exact for `kl` (0) and
    `preference_accuracy` (0: the reference's implicit reward of every pair is 0, and a tie is not a
    preferred pair, as in TRL's rewards/accuracies); `win_rate` and `kl_monte_carlo` have none. The
    base is at x = 0 for keys in ZERO_IS_BASE, else returned without an x (drawn as a level)."""
    x_key, rest = keys[0], list(keys[1:])
    interval = CURVE_METRICS[metric]
    lines: dict[str, CurveSeries] = {}
    for row in rows:
        if row["kind"] != "dpo" or row[metric] == "":
            continue
        label = ",".join(f"{k}={row[k]}" for k in rest) or metric.replace("_", " ")
        line = lines.setdefault(label, CurveSeries(label, [], [], [] if interval else None, [] if interval else None))
        line.x.append(row[x_key])
        line.y.append(float(row[metric]))
        if interval:
            line.low.append(float(row[interval[0]]))
            line.high.append(float(row[interval[1]]))
    for line in lines.values():
        order = sorted(range(len(line.x)), key=lambda i: _sort_key(line.x[i]))
        for name in ("x", "y", "low", "high"):
            values = getattr(line, name)
            if values is not None:
                setattr(line, name, [values[i] for i in order])
    ref = next((r for r in rows if r["kind"] == "reference"), None)
    base_value = {"reward": ref and ref["reward"], "length": ref and ref["length"], "kl": 0.0, "preference_accuracy": 0.0}.get(metric)
    base = None
    if base_value not in (None, ""):
        base = {"x": 0 if x_key in ZERO_IS_BASE else None, "y": float(base_value)}
    return list(lines.values()), base


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, str(value))


def curve_figure(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> Any:
    """The matplotlib figure of `curve_series`: for a key in ZERO_IS_BASE each line starts at the
    base model (x = 0); otherwise the base is a dashed level. Non-numeric x values are categories."""
    require("eval", "matplotlib", what="the sweep's curve")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines, base = curve_series(rows, keys, metric)
    x_key = keys[0]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for line in lines for v in line.x)
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    for line in lines:
        xs = line.x if numeric else [str(v) for v in line.x]
        ys, low, high = line.y, line.low, line.high
        if base is not None and base["x"] is not None and numeric:
            xs, ys = [base["x"], *xs], [base["y"], *ys]
            low, high = ([base["y"], *low], [base["y"], *high]) if low is not None else (None, None)
        yerr = [[y - lo for y, lo in zip(ys, low)], [hi - y for y, hi in zip(ys, high)]] if low is not None else None
        ax.errorbar(xs, ys, yerr=yerr, fmt="o-", capsize=3, label=line.label)
    if base is not None:
        if base["x"] is not None and numeric:
            ax.plot([base["x"]], [base["y"]], marker="*", markersize=16, color="#d62728", linestyle="none", label="base model (0 trained)")
        else:
            ax.axhline(base["y"], color="#d62728", linestyle="--", label="base model")
    all_ints = numeric and all(isinstance(v, int) for line in lines for v in line.x)
    unit = {"max_train_samples": " (training pairs)" if all_ints else " (fraction of the training pairs)"}.get(x_key, "")
    ax.set_xlabel(f"{x_key}{unit}")
    names = {"reward": "mean reward of samples", "preference_accuracy": "preference accuracy on held-out pairs",
             "win_rate": "win rate against the reference", "kl": "KL(model || reference), nats per completion",
             "kl_monte_carlo": "KL (log-ratio estimate)", "length": "mean sample length (tokens)"}
    ax.set_ylabel(names[metric])
    bars = " (95% bootstrap intervals)" if CURVE_METRICS[metric] else ""
    ax.set_title(f"{metric.replace('_', ' ')} against {x_key}{bars}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def curve_png(rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str) -> bytes:
    """`curve_figure` as PNG bytes."""
    fig = curve_figure(rows, keys, metric)
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def frontier_png(rows: Sequence[dict[str, Any]]) -> bytes:
    """Reward against KL: the tuned runs, best-of-N from the reference, the reference itself."""
    require("eval", "matplotlib", what="the frontier plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    bon = sorted((r for r in rows if r["kind"] in ("reference", "best-of-n")), key=lambda r: r["kl"])
    if bon:
        ax.errorbar(
            [r["kl"] for r in bon],
            [r["reward"] for r in bon],
            yerr=[[r["reward"] - r["reward_low"] for r in bon], [r["reward_high"] - r["reward"] for r in bon]],
            fmt="s--",
            color="#7f7f7f",
            capsize=3,
            label="best-of-N from the reference",
        )
        for r in bon[1:]:
            ax.annotate(r["label"].replace("best-of-", "N="), (r["kl"], r["reward"]), textcoords="offset points", xytext=(4, -12), fontsize=8, color="#555")
        ref = bon[0]
        ax.plot([ref["kl"]], [ref["reward"]], marker="*", markersize=16, color="#d62728", linestyle="none", label="reference (SFT / base), KL 0")
    runs = sorted((r for r in rows if r["kind"] == "dpo"), key=lambda r: r["kl"])
    if runs:
        ax.errorbar(
            [r["kl"] for r in runs],
            [r["reward"] for r in runs],
            xerr=[[r["kl"] - r["kl_low"] for r in runs], [r["kl_high"] - r["kl"] for r in runs]],
            yerr=[[r["reward"] - r["reward_low"] for r in runs], [r["reward_high"] - r["reward"] for r in runs]],
            fmt="o-",
            color="#1f77b4",
            capsize=3,
            label="tuned runs",
        )
        for r in runs:
            ax.annotate(r["label"], (r["kl"], r["reward"]), textcoords="offset points", xytext=(5, 5), fontsize=8, color="#1f77b4")
    ax.set_xlabel("KL(model || reference), nats per completion")
    ax.set_ylabel("mean reward of samples")
    ax.set_title("reward vs KL frontier (95% bootstrap intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def format_frontier(rows: Sequence[dict[str, Any]]) -> str:
    """The frontier as a Markdown table (printed at the end, pasteable into notes)."""
    lines = [
        "| point | KL (per-token) | KL (log-ratio) | mean reward [95% CI] | win rate vs ref | length | pref. accuracy |",
        "|---|---|---|---|---|---|---|",
    ]

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, float) else "–"

    for r in rows:
        lines.append(
            f"| {r['label']} | {num(r['kl'], '.3f')} | {num(r['kl_monte_carlo'], '.3f')} | "
            f"{num(r['reward'], '+.3f')} [{num(r['reward_low'], '+.3f')}, {num(r['reward_high'], '+.3f')}] | "
            f"{num(r['win_rate'], '.3f')} | {num(r['length'], '.1f')} | {num(r['preference_accuracy'], '.3f')} |"
        )
    return "\n".join(lines)
