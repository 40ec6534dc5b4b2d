"""The step plan: which examples each optimizer step takes, how they split into micro-batches and
processes, and the learning-rate schedule. Pure functions of (seed, step), so a resumed run finds
its place from the step number alone."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from preftune.config import OptimSettings
from preftune.errors import PreftuneError


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
    """The shuffled example order of one epoch: a pure function of (seed, epoch)."""
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


@dataclass
class Step:
    """One optimizer step as this process takes it."""

    epoch: int
    chunks: list[list[Any]]  # this process's micro-batches (items)
    weight: float  # each item's loss weight: processes / the step's units (0: a rank with nothing to do)
    forwards: int  # forwards every process runs (a sharded model's forward is a collective)


@dataclass
class StepPlan:
    """How many steps, how each is laid out, and the schedule, from the optimisation settings."""

    num_items: int
    micro_batch: int
    world: int
    seed: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    sharded: bool = False

    @classmethod
    def make(cls, num_items: int, optim: OptimSettings, world: int, sharded: bool) -> "StepPlan":
        global_batch = optim.per_device_train_batch_size * optim.gradient_accumulation_steps * world
        steps_per_epoch = math.ceil(num_items / global_batch)
        total = optim.max_steps if optim.max_steps > 0 else max(1, math.ceil(optim.num_train_epochs * steps_per_epoch))
        return cls(num_items, optim.per_device_train_batch_size, world, optim.seed, global_batch, steps_per_epoch, total,
                   math.ceil(optim.warmup_ratio * total), sharded)

    def epoch_at(self, step: int) -> float:
        """The fractional epoch once 0-based step `step` is done, as TRL logs it."""
        epoch = step // self.steps_per_epoch
        return round(epoch + (step % self.steps_per_epoch + 1) / self.steps_per_epoch, 4)

    def step(self, step: int, items: Sequence[Any], rank: int, units: Callable[[Any], int]) -> Step:
        """This process's share of 0-based step `step`."""
        indices, epoch = step_examples(len(items), self.global_batch, self.seed, step)
        # Loss normaliser of the step: its pairs or examples, or (SFT) its trained tokens.
        n_global = sum(units(items[j]) for j in indices)
        # Longest first, dealt round-robin: processes get equal work and each micro-batch holds
        # items of similar length, so little padding. The step's set of items, hence its gradient,
        # is unchanged.
        indices = sorted(indices, key=lambda j: -items[j].num_tokens)
        mine = indices[rank :: self.world]
        micro = [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        # A process with no example in a short last step still joins the collectives (else DDP
        # hangs): it runs one example with zero weight.
        weight = self.world / max(1, n_global)
        if not micro:
            micro, weight = [[indices[0]]], 0.0
        # Sharded, every process runs as many forwards as the busiest one, the extra ones weightless.
        forwards = math.ceil(math.ceil(len(indices) / self.world) / self.micro_batch) if self.sharded else len(micro)
        return Step(epoch, [[items[j] for j in chunk] for chunk in micro], weight, forwards)
