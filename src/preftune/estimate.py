"""Predict the peak memory of a training run before starting it, and the settings that fit a GPU.

The model is built on PyTorch's `meta` device (shapes, no weights), so counting its parameters costs
nothing. The estimate adds, per process:

- weights: fp32 for a full fine-tune (the master copy; bf16 is autocast), the frozen base in bf16 (or
  fp32 without bf16) under LoRA, 4-bit NF4 for the linear layers under QLoRA (0.5 byte a parameter
  plus double-quantised scales, about 0.53) with the rest in bf16;
- gradients and AdamW's two moments for the trainable parameters, in fp32;
- the reference: nothing when its log-probs are precomputed, it is the disabled adapter, or the
  strategy uses none (SFT, ORPO, SimPO, CPO, reward); a second copy of the base weights for `copy`;
- activations kept for backward, per token and layer: about 10 hidden-size and 4 intermediate-size
  values (norm inputs, q/k/v, attention output, MLP gate/up/activation/down input), in the compute
  dtype; with gradient checkpointing, one hidden-size value per layer plus one layer's worth. Attention
  itself is SDPA/flash (no stored scores). Tokens per micro-batch assume the worst case of the
  strategy's layout: for pairs with the shared prompt batch x (max_prompt_length + 2 x completion
  budget), without it 2 x batch x max_seq_length; SFT and KTO batch x max_seq_length; a reward model
  2 x batch x max_seq_length;
- the output head over the scored tokens in 1024-position chunks: logits, their log-softmax and its
  gradient in fp32 (none for a reward model);
- a fixed allowance for the CUDA context and allocator (0.5 GiB).

Under FSDP2 (`fsdp: full_shard` over N processes, `--num-processes N`) weights, gradients, AdamW's
moments and a `copy` reference are divided by N, and a process holds besides them the units it
has gathered: the root's (embeddings, head) for the whole step and two decoder layers at a time
(the one computing and the one prefetched), plus one layer's unsharded gradients during backward.
QLoRA is not sharded (preftune refuses `use_4bit` with `fsdp`), so its column stays per device.

It is an estimate: allocator fragmentation and kernels' workspaces vary. Where a GPU is available,
compare with `torch.cuda.max_memory_allocated()` of a real run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from preftune.batching import effective_prompt_length
from preftune.config import TrainConfig
from preftune.errors import PreftuneError

GiB = 2**30
CUDA_OVERHEAD = 0.5 * GiB
LOGPROB_CHUNK = 1024


@dataclass
class ModelShape:
    params: int  # all parameters
    linear_params: int  # in nn.Linear layers other than the output head (what LoRA and 4-bit touch)
    head_params: int  # the output head's own weights: 0 when tied to the input embeddings
    lora_params_per_rank: int  # sum of (in + out) over those layers: LoRA adds r times this
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def model_shape(name: str) -> ModelShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    from preftune.models import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()),
        linear_params=sum(m.weight.numel() for m in linear),
        head_params=0 if head is None or head.weight is model.get_input_embeddings().weight else head.weight.numel(),
        lora_params_per_rank=sum(m.in_features + m.out_features for m in linear),
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
        layers=getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"),
        vocab=config.vocab_size,
    )


REFERENCE_STRATEGIES = ("dpo", "kto")  # the others train without a reference model


def _tokens(cfg: TrainConfig, batch_size: int) -> tuple[int, int]:
    """(tokens whose activations a micro-batch keeps for backward, positions the output head
    scores), at the length limits, for the strategy's layout."""
    prompt = effective_prompt_length(cfg.max_seq_length, cfg.max_prompt_length)
    completion = cfg.max_seq_length - prompt
    if cfg.strategy == "sft":  # one sequence an example, all of it scored at most
        return batch_size * cfg.max_seq_length, batch_size * cfg.max_seq_length
    if cfg.strategy == "kto":  # one completion an example; the mismatched pairs run without gradient
        return batch_size * cfg.max_seq_length, batch_size * completion
    if cfg.strategy == "reward":  # chosen and rejected as whole sequences; a one-number head, no vocabulary
        return 2 * batch_size * cfg.max_seq_length, 0
    if cfg.share_prompt:  # pairs: the prompt once, then both completions (see batching.py)
        return batch_size * (prompt + 2 * completion), batch_size * 2 * completion
    return 2 * batch_size * cfg.max_seq_length, batch_size * 2 * completion


def estimate(
    shape: ModelShape, cfg: TrainConfig, mode: str, batch_size: int, checkpointing: bool, bf16: bool, num_processes: int = 1
) -> dict[str, float]:
    """Bytes by component for one process; `mode` is full, lora or qlora; `num_processes` > 1
    shards full and LoRA runs with FSDP2 over that many processes."""
    if cfg.strategy == "reward":  # a sequence classifier: the LM head is replaced by a hidden -> 1 score
        shape = dataclasses.replace(shape, params=shape.params - shape.head_params + shape.hidden, head_params=0)
    compute_bytes = 2 if bf16 else 4
    rank = int(cfg.lora_r or 16)
    if mode == "full":
        weights = shape.params * 4
        trainable = shape.params
    elif mode == "lora":
        trainable = rank * shape.lora_params_per_rank
        weights = shape.params * compute_bytes + trainable * 4
    elif mode == "qlora":
        trainable = rank * shape.lora_params_per_rank
        weights = shape.linear_params * 0.53 + (shape.params - shape.linear_params) * 2 + trainable * 4
    else:
        raise ValueError(mode)
    reference = 0.0
    if cfg.reference == "copy" and cfg.strategy in REFERENCE_STRATEGIES:
        reference = shape.params * (0.53 if mode == "qlora" else compute_bytes if mode != "full" else 4)
    tokens, scored = _tokens(cfg, batch_size)
    per_token_layer = (10 * shape.hidden + 4 * shape.intermediate) * compute_bytes
    if checkpointing:
        activations = tokens * shape.layers * shape.hidden * compute_bytes + tokens * per_token_layer
    else:
        activations = tokens * shape.layers * per_token_layer
    head = min(LOGPROB_CHUNK, scored) * shape.vocab * 4 * 3
    gradients, optimizer, gathered = trainable * 4, trainable * 8, 0.0
    n = num_processes if mode != "qlora" else 1
    if n > 1:
        root = shape.vocab * shape.hidden + shape.head_params
        layer = (shape.params - root) / max(1, shape.layers)
        gather_bytes = compute_bytes if (bf16 or mode == "lora") else 4  # bf16 parameters under mixed precision
        gathered = (root + 2 * layer) * gather_bytes + trainable / max(1, shape.layers) * 4
        weights, gradients, optimizer, reference = weights / n, gradients / n, optimizer / n, reference / n
    parts = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "reference": reference,
        "gathered": gathered,
        "activations": activations,
        "output head": head,
        "runtime": CUDA_OVERHEAD,
    }
    parts["total"] = sum(parts.values())
    return parts


def parse_size(text: str) -> float:
    match = re.fullmatch(r"\s*([0-9.]+)\s*(G|GB|GiB|M|MB|MiB)?\s*", text, flags=re.I)
    if not match:
        raise PreftuneError(f"--gpu-memory: expected a size like 16GB or 80GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "GB").lower()
    return value * (GiB if unit.startswith("g") else 2**20)


def largest_batch(
    shape: ModelShape, cfg: TrainConfig, mode: str, checkpointing: bool, bf16: bool, budget: float, num_processes: int = 1
) -> int:
    """The largest per-device batch (up to 64) whose estimate fits the budget; 0 if none does."""
    best = 0
    for batch in (1, 2, 4, 8, 16, 32, 64):
        if estimate(shape, cfg, mode, batch, checkpointing, bf16, num_processes)["total"] <= budget:
            best = batch
    return best


def report(name: str, cfg: TrainConfig, gpu_memory: str | None, num_processes: int = 1) -> str:
    if num_processes < 1:
        raise PreftuneError(f"--num-processes must be >= 1, got {num_processes}")
    shape = model_shape(name)
    bf16 = cfg.bf16 if cfg.bf16 is not None else True  # the estimate is for a GPU
    batch = cfg.per_device_train_batch_size
    lines = [
        f"model {name}: {shape.params / 1e6:.1f}M parameters ({shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}); batch {batch}, max_seq_length {cfg.max_seq_length}, "
        f"{'bf16' if bf16 else 'fp32'}, strategy {cfg.strategy}, "
        f"reference {cfg.reference if cfg.strategy in REFERENCE_STRATEGIES else 'none'}, "
        f"gradient_checkpointing {cfg.gradient_checkpointing}"
        + (f"; FSDP2 over {num_processes} processes (full and lora sharded, qlora per device)" if num_processes > 1 else ""),
        "",
        f"{'GiB':<12}" + "".join(f"{m:>10}" for m in ("full", "lora", "qlora")),
    ]
    table = {m: estimate(shape, cfg, m, batch, cfg.gradient_checkpointing, bf16, num_processes) for m in ("full", "lora", "qlora")}
    for part in table["full"]:
        lines.append(f"{part:<12}" + "".join(f"{table[m][part] / GiB:>10.2f}" for m in table))
    if gpu_memory:
        budget = parse_size(gpu_memory)
        lines += ["", f"settings that fit {budget / GiB:.0f} GiB (per device):"]
        for mode in ("full", "lora", "qlora"):
            options = []
            for checkpointing in (False, True):
                fit = largest_batch(shape, cfg, mode, checkpointing, bf16, budget, num_processes)
                if fit:
                    options.append(f"per_device_train_batch_size {fit}" + (" with gradient_checkpointing" if checkpointing else ""))
            keys = {"full": "lora_r: 0", "lora": f"lora_r: {cfg.lora_r or 16}", "qlora": f"lora_r: {cfg.lora_r or 16}, use_4bit: true"}[mode]
            if num_processes > 1 and mode != "qlora":
                keys += ", fsdp: full_shard"
            lines.append(f"  {mode:<6} ({keys}): " + ("; ".join(options) if options else "does not fit even at batch 1"))
    return "\n".join(lines)
