"""Summed completion log-probabilities, without full-vocabulary logits for the whole batch.

A causal LM's forward returns logits of shape (rows, length, vocab) in one piece: for a 49k
vocabulary and a 2x8x1024 batch that is 3.2 GB in fp32, most of it for prompt and padding positions
that a preference loss never reads. Here the transformer body runs once, the hidden states of the
completion positions alone are gathered, and the output head plus log-softmax run over them in
chunks. Under autograd each chunk is checkpointed, so backward recomputes one chunk's logits at a
time instead of keeping them all. That is why this module exists instead of `model(...).logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Config attributes that post-process logits after the head: such models take the generic path.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _unwrap_peft(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def split_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(transformer body, output head) of an HF causal LM, or None where the head is not a plain
    projection (logit soft-capping or scaling) and the model's own forward must be used."""
    base = _unwrap_peft(model)
    config = getattr(base, "config", None)
    if config is None or any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or body is base:
        return None
    return body, head


def _token_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """log p(target | hidden) for N positions, materialising at most `chunk_size` x vocab logits."""
    parts = []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(parts)


class CompletionLogprobs(nn.Module):
    """Wraps a causal LM: forward returns each row's summed completion log-prob and token count.

    Wrapping (rather than calling a function on the model) keeps the whole computation inside one
    `forward`, so `accelerate`'s DDP/FSDP wrappers see it and synchronise gradients as usual.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Position t's token is scored by the output at t - 1.
        scored = completion_mask[:, 1:].bool()
        targets = input_ids[:, 1:][scored]
        rows = scored.nonzero(as_tuple=True)[0]
        parts = split_body_and_head(self.model)
        if parts is not None:
            body, head = parts
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            token_logps = chunked_token_logps(head, hidden[:, :-1][scored], targets, self.chunk_size)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            token_logps = -F.cross_entropy(logits[:, :-1][scored].float(), targets, reduction="none")
        sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
        sums = sums.index_add(0, rows, token_logps)
        return sums, scored.sum(dim=1)
