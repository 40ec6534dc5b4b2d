"""Sharding with PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), on CPU (gloo) and GPU.

accelerate turns an FSDP config into DDP on CPU, so the sharding is applied here, as torchtune and
torchtitan do: each wrapped block (by default every decoder layer, the classes the model lists in
`_no_split_modules`) becomes one FSDP unit, then the root. The root is the `CompletionLogprobs` (or
reward) wrapper, not the transformers model: its forward is the one the loop calls, and the
embeddings and output head it reads directly belong to it. Processes still start with
`accelerate launch` or `torchrun`; every forward of a sharded model is a collective, so the
training loop gives every process the same number of forwards (see `training/plan.py`).

Checkpoints go through `torch.distributed.checkpoint` (each process writes its shards of the
weights and optimizer state, DTensor state dicts); `consolidated_state_dict` gathers full weights
on the main process for `final/`, a normal transformers folder or PEFT adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from preftune.config import ShardingPlan
from preftune.errors import PreftuneError
from preftune.masks import base_model

log = logging.getLogger("preftune")

@dataclass
class ShardingReport:
    wrapped: dict[str, int]  # class name -> units
    local_parameters: int  # elements this process holds
    total_parameters: int
    mesh: str

    def summary(self) -> str:
        units = ", ".join(f"{n} x {name}" for name, n in self.wrapped.items()) or "the root only"
        return (f"FSDP2 on {self.mesh}: {units}, then the root; this process holds {self.local_parameters:,} of "
                f"{self.total_parameters:,} parameters")


def device_mesh(world: int, device: torch.device) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world,))


def _wrap_classes(model: nn.Module, plan: ShardingPlan) -> tuple[str, ...]:
    if plan.wrap is not None:
        return plan.wrap
    names = getattr(base_model(model), "_no_split_modules", None) or ()
    return tuple(names)


def shard(wrapper: nn.Module, model: nn.Module, plan: ShardingPlan, mesh: Any, bf16: bool) -> ShardingReport:
    """Apply `fully_shard` to each block of `model` whose class `plan` wraps, then to `wrapper`
    (the root). Frozen and trainable parameters may share a unit (LoRA: adapters are sharded with
    their layers)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    total = sum(p.numel() for p in wrapper.parameters())
    classes = _wrap_classes(model, plan)
    reshard = plan.reshard_after_forward if plan.reshard_after_forward is not None else plan.mode == "full_shard"
    mixed = plan.mixed_precision if plan.mixed_precision is not None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if plan.cpu_offload else OffloadPolicy()
    wrapped: dict[str, int] = {}
    for module in list(model.modules()):
        name = type(module).__name__
        if name in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp, offload_policy=offload)
            wrapped[name] = wrapped.get(name, 0) + 1
    missing = [c for c in classes if c not in wrapped]
    if plan.wrap is not None and missing:
        raise PreftuneError(f"fsdp_config.wrap: the model has no module of class {', '.join(missing)}")
    # The root keeps its parameters (embeddings, final norm, head) gathered between forward and backward.
    fully_shard(wrapper, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in wrapper.parameters())
    return ShardingReport(wrapped, local, total, f"a {mesh.device_type} mesh of {mesh.size()} processes")


def set_gradient_sync(wrapper: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients only on a step's last micro-batch (FSDP2's `no_sync`)."""
    wrapper.set_requires_gradient_sync(sync)


def reshard(wrapper: nn.Module) -> None:
    """Put the sharded parameters back in place. The root keeps its parameters gathered after a
    forward until the backward; after a forward without one (the reference pass, evaluation) the
    module would otherwise still hold the gathered copies where the optimizer and the state dicts
    expect the shards."""
    wrapper.reshard()


def save_sharded(wrapper: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every process writes its shards of weights and optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    reshard(wrapper)
    model_state, optim_state = get_state_dict(wrapper, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_sharded(wrapper: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Read a `save_sharded` folder back into the sharded model and optimizer (a collective). DCP
    reads tensors and plain values; nothing in it is unpickled as arbitrary objects."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reshard(wrapper)
    model_state, optim_state = get_state_dict(wrapper, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # a checkpoint of another model, or damaged
        raise PreftuneError(f"could not load sharded checkpoint {folder}: {str(exc).splitlines()[0][:200]}") from None
    set_state_dict(wrapper, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidated_state_dict(wrapper: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Full weights of the wrapped transformers (or PEFT) model, gathered to CPU on every process
    (a collective), keys as that model names them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(wrapper)
    full = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
