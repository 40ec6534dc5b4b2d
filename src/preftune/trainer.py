"""The training loop: explicit, one screen per concern, on top of `accelerate`.

Why not `transformers.Trainer`: batching and the log-prob computation are where preference
training spends its time and memory, and both are ours (see `batching.py`, `logprobs.py`). The loop
below reads top to bottom: plan the step's examples, forward and backward each micro-batch, clip,
step, schedule, log, evaluate, checkpoint. What differs between strategies (SFT, DPO, KTO, ORPO,
SimPO, CPO, reward models: data, batches, loss, metrics) is the strategy's objective
(`objectives.py`); the loop is the same for all. `accelerate` supplies devices, mixed precision and
the distributed wrappers; nothing here is a home-made distributed layer.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from preftune import chat, checkpoint, modelcard, models, tracking
from preftune.batching import effective_prompt_length
from preftune.config import TrainConfig, to_yaml
from preftune.errors import Interrupted, PreftuneError, Problems
from preftune.io import replace_dir, write_atomic
from preftune.logprobs import CompletionLogprobs, RouterAux, check_paths, router_aux
from preftune import sharding
from preftune.objectives import Runtime, make_objective, padded
from preftune.prepared import Chain, PreparedData, prepare, split_rows, subset_rows, take_train_samples
from preftune.reference import (
    AdapterReference,
    ModelReference,
    PrecomputedReference,
    cache_path,
    precompute,
)

log = logging.getLogger("preftune")



# ---------------------------------------------------------------------------------------------
# Pure helpers: schedule, data plan, the CPU's bf16


def native_cpu_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU computes bfloat16 natively (x86's AVX512-BF16 or AMX, Arm's BF16), from its
    flags; None where the kernel does not say (not Linux). Without it bf16 ops are emulated, about
    10x slower than fp32."""
    try:
        text = Path(cpuinfo).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")) and ":" in line:
            flags.update(line.split(":", 1)[1].split())
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup reaches the peak on the last warmup step (never a wasted zero-lr first step),
    then `linear` decays towards 0 at `total_steps`, `cosine` follows half a cosine, `constant` holds.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(kind)


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so a resumed run
    finds its place from the step number alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def step_examples(num_examples: int, global_batch: int, seed: int, step: int) -> tuple[list[int], int]:
    """(dataset positions used by optimizer step `step` (0-based), its epoch). The last step of an
    epoch may be smaller; gradients are normalised by its true size."""
    steps_per_epoch = math.ceil(num_examples / global_batch)
    epoch, position = divmod(step, steps_per_epoch)
    order = epoch_order(num_examples, seed, epoch)  # cached: every step of an epoch shares it (never mutated)
    return order[position * global_batch : (position + 1) * global_batch], epoch


def split_for_eval(examples: Sequence[Any], eval_split: float, seed: int, what: str = "pairs") -> tuple[list[Any], list[Any]]:
    """Seeded random hold-out: a fraction in (0, 1) or a whole count; 0 means no evaluation."""
    if not eval_split:
        return list(examples), []
    n = len(examples)
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(eval_split * n))
    if n_eval >= n:
        raise PreftuneError(f"'eval_split' {eval_split:g} leaves no training {what} out of {n}")
    generator = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=generator)[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in held]
    evals = [e for i, e in enumerate(examples) if i in held]
    return train, evals


def disable_dropout(model: torch.nn.Module) -> None:
    """As TRL does by default: with dropout on, policy and reference disagree even at step 0.
    Besides `nn.Dropout` modules, many models keep a rate on the module and call the functional
    dropout with it (OPT's `dropout`, attention dropout), or skip layers at random (`layerdrop`):
    those rates go to 0 too."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if ("dropout" in name or name == "layerdrop") and isinstance(value, float) and not isinstance(value, bool):
                setattr(module, name, 0.0)


# ---------------------------------------------------------------------------------------------
# Run state


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    nonfinite_skips: int = 0  # optimizer steps skipped for a NaN/Inf loss or gradient, in all
    nonfinite_in_a_row: int = 0
    evaluated: bool = False  # this step's evaluation is already logged (resume must not repeat it)


class MetricsLog:
    """`metrics.jsonl`, one JSON object per line, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """After a resume, records past the checkpoint's step are dropped so each step appears once."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash mid-write
        write_atomic(self.path, "".join(line + "\n" for line in kept))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """A recipe: `setup()` builds everything from the config, `train()` runs the loop. What the
    strategy computes is `self.objective` (see objectives.py).

    Objects already in memory replace what the config names (`preftune.api.train` checks them):
    `model` is trained in place, `ref_model` is the reference, `train_data`/`eval_data` are
    sources for the readers (`data.in_memory_records`). `callbacks` get each logged record; one
    that returns False ends training after that step, which then finishes as at `max_steps`. The
    trainer works on its own copy of the config, so the caller's is never changed."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: Any = None,
        ref_model: Any = None,
        tokenizer: Any = None,
        train_data: Any = None,
        eval_data: Any = None,
        callbacks: Sequence[Callable[[dict[str, Any]], Any]] = (),
        origin: str | None = None,
    ) -> None:
        self.cfg = copy.deepcopy(config)
        self._model, self._ref_model, self._tokenizer = model, ref_model, tokenizer
        self._train_data, self._eval_data = train_data, eval_data
        self.callbacks = list(callbacks)
        self.origin = origin  # how the run was started, for the model card
        self.stopped_by_callback = False
        self.last_train: dict[str, Any] = {}  # the last logged records, for the model card
        self.last_eval: dict[str, Any] = {}
        self.output_dir = Path(config.output_dir)
        self._stop_signal: int | None = None
        self._context: Any = None  # the objective's per-step context (KTO's KL estimate)
        self._lock = checkpoint.OutputDirLock(self.output_dir)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything `train()` needs. The main process holds `output_dir`'s lock from here until
        `train()` returns (or setup fails), so a second run cannot write into the same folder."""
        try:
            self._setup()
        except BaseException:
            self._lock.release()
            raise

    def _setup(self) -> None:
        """The recipe, step by step; each step reads the config and sets what the next ones use."""
        cfg = self.cfg
        self.objective = make_objective(cfg)
        if not cfg.dataset and self._train_data is None:
            raise PreftuneError("config: 'dataset' is required (a JSONL/JSON/Parquet/CSV file or a datasets folder)")
        self._setup_threads()
        self._setup_precision()
        self._preflight()
        self._claim_output_dir()
        train_ex, eval_ex = self._setup_data()
        model, head, aux = self._setup_model(train_ex, eval_ex)
        pending = self._setup_reference(model, head, train_ex, eval_ex)
        policy = self._setup_policy(model, head, aux, pending)
        self._setup_optimizer(policy)
        self._setup_resume()
        self._announce()
        self.tracking = tracking.start(cfg, self.output_dir, self.is_main)

    def _setup_threads(self) -> None:
        """torch's CPU threads: `num_threads`, else torch's own choice (which follows
        OMP_NUM_THREADS). More threads than free cores (a machine shared with other work, several
        processes on one host) makes every op wait for its slowest thread."""
        cfg = self.cfg
        if cfg.num_threads is not None:
            if isinstance(cfg.num_threads, bool) or not isinstance(cfg.num_threads, int) or cfg.num_threads < 1:
                raise PreftuneError(
                    f"config: 'num_threads' must be a whole number >= 1 (null: torch's default), got {cfg.num_threads!r}"
                )
            torch.set_num_threads(cfg.num_threads)
        cfg.num_threads = torch.get_num_threads()  # config.resolved.yaml says what ran

    def _setup_precision(self) -> None:
        """bf16 or fp32, the accelerator (devices, processes) and whether the model is sharded."""
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        cfg = self.cfg
        use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
        bf16 = cfg.bf16 if cfg.bf16 is not None else (use_cuda and torch.cuda.is_bf16_supported())
        if bf16 and use_cuda and not torch.cuda.is_bf16_supported():
            raise PreftuneError("bf16: this GPU does not support bfloat16; set bf16: false")
        if bf16 and not use_cuda and native_cpu_bf16() is False:
            # Emulated bf16 would make the run ~10x slower for no memory a CPU run needs saved.
            log.warning("bf16: true, but this CPU has no native bfloat16 (no AVX512-BF16 or AMX): training in fp32, about 10x faster here")
            bf16 = False
        self.bf16 = bool(bf16)
        precision = "bf16" if self.bf16 else "no"
        from accelerate.state import AcceleratorState

        shared = AcceleratorState._shared_state
        if shared and shared.get("_mixed_precision") != precision:
            # accelerate keeps one precision per process; a later run in the same process (a
            # notebook, a pipeline stage) with another bf16 setting starts its state anew. The
            # process group and device (PartialState) are kept.
            AcceleratorState._reset_state()
        self.accelerator = acc = Accelerator(mixed_precision=precision, cpu=not use_cuda)
        self.is_main = acc.is_main_process
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            # Sharding is preftune's own step on PyTorch's FSDP2 (sharding.py), set in the config.
            raise PreftuneError(
                f"accelerate's {kind} mode is not used by preftune: launch as for DDP (accelerate launch --multi_gpu, "
                "or torchrun) and set fsdp: full_shard (or shard_grad_op) in the config to shard the model"
            )
        self.world = acc.num_processes
        self.sharded = bool(cfg.fsdp) and self.world > 1
        if self.sharded and cfg.use_lora and (cfg.merge_lora or cfg.strategy == "reward"):
            raise PreftuneError(
                "fsdp: merging LoRA into full weights (merge_lora, or a LoRA reward model) is not done under sharding; "
                "train with merge_lora: false and merge the saved adapter afterwards, or train without fsdp"
            )
        if self.sharded and cfg.use_4bit:
            raise PreftuneError("fsdp: use_4bit (QLoRA) weights are not sharded by preftune; use one of the two")
        if cfg.fsdp and self.world == 1 and acc.is_main_process:
            log.info("fsdp: %s with one process: nothing to shard, training as usual", cfg.fsdp)
        if self.bf16 and acc.device.type == "cpu" and native_cpu_bf16() is None:
            log.warning("bf16 on CPU is much slower than fp32 on most CPUs; set bf16: false for speed")
        set_seed(cfg.seed)
        cfg.bf16 = self.bf16  # self.cfg is the trainer's own copy: config.resolved.yaml says what ran

    def _preflight(self) -> None:
        """Every problem that shows before data is read or a model loaded, reported together, one
        line each: the model names (folder, config, alias package), the packages and devices the
        loading options need, and the output folder (writable, the checkpoint to resume, another
        run's files). A config with three mistakes then costs one rerun, not three."""
        cfg, device = self.cfg, self.accelerator.device
        reward = self.objective.model_kind == "reward"
        options: dict[str, Any] = dict(
            use_4bit=cfg.use_4bit, provider=cfg.provider, use_liger_kernel=cfg.use_liger_kernel, device=device
        )
        problems: list[str] = tracking.missing_packages(cfg.report_to)
        if self._model is None:
            problems += models.loading_problems(cfg.model_name, causal=not reward, **({} if reward else options))
        if cfg.ref_model_name and cfg.ref_model_name != cfg.model_name and self._ref_model is None and self.objective.needs_reference:
            problems += [p for p in models.loading_problems(cfg.ref_model_name, **options) if p not in problems]
        if cfg.attn_implementation == "flex_attention" and device.type == "cpu":
            problems.append(
                "attn_implementation: flex_attention trains only on a GPU (PyTorch runs its backward on CUDA only); "
                "use sdpa on this machine"
            )
        for check in (self._check_writable, self._check_resume_path, self._check_fresh_run):
            try:
                check()
            except PreftuneError as exc:
                problems.append(str(exc))
                if check is self._check_writable:
                    break  # the folder's state cannot be read further
        if len(problems) == 1:
            raise PreftuneError(problems[0])
        if problems:
            raise Problems(problems)

    def _check_resume_path(self) -> None:
        spec = self.cfg.resume_from_checkpoint
        if spec and spec != "latest" and not Path(spec).is_dir():
            raise PreftuneError(f"resume_from_checkpoint: {spec} does not exist")

    def _check_fresh_run(self) -> None:
        if not self.cfg.resume_from_checkpoint:
            self._check_fresh_output_dir()

    def _claim_output_dir(self) -> None:
        """Writable, locked by this run, and not another run's unless resuming."""
        self._check_writable()
        if self.is_main:
            self._lock.acquire()
        if not self.cfg.resume_from_checkpoint:
            self._check_fresh_output_dir()

    def _setup_data(self) -> tuple[Any, Any]:
        """The tokenizer, the train/eval examples (read, split, tokenized into items). Where the
        objective names its data family, each source is prepared once into a memory-mapped token
        table (`prepared.py`, cached by fingerprint) and the splits are views of row numbers."""
        cfg, objective = self.cfg, self.objective
        self.tokenizer = self._tokenizer if self._tokenizer is not None else models.load_tokenizer(cfg.model_name)
        chat.configure(self.tokenizer, cfg.chat_template_kwargs, cfg.fold_system_message)
        source = self._train_data if self._train_data is not None else cfg.dataset
        eval_source = self._eval_data if self._eval_data is not None else cfg.eval_dataset
        if objective.data_kind is None:
            examples = objective.load(source, cfg.dataset_split)
            if eval_source:
                train_ex, eval_ex = examples, objective.load(eval_source, cfg.eval_dataset_split)
            else:
                train_ex, eval_ex = split_for_eval(examples, cfg.eval_split, cfg.seed, self._unit())
        else:
            train_data = self._prepare(source, cfg.dataset_split)
            if eval_source:
                eval_data = self._prepare(eval_source, cfg.eval_dataset_split)
                train_ex = (train_data, np.arange(len(train_data)))
                eval_ex = (eval_data, np.arange(len(eval_data)))
            else:
                train_rows, eval_rows = split_rows(len(train_data), cfg.eval_split, cfg.seed, self._unit())
                train_ex, eval_ex = (train_data, train_rows), (train_data, eval_rows)
        train_ex, self.train_pool = take_train_samples(train_ex, cfg.max_train_samples, cfg.seed, self._unit())
        if cfg.max_prompt_length is not None and cfg.max_prompt_length >= cfg.max_seq_length:
            log.warning(
                "max_prompt_length %d >= max_seq_length %d: prompts are cut to %d tokens to leave room for completions",
                cfg.max_prompt_length,
                cfg.max_seq_length,
                effective_prompt_length(cfg.max_seq_length, cfg.max_prompt_length),
            )
        self._tokenize(train_ex, eval_ex)
        self.pad_id = self.tokenizer.pad_token_id
        return train_ex, eval_ex

    def _prepare(self, source: Any, split: str) -> PreparedData:
        """One source's token table, prepared by the main process first (the others then map the
        cache entry it wrote), with one line saying how long it took and where it lives."""
        cfg = self.cfg

        def prepare_here() -> PreparedData:
            return prepare(
                source, split, self.objective.data_kind, self.tokenizer, cfg.record_layout(), cache_dir=cfg.cache_dir,
                num_proc=cfg.dataset_num_proc, progress=cfg.progress_bar and self.is_main,
            )

        if self.world > 1:
            with self.accelerator.main_process_first():
                data = prepare_here()
        else:
            data = prepare_here()
        if self.is_main:
            where = data.folder if data.folder is not None else "memory"
            how = "mapped from the cache" if data.from_cache else "read, validated and tokenized"
            dropped = "".join(f"; dropped {n} {reason}{'s' if n != 1 else ''}" for reason, n in data.skipped.items())
            log.info("data: %s %s (%d records) in %.1fs: %s%s", data.name, how, len(data), data.seconds, where, dropped)
        return data

    def _setup_model(self, train_ex: Sequence[Any], eval_ex: Sequence[Any]) -> tuple[torch.nn.Module, bool | None, RouterAux | None]:
        """The model to train (given, or loaded as the strategy needs), and the fast paths proven
        on it: (model, fast head or not, MoE router loss)."""
        cfg, objective, acc = self.cfg, self.objective, self.accelerator
        self.model_dtype = torch.bfloat16 if (self.bf16 and cfg.use_lora) else torch.float32
        if self._model is not None:
            model = self._model.to(acc.device)
            if cfg.gradient_checkpointing:
                models._enable_gradient_checkpointing(model)
        elif objective.model_kind == "reward":
            if cfg.use_4bit or cfg.provider != "transformers":
                raise PreftuneError("strategy 'reward' loads its model with transformers, without use_4bit")
            model = models.load_reward_model(
                cfg.model_name,
                pad_token_id=self.pad_id,
                dtype=self.model_dtype,
                device=acc.device,
                attn_implementation=cfg.attn_implementation,
                gradient_checkpointing=cfg.gradient_checkpointing,
            )
        else:
            model = models.load_model(
                cfg.model_name,
                dtype=self.model_dtype,
                use_4bit=cfg.use_4bit,
                device=acc.device,
                attn_implementation=cfg.attn_implementation,
                gradient_checkpointing=cfg.gradient_checkpointing,
                provider=cfg.provider,
                use_liger_kernel=cfg.use_liger_kernel,
            )
            if getattr(model, "preftune_liger", False) and self.is_main:
                log.info("Liger kernels: RMSNorm, RoPE and SwiGLU")
        if cfg.disable_dropout:
            disable_dropout(model)
        if getattr(model.config, "_attn_implementation", None) == "flex_attention" and acc.device.type == "cpu":
            raise PreftuneError(
                "attn_implementation: flex_attention trains only on a GPU (PyTorch runs its backward on CUDA only); "
                "use sdpa on this machine"
            )
        # The fast paths (chunked head, several segments a row) are proven on this model and data,
        # or left for the safe ones, before anything trains; the reference model too, if separate.
        self.share_prompt = cfg.share_prompt
        head = self._prove_paths(model, "policy", train_ex, eval_ex)
        return model, head, self._router_aux(model, head)

    def _setup_reference(
        self, model: torch.nn.Module, head: bool | None, train_ex: Sequence[Any], eval_ex: Sequence[Any]
    ) -> tuple[Any, bool | None, Path] | None:
        """The reference: precomputed log-probs (cached), a frozen copy, the adapter-free policy, or
        none. Sharded, the precompute waits for the sharded policy: returned as pending."""
        cfg, acc = self.cfg, self.accelerator
        # The reference is frozen and offline data is fixed, so by default its log-probs are
        # computed once (and cached): no reference forward per step, no second model in memory.
        # Reference-free strategies load none at all.
        if not self.objective.needs_reference:
            self.reference_kind = "none"
        else:
            self.reference_kind = "precomputed" if cfg.reference == "auto" else cfg.reference
        self.reference: Any = None
        self.reference_seconds = 0.0  # wall time of the one-off reference pass, when there is one
        pending = None  # sharded: the reference pass runs once the models are sharded
        if self.reference_kind == "precomputed":
            ref_model, ref_head = self._reference_model(model, head, train_ex, eval_ex)
            cache = self._reference_cache(ref_model)
            if self.sharded:
                pending = (None if ref_model is model else ref_model, ref_head, cache)
            else:
                self.reference = self._precompute_reference(CompletionLogprobs(ref_model, fast_head=ref_head), cache)
            del ref_model
        elif self.reference_kind == "copy":
            if self._ref_model is not None or self._model is not None:
                # The reference given, or a copy of the model given as it starts.
                ref = self._ref_model if self._ref_model is not None else copy.deepcopy(model)
                ref = ref.to(acc.device)
            else:
                ref = self._load_reference_model(cfg.ref_model_name or cfg.model_name)
            ref_head = self._prove_paths(ref, "reference", train_ex, eval_ex)
            ref_module = CompletionLogprobs(ref, fast_head=ref_head)
            if self.sharded:  # sharded like the policy; it trains nothing
                self._shard(ref_module, ref)
            self.reference = ModelReference(ref_module)
        return pending

    def _setup_policy(
        self, model: torch.nn.Module, head: bool | None, aux: RouterAux | None, pending: tuple[Any, bool | None, Path] | None
    ) -> torch.nn.Module:
        """The LoRA adapter (if any), the objective's wrapper, sharding, and a pending reference pass."""
        cfg, objective = self.cfg, self.objective
        if cfg.use_lora and not hasattr(model, "peft_config"):  # a PeftModel given trains its own adapter
            model = models.apply_lora(
                model,
                r=int(cfg.lora_r),
                alpha=cfg.lora_alpha,
                dropout=cfg.lora_dropout,
                target_modules=cfg.lora_target_modules,
                task_type="SEQ_CLS" if objective.model_kind == "reward" else "CAUSAL_LM",
            )
        model.train()
        policy = objective.wrap(model)
        if isinstance(policy, CompletionLogprobs):
            policy.fast_head, policy.router_aux = head, aux
        if self.sharded:
            self._shard(policy, model)
            if pending is not None:
                ref_model, ref_head, cache = pending
                module = policy  # the policy at its start (a fresh adapter changes nothing) ...
                if ref_model is not None:  # ... or ref_model_name, sharded the same way
                    module = CompletionLogprobs(ref_model, fast_head=ref_head)
                    self._shard(module, ref_model)
                self.reference = self._precompute_reference(module, cache)
                del module, ref_model
        return policy

    def _setup_optimizer(self, policy: torch.nn.Module) -> None:
        """AdamW over the trainable parameters, the step count and the learning-rate schedule."""
        cfg, acc = self.cfg, self.accelerator
        params = [p for p in policy.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        self.num_params = sum(p.numel() for p in policy.parameters())
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            weight_decay=cfg.weight_decay,
            # One fused kernel instead of a Python loop over tensors: several times faster on CPU.
            # Sharded (DTensor) parameters take the default implementation.
            fused=(not self.sharded and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)) or None,
        )
        self.global_batch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        sorting = sorted({"aot", "aot_unpaired"} & set(cfg.loss_mix()[0])) if cfg.strategy == "dpo" else []
        if sorting and self.global_batch != cfg.per_device_train_batch_size:
            # AOT pairs the k-th smallest chosen log-ratio with the k-th smallest rejected one across
            # the batch: split into micro-batches, a step would sort each part alone.
            raise PreftuneError(
                f"loss_type {sorting[0]} sorts log-ratios across the whole batch, so a step split into micro-batches "
                "or processes would not be the same update: use gradient_accumulation_steps: 1 on one process, "
                "or another loss_type"
            )
        self.steps_per_epoch = math.ceil(len(self.train_items) / self.global_batch)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        self.warmup_steps = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, cfg.lr_scheduler_type)
        )
        if self.sharded:  # FSDP2 synchronises gradients itself: no DDP wrapper
            self.policy, self.optimizer = policy, optimizer
        else:
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
        self.inner = acc.unwrap_model(self.policy)
        if self.reference_kind == "adapter":
            self.reference = AdapterReference(self.inner)
        self.runtime = Runtime(acc, self.reference, self.pad_id, self.share_prompt, self.world)

    def _setup_resume(self) -> None:
        """The loop's state: fresh, or restored from a checkpoint (weights, optimizer, schedule,
        RNG, the objective's own state), with metrics.jsonl cut back to the checkpoint's step."""
        self.state = TrainState()
        self.metrics = MetricsLog(self.output_dir / "metrics.jsonl", self.is_main)
        self._resume()

    def _unit(self) -> str:
        return "examples" if self.cfg.strategy in ("sft", "kto") else "pairs"

    def _announce(self) -> None:
        """config.resolved.yaml (every setting as used) and one line saying what will run."""
        cfg, acc = self.cfg, self.accelerator
        if self.is_main:
            resolved = self.output_dir / "config.resolved.yaml"
            write_atomic(resolved, to_yaml(cfg))
            log.info(
                "%s: training on %s (%d eval) for %d steps (%.2f epochs), global batch %d, %s/%s parameters "
                "trainable, reference: %s, device: %s%s, %d CPU thread%s",
                cfg.strategy,
                self._training_on(),
                len(self.eval_items),
                self.total_steps,
                self.total_steps / self.steps_per_epoch,
                self.global_batch,
                f"{self.num_trainable:,}",
                f"{self.num_params:,}",
                self.reference_kind,
                acc.device,
                f" x {self.world} processes" if self.world > 1 else "",
                cfg.num_threads,
                "" if cfg.num_threads == 1 else "s",
            )

    def _training_on(self) -> str:
        """'48 pairs', or with max_train_samples '12 of 48 pairs (max_train_samples)'."""
        packed = self.cfg.strategy == "sft" and self.cfg.packing
        n, unit = len(self.train_items), "rows" if packed else self._unit()
        if self.cfg.max_train_samples is None:
            return f"{n} {unit}"
        if packed:  # the subset is of examples; packing then makes rows of them
            k = len(subset_rows(self.train_pool, self.cfg.max_train_samples, self.cfg.seed))
            return f"{n} rows ({k} of {self.train_pool} examples, max_train_samples)"
        return f"{n} of {self.train_pool} {unit} (max_train_samples)"

    def _tokenize(self, train_ex: Any, eval_ex: Any) -> None:
        """Items of both splits; eval items take positions after the train items (the reference
        cache is keyed by position)."""
        objective = self.objective
        if objective.data_kind is None:
            self.train_items, summary, truncated = objective.tokenize(self.tokenizer, train_ex)
            eval_items, eval_summary, _ = objective.tokenize(self.tokenizer, eval_ex) if eval_ex else ([], "", [])
            offset = len(self.train_items)
            for item in eval_items:
                item.index += offset
        else:
            self.train_items, summary, truncated = objective.items(*train_ex, offset=0)
            has_eval = len(eval_ex[1]) > 0
            eval_items, eval_summary, _ = objective.items(*eval_ex, offset=len(self.train_items)) if has_eval else ([], "", [])
        self.eval_items = eval_items
        if self.is_main:
            log.info("train: %s", summary)
            if len(eval_items):
                log.info("eval: %s", eval_summary)
            if truncated:
                log.info("first truncated examples: %s", ", ".join(truncated))

    def _shard(self, wrapper: torch.nn.Module, model: torch.nn.Module) -> None:
        """FSDP2 over all processes (see sharding.py), said in one line."""
        from preftune import sharding

        if not hasattr(self, "_mesh"):
            self._mesh = sharding.device_mesh(self.world, self.accelerator.device)
        plan = sharding.ShardingPlan.from_config(self.cfg.fsdp, self.cfg.fsdp_config)
        report = sharding.shard(wrapper, model, plan, self._mesh, self.bf16)
        if self.is_main:
            log.info("%s (%s)", report.summary(), plan.mode)

    def _load_reference_model(self, name: str) -> torch.nn.Module:
        """A separate reference loaded exactly as the policy is (dtype, attention implementation,
        quantisation), so both compute the same log-probs at step 0: loss ln 2 in every mode."""
        cfg = self.cfg
        ref = models.load_model(
            name,
            dtype=self.model_dtype,
            use_4bit=cfg.use_4bit,
            device=self.accelerator.device,
            attn_implementation=cfg.attn_implementation,
            provider=cfg.provider,
            use_liger_kernel=cfg.use_liger_kernel,
        )
        if cfg.disable_dropout:
            disable_dropout(ref)
        return ref

    def _prove_paths(self, model: torch.nn.Module, role: str, train_ex: Sequence[Any], eval_ex: Sequence[Any]) -> bool | None:
        """Check the fast paths on a few real items against the model's own forward (see
        `logprobs.check_paths`); say in one line what was chosen. Where segments disagree, the
        run takes one sequence a row (no shared prompt; for SFT, no packing: the data is
        tokenized again). Returns the head to use (None: the structural choice; False: the
        model's own forward)."""
        batches = self.objective.check_batches(self.train_items, self.pad_id, self.share_prompt)
        if batches is None:
            return None
        device = next(model.parameters()).device
        plain, segmented, group = batches
        plain = {k: v.to(device) for k, v in plain.items()}
        segmented = {k: v.to(device) for k, v in segmented.items()} if segmented is not None else None
        report = check_paths(model, plain, segmented, group)
        # Every process takes the main process's verdict: ranks that split differently would plan
        # different steps and hang in the collectives.
        report.fast_head, report.segments = self._main_says(report.fast_head), self._main_says(report.segments)
        if self.is_main:
            what = "packed sequences" if self.cfg.strategy == "sft" else "the prompt once for both completions"
            log.info("%s: %s", role, report.summary(what))
        if segmented is not None and not report.segments:
            if self.cfg.strategy == "sft":
                self.objective.packing = False
                self._tokenize(train_ex, eval_ex)
            else:
                self.share_prompt = False
        return None if report.fast_head else False

    def _router_aux(self, model: torch.nn.Module, head: bool | None) -> RouterAux | None:
        """A MoE policy trains with its router load-balancing loss (see `logprobs.router_aux`)."""
        aux = router_aux(model, self.cfg.router_aux_loss_coef) if self.objective.model_kind != "reward" else None
        if aux is None:
            return None
        if head is False:
            if self.is_main:
                log.warning("MoE router aux loss: off (it is computed beside the chunked output head, which this model cannot use)")
            return None
        self.objective.enable_router_aux(aux.coef)
        if self.is_main:
            source = "router_aux_loss_coef" if self.cfg.router_aux_loss_coef is not None else "the model config's router_aux_loss_coef"
            log.info("MoE router load-balancing loss: coefficient %g (%s), %d experts, top %d; logged as aux_loss",
                     aux.coef, source, aux.num_experts, aux.top_k)
        return aux

    def _check_writable(self) -> None:
        probe = self.output_dir / f".write-test-{os.getpid()}"  # one per process: ranks share the folder
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise PreftuneError(f"output_dir {self.output_dir} is not writable ({exc.strerror or exc})") from None

    def _reference_model(
        self, model: torch.nn.Module, head: bool | None, train_ex: Sequence[Any], eval_ex: Sequence[Any]
    ) -> tuple[torch.nn.Module, bool | None]:
        """The model whose log-probs are precomputed: the policy at its start (with its proven
        `head`), or `ref_model_name`, loaded like the policy and proven here."""
        if self._ref_model is not None and not self.cfg.ref_model_name:
            ref = self._ref_model.to(self.accelerator.device)
            return ref, self._prove_paths(ref, "reference", train_ex, eval_ex)
        if not self.cfg.ref_model_name:
            return model, head
        ref = self._load_reference_model(self.cfg.ref_model_name)
        return ref, self._prove_paths(ref, "reference", train_ex, eval_ex)

    def _reference_cache(self, ref_model: torch.nn.Module) -> Path:
        """Where the reference's log-probs are cached: keyed by its (whole, unsharded) weights, the
        tokenized data and the settings, so a stale file is never read (see reference.py)."""
        cfg = self.cfg
        settings = {"dtype": str(self.model_dtype), "bf16": self.bf16, "4bit": cfg.use_4bit}
        root = Path(cfg.cache_dir) if cfg.cache_dir else models.cache_dir()
        return cache_path(root, models.model_fingerprint(ref_model), Chain(self.train_items, self.eval_items), settings)

    def _precompute_reference(self, module: CompletionLogprobs, path: Path) -> PrecomputedReference:
        """One pass of the reference over train and eval items, cached at `path` (reference.py)."""
        cfg, acc = self.cfg, self.accelerator
        reference, self.reference_seconds = precompute(
            module, Chain(self.train_items, self.eval_items), path, acc,
            batch_size=cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size, pad_id=self.pad_id,
            share_prompt=self.share_prompt, sharded=self.sharded, progress=cfg.progress_bar and self.is_main,
            model_name=cfg.ref_model_name or cfg.model_name, main_says=self._main_says,
        )
        return reference

    # -- one batch ------------------------------------------------------------------------------
    def _forward(
        self, module: Any, batch: dict[str, torch.Tensor], training: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-item losses and the raw values metrics are made of (the objective's)."""
        return self.objective.forward(self.runtime, module, batch, self._context, training)

    def _device_batch(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.runtime.to_device(self.objective.collate(items, self.pad_id, self.share_prompt))

    def _reduce_means(self, sums: torch.Tensor, units: torch.Tensor) -> dict[str, float]:
        """Totals over every process, turned into the logged means by the objective."""
        keys = self.objective.stat_keys
        totals = self.accelerator.reduce(torch.cat([sums, units.reshape(1)]).to(self.accelerator.device), "sum").cpu()
        named = {k: totals[i].item() for i, k in enumerate(keys)}
        named["units"] = totals[-1].item()
        return self.objective.metrics(named)

    def _sum_values(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([values[k].double().sum().cpu() for k in self.objective.stat_keys])

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """The loop. SIGTERM/SIGINT finish the current step, save a checkpoint and stop."""
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            for sig in previous:
                signal.signal(sig, self._on_signal)
        try:
            return self._train_loop()
        finally:
            self.tracking.finish()  # a run stopped early still closes its trackers' files
            self._lock.release()
            if in_main_thread:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("%s received: finishing step %d, then saving a checkpoint", signal.Signals(signum).name, self.state.step + 1)

    def _train_loop(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        rank = acc.process_index
        bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc=cfg.strategy,
            unit="step",
            disable=not (self.is_main and cfg.progress_bar),
            dynamic_ncols=True,
        )
        last: dict[str, float] = {}
        objective = self.objective
        while self.state.step < self.total_steps and not self.stopped_by_callback:
            step = self.state.step  # 0-based index of the optimizer step being taken
            started = time.perf_counter()
            items = self.train_items
            indices, epoch = step_examples(len(items), self.global_batch, cfg.seed, step)
            # Loss normaliser of the step: its pairs or examples, or (SFT) its trained tokens.
            n_global = sum(objective.units(items[j]) for j in indices)
            # Longest first, dealt round-robin: ranks get equal work and each micro-batch holds items
            # of similar length, so little padding. The step's set of items, hence its gradient, is
            # unchanged.
            indices = sorted(indices, key=lambda j: -items[j].num_tokens)
            mine = indices[rank :: self.world]
            micro = [mine[i : i + cfg.per_device_train_batch_size] for i in range(0, len(mine), cfg.per_device_train_batch_size)]
            # A rank with no example in a short last step still joins the collectives (else DDP
            # hangs): it runs one example with zero weight.
            weight = self.world / max(1, n_global)
            if not micro:
                micro, weight = [[indices[0]]], 0.0
            chunks = [[items[j] for j in chunk] for chunk in micro]
            # A sharded forward is a collective: every rank runs as many as the busiest one (rank 0),
            # the extra ones with zero weight.
            per_rank = math.ceil(len(indices) / self.world)
            self.runtime.forwards = math.ceil(per_rank / cfg.per_device_train_batch_size) if self.sharded else len(chunks)
            self._context = objective.begin(self.runtime, self.inner, chunks, active=weight > 0)
            sums = torch.zeros(len(objective.stat_keys), dtype=torch.float64)
            units = torch.zeros((), dtype=torch.float64)
            tokens = 0
            plan = padded(chunks, self.runtime.forwards)
            for i, (chunk, real) in enumerate(plan):
                batch = self._device_batch(chunk)
                sync = i == len(plan) - 1
                chunk_weight = weight if real else 0.0
                if self.sharded:
                    sharding.set_gradient_sync(self.policy, sync)
                with nullcontext() if sync or self.sharded else acc.no_sync(self.policy):
                    losses, values = self._forward(self.policy, batch)
                    # Sum over the step's items / their units: the same gradient as one big batch,
                    # whatever the split into micro-batches and ranks (DDP and FSDP average ranks).
                    acc.backward(losses.sum() * chunk_weight)
                if chunk_weight:
                    sums += self._sum_values(values)
                    units += sum(objective.units(item) for item in chunk)
                    tokens += int(batch["num_tokens"])
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(self.inner.parameters(), max_norm)
            if hasattr(grad_norm, "full_tensor"):  # sharded parameters: the norm is a DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            means = self._reduce_means(sums, units)
            lr = self.scheduler.get_last_lr()[0]
            # Gradients are all-reduced and means reduced, so every rank takes the same decision.
            finite = math.isfinite(means["loss"]) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                self.state.nonfinite_in_a_row = 0
            else:
                self.state.nonfinite_skips += 1
                self.state.nonfinite_in_a_row += 1
                log.warning("step %d: loss %s, grad_norm %s: update skipped", step + 1, means["loss"], grad_norm)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self.state.evaluated = False
            total_tokens = int(acc.reduce(torch.tensor(float(tokens), device=acc.device), "sum").item())
            seconds = time.perf_counter() - started
            record = {
                "step": self.state.step,
                "epoch": round(epoch + (step % self.steps_per_epoch + 1) / self.steps_per_epoch, 4),
                **means,
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "step_seconds": round(seconds, 4),
                "tokens_per_second": round(total_tokens / seconds, 2) if seconds > 0 else 0.0,
                "nonfinite_skips": self.state.nonfinite_skips,
            }
            last = record
            s = self.state.step
            if s == 1 or s % cfg.logging_steps == 0 or s == self.total_steps or not finite:
                self._log(record)
            if self.state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                good = checkpoint.find_checkpoint(self.output_dir, "latest")
                raise PreftuneError(
                    f"loss or gradient was NaN/Inf for {self.state.nonfinite_in_a_row} steps in a row (through step {s}); "
                    f"stopped. Last good checkpoint: {good or 'none yet'}. Lower learning_rate, check the data with "
                    "`preftune data check`, or set bf16: false"
                )
            bar.set_postfix(**objective.progress(means))
            bar.update(1)
            if self.eval_items and cfg.eval_steps and s % cfg.eval_steps == 0 and s != self.total_steps:
                eval_record = self.evaluate()
                self._log({"step": s, "epoch": record["epoch"], **eval_record})
                self._say_eval(s, eval_record, bar)
                self.state.evaluated = True
            stop = self._stop_requested()
            if (s % cfg.save_steps == 0 or stop) and s != self.total_steps and finite:
                saved = self.save_checkpoint(evaluated=self.state.evaluated)
                if stop:
                    bar.close()
                    raise Interrupted(
                        f"stopped by {signal.Signals(stop).name} after step {s}; checkpoint saved: {saved}; "
                        "resume with resume_from_checkpoint: latest"
                    )
            elif stop:
                bar.close()
                raise Interrupted(f"stopped by {signal.Signals(stop).name} after step {s}; resume with resume_from_checkpoint: latest")
        bar.close()
        if self.eval_items and not self.state.evaluated:
            eval_record = self.evaluate()
            self._log({"step": self.state.step, "epoch": last.get("epoch", 0.0), **eval_record})
            self._say_eval(self.state.step, eval_record, bar)
            last.update(eval_record)
            self.state.evaluated = True
        self.save_checkpoint(evaluated=True)
        self.save_final()
        self.tracking.finish()
        return last

    def _say_eval(self, step: int, eval_record: dict[str, float], bar: Any) -> None:
        """One console line per evaluation, with the figures the progress bar shows for training
        steps: an evaluation otherwise leaves no trace on screen until the run ends."""
        if not self.is_main:
            return
        shown = self.objective.progress({k.removeprefix("eval_"): v for k, v in eval_record.items()})
        figures = ", ".join(f"{name} {value}" for name, value in shown.items())
        # Drawn around the bar, so the line does not land in the middle of it.
        with bar.external_write_mode():
            unit = "rows" if self.cfg.strategy == "sft" and self.cfg.packing else self._unit()
            log.info("step %d eval: %s (%d %s)", step, figures, len(self.eval_items), unit)

    def _main_says(self, answer: bool) -> bool:
        """The main process's `answer`, on every process."""
        if self.accelerator.num_processes == 1:
            return answer
        from accelerate.utils import broadcast

        flag = torch.tensor([float(answer)], device=self.accelerator.device)
        return bool(broadcast(flag, from_process=0).item())

    def _stop_requested(self) -> int:
        """The signal number when any process was asked to stop (agreed across ranks), else 0."""
        flag = torch.tensor(float(self._stop_signal or 0), device=self.accelerator.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, "max")
        return int(flag.item())

    def _log(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        if any(k.startswith("eval_") for k in record):
            self.last_eval = dict(record)
        else:
            self.last_train = dict(record)
        if self.callbacks:
            # Every process takes the main process's decision, so all leave the loop together.
            stop = self.is_main and any(callback(dict(record)) is False for callback in self.callbacks)
            if self._main_says(stop) and not self.stopped_by_callback:
                self.stopped_by_callback = True
                if self.is_main:
                    log.info("a callback stopped training after step %d", record["step"])
        self.tracking.log(record)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the whole eval set, `eval_`-prefixed as TRL names them."""
        cfg, acc = self.cfg, self.accelerator
        batch_size = cfg.per_device_eval_batch_size or cfg.per_device_train_batch_size
        mine = self.eval_items[acc.process_index :: self.world]
        chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        sums = torch.zeros(len(self.objective.stat_keys), dtype=torch.float64)
        units = torch.zeros((), dtype=torch.float64)
        was_training = self.inner.training
        self.inner.eval()
        step_context, step_forwards = self._context, self.runtime.forwards
        per_rank = math.ceil(len(self.eval_items) / self.world)
        self.runtime.forwards = math.ceil(per_rank / batch_size) if self.sharded else len(chunks)
        active = bool(chunks)
        chunks = chunks or [self.eval_items[:1]]  # a rank without eval items still joins a sharded forward
        self._context = self.objective.begin(self.runtime, self.inner, chunks, active=active, training=False)
        for chunk, real in padded(chunks, self.runtime.forwards):
            with acc.autocast():
                _, values = self._forward(self.inner, self._device_batch(chunk), training=False)
            if not (real and active):
                continue
            sums += self._sum_values(values)
            units += sum(self.objective.units(item) for item in chunk)
        self._context, self.runtime.forwards = step_context, step_forwards
        self.inner.train(was_training)
        # The router aux loss is a training regulariser; evaluation passes compute none.
        return {f"eval_{k}": v for k, v in self._reduce_means(sums, units).items() if k != "aux_loss"}

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, evaluated: bool = False) -> Path:
        """Everything needed to resume exactly (see checkpoint.py): written to a temporary folder,
        sealed with a manifest of checksums, then renamed, so `checkpoints/step-N` exists only once
        complete. `evaluated` records that this step's evaluation is already in metrics.jsonl."""
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"step-{self.state.step}"
        tmp = root / f".tmp-step-{self.state.step}"
        try:
            if self.is_main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            torch.save(checkpoint.rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
            if self.sharded:  # each process writes its shards of weights and optimizer state
                sharding.save_sharded(self.policy, self.optimizer, tmp / "sharded")
            if self.is_main:
                state = {
                    "step": self.state.step,
                    "total_steps": self.total_steps,
                    "global_batch": self.global_batch,
                    "world_size": self.world,
                    "evaluated": evaluated,
                    "objective": self.objective.state_dict(),
                    "nonfinite_skips": self.state.nonfinite_skips,
                    "nonfinite_in_a_row": self.state.nonfinite_in_a_row,
                }
                checkpoint.save_main_files(tmp, self.inner.model, self.optimizer, self.scheduler, state, self.sharded)
            acc.wait_for_everyone()
            if self.is_main:
                checkpoint.seal(tmp, final, self.state.step)
                checkpoint.prune(self.output_dir, self.cfg.save_total_limit)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            previous = checkpoint.list_checkpoints(self.output_dir)
            kept = f"; the last complete checkpoint is {previous[-1][1]}" if previous else ""
            raise PreftuneError(
                f"could not write checkpoint {final} ({exc.strerror or exc}){kept}; free disk space or "
                "choose another output_dir, then resume with resume_from_checkpoint: latest"
            ) from None
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume_from_checkpoint:
            self.metrics.reset()
            return
        path = checkpoint.find_checkpoint(self.output_dir, cfg.resume_from_checkpoint)
        if path is None:
            if self.is_main:
                log.info("resume_from_checkpoint: latest, but %s has no checkpoint yet: starting from step 0", self.output_dir)
            self.metrics.reset()
            return
        state = checkpoint.read_trainer_state(path)
        if state.get("global_batch") != self.global_batch:
            raise PreftuneError(
                f"checkpoint {path} was trained with global batch {state.get('global_batch')}, this run has "
                f"{self.global_batch}: keep per_device_train_batch_size x gradient_accumulation_steps x processes equal to resume exactly"
            )
        if (path / "sharded").is_dir() != self.sharded:
            written = "with" if (path / "sharded").is_dir() else "without"
            raise PreftuneError(
                f"checkpoint {path} was written {written} fsdp sharding; resume it with the fsdp setting it was trained with"
            )
        if self.sharded:
            sharding.load_sharded(self.policy, self.optimizer, path / "sharded")
        checkpoint.load_main_files(path, self.inner.model, self.optimizer, self.scheduler, self.sharded, self.accelerator.process_index)
        self.state = TrainState(
            step=state["step"],
            nonfinite_skips=state.get("nonfinite_skips", 0),
            nonfinite_in_a_row=state.get("nonfinite_in_a_row", 0),
            evaluated=state.get("evaluated", False),
        )
        # Checkpoints written before objectives owned their state keep it at the top level.
        self.objective.load_state_dict(state.get("objective", state))
        self.metrics.truncate_after(self.state.step)
        if self.is_main:
            log.info("resumed from %s at step %d", path, self.state.step)

    def _check_fresh_output_dir(self) -> None:
        """A new run does not silently mix its files with another run's."""
        previous = self.output_dir / "config.resolved.yaml"
        if self.cfg.overwrite_output_dir or not previous.is_file():
            return
        import yaml

        ignored = {"resume_from_checkpoint", "overwrite_output_dir", "progress_bar", "output_dir", "num_threads"}
        try:
            old = {k: v for k, v in (yaml.safe_load(previous.read_text()) or {}).items() if k not in ignored}
        except yaml.YAMLError:
            old = None
        new = {k: v for k, v in self.cfg.to_dict().items() if k not in ignored}
        if old != new:
            if self.is_main:
                for line in config_differences(self.output_dir, old, new):
                    log.error("%s", line)
            raise PreftuneError(
                f"output_dir {self.output_dir} already holds a run with a different config; resume it with "
                "resume_from_checkpoint: latest, pass --overwrite to replace it, or choose another output_dir"
            )

    def save_final(self) -> Path:
        """`final/`: the adapter (LoRA) or the full model, with the tokenizer beside it. A LoRA reward
        model also gets `final_merged/`, the folder that `--reward` loads."""
        self.accelerator.wait_for_everyone()
        final = self.output_dir / "final"
        # Sharded: full weights gathered from every process (a collective), written by the main one.
        state = sharding.consolidated_state_dict(self.policy) if self.sharded else None
        if self.is_main:
            card = self._model_card()
            replace_dir(
                final,
                lambda tmp: (
                    checkpoint.save_weights(self.inner.model, tmp, state),
                    self.tokenizer.save_pretrained(tmp),
                    (tmp / "README.md").write_text(card, encoding="utf-8"),  # after peft's own card
                ),
            )
            if self.cfg.use_lora and (self.cfg.merge_lora or self.objective.model_kind == "reward"):
                # Merged from a copy: the trained PeftModel stays whole for whoever holds it.
                merged = copy.deepcopy(self.inner.model).merge_and_unload()
                replace_dir(
                    self.output_dir / "final_merged",
                    lambda tmp: (
                        merged.save_pretrained(tmp, safe_serialization=True),
                        self.tokenizer.save_pretrained(tmp),
                        (tmp / "README.md").write_text(self._model_card(merged=True), encoding="utf-8"),
                    ),
                )
            log.info("saved %s", final)
        self.accelerator.wait_for_everyone()
        return final

    def _model_card(self, merged: bool = False) -> str:
        """`final/README.md`; a run from files is reproduced by its resolved config."""
        from preftune.data import dataset_names

        origin = self.origin or f"preftune train {self.output_dir / 'config.resolved.yaml'}"
        names = dataset_names(self._train_data if self._train_data is not None else self.cfg.dataset)
        evals = dataset_names(self._eval_data if self._eval_data is not None else self.cfg.eval_dataset)
        names += [n for n in evals if n not in names]
        return modelcard.render(
            self.cfg, train_metrics=self.last_train, eval_metrics=self.last_eval, origin=origin, datasets=names, merged=merged
        )


def config_differences(output_dir: Path, old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What a refused run into `output_dir` is told before the error: each key whose value differs
    from the earlier run's, both values, and the two ways out (a refusal that names nothing sends
    the user diffing YAML files by hand)."""
    if old is None:
        lines = [f"output_dir {output_dir} holds a run whose config.resolved.yaml cannot be read"]
    else:
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
        lines = [f"output_dir {output_dir} holds a run with another config ({len(keys)} {'key differs' if len(keys) == 1 else 'keys differ'}):"]
        for key in keys:
            lines.append(f"  {key}: {_shown(old.get(key, _ABSENT))} in that run, {_shown(new.get(key, _ABSENT))} in this one")
    lines.append(
        "to keep that run, choose a new output_dir; to replace it, set overwrite_output_dir: true "
        "(--overwrite on the command line)"
    )
    return lines


_ABSENT = object()


def _shown(value: Any) -> str:
    """A config value as it would be written in YAML or after --set (JSON is YAML)."""
    return "(not set)" if value is _ABSENT else json.dumps(value, default=str)


def train(config: TrainConfig) -> dict[str, float]:
    trainer = Trainer(config)
    trainer.setup()
    return trainer.train()
