"""`preftune report RUN_DIR`: one self-contained HTML page about a training run.

Everything a reader needs to judge the run without the run folder: the settings, training curves
from `metrics.jsonl`, the evaluation of `preftune eval` (`eval.json`) with its intervals, the
reward-vs-KL frontier when the run belongs to a sweep (`frontier.csv` beside or above it), and the
same prompts answered by the reference and by the tuned model (`eval_samples.jsonl`). Plots are
PNG embedded as data URIs and the style sheet is inline: no CDN, nothing fetched, so the file can be
mailed or archived. Every text from the run is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from preftune import __version__
from preftune.errors import PreftuneError, require
from preftune.io import write_atomic

SECTIONS = ("settings", "training", "evaluation", "frontier", "samples")

# (panel title, train key, eval key) of the training curves
CURVES = (
    ("loss", "loss", "eval_loss"),
    ("rewards/accuracies", "rewards/accuracies", "eval_rewards/accuracies"),
    ("rewards/margins", "rewards/margins", "eval_rewards/margins"),
    ("rewards/chosen and rewards/rejected", "rewards/chosen", "rewards/rejected"),
    ("learning_rate", "learning_rate", None),
    ("grad_norm", "grad_norm", None),
)

SETTINGS = (
    "strategy",
    "model_name",
    "dataset",
    "loss_type",
    "beta",
    "reference",
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "lr_scheduler_type",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "num_train_epochs",
    "max_seq_length",
    "seed",
)

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232a; margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 10px; border-bottom: 1px solid #d6dbe1; padding-bottom: 4px; }
.sub { color: #5b6570; margin: 0 0 16px; }
section { background: #fff; border: 1px solid #e1e5ea; border-radius: 8px; padding: 4px 20px 16px; margin-top: 18px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border-bottom: 1px solid #e8ebef; padding: 5px 12px 5px 0; text-align: left; vertical-align: top; }
th { color: #5b6570; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; text-align: right; }
tr.this td { background: #eef5ff; }
img { max-width: 100%; height: auto; border: 1px solid #eef0f3; }
.missing { color: #8a5a00; background: #fff7e6; padding: 8px 12px; border-radius: 6px; }
.warning { color: #8a1f11; background: #fdecea; padding: 8px 12px; border-radius: 6px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin: 10px 0 18px; }
.prompt { font-weight: 600; margin-top: 14px; white-space: pre-wrap; }
.sample { background: #f8f9fb; border: 1px solid #e6e9ed; border-radius: 6px; padding: 8px 10px; white-space: pre-wrap; }
.sample .who { display: block; color: #5b6570; font-size: 12px; margin-bottom: 4px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _img(png: bytes, alt: str) -> str:
    return f'<img src="{_png_data_uri(png)}" alt="{_e(alt)}">'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`; a torn last line (a run killed mid-write) is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def curves_png(records: Sequence[dict[str, Any]]) -> bytes:
    """Six panels of training curves; eval points (`eval_` keys) drawn over the training lines."""
    require("eval", "matplotlib", what="the HTML report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4), dpi=100)
    for ax, (title, train_key, second_key) in zip(axes.flat, CURVES):
        for key, style, label in ((train_key, "-", "train"), (second_key, "o--", "eval")):
            if key is None:
                continue
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not points:
                continue
            if train_key == "rewards/chosen":  # this panel draws two training series
                style, label = "-", key
            ax.plot([p[0] for p in points], [p[1] for p in points], style, markersize=4, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _group_panels(result: dict[str, Any]) -> list[tuple[str, list[str], dict[str, dict[str, Any]], str, str, float, float, str]]:
    """(title, groups top to bottom, their measures, measure key, count key, chance line, overall,
    number format) per panel."""
    by, panels = result["by"], []
    if "pairs" in by:
        groups = by["pairs"]["groups"]
        order = (by["pairs"].get("comparison") or {}).get("ranking") or list(groups)
        panels.append(("preference accuracy", order, groups, "accuracy", "num_pairs", 0.5, result["pairs"]["accuracy"]["mean"], ".3f"))
    if "samples" in by:
        groups = by["samples"]["groups"]
        order = (by["samples"].get("comparison") or {}).get("ranking") or list(groups)
        baseline = Path(str(by["samples"]["baseline"])).name or by["samples"]["baseline"]
        panels.append((f"reward gain over {baseline}", order, groups, "reward_gain", "num_prompts", 0.0,
                       result["samples"]["reward_gain"]["mean"], "+.3f"))
    return panels


def groups_png(result: dict[str, Any]) -> bytes:
    """Each group's headline measure with its interval, best at the top: the chance or no-change
    line solid, the ungrouped figure dashed, so a group that stands apart is seen at a glance."""
    require("eval", "matplotlib", what="the HTML report")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _group_panels(result)
    rows = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) if len(panels) > 1 else 10, max(2.6, 0.45 * rows + 1.3)), dpi=100, squeeze=False)
    for ax, (title, order, groups, key, count, chance, overall, fmt) in zip(axes[0], panels):
        ys = list(range(len(order)))[::-1]
        means = [groups[g][key]["mean"] for g in order]
        lows = [m - groups[g][key]["ci"][0] for g, m in zip(order, means)]
        highs = [groups[g][key]["ci"][1] - m for g, m in zip(order, means)]
        ax.errorbar(means, ys, xerr=[lows, highs], fmt="o", capsize=4, color="#1f77b4")
        ax.axvline(chance, color="#888888", linewidth=1)
        ax.axvline(overall, color="#d62728", linestyle="--", linewidth=1, label=f"all: {format(overall, fmt)}")
        ax.set_yticks(ys, [f"{g} (n={groups[g][count]})" for g in order], fontsize=8)
        ax.set_ylim(-0.6, len(order) - 0.4)
        ax.set_title(f"{title} per {result['by']['field']}", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _groups_section(result: dict[str, Any], level: str) -> str:
    """The per-group tables of `preftune eval --by` and their plot."""
    by = result["by"]
    parts = [f"<h3>Evaluation by {_e(by['field'])}</h3>",
             f"<p>Each group's figures are those of an evaluation of its records alone; records without the field "
             f"are the group {_e(by['missing'])}.</p>"]
    if "pairs" in by:
        groups = by["pairs"]["groups"]
        parts.append(_table(
            ("group", "pairs", "accuracy", level, "reward margin", level),
            [(name, str(g["num_pairs"]), *_interval(g["accuracy"], ".3f"), *_interval(g["margin"], "+.4f")) for name, g in groups.items()],
        ))
    if "samples" in by:
        s = by["samples"]
        comparison = s.get("comparison") or {}
        vs_rest = comparison.get("vs_rest", {})
        parts.append(f"<p>Samples, most improved first; baseline: {_e(s['baseline'])}.</p>")
        parts.append(_table(
            ("group", "prompts", "reward", "baseline", "gain over baseline", level, "gain minus the rest's", level,
             "win rate", level, "KL (per-token)", "length ratio"),
            [
                (name, str(g["num_prompts"]), f"{g['reward']['mean']:+.3f}", f"{g['baseline_reward']['mean']:+.3f}",
                 *_interval(g["reward_gain"], "+.3f"),
                 *(_interval(vs_rest[name], "+.3f") if name in vs_rest else ("", "")),
                 *_interval(g["win_rate"], ".3f"), f"{g['kl_per_token']['mean']:.3f}", f"x{g['length_ratio']:.2f}")
                for name, g in ((n, s["groups"][n]) for n in comparison.get("ranking") or list(s["groups"]))
            ],
        ))
        if comparison:
            d = comparison["best_minus_worst"]
            parts.append(
                f"<p>Most improved: {_e(comparison['best'])}; least: {_e(comparison['worst'])}; difference in reward gain "
                f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] (both picked by these data, so read that interval "
                "as optimistic; a group against the rest is the comparison for a group named in advance).</p>"
            )
    parts.append(_img(groups_png(result), f"each group's measure with its {level} per {by['field']}"))
    return "\n".join(parts)


def _interval(measure: dict[str, Any], fmt: str) -> tuple[str, str]:
    low, high = measure["ci"]
    return format(measure["mean"], fmt), f"[{format(low, fmt)}, {format(high, fmt)}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1, highlight: int | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cells = "".join(f'<td class="num">{_e(c)}</td>' if j >= numeric_from else f"<td>{_e(c)}</td>" for j, c in enumerate(row))
        out.append(f'<tr class="this">{cells}</tr>' if i == highlight else f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _settings_section(config: dict[str, Any], run_dir: Path) -> str:
    if not config:
        return _missing(f"no config.resolved.yaml in {run_dir}")
    rows = [(k, json.dumps(config[k]) if not isinstance(config[k], str) else config[k]) for k in SETTINGS if k in config]
    return _table(("setting", "value"), rows, numeric_from=99)


def _training_section(records: Sequence[dict[str, Any]]) -> str:
    if not records:
        return _missing("no metrics.jsonl: the run has not logged a step yet")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    parts = [_img(curves_png(records), "training curves: loss, accuracies, margins, rewards, learning rate, grad norm")]
    summary = []
    if train:
        first, last = train[0], train[-1]
        for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm"):
            if key in first and key in last:
                summary.append((key, f"{first[key]:.4f}", f"{last[key]:.4f}"))
        parts.append(f"<p>{len(train)} logged steps, last step {last['step']}.</p>")
    if evals:
        last_eval = evals[-1]
        for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
            if key in last_eval:
                summary.append((key, "", f"{last_eval[key]:.4f}"))
    if summary:
        parts.append(_table(("metric", "first step", "last step"), summary))
    return "\n".join(parts)


def _evaluation_section(result: dict[str, Any] | None, run_dir: Path) -> str:
    if not result:
        return _missing(f"no eval.json: run `preftune eval --model {run_dir} --pairs TEST --prompts PROMPTS --reward REWARD`")
    level = f"{result.get('confidence', 0.95):.0%} CI"
    parts = [f"<p>reference: {_e(result.get('reference', ''))}</p>"]
    if "pairs" in result:
        p = result["pairs"]
        parts.append(f"<h3>preference pairs: {p['num_pairs']} from {_e(Path(p['file']).name)}, beta {p['beta']:g}</h3>")
        parts.append(
            _table(
                ("measure", "mean", level),
                [
                    ("preference accuracy", *_interval(p["accuracy"], ".3f")),
                    ("implicit reward margin", *_interval(p["margin"], "+.4f")),
                    ("chosen reward", *_interval(p["chosen_reward"], "+.4f")),
                    ("rejected reward", *_interval(p["rejected_reward"], "+.4f")),
                ],
            )
        )
    if "samples" in result:
        s = result["samples"]
        parts.append(
            f"<h3>samples: {s['num_prompts']} prompts x {s['samples_per_prompt']}, reward {_e(s['reward_function'])}, "
            f"temperature {s['temperature']:g}, baseline: {_e(s['baseline'])}</h3>"
        )
        parts.append(
            _table(
                ("measure", "mean", level),
                [
                    *([
                        ("mean reward, tuned", *_interval(s["reward"], "+.3f")),
                        ("mean reward, baseline", *_interval(s["baseline_reward"], "+.3f")),
                        ("reward gain over baseline", *_interval(s["reward_gain"], "+.3f")),
                        ("win rate over baseline", *_interval(s["win_rate"], ".3f")),
                    ] if "reward" in s else []),
                    *([("judged win rate over baseline", *_interval(s["judged_win_rate"], ".3f"))] if "judged_win_rate" in s else []),
                    ("KL(tuned || reference), log-ratio", *_interval(s["kl_monte_carlo"], ".3f")),
                    ("KL(tuned || reference), per-token exact", *_interval(s["kl_per_token"], ".3f")),
                    ("mean length, tuned / baseline (tokens)", f"{s['length']:.1f} / {s['baseline_length']:.1f}", f"x{s['length_ratio']:.2f}"),
                ],
            )
        )
        if s.get("length_warning"):
            parts.append(
                f'<p class="warning">The tuned model\'s samples are {s["length_ratio"]:.2f}x as long as the baseline\'s: '
                "the reward may be paying for length.</p>"
            )
    if result.get("by"):
        parts.append(_groups_section(result, level))
    return "\n".join(parts)


def find_frontier(run_dir: Path) -> Path | None:
    """`frontier.csv` of the sweep the run belongs to (in its folder or the folder above)."""
    for folder in (run_dir, run_dir.parent):
        if (folder / "frontier.csv").is_file():
            return folder / "frontier.csv"
    return None


def _frontier_section(path: Path | None, run_dir: Path) -> str:
    if path is None:
        return _missing("not part of a sweep: `preftune sweep CONFIG --set-grid beta=...` draws the reward-vs-KL frontier")
    from preftune.eval.sweep import frontier_png, read_frontier

    rows = read_frontier(path)
    this = next((i for i, r in enumerate(rows) if r.get("run_dir") and Path(r["run_dir"]).resolve() == run_dir.resolve()), None)

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, float) else "–"

    table = _table(
        ("point", "KL", "mean reward", "95% CI", "win rate", "length"),
        [
            (
                r["label"],
                num(r["kl"], ".3f"),
                num(r["reward"], "+.3f"),
                f"[{num(r['reward_low'], '+.3f')}, {num(r['reward_high'], '+.3f')}]",
                num(r["win_rate"], ".3f"),
                num(r["length"], ".1f"),
            )
            for r in rows
        ],
        highlight=this,
    )
    return _img(frontier_png(rows), "reward against KL for each run, the reference and best-of-N") + "\n" + table


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def _samples_section(path: Path, limit: int) -> str:
    if not path.is_file():
        return _missing("no eval_samples.jsonl: `preftune eval ... --prompts PROMPTS --reward REWARD` writes it")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit] if line.strip()]
    parts = [f"<p>The first sample of each of the first {len(records)} prompts, from the baseline and from the tuned model, with their rewards.</p>"]
    for r in records:
        parts.append(f'<div class="prompt">{_e(_prompt_text(r["prompt"]))}</div>')
        parts.append('<div class="pair">')
        for who, key in (("baseline", "baseline"), ("tuned", "model")):
            text = r[key][0] if r.get(key) else ""
            reward = r.get(f"{key}_scores", [None])[0]
            label = f"{who}, reward {reward:+.3f}" if isinstance(reward, (int, float)) else who
            parts.append(f'<div class="sample"><span class="who">{_e(label)}</span>{_e(text)}</div>')
        parts.append("</div>")
    return "\n".join(parts)


def build_report(run_dir: str | Path, output: str | Path | None = None, max_samples: int = 8) -> Path:
    """Write the report of a run folder and return its path (default RUN_DIR/report.html)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PreftuneError(f"run folder not found: {run_dir}")
    config: dict[str, Any] = {}
    if (run_dir / "config.resolved.yaml").is_file():
        config = yaml.safe_load((run_dir / "config.resolved.yaml").read_text(encoding="utf-8")) or {}
    records = read_metrics(run_dir / "metrics.jsonl")
    result = None
    if (run_dir / "eval.json").is_file():
        try:
            result = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise PreftuneError(f"{run_dir / 'eval.json'}: not valid JSON ({exc})") from None
    if not config and not records and result is None and find_frontier(run_dir) is None:
        raise PreftuneError(f"{run_dir}: not a run folder (no config.resolved.yaml, metrics.jsonl, eval.json or frontier.csv)")
    bodies = {
        "settings": ("Settings", _settings_section(config, run_dir)),
        "training": ("Training curves", _training_section(records)),
        "evaluation": ("Evaluation", _evaluation_section(result, run_dir)),
        "frontier": ("Reward vs KL frontier", _frontier_section(find_frontier(run_dir), run_dir)),
        "samples": ("Samples: baseline and tuned", _samples_section(run_dir / "eval_samples.jsonl", max_samples)),
    }
    title = f"preftune report: {run_dir.resolve().name}"
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="sub">{_e(config.get("model_name", ""))} · written {time.strftime("%Y-%m-%d %H:%M")} by preftune {__version__}</p>',
    ]
    for key in SECTIONS:
        heading, body = bodies[key]
        page.append(f'<section id="{key}"><h2>{_e(heading)}</h2>\n{body}\n</section>')
    page.append("</main></body></html>\n")
    path = Path(output) if output else run_dir / "report.html"
    write_atomic(path, "\n".join(page))
    return path
