"""The Python API: objects in, a trained model out, the same run as `preftune train`.

Notebook users hold a model object and a `datasets.Dataset`; `train` takes them as they are,
checks them as the command line checks names and files (the same `PreftuneError` messages, rows
named where files name lines), runs the one training loop (`training.recipe.run`) and hands back the
trained model. The command line calls `train` too, so the two cannot drift apart. The collection
steps (`generate`, `score`, `build_pairs`) and `evaluate` are the commands' code on in-memory
records.

Nothing the caller passes is changed except the model being trained: the config is copied, the
tokenizer is copied before a pad token is set, and a reference model gets back its modes and
gradient flags.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from preftune.config import ALIASES, PROVIDERS, REFERENCE_FREE, TrainConfig, load_config, read_config_file
from preftune.errors import PreftuneError
from preftune.modelcard import IN_MEMORY

log = logging.getLogger("preftune")

Callback = Callable[[dict[str, Any]], Any]

__all__ = ["TrainResult", "train", "evaluate", "generate", "score", "build_pairs"]


@dataclass
class TrainResult:
    """What `train` returns. `model` is the trained model in memory (a `PeftModel` under LoRA, in
    eval mode), `tokenizer` the one it was trained with (pad token set), `metrics` the last logged
    training values merged with the final evaluation's `eval_*` ones, `output_dir` the run folder
    (`final/`, `metrics.jsonl`, `config.resolved.yaml`, checkpoints).

    Example::

        result = preftune.train("dpo.yaml", model=model, tokenizer=tokenizer)
        result.metrics["eval_rewards/accuracies"], result.model.generate(...)
        pandas.DataFrame(result.history())  # every logged step
    """

    model: Any
    tokenizer: Any
    metrics: dict[str, float]
    output_dir: Path

    def history(self) -> list[dict[str, Any]]:
        """Every record of `metrics.jsonl`, in order (e.g. for `pandas.DataFrame(result.history())`)."""
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------
# train


def _resolve_config(config: Any, overrides: dict[str, Any]) -> tuple[TrainConfig, set[str]]:
    """A validated copy of `config` (dict, JSON/YAML path or TrainConfig) with `overrides` applied,
    and the keys the caller set. All three go through `config.load_config`, so they meet the same
    checks and messages."""
    path = None
    if isinstance(config, TrainConfig):
        defaults = TrainConfig().to_dict()
        data = {k: v for k, v in config.to_dict().items() if v != defaults[k]}
    elif isinstance(config, dict):
        data = copy.deepcopy(config)
    elif isinstance(config, (str, os.PathLike)):
        path = config
        data = read_config_file(path)
    else:
        raise PreftuneError(
            f"config: expected a dict, a path to a JSON/YAML file or a preftune.TrainConfig, got {type(config).__name__}"
        )
    given = {ALIASES.get(str(k), str(k)) for k in [*data, *overrides]}
    return load_config(path, [f"{k}={json.dumps(v)}" for k, v in overrides.items()], data=data), given


def _check_model(model: Any, cfg: TrainConfig, what: str) -> None:
    """A model object stands in for a loaded one: the settings that only shape loading cannot apply."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    if not isinstance(model, (PreTrainedModel, PeftModel)):
        key = "model_name" if what == "model" else "ref_model_name"
        raise PreftuneError(
            f"{what}: expected a transformers PreTrainedModel or a peft PeftModel, got {type(model).__name__} "
            f"(a name or folder goes in the config's '{key}')"
        )
    if what == "ref_model":
        return
    if not isinstance(model, PeftModel) and hasattr(model, "peft_config"):
        raise PreftuneError(
            "model: it holds LoRA layers injected by an earlier run; pass that run's result.model (the PeftModel around it)"
        )
    for key, value, why in (
        ("use_4bit", cfg.use_4bit, "load the model in 4-bit yourself and set use_4bit: false"),
        ("provider", PROVIDERS[cfg.provider] != "transformers", "pass a model loaded by that provider and leave provider unset"),
        ("use_liger_kernel", cfg.use_liger_kernel is True, "apply the kernels yourself before passing the model"),
        ("attn_implementation", cfg.attn_implementation is not None, "load the model with it"),
    ):
        if value:
            raise PreftuneError(f"config: '{key}' applies when preftune loads the model; with model= {why}")
    classifier = type(getattr(model, "get_base_model", lambda: model)()).__name__.endswith("ForSequenceClassification")
    if cfg.strategy == "reward" and not classifier:
        raise PreftuneError(
            f"model: strategy 'reward' trains a sequence classifier with one output "
            f"(AutoModelForSequenceClassification, num_labels=1), got {type(model).__name__}"
        )
    if cfg.strategy != "reward" and classifier:
        raise PreftuneError(f"model: strategy '{cfg.strategy}' trains a causal LM, got the classifier {type(model).__name__}")
    if cfg.strategy == "reward" and getattr(model.config, "num_labels", 1) != 1:
        raise PreftuneError(f"model: a reward model has one output (num_labels=1), this one has {model.config.num_labels}")


def _adapter_settings(model: Any) -> dict[str, Any]:
    """The LoRA settings of a PeftModel's active adapter, as config keys: the run trains that
    adapter, so the resolved config records its settings rather than the config's."""
    adapter = model.peft_config[model.active_adapter]
    if str(getattr(adapter, "peft_type", "")).rsplit(".", 1)[-1] != "LORA":
        raise PreftuneError(f"model: the PeftModel's adapter is {adapter.peft_type}; preftune trains LoRA adapters")
    targets = adapter.target_modules
    return {
        "lora_r": int(adapter.r),
        "lora_alpha": float(adapter.lora_alpha),
        "lora_dropout": float(adapter.lora_dropout),
        "lora_target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else (targets or "all-linear"),
    }


def _model_name(model: Any) -> str:
    """Where a model object came from (`from_pretrained`'s name or folder), or '' when built in memory."""
    base = getattr(model, "get_base_model", lambda: model)()
    return str(getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "") or "")


def _prepared_tokenizer(tokenizer: Any) -> Any:
    """A copy with the padding rules of `models.load_tokenizer`: the caller's tokenizer is untouched."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PreftuneError("tokenizer: it has neither a pad nor an eos token; completions need an eos")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _describe(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return repr(str(value))
    rows = isinstance(value, (list, tuple)) or hasattr(value, "column_names") or hasattr(value, "columns")
    size = f", {len(value)} rows" if rows else ""
    return f"<{type(value).__name__}{size}>"


def _call_text(config: Any, objects: dict[str, Any], overrides: dict[str, Any]) -> str:
    """The call as a reader of the model card would write it: the config as given, the objects by type."""
    if isinstance(config, TrainConfig):
        defaults = TrainConfig().to_dict()
        head = "TrainConfig(" + ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if v != defaults[k]) + ")"
    elif isinstance(config, dict):
        head = repr(config)
    else:
        head = _describe(config)
    args = [head] + [f"{k}={_describe(v)}" for k, v in objects.items() if v is not None]
    args += [f"{k}={v!r}" for k, v in overrides.items()]
    return f"preftune.train({', '.join(args)})"


def _as_callbacks(callbacks: Any) -> list[Callback]:
    if callbacks is None:
        return []
    listed = [callbacks] if callable(callbacks) else list(callbacks)
    for i, callback in enumerate(listed):
        if not callable(callback):
            raise PreftuneError(f"callbacks[{i}]: expected a function of the metrics record, got {type(callback).__name__}")
    return listed


def train(
    config: TrainConfig | dict[str, Any] | str | os.PathLike[str],
    *,
    model: Any = None,
    ref_model: Any = None,
    tokenizer: Any = None,
    train_dataset: Any = None,
    eval_dataset: Any = None,
    callbacks: Callback | Iterable[Callback] | None = None,
    origin: str | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train as `preftune train` does, from a config and, optionally, objects already in memory.

    - `config`: a dict, a JSON/YAML path or a `TrainConfig`, checked like the CLI's; keyword
      `overrides` replace keys (`beta=0.2`), as `--set` does.
    - `model`: a `PreTrainedModel` or a `PeftModel` (its adapter is trained, with its own LoRA
      settings); it is trained in place (under LoRA, adapters are injected into it), on the run's
      device, in the dtype it has (`bf16` adds autocast, as for a loaded model). `model_name`
      may then be left out (the model's own `name_or_path` is recorded); given, it is the name the
      resolved config and the model card record. `tokenizer`: used instead of loading
      `model_name`'s (a copy is taken). `ref_model`: the reference (`reference: copy` keeps it
      in memory; `auto` or `precomputed` scores the data with it once).
    - `train_dataset` / `eval_dataset`: a `datasets.Dataset` (or `DatasetDict`), a list of dicts
      or a pandas DataFrame in any record shape the files take, instead of `dataset` /
      `eval_dataset`; errors name `train_dataset row N` (0-based, as `train_dataset[N]`).
    - `callbacks`: functions called with each record as it is written to `metrics.jsonl`. One that
      returns `False` stops training after that step: the run then ends as at `max_steps` (final
      evaluation, checkpoint, `final/`). An exception raised in a callback aborts the run and
      propagates.
    - `origin`: how the run was started, for the model card (default: this call).

    Example::

        import datasets, preftune
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained("my-sft-model")
        tokenizer = AutoTokenizer.from_pretrained("my-sft-model")
        pairs = datasets.Dataset.from_list([{"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}] * 16)
        result = preftune.train({"strategy": "dpo", "lora_r": 8, "max_steps": 4, "output_dir": "runs/nb"},
                                model=model, tokenizer=tokenizer, train_dataset=pairs)
        result.metrics["loss"], result.model  # a PeftModel
    """
    from preftune.training.recipe import run

    cfg, given = _resolve_config(config, overrides)
    hooks = _as_callbacks(callbacks)
    cfg, prepared = _take_model(model, tokenizer, cfg, given)
    _check_reference(ref_model, cfg)
    train_data, eval_data = _take_data(train_dataset, eval_dataset, cfg)
    if origin is None:
        objects = {"model": model, "ref_model": ref_model, "tokenizer": tokenizer,
                   "train_dataset": train_dataset, "eval_dataset": eval_dataset}
        origin = _call_text(config, objects, overrides)

    saved = _frozen_state(ref_model)
    try:
        trainer, metrics = run(
            cfg, model=model, ref_model=ref_model, tokenizer=prepared, train_data=train_data,
            eval_data=eval_data, callbacks=hooks, origin=origin,
        )
    finally:
        _restore(ref_model, saved)
    trained = trainer.inner.model.eval()
    return TrainResult(model=trained, tokenizer=trainer.tokenizer, metrics=metrics, output_dir=Path(cfg.output_dir))


def _take_model(model: Any, tokenizer: Any, cfg: TrainConfig, given: set[str]) -> tuple[TrainConfig, Any]:
    """The config as the model object makes it (its name, a PeftModel's LoRA settings) and the
    tokenizer to train with (a prepared copy; None: the trainer loads `model_name`'s)."""
    if model is None:
        return cfg, _prepared_tokenizer(tokenizer) if tokenizer is not None else None
    _check_model(model, cfg, "model")
    changes: dict[str, Any] = _adapter_settings(model) if hasattr(model, "peft_config") else {}
    name = _model_name(model)
    if "model_name" not in given:  # the name the resolved config and the card record
        changes["model_name"] = name or IN_MEMORY
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in changes.items()], data=cfg.to_dict())
    if tokenizer is not None:
        prepared = _prepared_tokenizer(tokenizer)
    elif name or "model_name" in given:
        prepared = _tokenizer_of(name or cfg.model_name)  # the model's own, where it came from a folder
    else:
        raise PreftuneError("tokenizer: pass tokenizer= with a model built in memory (it names no folder to load one from)")
    if cfg.strategy == "reward":
        # The head pools the last token that is not padding (as models.load_reward_model sets it).
        model.config.pad_token_id = prepared.pad_token_id
    return cfg, prepared


def _check_reference(ref_model: Any, cfg: TrainConfig) -> None:
    """A reference object is refused where the config's reference settings could not use it."""
    if ref_model is None:
        return
    _check_model(ref_model, cfg, "ref_model")
    if cfg.strategy in REFERENCE_FREE:
        raise PreftuneError(f"ref_model: strategy '{cfg.strategy}' uses no reference model")
    if cfg.reference == "adapter":
        raise PreftuneError("ref_model: 'reference: adapter' uses the base model itself; use copy, precomputed or auto")
    if cfg.ref_model_name:
        raise PreftuneError("ref_model: give the reference as ref_model= or as 'ref_model_name', not both")


def _take_data(train_dataset: Any, eval_dataset: Any, cfg: TrainConfig) -> tuple[Any, Any]:
    """In-memory records for the readers (`data.in_memory_records`), one source per split."""
    from preftune.data import in_memory_records

    for obj, key, name in ((train_dataset, "dataset", "train_dataset"), (eval_dataset, "eval_dataset", "eval_dataset")):
        if obj is not None and getattr(cfg, key):
            raise PreftuneError(f"{name}: the config names '{key}' {getattr(cfg, key)!r} too; give one of them")
    train_data = in_memory_records(train_dataset, "train_dataset", cfg.dataset_split) if train_dataset is not None else None
    eval_data = in_memory_records(eval_dataset, "eval_dataset", "test") if eval_dataset is not None else None
    return train_data, eval_data


def _tokenizer_of(name: str) -> Any:
    from preftune.models import load_tokenizer

    return load_tokenizer(name)


def _frozen_state(model: Any) -> Any:
    """A reference's mode and gradient flags: freezing it for the run must not outlive the run."""
    if model is None:
        return None
    return model.training, [(p, p.requires_grad) for p in model.parameters()]


def _restore(model: Any, saved: Any) -> None:
    if model is None:
        return
    training, flags = saved
    model.train(training)
    for parameter, flag in flags:
        parameter.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# evaluate


def evaluate(
    model: str | os.PathLike[str] | TrainResult,
    *,
    ref: str | None = None,
    baseline: str | None = None,
    pairs: Any = None,
    prompts: Any = None,
    reward: Any = None,
    num_samples: int = 4,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    max_prompts: int | None = None,
    seed: int = 0,
    beta: float | None = None,
    batch_size: int = 16,
    confidence: float = 0.95,
    judge_prompt: str | os.PathLike[str] | None = None,
    bootstrap: int = 2000,
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
    chat_template_kwargs: dict | None = None,
    columns: dict | None = None,
    by: str | None = None,
) -> dict[str, Any]:
    """What `preftune eval` computes, as the dict it writes to `eval.json` (written too, into the run
    folder or `output`). Arguments are the command's flags; `model` is a run folder, a LoRA adapter
    folder, a model name (then `ref` is needed) or a `TrainResult`. `pairs` and `prompts` are files
    or in-memory records (Dataset, list of dicts, DataFrame; prompts may be plain strings);
    `reward` a name (`sentiment`, `length`, a reward-model folder, `module:function`) or a
    function `(prompts, completions) -> scores`; `judge:MODEL` (`judge:self`: the evaluated model)
    gives a judged win rate against the baseline instead of rewards, `judge_prompt` its prompt file.
    `chat_template_kwargs` and `columns` default to the run's own (a run folder's config). `by`
    names a record field: every measure is also given per value of it, in the result's `by` section.

    Example::

        result = preftune.train("dpo.yaml")
        report = preftune.evaluate(result, pairs="test.jsonl", prompts=["The movie was"], reward="sentiment")
        report["pairs"]["accuracy"]["mean"], report["samples"]["kl_per_token"]["mean"]
    """
    from preftune.eval.evaluation import EvalSettings, run_eval

    target = str(model.output_dir) if isinstance(model, TrainResult) else str(model)
    settings = EvalSettings(
        model=target,
        ref=ref,
        baseline=baseline,
        pairs=_source(pairs, "pairs"),
        prompts=_prompt_source(prompts),
        reward=reward,
        judge_prompt=str(judge_prompt) if judge_prompt is not None else None,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        max_prompts=max_prompts,
        seed=seed,
        beta=beta,
        batch_size=batch_size,
        level=confidence,
        resamples=bootstrap,
        output=str(output) if output is not None else None,
        progress=progress,
        chat_template_kwargs=chat_template_kwargs,
        columns=columns,
        by=by,
    )
    return run_eval(settings)


def _source(data: Any, name: str) -> Any:
    """A file path as it is; anything else as in-memory records named `name`."""
    from preftune.data import in_memory_records

    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else str(data)
    return in_memory_records(data, name, "test")


def _prompt_source(prompts: Any) -> Any:
    """Prompts as `generation.load_prompts` reads them; a list of plain strings becomes records."""
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, (str, list)) and not isinstance(p, dict) for p in prompts):
        prompts = [{"prompt": p} for p in prompts]
    return _source(prompts, "prompts")


# ---------------------------------------------------------------------------------------------
# collection: generate, score, pairs


def generate(
    model: Any,
    prompts: Any,
    *,
    tokenizer: Any = None,
    num_samples: int = 4,
    temperature: float | Sequence[float] = 0.7,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 8,
    chat: bool | None = None,
    progress: bool = True,
    chat_template_kwargs: dict | None = None,
) -> list[dict[str, Any]]:
    """Sample completions as `preftune generate` does, returning the records it writes (one per
    prompt: `index`, `prompt`, `completions`, `lengths`, `stopped`, `sampling`, the prompt's other
    fields). `model` is a name or folder (as the command's `--model`) or a loaded model with its
    `tokenizer`; `prompts` are strings, records with a `prompt` field (text or messages), a
    Dataset or a DataFrame. Sample j of prompt i is seeded from (seed, i, j): the same call gives
    the same samples. `chat=None` sends string prompts as a user message when the tokenizer has a
    chat template; `chat_template_kwargs` reach its rendering (e.g. `{"enable_thinking": False}`).
    Several temperatures (`temperature=[0.7, 1.0]`) give `num_samples` at each, and each record a
    `temperatures` list, one per completion.

    Example::

        samples = preftune.generate("smollm2-135m-instruct", ["Write a movie review:"], num_samples=4)
        samples[0]["completions"]
    """
    from preftune.collect.generation import SamplingSettings, chat_prompts, iter_sample_records, load_generation_model, load_prompts
    from preftune.reference import eval_mode

    temperatures = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if not temperatures:
        raise PreftuneError("temperature: give at least one value")
    settings = SamplingSettings(num_samples, temperatures[0], top_p, max_new_tokens, seed).check()
    records = load_prompts(_prompt_source(prompts))
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        model, loaded = load_generation_model(name)
        tokenizer = _prepared_tokenizer(tokenizer) if tokenizer is not None else loaded
    else:
        _check_generation_model(model)
        name = _model_name(model) or type(model).__name__
        if tokenizer is None:
            if not _model_name(model):
                raise PreftuneError("tokenizer: pass tokenizer= with a model built in memory")
            tokenizer = _tokenizer_of(name)
        else:
            tokenizer = _prepared_tokenizer(tokenizer)
    if chat_template_kwargs is not None:
        from preftune import chat as chat_rendering

        chat_rendering.configure(tokenizer, chat_template_kwargs)
    records = chat_prompts(records, tokenizer, chat)
    with eval_mode(model):
        batches = iter_sample_records(
            model, tokenizer, records, settings, model_name=name, batch_size=batch_size, progress=progress,
            temperatures=temperatures,
        )
        return [record for batch in batches for record in batch]


def _check_generation_model(model: Any) -> None:
    if not hasattr(model, "generate"):
        raise PreftuneError(f"model: expected a name, a folder or a loaded causal LM, got {type(model).__name__}")


def score(records: Any, reward: Any, *, batch_size: int = 64, progress: bool = True) -> list[dict[str, Any]]:
    """Score samples records as `preftune score` does: each gets `scores` (one per completion) and
    `reward` (its name). `records` are what `generate` returns (or a Dataset/DataFrame of them);
    `reward` a name (`sentiment`, `length`, a reward-model folder, `module:function`, `judge:MODEL`)
    or a function `(prompts, completions) -> list of floats`.

    Example::

        scored = preftune.score(samples, "sentiment")
        scored = preftune.score(samples, lambda prompts, completions: [len(c) for c in completions])
    """
    from preftune.collect.generation import read_samples
    from preftune.collect.rewards import as_reward, score_records

    checked = [record for _, record in read_samples(_source(records, "records"))]
    return score_records(as_reward(reward), checked, batch_size=batch_size, progress=progress)


def build_pairs(
    records: Any, *, strategy: str = "best-worst", min_margin: float = 0.0, seed: int = 0
) -> list[dict[str, Any]]:
    """Preference pairs from scored samples as `preftune pairs` builds them (`prompt`, `chosen`,
    `rejected`, `chosen_score`, `rejected_score`, the record's other fields); `strategy` is
    `best-worst`, `all-pairs` or `random`. The result is a list `train(train_dataset=...)` takes.

    Example::

        pairs = preftune.build_pairs(preftune.score(preftune.generate(model, prompts, tokenizer=tok), "sentiment"))
        preftune.train({"lora_r": 8, "max_steps": 8}, model=model, tokenizer=tok, train_dataset=pairs)
    """
    from preftune.data import load_records
    from preftune.collect.pairs import build_pairs as pair_up

    source = _source(records, "records")
    pairs, stats = pair_up(load_records(source), strategy, min_margin, seed)
    if not pairs:
        raise PreftuneError(f"{source}: no pairs: {stats.summary()}")
    log.info("%s", stats.summary())
    return pairs
