"""`preftune sweep`: one training run per value of a grid, each evaluated the same way, and the
reward-vs-KL frontier of the DPO paper (Rafailov et al. 2023, figure 2).

beta sets how far DPO may move from the reference; the frontier shows what each beta bought in
reward for the KL it spent. Two baselines go on the same axes: the reference itself (the SFT or
base model, KL 0) and best-of-N sampling from it, the simplest way to spend KL on reward
(`evaluation.expected_best_of_n`, `evaluation.best_of_n_kl`).

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
    "run_dir",
)


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
                "run_dir": "",
            }
        )
    return rows


def _run_row(name: str, run_dir: Path, result: dict[str, Any]) -> dict[str, Any]:
    s = result["samples"]
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
        "preference_accuracy": result.get("pairs", {}).get("accuracy", {}).get("mean", ""),
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
        rows.append(_run_row(name, run_dir, result))
    write_frontier(rows, sweep_dir)
    return rows


def sweep_folder(settings: SweepSettings, base: TrainConfig | None = None) -> Path:
    """The sweep's folder: --output-dir, else the config's output_dir."""
    if settings.output_dir:
        return Path(settings.output_dir)
    return Path((base or load_config(settings.config, settings.overrides)).output_dir)


def frontier_files(sweep_dir: Path) -> tuple[Path, Path]:
    """Where a sweep writes its frontier: the table and the plot."""
    return sweep_dir / "frontier.csv", sweep_dir / "frontier.png"


def write_frontier(rows: Sequence[dict[str, Any]], sweep_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FRONTIER_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    table, plot = frontier_files(sweep_dir)
    write_atomic(table, buffer.getvalue())
    write_atomic(plot, frontier_png(rows))


def read_frontier(path: Path) -> list[dict[str, Any]]:
    """Rows of a `frontier.csv`, numbers as floats (empty cells stay empty strings)."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    numeric = set(FRONTIER_COLUMNS) - {"kind", "label", "run_dir"}
    return [{k: (float(v) if k in numeric and v != "" else v) for k, v in row.items()} for row in rows]


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
