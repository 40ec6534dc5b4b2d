"""Training configuration: the keys users write, and the typed sections a run reads.

Users write flat keys (`learning_rate`, `lora_r`, `beta`, ...), the names they know from seed-style
configs and TRL, in JSON or YAML, overridable with `--set`: that is `TrainConfig`, and nothing
else is accepted. `resolve` turns it into `Settings`: typed, frozen sections (model, LoRA, data,
optimisation, reference, run, sharding, and the chosen strategy's loss section), each checked and
with its defaults resolved when it is built, once. A key that belongs to another strategy's section
is refused there, naming the strategies it applies to, rather than silently ignored.

This module is a leaf: it imports nothing of preftune but `errors`, so reading a config never loads
torch, and every other module may import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from preftune.errors import PreftuneError, Problems, suggest

STRATEGIES = ("sft", "dpo", "kto", "orpo", "simpo", "cpo", "reward")
# Strategies whose loss has no reference model: none is loaded or precomputed.
REFERENCE_FREE = ("sft", "orpo", "simpo", "cpo", "reward")
# Model providers, as users may name them -> the loader that serves them.
PROVIDERS = {"transformers": "transformers", "hf": "transformers", "unsloth": "unsloth"}
REFERENCES = ("auto", "adapter", "copy", "precomputed")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# accelerate's trackers (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`); `none` and `all` as accelerate reads them
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "swanlab", "clearml", "dvclive")
REPORT_TO = ("none", "all", *TRACKERS)
# DPO's `loss_type` names, as TRL's DPOTrainer calls them (the formulas are in losses.py).
LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
# Losses that sort log-ratios across the whole batch rather than scoring each pair alone.
BATCH_SORTING_LOSSES = ("aot", "aot_unpaired")
FSDP_MODES = ("full_shard", "shard_grad_op")
FSDP_CONFIG_KEYS = ("wrap", "cpu_offload", "reshard_after_forward", "mixed_precision")
# preftune's record fields, the targets of a `columns` mapping.
MAPPABLE_FIELDS = (
    "prompt", "chosen", "rejected", "system", "completion", "label", "messages", "text",
    "response_a", "response_b", "winner", "preference", "tools",
)


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
    report_to: Union[str, list] = "none"  # a tracker or a list of them (see training/tracking.py)
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


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise PreftuneError(f"{where}: {message}")


def _one_of(where: str, key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise PreftuneError(f"{where}: '{key}' must be one of {', '.join(choices)}; got {value!r}{suggest(str(value), choices)}")


def validate_loss_types(
    loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None
) -> tuple[list[str], list[float]]:
    """`loss_type`/`loss_weights` as two equal-length lists, or a `PreftuneError`: a typo in a loss
    name fails when the config is read, before any model is loaded."""
    valid = ", ".join(LOSS_TYPES)
    if isinstance(loss_type, str):
        types_ = [loss_type]
    elif isinstance(loss_type, Sequence) and all(isinstance(t, str) for t in loss_type):
        types_ = list(loss_type)
    else:
        raise PreftuneError(f"'loss_type' must be a name or a list of names, got {loss_type!r}; valid: {valid}")
    if not types_:
        raise PreftuneError(f"'loss_type' is an empty list; give at least one of: {valid}")
    for name in types_:
        if name not in LOSS_TYPES:
            raise PreftuneError(f"unknown 'loss_type' {name!r}{suggest(name, LOSS_TYPES)}; valid: {valid}")
    if loss_weights is None:
        return types_, [1.0] * len(types_)
    if isinstance(loss_weights, (str, bytes)) or not isinstance(loss_weights, Sequence):
        raise PreftuneError(f"'loss_weights' must be a list of numbers, got {loss_weights!r}")
    if len(loss_weights) != len(types_):
        raise PreftuneError(
            f"'loss_weights' has {len(loss_weights)} value(s) but 'loss_type' names {len(types_)} loss(es) "
            f"({', '.join(types_)}); give one weight per loss"
        )
    weights: list[float] = []
    for w in loss_weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise PreftuneError(f"'loss_weights' must be finite numbers >= 0, got {w!r}")
        weights.append(float(w))
    return types_, weights


# ---------------------------------------------------------------------------------------------
# Record layout and sharding plan: sections with a structure of their own


def field_key(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


@dataclass(frozen=True)
class RecordLayout:
    """How a source's records map onto preftune's fields: `columns` renames file fields
    ({preftune field: file field}, as LLaMA-Factory's `columns`), `system_prompt` gives every
    record without a system message one."""

    columns: tuple[tuple[str, str], ...] = ()
    system_prompt: str | None = None

    @classmethod
    def make(cls, columns: dict[str, Any] | None = None, system_prompt: str | None = None, where: str = "columns") -> "RecordLayout":
        """Checked: every key is one of preftune's fields (hyphens and case forgiven), every value a
        field name, and no file field is taken twice."""
        pairs: list[tuple[str, str]] = []
        for target, source in (columns or {}).items():
            key = field_key(str(target))
            if key not in MAPPABLE_FIELDS:
                raise PreftuneError(
                    f"{where}: '{target}' is not one of preftune's fields ({', '.join(MAPPABLE_FIELDS)}){suggest(str(target), MAPPABLE_FIELDS)}"
                )
            if not isinstance(source, str) or not source.strip():
                raise PreftuneError(f"{where}: '{target}' must name a field of the file, got {source!r}")
            pairs.append((key, source))
        taken = Counter(source for _, source in pairs)
        twice = [source for source, n in taken.items() if n > 1]
        if twice:
            raise PreftuneError(f"{where}: field '{twice[0]}' is mapped to two of preftune's fields")
        if system_prompt is not None and not isinstance(system_prompt, str):
            shown = "null" if system_prompt is None else type(system_prompt).__name__
            raise PreftuneError(f"system_prompt: must be a string, got {shown}")
        return cls(tuple(pairs), system_prompt or None)

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.columns)

    def describe(self) -> str:
        """The mapping as a config line would write it, or 'none'."""
        if not self.columns:
            return "none"
        return "columns: {" + ", ".join(f"{t}: {s}" for t, s in self.columns) + "}"

    def apply(self, record: Any) -> Any:
        """A copy of the record under preftune's names; a mapped field missing from a record is an
        error naming the fields it has."""
        if not self.columns or not isinstance(record, dict):
            return record
        out = dict(record)
        for target, source in self.columns:
            if source not in record:
                raise PreftuneError(
                    f"field '{source}' (mapped to '{target}' by columns) is missing; the record has {', '.join(map(str, record)) or 'no fields'}"
                )
        for target, source in self.columns:
            out.pop(source, None)
        for target, source in self.columns:
            out[target] = record[source]
        return out


@dataclass(frozen=True)
class ShardingPlan:
    """How a model is sharded, from `fsdp` and `fsdp_config` (HF TrainingArguments' names)."""

    mode: str
    wrap: tuple[str, ...] | None = None  # module class names; None: the model's `_no_split_modules`
    cpu_offload: bool = False
    reshard_after_forward: bool | None = None  # None: True for full_shard, False for shard_grad_op
    mixed_precision: bool | None = None  # None: bf16 parameters with fp32 reduction when bf16 is on

    @classmethod
    def from_config(cls, mode: str, options: dict[str, Any] | None, where: str = "config") -> "ShardingPlan":
        _one_of(where, "fsdp", mode, FSDP_MODES)
        options = dict(options or {})
        for key in options:
            if key not in FSDP_CONFIG_KEYS:
                raise PreftuneError(f"{where}: unknown key 'fsdp_config.{key}'{suggest(key, FSDP_CONFIG_KEYS)}")
        wrap = options.get("wrap")
        if wrap is not None:
            if isinstance(wrap, str):
                wrap = [wrap]
            if not isinstance(wrap, list) or not wrap or not all(isinstance(w, str) and w for w in wrap):
                raise PreftuneError(f"{where}: 'fsdp_config.wrap' must be a class name or a list of them, got {wrap!r}")
            wrap = tuple(wrap)
        for key in ("cpu_offload", "reshard_after_forward", "mixed_precision"):
            value = options.get(key)
            if value is not None and not isinstance(value, bool):
                raise PreftuneError(f"{where}: 'fsdp_config.{key}' must be true, false or null, got {value!r}")
        return cls(mode, wrap, bool(options.get("cpu_offload", False)), options.get("reshard_after_forward"),
                   options.get("mixed_precision"))


# ---------------------------------------------------------------------------------------------
# The sections a run reads. Field names are the keys users write, so a key is found in one place.


@dataclass(frozen=True)
class ModelSettings:
    model_name: str
    provider: str  # the loader: transformers or unsloth ('hf' is transformers)
    use_4bit: bool
    bf16: bool | None  # None: decided from the device when the run starts
    num_threads: int | None
    gradient_checkpointing: bool
    attn_implementation: str | None
    use_liger_kernel: bool | None
    disable_dropout: bool
    router_aux_loss_coef: float | None

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "ModelSettings":
        _one_of(where, "provider", cfg.provider, tuple(PROVIDERS))
        _check(
            cfg.num_threads is None or (isinstance(cfg.num_threads, int) and not isinstance(cfg.num_threads, bool) and cfg.num_threads >= 1),
            where, f"'num_threads' must be a whole number >= 1 (null: torch's default), got {cfg.num_threads!r}",
        )
        _check(
            cfg.router_aux_loss_coef is None or (cfg.router_aux_loss_coef >= 0 and math.isfinite(cfg.router_aux_loss_coef)),
            where, f"'router_aux_loss_coef' must be >= 0 or null, got {cfg.router_aux_loss_coef}",
        )
        _check(not (cfg.use_4bit and not cfg.use_lora), where, "'use_4bit' trains through LoRA: set 'lora_r' > 0 (QLoRA)")
        return cls(
            cfg.model_name, PROVIDERS[cfg.provider], cfg.use_4bit, cfg.bf16, cfg.num_threads, cfg.gradient_checkpointing,
            cfg.attn_implementation, cfg.use_liger_kernel, cfg.disable_dropout, cfg.router_aux_loss_coef,
        )


@dataclass(frozen=True)
class LoraSettings:
    lora_r: int
    lora_alpha: float
    lora_dropout: float | None  # None: 0.05, or 0 on weights where peft allows no dropout
    lora_target_modules: str | tuple[str, ...]
    merge_lora: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "LoraSettings | None":
        _check(cfg.lora_r is None or cfg.lora_r >= 0, where, f"'lora_r' must be >= 0 (0 or null: full fine-tune), got {cfg.lora_r}")
        _check(cfg.lora_alpha > 0, where, "'lora_alpha' must be > 0")
        _check(
            cfg.lora_dropout is None or 0.0 <= cfg.lora_dropout < 1.0, where,
            f"'lora_dropout' must be in [0, 1) or null, got {cfg.lora_dropout}",
        )
        targets = cfg.lora_target_modules
        if isinstance(targets, list):
            _check(all(isinstance(m, str) for m in targets), where, "'lora_target_modules' must be a string or a list of strings")
            targets = tuple(targets)
        if not cfg.lora_r:
            return None
        return cls(int(cfg.lora_r), cfg.lora_alpha, cfg.lora_dropout, targets, cfg.merge_lora)


@dataclass(frozen=True)
class DataSettings:
    dataset: str | None
    dataset_split: str
    eval_dataset: str | None
    eval_split: float
    eval_dataset_split: str
    layout: RecordLayout  # `columns` and `system_prompt`
    chat_template_kwargs: dict | None
    fold_system_message: bool
    dataset_num_proc: int | None
    max_seq_length: int
    max_prompt_length: int | None  # None: half of max_seq_length (batching.effective_prompt_length)
    share_prompt: bool
    max_train_samples: int | float | None  # a count or a fraction of the training data (prepared.subset_rows)

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "DataSettings":
        _check(cfg.max_seq_length >= 2, where, f"'max_seq_length' must be >= 2, got {cfg.max_seq_length}")
        _check(
            cfg.max_prompt_length is None or cfg.max_prompt_length >= 1, where,
            f"'max_prompt_length' must be >= 1 or null, got {cfg.max_prompt_length}",
        )
        _check(
            cfg.eval_split == 0 or 0 < cfg.eval_split < 1 or (cfg.eval_split >= 1 and float(cfg.eval_split).is_integer()),
            where, f"'eval_split' must be 0, a fraction in (0, 1) or a whole count, got {cfg.eval_split}",
        )
        try:
            layout = RecordLayout.make(cfg.columns, cfg.system_prompt)
        except PreftuneError as exc:
            raise PreftuneError(f"{where}: {exc}") from None
        _check(cfg.dataset_num_proc is None or cfg.dataset_num_proc >= 1, where, "'dataset_num_proc' must be >= 1 or null")
        n = cfg.max_train_samples  # whether a count fits the data is known once it is read
        if isinstance(n, int):
            _check(n >= 1, where, f"'max_train_samples' must be a count >= 1 or a fraction in (0, 1], got {n}")
        elif n is not None:
            _check(0 < n <= 1, where, f"'max_train_samples' must be a count >= 1 (a whole number) or a fraction in (0, 1], got {n:g}")
        if cfg.chat_template_kwargs is not None:
            _check(all(isinstance(k, str) for k in cfg.chat_template_kwargs), where, "'chat_template_kwargs' keys must be strings")
        return cls(
            cfg.dataset, cfg.dataset_split, cfg.eval_dataset, cfg.eval_split, cfg.eval_dataset_split, layout,
            cfg.chat_template_kwargs, cfg.fold_system_message, cfg.dataset_num_proc, cfg.max_seq_length,
            cfg.max_prompt_length, cfg.share_prompt, cfg.max_train_samples,
        )


@dataclass(frozen=True)
class OptimSettings:
    num_train_epochs: float
    max_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int  # resolved: the train batch size when not set
    gradient_accumulation_steps: int
    learning_rate: float
    lr_scheduler_type: str
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    seed: int

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "OptimSettings":
        _one_of(where, "lr_scheduler_type", cfg.lr_scheduler_type, SCHEDULERS)
        _check(cfg.num_train_epochs > 0, where, f"'num_train_epochs' must be > 0, got {cfg.num_train_epochs}")
        _check(cfg.per_device_train_batch_size >= 1, where, "'per_device_train_batch_size' must be >= 1")
        _check(
            cfg.per_device_eval_batch_size is None or cfg.per_device_eval_batch_size >= 1, where,
            "'per_device_eval_batch_size' must be >= 1",
        )
        _check(cfg.gradient_accumulation_steps >= 1, where, "'gradient_accumulation_steps' must be >= 1")
        _check(
            cfg.learning_rate > 0 and math.isfinite(cfg.learning_rate), where, f"'learning_rate' must be > 0, got {cfg.learning_rate}"
        )
        _check(0.0 <= cfg.warmup_ratio <= 1.0, where, f"'warmup_ratio' must be in [0, 1], got {cfg.warmup_ratio}")
        _check(cfg.weight_decay >= 0, where, "'weight_decay' must be >= 0")
        _check(cfg.max_grad_norm >= 0, where, "'max_grad_norm' must be >= 0 (0 turns clipping off)")
        return cls(
            cfg.num_train_epochs, cfg.max_steps, cfg.per_device_train_batch_size,
            cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
            cfg.learning_rate, cfg.lr_scheduler_type, cfg.warmup_ratio, cfg.weight_decay, cfg.max_grad_norm,
            cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.seed,
        )


@dataclass(frozen=True)
class ReferenceSettings:
    reference: str  # resolved: none (reference-free), precomputed (for auto), copy or adapter
    ref_model_name: str | None
    cache_dir: str | None

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "ReferenceSettings":
        _one_of(where, "reference", cfg.reference, REFERENCES)
        _check(
            cfg.ref_model_name is None or cfg.reference in ("auto", "copy", "precomputed"), where,
            "'ref_model_name' needs 'reference' auto, copy or precomputed (the disabled adapter is the base model itself)",
        )
        _check(
            cfg.reference != "adapter" or cfg.use_lora, where,
            "'reference: adapter' needs LoRA ('lora_r' > 0); use 'copy' or 'precomputed' for a full fine-tune",
        )
        # The reference is frozen and offline data fixed, so by default its log-probs are computed
        # once (and cached): no reference forward per step, no second model in memory.
        kind = "none" if cfg.strategy in REFERENCE_FREE else ("precomputed" if cfg.reference == "auto" else cfg.reference)
        return cls(kind, cfg.ref_model_name, cfg.cache_dir)


@dataclass(frozen=True)
class RunSettings:
    output_dir: str
    task: str | None
    logging_steps: int
    eval_steps: int | None
    save_steps: int
    save_total_limit: int | None
    resume_from_checkpoint: str | None
    overwrite_output_dir: bool
    max_nonfinite_steps: int
    report_to: tuple[str, ...]  # tracker names; () for none
    run_name: str | None
    tracker_project: str
    tracker_init_kwargs: dict | None
    progress_bar: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "RunSettings":
        names = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
        _check(bool(names) and all(isinstance(n, str) for n in names), where, "'report_to' must be a tracker name or a list of them")
        for name in names:
            _one_of(where, "report_to", name, REPORT_TO)
        _check(len(set(names)) == len(names), where, f"'report_to' names a tracker twice: {names}")
        _check("none" not in names or len(names) == 1, where, "'report_to': none cannot be combined with trackers")
        for name, kwargs in (cfg.tracker_init_kwargs or {}).items():
            _one_of(where, "tracker_init_kwargs", name, TRACKERS)
            _check(isinstance(kwargs, dict), where, f"'tracker_init_kwargs' of {name} must be a mapping of keyword arguments")
        _check(cfg.logging_steps >= 1, where, "'logging_steps' must be >= 1")
        _check(cfg.save_steps >= 1, where, "'save_steps' must be >= 1")
        _check(cfg.max_nonfinite_steps >= 1, where, "'max_nonfinite_steps' must be >= 1")
        _check(cfg.eval_steps is None or cfg.eval_steps >= 1, where, "'eval_steps' must be >= 1 or null")
        _check(cfg.save_total_limit is None or cfg.save_total_limit >= 1, where, "'save_total_limit' must be >= 1 or null")
        return cls(
            cfg.output_dir, cfg.task, cfg.logging_steps, cfg.eval_steps, cfg.save_steps, cfg.save_total_limit,
            cfg.resume_from_checkpoint, cfg.overwrite_output_dir, cfg.max_nonfinite_steps,
            tuple(n for n in names if n != "none"), cfg.run_name, cfg.tracker_project, cfg.tracker_init_kwargs, cfg.progress_bar,
        )


def sharding_plan(cfg: "TrainConfig", where: str) -> ShardingPlan | None:
    if cfg.fsdp is None and cfg.fsdp_config is None:
        return None
    _check(cfg.fsdp is not None, where, "'fsdp_config' needs 'fsdp': full_shard or shard_grad_op")
    return ShardingPlan.from_config(cfg.fsdp, cfg.fsdp_config, where)


# ---------------------------------------------------------------------------------------------
# Each strategy's own section. `keys` are the keys it reads; `also` the keys of the shared
# sections that only some strategies use. A key of another strategy's section, set to anything but
# its default, is refused naming the strategies it applies to.

# A causal LM's keys: a reward model is a sequence classifier scoring whole conversations.
CAUSAL_LM_KEYS = ("max_prompt_length", "router_aux_loss_coef", "use_liger_kernel", "use_4bit")
REFERENCE_KEYS = ("reference", "ref_model_name")
PAIR_KEYS = ("share_prompt",)  # one prompt, two completions: the prompt encoded once


@dataclass(frozen=True)
class DPOLoss:
    """DPO and its family of `loss_type`s against a reference (losses.preference_loss)."""

    keys: ClassVar[tuple[str, ...]] = (
        "beta", "loss_type", "loss_weights", "rpo_alpha", "label_smoothing", "f_divergence_type", "f_alpha",
        "discopop_tau", "use_weighting", "margin_weighting",
    )
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS + REFERENCE_KEYS + PAIR_KEYS
    beta: float
    loss_type: tuple[str, ...]  # with TRL's `rpo_alpha` folded in as an `sft` term
    loss_weights: tuple[float, ...]
    label_smoothing: float
    f_divergence_type: str
    f_alpha: float
    discopop_tau: float
    use_weighting: bool
    margin_weighting: bool

    @property
    def sorts_batch(self) -> bool:
        return any(t in BATCH_SORTING_LOSSES for t in self.loss_type)

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "DPOLoss":
        _check(cfg.beta > 0, where, f"'beta' must be > 0, got {cfg.beta}")
        _check(0.0 <= cfg.label_smoothing < 0.5, where, f"'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}")
        _one_of(where, "f_divergence_type", cfg.f_divergence_type, F_DIVERGENCES)
        _check(cfg.f_alpha > 0, where, "'f_alpha' must be > 0")
        if isinstance(cfg.loss_type, list):
            _check(all(isinstance(t, str) for t in cfg.loss_type), where, "'loss_type' must be a string or a list of strings")
        if cfg.loss_weights is not None:
            _check(
                all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in cfg.loss_weights), where,
                "'loss_weights' must be a list of numbers",
            )
        try:
            types_, weights = validate_loss_types(*cfg.loss_mix())
        except PreftuneError as exc:
            raise PreftuneError(f"{where}: {exc}") from None
        sorts = any(t in BATCH_SORTING_LOSSES for t in types_)
        _check(
            not (cfg.use_weighting and sorts), where,
            "'use_weighting' cannot weigh the aot losses: they sort log-ratios across the batch, not per pair",
        )
        _check(
            not (cfg.margin_weighting and sorts), where,
            "'margin_weighting' cannot weigh the aot losses: they sort log-ratios across the batch, not per pair",
        )
        return cls(cfg.beta, tuple(types_), tuple(weights), cfg.label_smoothing, cfg.f_divergence_type, cfg.f_alpha,
                   cfg.discopop_tau, cfg.use_weighting, cfg.margin_weighting)


def _pair_beta(cfg: "TrainConfig", where: str) -> None:
    _check(cfg.beta > 0, where, f"'beta' must be > 0, got {cfg.beta}")


def _cpo_alpha(cfg: "TrainConfig", where: str, default: float) -> float:
    if cfg.cpo_alpha is None:
        return default
    _check(cfg.cpo_alpha >= 0 and math.isfinite(cfg.cpo_alpha), where, f"'cpo_alpha' must be >= 0, got {cfg.cpo_alpha}")
    return float(cfg.cpo_alpha)


@dataclass(frozen=True)
class ORPOLoss:
    """ORPO (Hong et al. 2024): the chosen NLL plus beta x the log odds-ratio term."""

    keys: ClassVar[tuple[str, ...]] = ("beta", "margin_weighting")
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS + PAIR_KEYS
    beta: float
    margin_weighting: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "ORPOLoss":
        _pair_beta(cfg, where)
        return cls(cfg.beta, cfg.margin_weighting)


@dataclass(frozen=True)
class SimPOLoss:
    """SimPO (Meng et al. 2024): length-normalised rewards with a target margin gamma."""

    keys: ClassVar[tuple[str, ...]] = ("beta", "simpo_gamma", "label_smoothing", "cpo_alpha", "margin_weighting")
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS + PAIR_KEYS
    beta: float
    simpo_gamma: float
    label_smoothing: float
    cpo_alpha: float  # weight of the chosen NLL; 0 by default (SimPO has none)
    margin_weighting: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "SimPOLoss":
        _pair_beta(cfg, where)
        _check(cfg.simpo_gamma >= 0 and math.isfinite(cfg.simpo_gamma), where, f"'simpo_gamma' must be >= 0, got {cfg.simpo_gamma}")
        _check(0.0 <= cfg.label_smoothing < 0.5, where, f"'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}")
        return cls(cfg.beta, cfg.simpo_gamma, cfg.label_smoothing, _cpo_alpha(cfg, where, 0.0), cfg.margin_weighting)


@dataclass(frozen=True)
class CPOLoss:
    """CPO (Xu et al. 2024): DPO's sigmoid loss on the policy alone, plus the chosen NLL."""

    keys: ClassVar[tuple[str, ...]] = ("beta", "label_smoothing", "cpo_alpha", "margin_weighting")
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS + PAIR_KEYS
    beta: float
    label_smoothing: float
    cpo_alpha: float  # weight of the chosen NLL; 1 by default
    margin_weighting: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "CPOLoss":
        _pair_beta(cfg, where)
        _check(0.0 <= cfg.label_smoothing < 0.5, where, f"'label_smoothing' must be in [0, 0.5), got {cfg.label_smoothing}")
        return cls(cfg.beta, cfg.label_smoothing, _cpo_alpha(cfg, where, 1.0), cfg.margin_weighting)


@dataclass(frozen=True)
class KTOLoss:
    """KTO (Ethayarajh et al. 2024) on unpaired examples."""

    keys: ClassVar[tuple[str, ...]] = ("beta", "desirable_weight", "undesirable_weight")
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS + REFERENCE_KEYS
    beta: float
    desirable_weight: float
    undesirable_weight: float

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "KTOLoss":
        _pair_beta(cfg, where)
        _check(
            cfg.desirable_weight > 0 and cfg.undesirable_weight > 0, where,
            "'desirable_weight' and 'undesirable_weight' must be > 0",
        )
        return cls(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)


@dataclass(frozen=True)
class SFTLoss:
    """Supervised fine-tuning: the NLL of the trained tokens."""

    keys: ClassVar[tuple[str, ...]] = ("completion_only_loss", "packing")
    also: ClassVar[tuple[str, ...]] = CAUSAL_LM_KEYS
    completion_only_loss: bool
    packing: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "SFTLoss":
        return cls(cfg.completion_only_loss, cfg.packing)


@dataclass(frozen=True)
class RewardLoss:
    """A Bradley-Terry reward model: a sequence classifier loaded with transformers."""

    keys: ClassVar[tuple[str, ...]] = ("margin_weighting",)
    also: ClassVar[tuple[str, ...]] = ()
    margin_weighting: bool

    @classmethod
    def of(cls, cfg: "TrainConfig", where: str) -> "RewardLoss":
        _check(
            PROVIDERS[cfg.provider] == "transformers", where,
            f"strategy 'reward' loads its model with transformers; 'provider: {cfg.provider}' loads causal LMs only",
        )
        return cls(cfg.margin_weighting)


LOSS_SECTIONS: dict[str, type] = {
    "sft": SFTLoss, "dpo": DPOLoss, "kto": KTOLoss, "orpo": ORPOLoss, "simpo": SimPOLoss, "cpo": CPOLoss, "reward": RewardLoss,
}


def strategies_taking(key: str) -> list[str]:
    """The strategies whose section reads `key` (every strategy for a key of the shared sections)."""
    return [s for s, section in LOSS_SECTIONS.items() if key in section.keys + section.also or key not in STRATEGY_KEYS]


def _said(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


# Refusals older than the general rule keep their words.
_REFUSALS = {
    "loss_type": "'loss_type', 'loss_weights' and 'rpo_alpha' choose among DPO's losses; strategy '{s}' has its own loss",
    "loss_weights": "'loss_type', 'loss_weights' and 'rpo_alpha' choose among DPO's losses; strategy '{s}' has its own loss",
    "rpo_alpha": "'loss_type', 'loss_weights' and 'rpo_alpha' choose among DPO's losses; strategy '{s}' has its own loss",
    "reference": "strategy '{s}' uses no reference model, so 'reference' and 'ref_model_name' do not apply",
    "ref_model_name": "strategy '{s}' uses no reference model, so 'reference' and 'ref_model_name' do not apply",
    "use_weighting": "'use_weighting' (WPO) weighs DPO's pairs; strategy is '{s}'",
    "margin_weighting": "'margin_weighting' weighs preference pairs; strategy '{s}' has none (it applies to strategies {where})",
}


def ignored_keys(cfg: "TrainConfig", where: str = "config") -> list[str]:
    """One line per key set away from its default that the chosen strategy would not read."""
    takes = LOSS_SECTIONS[cfg.strategy].keys + LOSS_SECTIONS[cfg.strategy].also
    lines: list[str] = []
    for key in STRATEGY_KEYS:
        if key in takes or getattr(cfg, key) == _DEFAULTS[key]:
            continue
        applies = strategies_taking(key)
        text = _REFUSALS.get(key, "'{key}' applies to strategies {where}, not '{s}'")
        if len(applies) == 1:
            text = text.replace("strategies {where}", "strategy {where}")
        line = f"{where}: " + text.format(key=key, s=cfg.strategy, where=_said(applies))
        if line not in lines:
            lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# Settings: the typed sections of one run


@dataclass(frozen=True)
class Settings:
    """What a run reads, section by section; built by `resolve`, never by hand."""

    strategy: str
    model: ModelSettings
    lora: LoraSettings | None  # None: a full fine-tune
    data: DataSettings
    optim: OptimSettings
    reference: ReferenceSettings
    run: RunSettings
    sharding: ShardingPlan | None
    loss: Any  # the strategy's section: DPOLoss, ORPOLoss, SimPOLoss, CPOLoss, KTOLoss, SFTLoss or RewardLoss


def resolve(cfg: "TrainConfig", where: str = "config") -> Settings:
    """The run's sections, each checked and with its defaults resolved; a key of another strategy's
    section is refused (one line each, all of them at once)."""
    _one_of(where, "strategy", cfg.strategy, STRATEGIES)
    refused = ignored_keys(cfg, where)
    if len(refused) == 1:
        raise PreftuneError(refused[0])
    if refused:
        raise Problems(refused)
    return Settings(
        strategy=cfg.strategy,
        model=ModelSettings.of(cfg, where),
        lora=LoraSettings.of(cfg, where),
        data=DataSettings.of(cfg, where),
        optim=OptimSettings.of(cfg, where),
        reference=ReferenceSettings.of(cfg, where),
        run=RunSettings.of(cfg, where),
        sharding=sharding_plan(cfg, where),
        loss=LOSS_SECTIONS[cfg.strategy].of(cfg, where),
    )


def validate(cfg: "TrainConfig", where: str = "config") -> "TrainConfig":
    """`cfg` itself once every section of it resolves (see `resolve`); it is not changed."""
    resolve(cfg, where)
    return cfg


def applicable(data: dict[str, Any], strategy: str) -> dict[str, Any]:
    """`data` without the keys `strategy` does not read: a pipeline's shared keys reach only the
    stages they apply to."""
    takes = LOSS_SECTIONS[strategy].keys + LOSS_SECTIONS[strategy].also
    return {k: v for k, v in data.items() if ALIASES.get(k, k) not in STRATEGY_KEYS or ALIASES.get(k, k) in takes}


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


# Every key some strategy's section reads (the rest belong to the shared sections), and defaults.
STRATEGY_KEYS = tuple(dict.fromkeys(k for section in LOSS_SECTIONS.values() for k in section.keys + section.also))
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
