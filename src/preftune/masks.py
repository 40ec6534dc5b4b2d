"""Attention masks built from segments, in the form each model's attention needs.

A batch row may hold more than one sequence: a prompt followed by both its completions (the
shared-prompt layout of `batching.py`), or several SFT sequences packed together
(`sequences.py`). Collation describes such a row by segments, not by a finished mask:

- `doc_ids[b, t]`: which sequence of the row token t belongs to (-1: padding);
- `branch_ids[b, t]`: 0 for a part every branch of that sequence reads (a shared prompt), k > 0
  for branch k (completion k), which no other branch may read;
- `position_ids[b, t]`: the token's position in its own sequence, as if it ran alone.

From those, `build_attention_mask` makes what the model's attention needs, because
transformers uses a 4D mask exactly as given and then adds nothing of its own: a sliding-window
layer needs the window inside its mask (per layer type, as a dict, where full and sliding layers
mix); eager attention adds the mask to its scores (0 / -inf, not True / False); FlexAttention
wants a `BlockMask` (a dense mask would be added to its scores as 0 / 1). Where no custom mask
can be right (ALiBi biases read physical key positions; recurrent, SSM and convolution layers
carry state from one token to the next, across segments; an attention implementation not listed
here), `attention_spec` says why, and the caller runs one sequence per row instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Attention implementations whose masks are built here. Flash-attention takes no custom mask.
MASKED_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention")
# Layer types (transformers' `config.layer_types`) that attend through a mask; any other kind
# ("linear_attention", "conv", "mamba", "hybrid", ...) carries state along the row.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
# Model types whose position bias is ALiBi computed from physical key positions or a 2D mask.
_ALIBI_MODEL_TYPES = ("bloom", "mpt")
# Class-name fragments of state-carrying layers, for models whose config names no layer types.
_STATEFUL_NAMES = ("Mamba", "Mixer", "Rwkv", "RWKV", "GatedDeltaNet", "ShortConv", "Recurrent", "Rglru", "SSM", "xLSTM")


@dataclass(frozen=True)
class AttentionSpec:
    """What a model's attention needs from a custom mask, read from its structure.

    `blocker` is None when segment masks can be made right for the model, else the reason they
    cannot (then every sequence gets its own row: no shared prompt, no packing)."""

    implementation: str
    sliding_window: int | None = None  # tokens a sliding layer sees, itself included
    layer_types: tuple[str, ...] = ()  # the attention layer types present, when the model mixes them
    blocker: str | None = None

    @property
    def segments_ok(self) -> bool:
        return self.blocker is None


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def text_config(model: nn.Module) -> Any:
    config = getattr(base_model(model), "config", None)
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def _uses_alibi(config: Any) -> bool:
    if getattr(config, "model_type", None) in _ALIBI_MODEL_TYPES:
        attn = getattr(config, "attn_config", None)  # MPT can turn ALiBi off
        return bool(getattr(attn, "alibi", True)) if attn is not None else True
    return bool(getattr(config, "alibi", False))  # Falcon's option


def _stateful_layer(model: nn.Module) -> str | None:
    for module in base_model(model).modules():
        name = type(module).__name__
        if isinstance(module, nn.Conv1d) or any(part in name for part in _STATEFUL_NAMES):
            return name
    return None


def attention_spec(model: nn.Module) -> AttentionSpec:
    """Decide from the model's structure whether segment masks can be right, and what they need."""
    base = base_model(model)
    config = text_config(model)
    impl = str(getattr(getattr(base, "config", None), "_attn_implementation", None) or "eager")
    if impl not in MASKED_IMPLEMENTATIONS:
        reason = "it takes no custom mask" if impl.startswith("flash") else "preftune builds no masks for it"
        return AttentionSpec(impl, blocker=f"attention implementation '{impl}': {reason}")
    if _uses_alibi(config):
        return AttentionSpec(impl, blocker="ALiBi position bias reads physical positions, not position ids")
    declared = tuple(getattr(config, "layer_types", None) or ())
    stateful = sorted({t for t in declared if t not in ATTENTION_LAYER_TYPES})
    if stateful:
        return AttentionSpec(impl, blocker=f"{', '.join(stateful)} layers carry state from one segment into the next")
    layer = _stateful_layer(model)
    if layer is not None:
        return AttentionSpec(impl, blocker=f"{layer} layers carry state from one segment into the next")
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False or not window or window <= 0:
        window = None
    present = tuple(t for t in ATTENTION_LAYER_TYPES if t in declared)
    if declared and "sliding_attention" not in declared:
        window = None  # the window setting is there, but no layer uses it
    return AttentionSpec(impl, sliding_window=int(window) if window else None, layer_types=present if len(present) > 1 else ())


def needs_segments(batch: dict[str, torch.Tensor]) -> bool:
    """Whether any row of the batch holds more than one segment (else a padding mask suffices)."""
    return bool(batch.get("segmented", torch.zeros(())).item())


def segment_mask(
    doc_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None = None
) -> torch.Tensor:
    """(B, 1, L, L) boolean, True where query t may attend to key s: s is not later than t, in the
    same sequence, in the shared part or t's own branch, and (with a window) fewer than `window`
    positions back. A padding query attends to itself only, so no softmax row is empty."""
    width = doc_ids.shape[1]
    qd, kd = doc_ids[:, :, None], doc_ids[:, None, :]
    qb, kb = branch_ids[:, :, None], branch_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = causal & (qd == kd) & (kd >= 0) & ((kb == 0) | (kb == qb))
    if window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    allowed |= torch.eye(width, dtype=torch.bool, device=doc_ids.device) & (qd < 0)
    return allowed[:, None]


def _flex_block_mask(doc_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Any, h: Any, q: Any, k: Any) -> Any:
        qd, kd = doc_ids[b, q], doc_ids[b, k]
        qb, kb = branch_ids[b, q], branch_ids[b, k]
        ok = (k <= q) & (qd == kd) & (kd >= 0) & ((kb == 0) | (kb == qb))
        if window is not None:
            ok = ok & (position_ids[b, q] - position_ids[b, k] < window)
        return ok | ((q == k) & (qd < 0))

    batch, width = doc_ids.shape
    return create_block_mask(mask_mod, batch, None, width, width, device=str(doc_ids.device))


def _one_mask(spec: AttentionSpec, batch: dict[str, torch.Tensor], window: int | None, dtype: torch.dtype) -> Any:
    doc, branch, pos = batch["doc_ids"], batch["branch_ids"], batch["position_ids"]
    if spec.implementation == "flex_attention":
        return _flex_block_mask(doc, branch, pos, window)
    mask = segment_mask(doc, branch, pos, window)
    if spec.implementation == "eager":  # eager adds the mask to the scores
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def build_attention_mask(spec: AttentionSpec, batch: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> Any:
    """What to pass as `attention_mask`: the 2D padding mask when every row is one sequence
    (transformers then builds causal and window masks itself), else the segment mask in the
    model's form; a dict keyed by layer type where full and sliding layers mix."""
    if not needs_segments(batch):
        return batch["attention_mask"]
    if spec.blocker is not None:
        raise ValueError(f"this batch needs segment masks, which this model cannot take: {spec.blocker}")
    if spec.layer_types:
        return {
            kind: _one_mask(spec, batch, spec.sliding_window if kind == "sliding_attention" else None, dtype)
            for kind in spec.layer_types
        }
    return _one_mask(spec, batch, spec.sliding_window, dtype)
