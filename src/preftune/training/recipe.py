"""The training recipe: setup in named steps, then a short loop that asks its components.

Why not `transformers.Trainer`: batching and the log-prob computation are where preference
training spends its time and memory, and both are ours (`batching.py`, `logprobs.py`). What
differs between strategies (data, model, reference, constraints, loss, metrics, save rules) is
the strategy's objective (`objectives/`), which the recipe asks and never names. The decisions
live in small components beside this file: the step plan (`plan.py`), devices and processes
(`distributed.py`), where records go (`metrics.py`), the run folder (`rundir.py`) and saving and
resuming (`checkpointer.py`). `accelerate` supplies devices, mixed precision and the distributed
wrappers; nothing here is a home-made distributed layer.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from preftune import chat, checkpoint, models, sharding
from preftune.batching import effective_prompt_length
from preftune.config import TrainConfig, resolve, to_yaml
from preftune.errors import Interrupted, PreftuneError, Problems
from preftune.logprobs import RouterAux, prove_paths, router_aux
from preftune.objectives import Runtime, make_objective, padded
from preftune.prepared import Chain, PreparedData, prepare, split_rows, subset_rows, take_train_samples
from preftune.reference import AdapterReference, build_reference
from preftune.training.checkpointer import Checkpointer, TrainState, model_card
from preftune.training.distributed import Distributed, StopSignals
from preftune.training.metrics import MetricsLogger
from preftune.training.plan import StepPlan, lr_factor, split_for_eval
from preftune.training import tracking
from preftune.training.rundir import RunDirectory

log = logging.getLogger("preftune")


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


class Trainer:
    """A recipe: `setup()` builds everything from the config, `train()` runs the loop.

    The config is resolved into its sections here (`config.resolve`), so however a run is started
    its config is checked, and the defaults it trains with are the resolved ones. Objects already
    in memory replace what the config names (`preftune.api.train` checks them): `model` is trained
    in place, `ref_model` is the reference, `train_data`/`eval_data` are sources for the readers
    (`data.in_memory_records`). `callbacks` get each logged record; one that returns False ends
    training after that step, which then finishes as at `max_steps`. The trainer works on its own
    copy of the config, so the caller's is never changed."""

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
        self.settings = resolve(self.cfg)
        self.objective = make_objective(self.settings)
        self._model, self._ref_model, self._tokenizer = model, ref_model, tokenizer
        self._train_data, self._eval_data = train_data, eval_data
        self.callbacks = list(callbacks)
        self.origin = origin  # how the run was started, for the model card
        self.output_dir = Path(self.settings.run.output_dir)
        self.run_dir = RunDirectory(self.output_dir)
        self._context: Any = None  # the objective's per-step context (KTO's KL estimate)

    # What tests and callers read off a set-up trainer
    @property
    def bf16(self) -> bool:
        return self.dist.bf16

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def global_batch(self) -> int:
        return self.plan.global_batch

    @property
    def share_prompt(self) -> bool:
        return self.objective.share_prompt

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Everything `train()` needs. The main process holds `output_dir`'s lock from here until
        `train()` returns (or setup fails), so a second run cannot write into the same folder."""
        try:
            self._setup()
        except BaseException:
            if hasattr(self, "metrics"):  # trackers already started
                self.metrics.close()
            self.run_dir.release()
            raise

    def _setup(self) -> None:
        """The recipe, step by step; each step sets what the next ones use."""
        s = self.settings
        if not s.data.dataset and self._train_data is None:
            raise PreftuneError("config: 'dataset' is required (a JSONL/JSON/Parquet/CSV file or a datasets folder)")
        self._setup_devices()
        self._preflight()
        self.run_dir.claim(self.cfg.to_dict(), bool(s.run.resume_from_checkpoint), s.run.overwrite_output_dir, self.is_main)
        train_ex, eval_ex = self._setup_data()
        model, head, aux = self._setup_model(train_ex, eval_ex)
        pending = self._setup_reference(model, head, train_ex, eval_ex)
        policy = self._setup_policy(model, head, aux, pending)
        self._setup_optimizer(policy)
        self._setup_resume()
        self._announce()

    def _setup_devices(self) -> None:
        """Threads, precision, the accelerator; config.resolved.yaml then says what ran."""
        s, objective = self.settings, self.objective
        self.dist = dist = Distributed.start(s.model, s.sharding, s.optim.seed)
        if dist.sharded and s.lora is not None and (s.lora.merge_lora or objective.merges_adapter):
            raise PreftuneError(
                "fsdp: merging LoRA into full weights (merge_lora, or a LoRA reward model) is not done under sharding; "
                "train with merge_lora: false and merge the saved adapter afterwards, or train without fsdp"
            )
        if dist.sharded and s.model.use_4bit:
            raise PreftuneError("fsdp: use_4bit (QLoRA) weights are not sharded by preftune; use one of the two")
        self.cfg.num_threads, self.cfg.bf16 = torch.get_num_threads(), dist.bf16

    def _preflight(self) -> None:
        """Every problem that shows before data is read or a model loaded, reported together, one
        line each: the model names (folder, config, alias package), the packages and devices the
        loading options need, and the output folder (writable, the checkpoint to resume, another
        run's files). A config with three mistakes then costs one rerun, not three."""
        s, objective, device = self.settings, self.objective, self.dist.device
        m = s.model
        options: dict[str, Any] = dict(use_4bit=m.use_4bit, provider=m.provider, use_liger_kernel=m.use_liger_kernel, device=device)
        problems: list[str] = tracking.missing_packages(self.cfg.report_to)
        if self._model is None:
            problems += models.loading_problems(m.model_name, causal=objective.causal_lm, **(options if objective.causal_lm else {}))
        ref_name = s.reference.ref_model_name
        if ref_name and ref_name != m.model_name and self._ref_model is None and objective.needs_reference:
            problems += [p for p in models.loading_problems(ref_name, **options) if p not in problems]
        if m.attn_implementation == "flex_attention" and device.type == "cpu":
            problems.append(
                "attn_implementation: flex_attention trains only on a GPU (PyTorch runs its backward on CUDA only); "
                "use sdpa on this machine"
            )
        checks = [self.run_dir.check_writable, lambda: self.run_dir.check_resume_path(s.run.resume_from_checkpoint)]
        if not s.run.resume_from_checkpoint:
            checks.append(lambda: self.run_dir.check_fresh(self.cfg.to_dict(), s.run.overwrite_output_dir, self.is_main))
        for i, check in enumerate(checks):
            try:
                check()
            except PreftuneError as exc:
                problems.append(str(exc))
                if i == 0:
                    break  # the folder's state cannot be read further
        if len(problems) == 1:
            raise PreftuneError(problems[0])
        if problems:
            raise Problems(problems)

    def _setup_data(self) -> tuple[Any, Any]:
        """The tokenizer, the train/eval examples (read, split, tokenized into items). Where the
        objective names its data family, each source is prepared once into a memory-mapped token
        table (`prepared.py`, cached by fingerprint) and the splits are views of row numbers."""
        d, objective = self.settings.data, self.objective
        self.tokenizer = self._tokenizer if self._tokenizer is not None else models.load_tokenizer(self.settings.model.model_name)
        chat.configure(self.tokenizer, d.chat_template_kwargs, d.fold_system_message)
        source = self._train_data if self._train_data is not None else d.dataset
        eval_source = self._eval_data if self._eval_data is not None else d.eval_dataset
        seed = self.settings.optim.seed
        if objective.data_kind is None:
            examples = objective.load(source, d.dataset_split)
            if eval_source:
                train_ex, eval_ex = examples, objective.load(eval_source, d.eval_dataset_split)
            else:
                train_ex, eval_ex = split_for_eval(examples, d.eval_split, seed, objective.unit)
        else:
            train_data = self._prepare(source, d.dataset_split)
            if eval_source:
                eval_data = self._prepare(eval_source, d.eval_dataset_split)
                train_ex = (train_data, np.arange(len(train_data)))
                eval_ex = (eval_data, np.arange(len(eval_data)))
            else:
                train_rows, eval_rows = split_rows(len(train_data), d.eval_split, seed, objective.unit)
                train_ex, eval_ex = (train_data, train_rows), (train_data, eval_rows)
        train_ex, self.train_pool = take_train_samples(train_ex, d.max_train_samples, seed, objective.unit)
        if d.max_prompt_length is not None and d.max_prompt_length >= d.max_seq_length:
            log.warning(
                "max_prompt_length %d >= max_seq_length %d: prompts are cut to %d tokens to leave room for completions",
                d.max_prompt_length, d.max_seq_length, effective_prompt_length(d.max_seq_length, d.max_prompt_length),
            )
        self._itemize(train_ex, eval_ex)
        self.pad_id = self.tokenizer.pad_token_id
        return train_ex, eval_ex

    def _prepare(self, source: Any, split: str) -> PreparedData:
        """One source's token table, prepared by the main process first (the others then map the
        cache entry it wrote), with one line saying how long it took and where it lives."""
        d = self.settings.data

        def prepare_here() -> PreparedData:
            return prepare(
                source, split, self.objective.data_kind, self.tokenizer, d.layout, cache_dir=self.settings.reference.cache_dir,
                num_proc=d.dataset_num_proc, progress=self.settings.run.progress_bar and self.is_main,
            )

        with self.dist.accelerator.main_process_first() if self.dist.world > 1 else nullcontext():
            data = prepare_here()
        if self.is_main:
            where = data.folder if data.folder is not None else "memory"
            how = "mapped from the cache" if data.from_cache else "read, validated and tokenized"
            dropped = "".join(f"; dropped {n} {reason}{'s' if n != 1 else ''}" for reason, n in data.skipped.items())
            log.info("data: %s %s (%d records) in %.1fs: %s%s", data.name, how, len(data), data.seconds, where, dropped)
        return data

    def _itemize(self, train_ex: Any, eval_ex: Any) -> None:
        """Items of both splits; eval items take positions after the train items (the reference
        cache is keyed by position)."""
        objective = self.objective
        if objective.data_kind is None:
            self.train_items, summary, truncated = objective.tokenize(self.tokenizer, train_ex)
            eval_items, eval_summary, _ = objective.tokenize(self.tokenizer, eval_ex) if eval_ex else ([], "", [])
            for item in eval_items:
                item.index += len(self.train_items)
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

    def _setup_model(self, train_ex: Any, eval_ex: Any) -> tuple[torch.nn.Module, bool | None, RouterAux | None]:
        """The model to train (given, or loaded as the strategy loads it), and the fast paths proven
        on it: (model, fast head or not, MoE router loss)."""
        m, device = self.settings.model, self.dist.device
        self.model_dtype = torch.bfloat16 if (self.bf16 and self.settings.lora is not None) else torch.float32
        if self._model is not None:
            model = self._model.to(device)
            if m.gradient_checkpointing:
                models._enable_gradient_checkpointing(model)
        else:
            model = self.objective.load_model(m.model_name, m, dtype=self.model_dtype, device=device, pad_id=self.pad_id)
            if getattr(model, "preftune_liger", False) and self.is_main:
                log.info("Liger kernels: RMSNorm, RoPE and SwiGLU")
        if m.disable_dropout:
            disable_dropout(model)
        if getattr(model.config, "_attn_implementation", None) == "flex_attention" and device.type == "cpu":
            raise PreftuneError(
                "attn_implementation: flex_attention trains only on a GPU (PyTorch runs its backward on CUDA only); "
                "use sdpa on this machine"
            )
        # The fast paths (chunked head, several segments a row) are proven on this model and data,
        # or left for the safe ones, before anything trains; the reference model too, if separate.
        head = self._prove(model, "policy", train_ex, eval_ex)
        return model, head, self._router_aux(model, head)

    def _prove(self, model: torch.nn.Module, role: str, train_ex: Any, eval_ex: Any) -> bool | None:
        """The fast paths checked on a few real items against the model's own forward
        (`logprobs.prove_paths`), said in one line. Where segments disagree the run takes one
        sequence a row (the objective says whether its items are then built again). Returns the
        head to use (None: the structural choice; False: the model's own forward)."""
        objective = self.objective
        batches = objective.check_batches(self.train_items, self.pad_id)
        report = prove_paths(model, batches, self.dist.main_says)
        if report is None:
            return None
        if self.is_main:
            log.info("%s: %s", role, report.summary(objective.segments_text))
        if batches[1] is not None and not report.segments:
            if objective.refuse_segments():
                self._itemize(train_ex, eval_ex)
        return None if report.fast_head else False

    def _router_aux(self, model: torch.nn.Module, head: bool | None) -> RouterAux | None:
        """A MoE policy trains with its router load-balancing loss (see `logprobs.router_aux`)."""
        coef = self.settings.model.router_aux_loss_coef
        aux = router_aux(model, coef) if self.objective.causal_lm else None
        if aux is None:
            return None
        if head is False:
            if self.is_main:
                log.warning("MoE router aux loss: off (it is computed beside the chunked output head, which this model cannot use)")
            return None
        self.objective.enable_router_aux(aux.coef)
        if self.is_main:
            source = "router_aux_loss_coef" if coef is not None else "the model config's router_aux_loss_coef"
            log.info("MoE router load-balancing loss: coefficient %g (%s), %d experts, top %d; logged as aux_loss",
                     aux.coef, source, aux.num_experts, aux.top_k)
        return aux

    def _setup_reference(self, model: torch.nn.Module, head: bool | None, train_ex: Any, eval_ex: Any) -> Any:
        """The reference: precomputed log-probs (cached), a frozen copy, the adapter-free policy
        (set with the optimizer), or none (see `reference.build_reference`). Sharded, the
        precompute waits for the sharded policy: returned as pending."""
        s, objective = self.settings, self.objective
        self.reference_kind = s.reference.reference
        self.reference_seconds = 0.0  # wall time of the one-off reference pass, when there is one
        m = s.model
        self.reference, pending, self.reference_seconds = build_reference(
            s.reference,
            policy=model,
            policy_head=head,
            given=self._ref_model,
            policy_given=self._model is not None,
            load=self._loaded_reference,
            prove=lambda ref: self._prove(ref, "reference", train_ex, eval_ex),
            items=Chain(self.train_items, self.eval_items),
            accelerator=self.dist.accelerator,
            main_says=self.dist.main_says,
            shard=self._shard if self.dist.sharded else None,
            cache_settings={"dtype": str(self.model_dtype), "bf16": self.bf16, "4bit": m.use_4bit},
            batch_size=s.optim.per_device_eval_batch_size,
            pad_id=self.pad_id,
            share_prompt=objective.share_prompt,
            progress=s.run.progress_bar and self.is_main,
            model_name=m.model_name,
        )
        return pending

    def _loaded_reference(self, name: str) -> torch.nn.Module:
        """A separate reference loaded exactly as the policy is (dtype, attention implementation,
        quantisation), so both compute the same log-probs at step 0: loss ln 2 in every mode."""
        m = self.settings.model
        ref = self.objective.load_model(name, m, dtype=self.model_dtype, device=self.dist.device, pad_id=self.pad_id)
        if m.disable_dropout:
            disable_dropout(ref)
        return ref

    def _shard(self, wrapper: torch.nn.Module, model: torch.nn.Module) -> None:
        """FSDP2 over all processes (see sharding.py), said in one line."""
        if not hasattr(self, "_mesh"):
            self._mesh = sharding.device_mesh(self.dist.world, self.dist.device)
        plan = self.settings.sharding
        report = sharding.shard(wrapper, model, plan, self._mesh, self.bf16)
        if self.is_main:
            log.info("%s (%s)", report.summary(), plan.mode)

    def _setup_policy(self, model: torch.nn.Module, head: bool | None, aux: RouterAux | None, pending: Any) -> torch.nn.Module:
        """The LoRA adapter (if any), the objective's wrapper, sharding, and a pending reference pass."""
        lora, objective = self.settings.lora, self.objective
        if lora is not None and not hasattr(model, "peft_config"):  # a PeftModel given trains its own adapter
            model = models.apply_lora(
                model, r=lora.lora_r, alpha=lora.lora_alpha, dropout=lora.lora_dropout,
                target_modules=list(lora.lora_target_modules) if isinstance(lora.lora_target_modules, tuple) else lora.lora_target_modules,
                task_type=objective.lora_task_type,
            )
        model.train()
        policy = objective.wrap(model, head, aux)
        if self.dist.sharded:
            self._shard(policy, model)
            if pending is not None:
                self.reference, self.reference_seconds = pending(policy)
        return policy

    def _setup_optimizer(self, policy: torch.nn.Module) -> None:
        """AdamW over the trainable parameters, the step plan and the learning-rate schedule."""
        o, acc = self.settings.optim, self.dist.accelerator
        params = [p for p in policy.parameters() if p.requires_grad]
        self.num_trainable = sum(p.numel() for p in params)
        self.num_params = sum(p.numel() for p in policy.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon, weight_decay=o.weight_decay,
            # One fused kernel instead of a Python loop over tensors: several times faster on CPU.
            # Sharded (DTensor) parameters take the default implementation.
            fused=(not self.dist.sharded and all(p.dtype in (torch.float32, torch.bfloat16, torch.float16) for p in params)) or None,
        )
        self.plan = plan = StepPlan.make(len(self.train_items), o, self.dist.world, self.dist.sharded)
        self.objective.check_step(plan.global_batch, o.per_device_train_batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, plan.total_steps, plan.warmup_steps, o.lr_scheduler_type)
        )
        if self.dist.sharded:  # FSDP2 synchronises gradients itself: no DDP wrapper
            self.policy, self.optimizer = policy, optimizer
        else:
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
        self.inner = acc.unwrap_model(self.policy)
        if self.reference_kind == "adapter":
            self.reference = AdapterReference(self.inner)
        self.runtime = Runtime(acc, self.reference, self.pad_id, self.dist.world)

    def _setup_resume(self) -> None:
        """The loop's state and its components: fresh, or restored from a checkpoint (weights,
        optimizer, schedule, RNG, the objective's own state), metrics.jsonl cut back to its step."""
        r = self.settings.run
        self.metrics = MetricsLogger(self.output_dir, self.is_main, tracking.start(self.cfg, self.output_dir, self.is_main),
                                     r.logging_steps, self.callbacks, self.dist.main_says)
        self.checkpointer = Checkpointer(self.output_dir, self.dist, r.save_steps, r.save_total_limit)
        self.signals = StopSignals(self.dist)
        self.state = TrainState()
        path = self.checkpointer.find(r.resume_from_checkpoint)
        if path is None:
            self.metrics.file.reset()
            return
        self.state, saved = self.checkpointer.resume(path, self.policy, self.inner, self.optimizer, self.scheduler, self.plan.global_batch)
        # Checkpoints written before objectives owned their state keep it at the top level.
        self.objective.load_state_dict(saved.get("objective", saved))
        self.metrics.file.truncate_after(self.state.step)

    def _announce(self) -> None:
        """config.resolved.yaml (every setting as used) and one line saying what will run."""
        plan, cfg = self.plan, self.cfg
        if self.is_main:
            self.run_dir.write_resolved(to_yaml(cfg))
            log.info(
                "%s: training on %s (%d eval) for %d steps (%.2f epochs), global batch %d, %s/%s parameters "
                "trainable, reference: %s, device: %s%s, %d CPU thread%s",
                self.objective.name, self._training_on(), len(self.eval_items), plan.total_steps,
                plan.total_steps / plan.steps_per_epoch, plan.global_batch, f"{self.num_trainable:,}", f"{self.num_params:,}",
                self.reference_kind, self.dist.device, f" x {self.dist.world} processes" if self.dist.world > 1 else "",
                cfg.num_threads, "" if cfg.num_threads == 1 else "s",
            )

    def _training_on(self) -> str:
        """'48 pairs', or with max_train_samples '12 of 48 pairs (max_train_samples)'."""
        n, unit, wanted = len(self.train_items), self.objective.row_unit(), self.settings.data.max_train_samples
        if wanted is None:
            return f"{n} {unit}"
        if unit != self.objective.unit:  # rows of packed examples: the subset is of examples
            k = len(subset_rows(self.train_pool, wanted, self.settings.optim.seed))
            return f"{n} {unit} ({k} of {self.train_pool} {self.objective.unit}, max_train_samples)"
        return f"{n} of {self.train_pool} {unit} (max_train_samples)"

    # -- the loop -------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        """The loop. SIGTERM/SIGINT finish the current step, save a checkpoint and stop."""
        from tqdm.auto import tqdm

        plan, state, metrics = self.plan, self.state, self.metrics
        bar = tqdm(total=plan.total_steps, initial=state.step, desc=self.objective.name, unit="step",
                   disable=not (self.is_main and self.settings.run.progress_bar), dynamic_ncols=True)
        last: dict[str, float] = {}
        try:
            with self.signals:
                while state.step < plan.total_steps and not metrics.stopped_by_callback:
                    record = last = self.train_step()
                    step, finite, last_step = state.step, state.nonfinite_in_a_row == 0, state.step == plan.total_steps
                    if metrics.should_log(step, last_step, finite):
                        metrics.log(record)
                    self._stop_if_diverged(step)
                    bar.set_postfix(**self.objective.progress(record))
                    bar.update(1)
                    if self._should_evaluate(step, last_step):
                        self._log_evaluation(record["epoch"], bar)
                    stop = self.signals.requested()
                    saved = None
                    if self.checkpointer.should_save(step, last_step, finite, bool(stop)):
                        saved = self._save_checkpoint()
                    if stop:
                        bar.close()
                        where = f"; checkpoint saved: {saved}" if saved else ""
                        raise Interrupted(f"stopped by {signal.Signals(stop).name} after step {step}{where}; "
                                          "resume with resume_from_checkpoint: latest")
                bar.close()
                if self.eval_items and not state.evaluated:
                    last.update(self._log_evaluation(last.get("epoch", 0.0), bar))
                self._save_checkpoint()
                self.save_final()
        finally:
            metrics.close()
            self.run_dir.release()
        return last

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: forward and backward each micro-batch of the plan, clip, update
        (skipped on a NaN/Inf), schedule; returns the step's record, TRL's names."""
        acc, objective, plan = self.dist.accelerator, self.objective, self.plan
        started = time.perf_counter()
        self.signals.step = self.state.step
        step = plan.step(self.state.step, self.train_items, acc.process_index, objective.units)
        self.runtime.forwards = step.forwards
        self._context = objective.begin(self.runtime, self.inner, step.chunks, active=step.weight > 0)
        sums = torch.zeros(len(objective.stat_keys), dtype=torch.float64)
        units = torch.zeros((), dtype=torch.float64)
        tokens = 0
        micro_batches = padded(step.chunks, step.forwards)
        for i, (chunk, real) in enumerate(micro_batches):
            batch = self._device_batch(chunk)
            sync = i == len(micro_batches) - 1
            weight = step.weight if real else 0.0
            if self.dist.sharded:
                sharding.set_gradient_sync(self.policy, sync)
            with nullcontext() if sync or self.dist.sharded else acc.no_sync(self.policy):
                losses, values = objective.forward(self.runtime, self.policy, batch, self._context, True)
                # Sum over the step's items / their units: the same gradient as one big batch,
                # whatever the split into micro-batches and processes (DDP and FSDP average them).
                acc.backward(losses.sum() * weight)
            if weight:
                sums += self._sum_values(values)
                units += sum(objective.units(item) for item in chunk)
                tokens += int(batch["num_tokens"])
        max_norm = self.settings.optim.max_grad_norm or float("inf")
        grad_norm = acc.clip_grad_norm_(self.inner.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # sharded parameters: the norm is a DTensor
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        means = self._reduce_means(sums, units)
        lr = self.scheduler.get_last_lr()[0]
        # Gradients are all-reduced and means reduced, so every process takes the same decision.
        if math.isfinite(means["loss"]) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.state.nonfinite_in_a_row = 0
        else:
            self.state.nonfinite_skips += 1
            self.state.nonfinite_in_a_row += 1
            log.warning("step %d: loss %s, grad_norm %s: update skipped", self.state.step + 1, means["loss"], grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.evaluated = False
        total_tokens = int(self.dist.sum(torch.tensor(float(tokens))).item())
        seconds = time.perf_counter() - started
        return {
            "step": self.state.step,
            "epoch": plan.epoch_at(self.state.step - 1),
            **means,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "step_seconds": round(seconds, 4),
            "tokens_per_second": round(total_tokens / seconds, 2) if seconds > 0 else 0.0,
            "nonfinite_skips": self.state.nonfinite_skips,
        }

    # -- what the loop asks ---------------------------------------------------------------------
    def _stop_if_diverged(self, step: int) -> None:
        if self.state.nonfinite_in_a_row >= self.settings.run.max_nonfinite_steps:
            good = checkpoint.find_checkpoint(self.output_dir, "latest")
            raise PreftuneError(
                f"loss or gradient was NaN/Inf for {self.state.nonfinite_in_a_row} steps in a row (through step {step}); "
                f"stopped. Last good checkpoint: {good or 'none yet'}. Lower learning_rate, check the data with "
                "`preftune data check`, or set bf16: false"
            )

    def _should_evaluate(self, step: int, last_step: bool) -> bool:
        """Every `eval_steps` when there is an eval set; the last step's evaluation comes with the
        end of the run (once, even after a resume)."""
        every = self.settings.run.eval_steps
        return bool(self.eval_items) and bool(every) and step % every == 0 and not last_step

    def _log_evaluation(self, epoch: float, bar: Any) -> dict[str, float]:
        """Evaluate, log the record, and say it in one console line with the figures the progress
        bar shows for training steps (an evaluation otherwise leaves no trace on screen)."""
        record = self.evaluate()
        self.metrics.log({"step": self.state.step, "epoch": epoch, **record})
        self.state.evaluated = True
        if self.is_main:
            shown = self.objective.progress({k.removeprefix("eval_"): v for k, v in record.items()})
            figures = ", ".join(f"{name} {value}" for name, value in shown.items())
            with bar.external_write_mode():  # drawn around the bar, not in the middle of it
                log.info("step %d eval: %s (%d %s)", self.state.step, figures, len(self.eval_items), self.objective.row_unit())
        return record

    def _device_batch(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        return self.runtime.to_device(self.objective.collate(items, self.pad_id))

    def _reduce_means(self, sums: torch.Tensor, units: torch.Tensor) -> dict[str, float]:
        """Totals over every process, turned into the logged means by the objective."""
        keys = self.objective.stat_keys
        totals = self.dist.sum(torch.cat([sums, units.reshape(1)]))
        named = {k: totals[i].item() for i, k in enumerate(keys)}
        named["units"] = totals[-1].item()
        return self.objective.metrics(named)

    def _sum_values(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([values[k].double().sum().cpu() for k in self.objective.stat_keys])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean metrics over the whole eval set, `eval_`-prefixed as TRL names them."""
        acc, objective = self.dist.accelerator, self.objective
        batch_size = self.settings.optim.per_device_eval_batch_size
        mine = self.eval_items[acc.process_index :: self.dist.world]
        chunks = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
        sums = torch.zeros(len(objective.stat_keys), dtype=torch.float64)
        units = torch.zeros((), dtype=torch.float64)
        was_training = self.inner.training
        self.inner.eval()
        step_context, step_forwards = self._context, self.runtime.forwards
        per_rank = math.ceil(len(self.eval_items) / self.dist.world)
        self.runtime.forwards = math.ceil(per_rank / batch_size) if self.dist.sharded else len(chunks)
        active = bool(chunks)
        chunks = chunks or [self.eval_items[:1]]  # a process without eval items still joins a sharded forward
        context = objective.begin(self.runtime, self.inner, chunks, active=active, training=False)
        for chunk, real in padded(chunks, self.runtime.forwards):
            with acc.autocast():
                _, values = objective.forward(self.runtime, self.inner, self._device_batch(chunk), context, False)
            if real and active:
                sums += self._sum_values(values)
                units += sum(objective.units(item) for item in chunk)
        self._context, self.runtime.forwards = step_context, step_forwards
        self.inner.train(was_training)
        # The router aux loss is a training regulariser; evaluation passes compute none.
        return {f"eval_{k}": v for k, v in self._reduce_means(sums, units).items() if k != "aux_loss"}

    # -- saving ---------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        extra = {"total_steps": self.plan.total_steps, "global_batch": self.plan.global_batch, "world_size": self.dist.world,
                 "objective": self.objective.state_dict()}
        return self.checkpointer.save(self.policy, self.inner, self.optimizer, self.scheduler, self.state, extra)

    def save_final(self) -> Path:
        """`final/`, and `final_merged/` where LoRA is merged (`merge_lora`, or a strategy whose
        saved model is always full weights, as a reward model for `--reward`)."""
        lora = self.settings.lora
        merge = lora is not None and (lora.merge_lora or self.objective.merges_adapter)
        card = self._model_card()
        return self.checkpointer.save_final(self.policy, self.inner, self.tokenizer, card, self._model_card(merged=True) if merge else None)

    def _model_card(self, merged: bool = False) -> str:
        return model_card(self.cfg, self.origin, self.output_dir, self._train_data, self._eval_data,
                          self.metrics.last_train, self.metrics.last_eval, merged)


def run(config: TrainConfig, **objects: Any) -> tuple[Trainer, dict[str, float]]:
    """The one way a run starts (the CLI, the Python API, pipelines, sweeps, the recipes): the
    config resolved and checked (`Trainer` does it), set up, trained. Returns the trainer and the
    last logged metrics."""
    trainer = Trainer(config, **objects)
    trainer.setup()
    return trainer, trainer.train()
