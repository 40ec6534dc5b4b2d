"""Devices, precision and processes (through `accelerate`), and the agreements processes must
reach: the main process's verdicts, summed metrics, and a stop asked of any of them."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.config import ModelSettings, ShardingPlan
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")


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


@dataclass
class Distributed:
    """The accelerator of a run and what follows from it: precision, processes, sharding."""

    accelerator: Any
    bf16: bool
    world: int
    sharded: bool

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @classmethod
    def start(cls, model: ModelSettings, sharding: ShardingPlan | None, seed: int) -> "Distributed":
        """torch's CPU threads, bf16 or fp32, the accelerator and whether the model is sharded.

        Threads: `num_threads`, else torch's own choice (which follows OMP_NUM_THREADS). More
        threads than free cores makes every op wait for its slowest thread."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import set_seed

        if model.num_threads is not None:
            torch.set_num_threads(model.num_threads)
        use_cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes")
        bf16 = model.bf16 if model.bf16 is not None else (use_cuda and torch.cuda.is_bf16_supported())
        if bf16 and use_cuda and not torch.cuda.is_bf16_supported():
            raise PreftuneError("bf16: this GPU does not support bfloat16; set bf16: false")
        if bf16 and not use_cuda and native_cpu_bf16() is False:
            # Emulated bf16 would make the run ~10x slower for no memory a CPU run needs saved.
            log.warning("bf16: true, but this CPU has no native bfloat16 (no AVX512-BF16 or AMX): training in fp32, about 10x faster here")
            bf16 = False
        precision = "bf16" if bf16 else "no"
        shared = AcceleratorState._shared_state
        if shared and shared.get("_mixed_precision") != precision:
            # accelerate keeps one precision per process; a later run in the same process (a
            # notebook, a pipeline stage) with another bf16 setting starts its state anew. The
            # process group and device (PartialState) are kept.
            AcceleratorState._reset_state()
        acc = Accelerator(mixed_precision=precision, cpu=not use_cuda)
        kind = str(acc.distributed_type).rsplit(".", 1)[-1]
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            # Sharding is preftune's own step on PyTorch's FSDP2 (sharding.py), set in the config.
            raise PreftuneError(
                f"accelerate's {kind} mode is not used by preftune: launch as for DDP (accelerate launch --multi_gpu, "
                "or torchrun) and set fsdp: full_shard (or shard_grad_op) in the config to shard the model"
            )
        world = acc.num_processes
        if sharding is not None and world == 1 and acc.is_main_process:
            log.info("fsdp: %s with one process: nothing to shard, training as usual", sharding.mode)
        if bf16 and acc.device.type == "cpu" and native_cpu_bf16() is None:
            log.warning("bf16 on CPU is much slower than fp32 on most CPUs; set bf16: false for speed")
        set_seed(seed)
        return cls(acc, bool(bf16), world, sharding is not None and world > 1)

    def main_says(self, answer: bool) -> bool:
        """The main process's `answer`, on every process: processes that decide differently would
        plan different steps and hang in the collectives."""
        if self.world == 1:
            return answer
        from accelerate.utils import broadcast

        flag = torch.tensor([float(answer)], device=self.device)
        return bool(broadcast(flag, from_process=0).item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over every process, back on the CPU."""
        return self.accelerator.reduce(values.to(self.device), "sum").cpu()


class StopSignals:
    """SIGTERM/SIGINT while training: the current step finishes, a checkpoint is saved, the run
    stops (a second signal stops at once). Installed only in the main thread, restored on exit."""

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist
        self.received: int | None = None
        self.step = 0  # the step being taken, for the message
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum
        log.warning("%s received: finishing step %d, then saving a checkpoint", signal.Signals(signum).name, self.step + 1)

    def requested(self) -> int:
        """The signal number when any process was asked to stop (agreed across processes), else 0."""
        flag = torch.tensor(float(self.received or 0), device=self.dist.device)
        if self.dist.world > 1:
            flag = self.dist.accelerator.reduce(flag, "max")
        return int(flag.item())
