"""The frozen reference model of DPO, in three forms that trade memory for flexibility.

- `AdapterReference`: under LoRA the base model *is* the reference; disabling the adapter gives it
  back for free (no second copy in memory).
- `ModelReference`: a separate frozen model (a copy of the start point, or `ref_model_name`).
- `PrecomputedReference`: the reference never changes and neither does the data, so its log-probs
  are computed once, before training, and cached on disk keyed by fingerprints of the model weights,
  the tokenized data and the settings. A later run with the same three reuses the file; a change in
  any of them gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune import models, sharding
from preftune.batching import collate_pairs
from preftune.config import ReferenceSettings
from preftune.errors import PreftuneError
from preftune.io import atomic_path
from preftune.logprobs import CompletionLogprobs, completion_logps
from preftune.prepared import item_lengths

log = logging.getLogger("preftune")

CACHE_FORMAT = 2  # bump when the meaning of a cached file changes (2: windows, heads and layouts proven per model)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Reference scores are taken without dropout, whatever mode the policy is in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _split(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = sums.shape[0] // 2
    return sums[:half], sums[half:]


class _Reference:
    """Every form answers `sequence_logps(batch)`: one summed log-prob per output of the batch, in
    the batch's order; `logps(batch)` splits a batch of pairs into (chosen, rejected)."""

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return _split(self.sequence_logps(batch))


class AdapterReference(_Reference):
    """The base model seen through the policy with its LoRA adapter switched off."""

    def __init__(self, policy: CompletionLogprobs) -> None:
        self.policy = policy

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with eval_mode(self.policy), self.policy.model.disable_adapter():
            return completion_logps(self.policy, batch).sums


class ModelReference(_Reference):
    """A separate frozen model."""

    def __init__(self, module: CompletionLogprobs) -> None:
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return completion_logps(self.module, batch).sums


class PrecomputedReference(_Reference):
    """Log-probs looked up by dataset position (`batch["index"]`) and completion slot
    (`batch["output_slot"]`: 0 the chosen completion, or a KTO example's own; 1 the rejected one, or
    a KTO example's mismatched completion)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self.chosen = chosen.float()
        self.rejected = rejected.float()
        self.table = torch.stack([self.chosen, self.rejected], dim=1)

    def sequence_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        index = batch["index"].cpu()
        slots = batch["output_slot"].cpu()
        rows = index.repeat(slots.shape[0] // max(1, index.shape[0]))
        return self.table[rows, slots].to(batch["input_ids"].device)


def data_fingerprint(pairs: Sequence[Any]) -> str:
    """Hash of the exact token ids scored: covers the data, the tokenizer and the truncation. A view
    of a prepared token table answers from the table's key, its rows and its truncation settings
    (`prepared.TableItems.fingerprint`) without reading every id."""
    own = getattr(pairs, "fingerprint", None)
    if callable(own) and (value := own()) is not None:
        return value
    h = hashlib.blake2b(digest_size=16)
    for p in pairs:
        h.update(json.dumps([p.index, p.prompt_ids, *p.completions]).encode())
    return h.hexdigest()


def cache_key(model_fingerprint: str, pairs: Sequence[Any], settings: dict) -> str:
    payload = json.dumps(
        {"format": CACHE_FORMAT, "model": model_fingerprint, "data": data_fingerprint(pairs), "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_path(root: Path, model_fingerprint: str, pairs: Sequence[Any], settings: dict) -> Path:
    """The cache file of a reference pass under `root`, named by its `cache_key`."""
    return root / "reference" / f"{cache_key(model_fingerprint, pairs, settings)}.safetensors"


@torch.no_grad()
def compute_logps(
    module: CompletionLogprobs,
    pairs: Sequence[Any],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    progress: bool = False,
    share_prompt: bool = True,
    share: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs for every pair, indexed by `TokenizedPair.index` (for KTO's
    examples: their completion, and their mismatched completion). `share=(rank, world)` scores
    only this process's share (zeros elsewhere), in as many batches as every other process runs:
    a sharded model's forwards are collectives."""
    from tqdm.auto import tqdm

    # Items are indexed 0..n-1 (train, then eval); a plain list may hold other indices.
    size = (len(pairs) if hasattr(pairs, "lengths") else max(p.index for p in pairs) + 1) if len(pairs) else 0
    chosen = torch.zeros(size, dtype=torch.float32)
    rejected = torch.zeros(size, dtype=torch.float32)
    # Longest first: the first batch shows at once whether memory suffices.
    order = np.argsort(-item_lengths(pairs), kind="stable").tolist()
    rank, world = share
    mine = order[rank::world]
    count = math.ceil(math.ceil(len(order) / world) / batch_size) if pairs else 0
    with eval_mode(module):
        for b in tqdm(range(count), desc="reference log-probs", disable=not progress, unit="batch"):
            indices = mine[b * batch_size : (b + 1) * batch_size]
            chunk = [pairs[i] for i in (indices or order[:1])]  # a process out of pairs joins with one, discarded
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, share_prompt).items()}
            with autocast() if autocast else contextlib.nullcontext():
                sums = completion_logps(module, batch).sums
            if not indices:
                continue
            c, r = _split(sums.float().cpu())
            chosen[batch["index"].cpu()] = c
            rejected[batch["index"].cpu()] = r
    return chosen, rejected


def load_cached(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached tensors, or None when absent or unreadable (then they are recomputed)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        return tensors["chosen"], tensors["rejected"]
    except Exception as exc:  # a damaged file is recomputed, never trusted
        log.warning("ignoring unreadable reference cache %s (%s); recomputing", path, exc)
        return None


def save_cached(path: Path, chosen: torch.Tensor, rejected: torch.Tensor, metadata: dict[str, str]) -> None:
    """Atomic: written beside the target, then renamed, so a crash leaves no half file."""
    with atomic_path(path) as tmp:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, str(tmp), metadata=metadata)


def precompute(
    module: CompletionLogprobs,
    pairs: Sequence[Any],
    path: Path,
    accelerator: Any,
    *,
    batch_size: int,
    pad_id: int,
    share_prompt: bool,
    sharded: bool,
    progress: bool,
    model_name: str,
    main_says: Callable[[bool], bool],
) -> tuple[PrecomputedReference, float]:
    """One pass of the reference over `pairs`, cached at `path`, and its wall time (0 on a cache
    hit). Unsharded, the main process scores them all; sharded, every process scores its share (the
    forwards are collectives) and the shares are summed into one table. The cache is written once.
    `main_says` gives the main process's answer to every process."""
    acc = accelerator
    is_main = acc.is_main_process
    # The main process decides, and every process follows: a process that looked for the file
    # itself could find the one the main process has just written, skip the barrier below
    # and desynchronise the collectives (a hang).
    cached = load_cached(path) if is_main else None
    hit = main_says(cached is not None and cached[0].shape[0] == len(pairs))
    if hit:
        if is_main:
            log.info("reusing precomputed reference log-probs: %s (%d pairs)", path, len(pairs))
        cached = cached or load_cached(path)
        if cached is None:
            raise PreftuneError(f"could not read precomputed reference log-probs from {path}")
        return PrecomputedReference(*cached), 0.0
    started = time.perf_counter()
    world = acc.num_processes
    share = (acc.process_index, world) if sharded else (0, 1)
    if sharded or is_main:
        chosen, rejected = compute_logps(
            module, pairs, batch_size, pad_id, acc.device, autocast=acc.autocast,
            progress=progress, share_prompt=share_prompt, share=share,
        )
        if sharded:  # each pair was scored by exactly one process
            sharding.reshard(module)
            table = acc.reduce(torch.stack([chosen, rejected]).to(acc.device), "sum").cpu()
            chosen, rejected = table[0], table[1]
        if is_main:
            save_cached(path, chosen, rejected, {"pairs": str(len(pairs)), "model": model_name})
            how = f" ({world} processes, each its share)" if sharded else ""
            log.info("precomputed reference log-probs for %d pairs in %.1fs%s: %s", len(pairs),
                     time.perf_counter() - started, how, path)
    acc.wait_for_everyone()
    seconds = time.perf_counter() - started
    cached = load_cached(path)
    if cached is None:
        raise PreftuneError(f"could not read back precomputed reference log-probs from {path}")
    return PrecomputedReference(*cached), seconds


Pending = Callable[[torch.nn.Module], tuple[PrecomputedReference, float]]


def build_reference(
    settings: ReferenceSettings,
    *,
    policy: torch.nn.Module,
    policy_head: bool | None,
    given: torch.nn.Module | None,
    policy_given: bool,
    load: Callable[[str], torch.nn.Module],
    prove: Callable[[torch.nn.Module], bool | None],
    items: Sequence[Any],
    accelerator: Any,
    main_says: Callable[[bool], bool],
    shard: Callable[[torch.nn.Module, torch.nn.Module], None] | None,
    cache_settings: dict,
    batch_size: int,
    pad_id: int,
    share_prompt: bool,
    progress: bool,
    model_name: str,
) -> tuple[_Reference | None, Pending | None, float]:
    """The reference a run's settings ask for: (reference, pending, seconds of the one-off pass).

    - `precomputed` (what `auto` means): the log-probs of the policy at its start (or of `given`,
      or `ref_model_name`, loaded as the policy is by `load` and proven by `prove`), computed once
      over `items` and cached, keyed by the model's weights, the data and `cache_settings`, so a
      stale file is never read. Sharded (`shard` given), the pass waits for the sharded policy:
      `pending(policy_wrapper)` runs it then.
    - `copy`: a frozen model held beside the policy: `given`, a copy of the policy object the
      caller gave (`policy_given`), or the named model loaded.
    - `adapter` and `none`: nothing here (the adapter-free policy is set up with the optimizer).
    """
    kind, name = settings.reference, settings.ref_model_name
    device = next(policy.parameters()).device
    if kind == "copy":
        if given is not None or policy_given:
            ref = (given if given is not None else copy.deepcopy(policy)).to(device)
        else:
            ref = load(name or model_name)
        module = CompletionLogprobs(ref, fast_head=prove(ref))
        if shard is not None:  # sharded like the policy; it trains nothing
            shard(module, ref)
        return ModelReference(module), None, 0.0
    if kind != "precomputed":
        return None, None, 0.0
    if given is not None and not name:
        ref, head = given.to(device), prove(given)
    elif not name:
        ref, head = policy, policy_head
    else:
        ref = load(name)
        head = prove(ref)
    root = Path(settings.cache_dir) if settings.cache_dir else models.cache_dir()
    path = cache_path(root, models.model_fingerprint(ref), items, cache_settings)

    def run(module: torch.nn.Module) -> tuple[PrecomputedReference, float]:
        return precompute(
            module, items, path, accelerator, batch_size=batch_size, pad_id=pad_id, share_prompt=share_prompt,
            sharded=shard is not None, progress=progress, model_name=name or model_name, main_says=main_says,
        )

    if shard is None:
        reference, seconds = run(CompletionLogprobs(ref, fast_head=head))
        return reference, None, seconds
    separate = None if ref is policy else ref

    def pending(policy_wrapper: torch.nn.Module) -> tuple[PrecomputedReference, float]:
        module = policy_wrapper  # the policy at its start (a fresh adapter changes nothing) ...
        if separate is not None:  # ... or ref_model_name, sharded the same way
            module = CompletionLogprobs(separate, fast_head=head)
            shard(module, separate)
        return run(module)

    return None, pending, 0.0
