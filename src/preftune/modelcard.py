"""The model card written beside the final weights (`final/README.md`), in the Hub's format.

A YAML header the Hub reads (`base_model`, `library_name`, `tags`, `datasets` when they are hub
names, `pipeline_tag`), then what a reader needs to trust or reproduce the model: strategy, loss,
key settings, the last training and evaluation metrics, and the command or call that made it. As
TRL's trainers and the Hub's own do, so a pushed folder shows a complete card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from preftune.config import TrainConfig, resolve

# The hub ids of the embedded models' aliases (models.EMBEDDED_MODELS), so a card names the real base.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
# The `model_name` recorded for a model object built in memory: there is no base to name.
IN_MEMORY = "in-memory model"

PAPERS = {
    "sft": "supervised fine-tuning on the completions",
    "dpo": "Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290)",
    "kto": "Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv:2402.01306)",
    "orpo": "Odds Ratio Preference Optimization (Hong et al. 2024, arXiv:2403.07691)",
    "simpo": "Simple Preference Optimization (Meng et al. 2024, arXiv:2405.14734)",
    "cpo": "Contrastive Preference Optimization (Xu et al. 2024, arXiv:2401.08417)",
    "reward": "a Bradley-Terry reward model on preference pairs",
}

# Settings of each strategy worth a line on the card (the whole config is in config.resolved.yaml).
_COMMON = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "num_train_epochs", "max_steps",
           "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length", "seed")
_STRATEGY_KEYS = {
    "dpo": ("loss_type", "loss_weights", "beta", "label_smoothing", "reference"),
    "kto": ("beta", "desirable_weight", "undesirable_weight", "reference"),
    "orpo": ("beta",),
    "simpo": ("beta", "simpo_gamma", "cpo_alpha"),
    "cpo": ("beta", "cpo_alpha", "label_smoothing"),
    "sft": ("completion_only_loss", "packing"),
    "reward": (),
}
_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
_TIMING = ("step_seconds", "tokens_per_second", "nonfinite_skips")


def base_model_name(name: str) -> str:
    """The name the card gives the base: the hub id of an embedded alias, else the name as given."""
    return HUB_IDS.get(str(name).strip().lower(), str(name))


def loss_description(cfg: TrainConfig) -> str:
    """One line on what was minimised."""
    if cfg.strategy == "dpo":
        types, weights = cfg.loss_mix()
        mix = " + ".join(t if w == 1 else f"{w:g} x {t}" for t, w in zip(types, weights))
        smoothing = f", label smoothing {cfg.label_smoothing:g}" if cfg.label_smoothing else ""
        return f"DPO loss `{mix}`, beta {cfg.beta:g}{smoothing}"
    if cfg.strategy == "kto":
        return f"KTO loss, beta {cfg.beta:g}, desirable/undesirable weights {cfg.desirable_weight:g}/{cfg.undesirable_weight:g}"
    if cfg.strategy == "orpo":
        return f"NLL of chosen + {cfg.beta:g} x odds-ratio term"
    if cfg.strategy == "simpo":
        return f"SimPO loss, beta {cfg.beta:g}, target margin {cfg.simpo_gamma:g}, chosen NLL weight {resolve(cfg).loss.cpo_alpha:g}"
    if cfg.strategy == "cpo":
        return f"CPO loss, beta {cfg.beta:g}, chosen NLL weight {resolve(cfg).loss.cpo_alpha:g}"
    if cfg.strategy == "sft":
        return "mean NLL of the " + ("completion tokens" if cfg.completion_only_loss else "tokens")
    return "Bradley-Terry loss: -log sigmoid(r(chosen) - r(rejected))"


def _header(cfg: TrainConfig, adapter: bool, datasets: Sequence[str]) -> dict[str, Any]:
    tags = ["preftune", cfg.strategy]
    if cfg.strategy == "dpo":
        tags += [t for t in cfg.loss_mix()[0] if t not in tags]
    if cfg.use_lora:
        tags.append("lora")
    if cfg.strategy == "reward":
        tags.append("reward-model")
    header: dict[str, Any] = {}
    if cfg.model_name != IN_MEMORY:
        header["base_model"] = base_model_name(cfg.model_name)
    header["library_name"] = "peft" if adapter else "transformers"
    header["pipeline_tag"] = "text-classification" if cfg.strategy == "reward" else "text-generation"
    header["tags"] = tags
    if datasets:
        header["datasets"] = list(datasets)
    return header


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


def _metrics_table(record: dict[str, Any]) -> list[str]:
    rows = [(k, v) for k, v in record.items() if k not in _TIMING and isinstance(v, (int, float))]
    return ["| metric | value |", "|---|---|"] + [f"| `{k}` | {_value(v)} |" for k, v in rows]


def render(
    cfg: TrainConfig,
    *,
    train_metrics: dict[str, Any],
    eval_metrics: dict[str, Any],
    origin: str,
    datasets: Sequence[str] = (),
    merged: bool = False,
) -> str:
    """The card's Markdown. `merged`: the card of `final_merged/` (full weights from a LoRA run)."""
    adapter = cfg.use_lora and not merged
    header = yaml.safe_dump(_header(cfg, adapter, datasets), sort_keys=False, default_flow_style=False)
    base = base_model_name(cfg.model_name)
    title = Path(cfg.output_dir).name or "model"
    form = "a LoRA adapter" if adapter else "full weights, the LoRA adapter merged in" if cfg.use_lora else "full weights"
    lines = [
        "---",
        header.rstrip(),
        "---",
        "",
        f"# {title}",
        "",
        f"Fine-tuned from `{base}` with preftune ({form}).",
        "",
        "## Training",
        "",
        f"- strategy: `{cfg.strategy}`, {PAPERS[cfg.strategy]}",
        f"- loss: {loss_description(cfg)}",
    ]
    keys = _STRATEGY_KEYS[cfg.strategy] + _COMMON + (_LORA_KEYS if cfg.use_lora else ())
    values = cfg.to_dict()
    # max_steps > 0 overrides the epochs: show the one that counted.
    shown = [k for k in keys if values[k] is not None and k != ("num_train_epochs" if cfg.max_steps > 0 else "max_steps")]
    settings = [f"`{k}` {_value(values[k])}" for k in shown]
    lines += [f"- settings: {', '.join(settings)}", "- every setting: `config.resolved.yaml` in the run folder", ""]
    if train_metrics:
        lines += [f"## Last training metrics (step {train_metrics.get('step', '?')})", "", *_metrics_table(train_metrics), ""]
    if eval_metrics:
        lines += [f"## Evaluation (step {eval_metrics.get('step', '?')})", "", *_metrics_table(eval_metrics), ""]
    lines += ["## How it was made", "", "```", origin, "```", ""]
    lines += _usage(cfg, adapter)
    return "\n".join(lines).rstrip() + "\n"


def _usage(cfg: TrainConfig, adapter: bool) -> list[str]:
    """How to load the folder the card sits in."""
    head = "SequenceClassification" if cfg.strategy == "reward" else "CausalLM"
    module, loader = ("peft", f"AutoPeftModelFor{head}") if adapter else ("transformers", f"AutoModelFor{head}")
    code = [f"from {module} import {loader}", "", f"model = {loader}.from_pretrained(FOLDER)  # this folder"]
    return ["## Use", "", "```python", *code, "```", ""]


def read_header(text: str) -> dict[str, Any]:
    """The YAML header of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0]) or {}
