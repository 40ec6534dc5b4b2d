"""Training configuration: one typed schema, read from JSON or YAML, overridable with `--set`.

Every key a user can write is a field of `TrainConfig`; nothing else is accepted. Keys follow the
names users already know from seed-style configs and TRL (`learning_rate`, `lora_r`, `beta`, ...),
so a config moves between tools with few edits. Validation happens once, here, so the trainer can
trust every value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from preftune.errors import PreftuneError

STRATEGIES = ("sft", "dpo", "kto", "orpo", "simpo", "cpo", "reward")
# Strategies whose loss has no reference model: none is loaded or precomputed.
REFERENCE_FREE = ("sft", "orpo", "simpo", "cpo", "reward")
PROVIDERS = ("transformers", "hf", "unsloth")
REFERENCES = ("auto", "adapter", "copy", "precomputed")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# accelerate's trackers (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`); `none` and `all` as accelerate reads them
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "swanlab", "clearml", "dvclive")
REPORT_TO = ("none", "all", *TRACKERS)


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are those written to `config.resolved.yaml`.

    Built directly, it is checked when a run starts (`preftune.train`), as a file is.

    Example::

        cfg = preftune.TrainConfig(strategy="dpo", dataset="pairs.jsonl", beta=0.2, lora_r=8)
        preftune.train(cfg)
    """

    # What to train
    strategy: str = "dpo"
    task: str | None = None  # free-form label of the job (kept in the resolved config)
    model_name: str = "smollm2-135m-instruct"
    provider: str = "transformers"
    dataset: str | None = None
    dataset_split: str = "train"
    eval_dataset: str | None = None  # a separate eval file; otherwise `eval_split` of `dataset`
    eval_split: float = 0.1  # fraction in [0, 1) or a whole count >= 1; 0 turns evaluation off
    max_train_samples: Union[int, float, None] = None  # a count or a fraction in (0, 1] of the training data: a seeded nested subset
    eval_dataset_split: str = "test"  # the split of `eval_dataset` (a datasets folder or hub name): test_prefs, ...
    output_dir: str = "runs/train"

    # How records and conversations are read (see data.py and chat.py)
    columns: dict | None = None  # {preftune field: file field}, e.g. {prompt: question, system: system}
    system_prompt: str | None = None  # a system message for every record without one
    chat_template_kwargs: dict | None = None  # extra chat-template variables, e.g. {enable_thinking: false}
    fold_system_message: bool = False  # put the system message into the first user turn (templates that refuse one)
    dataset_num_proc: int | None = None  # processes for tokenizing data; null: the cores this process may use

    # Optimisation
    num_train_epochs: float = 1.0
    max_steps: int = -1  # overrides epochs when > 0
    per_device_train_batch_size: int = 4
    per_device_eval_batch_size: int | None = None  # defaults to the train batch size
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42

    # Preference loss
    loss_type: Union[str, list] = "sigmoid"
    loss_weights: list | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None  # TRL's name: adds `sft` with this weight to the loss mix
    f_divergence_type: str = "reverse_kl"
    f_alpha: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO: weigh each pair by the policy's length-normalised probabilities
    margin_weighting: bool = False  # weigh each pair's loss by its `margin` (label export's mean strength) / 2

    # Other strategies (TRL's names)
    completion_only_loss: bool = True  # sft: loss on completions / assistant turns only
    packing: bool = False  # sft: several sequences per row, none seeing another
    desirable_weight: float = 1.0  # kto: lambda_D
    undesirable_weight: float = 1.0  # kto: lambda_U
    simpo_gamma: float = 0.5  # simpo: target reward margin
    cpo_alpha: float | None = None  # cpo/simpo: weight of the chosen NLL; null: 1 for cpo, 0 for simpo

    # Sequence lengths
    max_seq_length: int = 1024
    max_prompt_length: int | None = None  # null: half of max_seq_length

    # Model and precision
    lora_r: int | None = 16  # 0 or null: full fine-tune
    lora_alpha: float = 32.0
    lora_dropout: float | None = None  # null: 0.05, or 0 on weights where peft allows no dropout
    lora_target_modules: Union[str, list] = "all-linear"
    merge_lora: bool = False  # also write `final_merged/` with the adapter merged into full weights
    use_4bit: bool = False
    bf16: bool | None = None  # null: on where the device supports it (CUDA), off on CPU
    num_threads: int | None = None  # CPU threads of torch's ops; null: torch's default (OMP_NUM_THREADS, else the cores)
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    use_liger_kernel: bool | None = None  # null: Liger's kernels when installed and on CUDA
    disable_dropout: bool = True  # as TRL: dropout makes policy and reference disagree at step 0
    share_prompt: bool = True  # encode each prompt once for both completions (see batching.py)
    router_aux_loss_coef: float | None = None  # MoE: null takes the model config's; 0 turns the aux loss off
    fsdp: str | None = None  # full_shard | shard_grad_op: shard with PyTorch's FSDP2 across the launched processes
    fsdp_config: dict | None = None  # wrap, cpu_offload, reshard_after_forward, mixed_precision (see sharding.py)

    # Reference model
    reference: str = "auto"
    ref_model_name: str | None = None
    cache_dir: str | None = None  # where precomputed reference log-probs live; default: the user cache

    # Bookkeeping
    logging_steps: int = 10
    eval_steps: int | None = None  # null: evaluate only at the end
    save_steps: int = 500
    save_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False  # allow a new run in a folder that holds another run's files
    max_nonfinite_steps: int = 5  # stop after this many NaN/Inf steps in a row (each is skipped)
    report_to: Union[str, list] = "none"  # a tracker or a list of them (see tracking.py)
    run_name: str | None = None  # the run's name in the trackers; null: output_dir's folder name
    tracker_project: str = "preftune"  # the trackers' project (W&B, Trackio) or experiment (MLflow)
    tracker_init_kwargs: dict | None = None  # per tracker, keyword arguments of its init, e.g. {wandb: {tags: [dpo]}}
    progress_bar: bool = True

    # ----------------------------------------------------------------------------------------
    @property
    def use_lora(self) -> bool:
        return bool(self.lora_r)

    def loss_mix(self) -> tuple[list[str], list[float]]:
        """The loss types and their weights, with TRL's `rpo_alpha` folded in as an `sft` term."""
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        weights = [float(w) for w in self.loss_weights] if self.loss_weights is not None else [1.0] * len(types)
        if self.rpo_alpha is not None and "sft" not in types:
            types.append("sft")
            weights.append(float(self.rpo_alpha))
        return types, weights

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record_layout(self) -> Any:
        """The `data.RecordLayout` of `columns` and `system_prompt`."""
        from preftune.data import RecordLayout

        return RecordLayout.make(self.columns, self.system_prompt)


KNOWN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Names from TRL's DPOConfig / transformers.TrainingArguments that mean the same thing here.
ALIASES = {
    "max_length": "max_seq_length",
    "model_name_or_path": "model_name",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_dataset_split",
    "lora_target": "lora_target_modules",
    "project": "tracker_project",  # transformers' TrainingArguments (trackio)
    "project_name": "tracker_project",  # accelerate's init_trackers
}


def _type_name(tp: Any) -> str:
    return {int: "a whole number", float: "a number", bool: "true or false", str: "a string", list: "a list",
            dict: "a mapping"}.get(
        tp, str(tp)
    )


def coerce(key: str, value: Any, annotation: Any, where: str) -> Any:
    """Convert a parsed YAML/JSON value to the field's type, or raise a one-line error."""
    origin = get_origin(annotation)
    options = list(get_args(annotation)) if origin in (Union, types.UnionType) else [annotation]
    if type(None) in options:
        if value is None:
            return None
        options = [o for o in options if o is not type(None)]
    for tp in options:
        if tp is bool and isinstance(value, bool):
            return value
        if tp is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if tp is int and isinstance(value, float) and value.is_integer() and float not in options:
            return int(value)
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if tp is float and isinstance(value, str):
            # YAML 1.1 reads `1e-5` (no dot) as a string: accept it as the number it means.
            try:
                return float(value)
            except ValueError:
                pass
        if tp is str and isinstance(value, str):
            return value
        if tp is list and isinstance(value, (list, tuple)):
            return list(value)
        if tp is dict and isinstance(value, dict):
            return dict(value)
    nullable = type(None) in get_args(annotation)
    wanted = " or ".join(_type_name(o) for o in options if o is not type(None)) + (" or null" if nullable else "")
    raise PreftuneError(f"{where}: '{key}' must be {wanted}, got {value!r}")


def suggest(key: str, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise PreftuneError(f"{where}: {message}")


def _one_of(where: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise PreftuneError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}{suggest(str(value), choices)}")


def validate(cfg: TrainConfig, where: str = "config") -> TrainConfig:
    """Range and consistency checks that types alone cannot express."""
    from preftune.losses import validate_loss_types

    _one_of(where, "strategy", cfg.strategy, STRATEGIES)
    _one_of(where, "provider", cfg.provider, PROVIDERS)
    _one_of(where, "reference", cfg.reference, REFERENCES)
    _one_of(where, "lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS)
    _one_of(where, "f_divergence_type", cfg.f_divergence_type, F_DIVERGENCES)
    _check_report_to(cfg, where)
    _check_max_train_samples(cfg.max_train_samples, where)
    _check(cfg.num_train_epochs > 0, where, f"'num_train_epochs' must be > 0, got {cfg.num_train_epochs}")
    _check(cfg.per_device_train_batch_size >= 1, where, "'per_device_train_batch_size' must be >= 1")
    _check(
        cfg.per_device_eval_batch_size is None or cfg.per_device_eval_batch_size >= 1,
        where,
        "'per_device_eval_batch_size' must be >= 1",
    )
    _check(cfg.gradient_accumulation_steps >= 1, where, "'gradient_accumulation_steps' must be >= 1")
    _check(cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate), where, f"'learning_rate' must be > 0, got {cfg.learning_rate}")
    _check(0.0 <= cfg.warmup_ratio <= 1.0, where, f"'warmup_ratio' must be in [0, 1], got {cfg.warmup_ratio}")
    _check(cfg.weight_decay >= 0, where, "'weight_decay' must be >= 0")
    _check(cfg.max_grad_norm >= 0, where, "'max_grad_norm' must be >= 0 (0 turns clipping off)")
    _check(cfg.beta > 0, where, f"'beta' must be > 0, got {cfg.beta}")
    _check(0.0 <= cfg.label_smoothing < 0.5, where, f"'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}")
    _check(cfg.f_alpha > 0, where, "'f_alpha' must be > 0")
    _check(cfg.max_seq_length >= 2, where, f"'max_seq_length' must be >= 2, got {cfg.max_seq_length}")
    _check(
        cfg.max_prompt_length is None or cfg.max_prompt_length >= 1,
        where,
        f"'max_prompt_length' must be >= 1 or null, got {cfg.max_prompt_length}",
    )
    _check(
        cfg.eval_split == 0 or 0 < cfg.eval_split < 1 or (cfg.eval_split >= 1 and float(cfg.eval_split).is_integer()),
        where,
        f"'eval_split' must be 0, a fraction in (0, 1) or a whole count, got {cfg.eval_split}",
    )
    _check(cfg.lora_r is None or cfg.lora_r >= 0, where, f"'lora_r' must be >= 0 (0 or null: full fine-tune), got {cfg.lora_r}")
    _check(cfg.lora_alpha > 0, where, "'lora_alpha' must be > 0")
    _check(
        cfg.lora_dropout is None or 0.0 <= cfg.lora_dropout < 1.0, where, f"'lora_dropout' must be in [0, 1) or null, got {cfg.lora_dropout}"
    )
    _check(
        cfg.router_aux_loss_coef is None or (cfg.router_aux_loss_coef >= 0 and math.isfinite(cfg.router_aux_loss_coef)),
        where,
        f"'router_aux_loss_coef' must be >= 0 or null, got {cfg.router_aux_loss_coef}",
    )
    _check(cfg.logging_steps >= 1, where, "'logging_steps' must be >= 1")
    _check(cfg.save_steps >= 1, where, "'save_steps' must be >= 1")
    _check(cfg.max_nonfinite_steps >= 1, where, "'max_nonfinite_steps' must be >= 1")
    _check(cfg.eval_steps is None or cfg.eval_steps >= 1, where, "'eval_steps' must be >= 1 or null")
    _check(cfg.save_total_limit is None or cfg.save_total_limit >= 1, where, "'save_total_limit' must be >= 1 or null")
    _check(not (cfg.use_4bit and not cfg.use_lora), where, "'use_4bit' trains through LoRA: set 'lora_r' > 0 (QLoRA)")
    mix = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    sorts_batch = cfg.strategy == "dpo" and any(t in ("aot", "aot_unpaired") for t in mix)
    if cfg.use_weighting:
        _check(cfg.strategy == "dpo", where, f"'use_weighting' (WPO) weighs DPO's pairs; strategy is '{cfg.strategy}'")
        _check(not sorts_batch, where, "'use_weighting' cannot weigh the aot losses: they sort log-ratios across the batch, not per pair")
    if cfg.margin_weighting:
        _check(
            cfg.strategy in ("dpo", "orpo", "simpo", "cpo", "reward"),
            where,
            f"'margin_weighting' weighs preference pairs; strategy '{cfg.strategy}' has none",
        )
        _check(not sorts_batch, where, "'margin_weighting' cannot weigh the aot losses: they sort log-ratios across the batch, not per pair")
    _check(
        cfg.ref_model_name is None or cfg.reference in ("auto", "copy", "precomputed"),
        where,
        "'ref_model_name' needs 'reference' auto, copy or precomputed (the disabled adapter is the base model itself)",
    )
    _check(
        cfg.reference != "adapter" or cfg.use_lora,
        where,
        "'reference: adapter' needs LoRA ('lora_r' > 0); use 'copy' or 'precomputed' for a full fine-tune",
    )
    if isinstance(cfg.loss_type, list):
        _check(all(isinstance(t, str) for t in cfg.loss_type), where, "'loss_type' must be a string or a list of strings")
    if cfg.loss_weights is not None:
        _check(
            all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in cfg.loss_weights),
            where,
            "'loss_weights' must be a list of numbers",
        )
    try:
        validate_loss_types(*cfg.loss_mix())
    except PreftuneError as exc:
        raise PreftuneError(f"{where}: {exc}") from None
    if cfg.columns is not None or cfg.system_prompt is not None:
        from preftune.data import RecordLayout

        try:
            RecordLayout.make(cfg.columns, cfg.system_prompt)
        except PreftuneError as exc:
            raise PreftuneError(f"{where}: {exc}") from None
    _check(cfg.dataset_num_proc is None or cfg.dataset_num_proc >= 1, where, "'dataset_num_proc' must be >= 1 or null")
    if cfg.chat_template_kwargs is not None:
        _check(all(isinstance(k, str) for k in cfg.chat_template_kwargs), where, "'chat_template_kwargs' keys must be strings")
    if isinstance(cfg.lora_target_modules, list):
        _check(all(isinstance(m, str) for m in cfg.lora_target_modules), where, "'lora_target_modules' must be a string or a list of strings")
    if cfg.fsdp is not None or cfg.fsdp_config is not None:
        from preftune.sharding import FSDP_MODES, ShardingPlan

        _check(cfg.fsdp is not None, where, "'fsdp_config' needs 'fsdp': full_shard or shard_grad_op")
        _one_of(where, "fsdp", cfg.fsdp, FSDP_MODES)
        ShardingPlan.from_config(cfg.fsdp, cfg.fsdp_config, where)
    _validate_strategy(cfg, where)
    return cfg


def _check_report_to(cfg: TrainConfig, where: str) -> None:
    """`report_to` is one name or a list of accelerate's tracker names; `none` stands alone."""
    names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    _check(bool(names) and all(isinstance(n, str) for n in names), where, "'report_to' must be a tracker name or a list of them")
    for name in names:
        _one_of(where, "report_to", name, REPORT_TO)
    _check(len(set(names)) == len(names), where, f"'report_to' names a tracker twice: {names}")
    _check("none" not in names or len(names) == 1, where, "'report_to': none cannot be combined with trackers")
    if cfg.tracker_init_kwargs is not None:
        for name, kwargs in cfg.tracker_init_kwargs.items():
            _one_of(where, "tracker_init_kwargs", name, TRACKERS)
            _check(isinstance(kwargs, dict), where, f"'tracker_init_kwargs' of {name} must be a mapping of keyword arguments")


def _check_max_train_samples(value: int | float | None, where: str) -> None:
    """A whole count >= 1 or a fraction in (0, 1]; whether a count fits the data is known once it is read."""
    if value is None:
        return
    if isinstance(value, int):
        _check(value >= 1, where, f"'max_train_samples' must be a count >= 1 or a fraction in (0, 1], got {value}")
    else:
        _check(
            0 < value <= 1,
            where,
            f"'max_train_samples' must be a count >= 1 (a whole number) or a fraction in (0, 1], got {value:g}",
        )


def _validate_strategy(cfg: TrainConfig, where: str) -> None:
    """Keys that belong to one strategy are refused elsewhere rather than silently ignored."""
    s = cfg.strategy
    if s != "dpo":
        dpo_only = cfg.loss_type != "sigmoid" or cfg.loss_weights is not None or cfg.rpo_alpha is not None
        _check(
            not dpo_only,
            where,
            f"'loss_type', 'loss_weights' and 'rpo_alpha' choose among DPO's losses; strategy '{s}' has its own loss",
        )
    if s in REFERENCE_FREE:
        _check(
            cfg.reference == "auto" and cfg.ref_model_name is None,
            where,
            f"strategy '{s}' uses no reference model, so 'reference' and 'ref_model_name' do not apply",
        )
    _check(s == "sft" or not cfg.packing, where, "'packing' applies to strategy sft")
    _check(cfg.desirable_weight > 0 and cfg.undesirable_weight > 0, where, "'desirable_weight' and 'undesirable_weight' must be > 0")
    _check(cfg.simpo_gamma >= 0 and math.isfinite(cfg.simpo_gamma), where, f"'simpo_gamma' must be >= 0, got {cfg.simpo_gamma}")
    _check(
        cfg.label_smoothing == 0 or s in ("dpo", "simpo", "cpo"),
        where,
        f"'label_smoothing' applies to strategies dpo, simpo and cpo, not '{s}'",
    )
    if cfg.cpo_alpha is None:
        cfg.cpo_alpha = {"cpo": 1.0, "simpo": 0.0}.get(s)
    else:
        _check(s in ("cpo", "simpo"), where, f"'cpo_alpha' applies to strategies cpo and simpo, not '{s}'")
        _check(cfg.cpo_alpha >= 0 and math.isfinite(cfg.cpo_alpha), where, f"'cpo_alpha' must be >= 0, got {cfg.cpo_alpha}")


def from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """Build a validated config from a mapping, rejecting unknown keys with the closest known one."""
    if not isinstance(data, dict):
        raise PreftuneError(f"{where}: the config must be a mapping of keys to values, got {type(data).__name__}")
    hints = get_type_hints(TrainConfig)
    values: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        name = ALIASES.get(key, key)
        if name == "stages":
            raise PreftuneError(f"{where}: 'stages' makes a pipeline: run it with `preftune train` or `preftune pipeline`")
        if name not in hints:
            raise PreftuneError(f"{where}: unknown key '{key}'{suggest(key, KNOWN_KEYS)}")
        values[name] = coerce(name, value, hints[name], where)
    return validate(TrainConfig(**values), where)


def parse_override(item: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `--set`, the value parsed as YAML (`beta=0.2`, `lora_r=0`, `bf16=true`)."""
    if "=" not in item:
        raise PreftuneError(f"--set {item}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise PreftuneError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise PreftuneError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "could not parse"
        raise PreftuneError(f"{path}{line}: invalid YAML ({problem})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PreftuneError(f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), data: dict[str, Any] | None = None
) -> TrainConfig:
    """Read CONFIG (JSON or YAML), or take `data` already read from it, apply `--set` overrides, validate.

    Example::

        cfg = preftune.load_config("examples/dpo_lora.yaml", ["beta=0.2", "max_steps=8"])
        cfg.beta, cfg.use_lora  # (0.2, True)
    """
    if data is None:
        data = read_config_file(path) if path is not None else {}
    where = str(path) if path is not None else "config"
    return from_dict(apply_overrides(data, overrides), where)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with `--set KEY=VALUE` overrides applied (values parsed as YAML)."""
    data = dict(data)
    for item in overrides:
        key, value = parse_override(item)
        name = ALIASES.get(key, key)
        if name not in KNOWN_KEYS:
            raise PreftuneError(f"--set: unknown key '{key}'{suggest(key, KNOWN_KEYS)}")
        # An override replaces the key whatever spelling the file used for it.
        for alias, target in ALIASES.items():
            if target == name:
                data.pop(alias, None)
        data[name] = value
    return data


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
