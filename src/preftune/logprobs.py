"""Summed completion log-probabilities, without full-vocabulary logits for the whole batch.

A causal LM's forward returns logits of shape (rows, length, vocab) in one piece: for a 49k
vocabulary and a 2x8x1024 batch that is 3.2 GB in fp32, most of it for prompt and padding positions
that a preference loss never reads. Here the transformer body runs once, the hidden states of the
completion positions alone are gathered, and the output head plus log-softmax run over them in
chunks. Under autograd each chunk is checkpointed, so backward recomputes one chunk's logits at a
time instead of keeping them all. When the head is frozen (LoRA, QLoRA) even that recomputation is
skipped: the gradient with respect to the hidden state is computed in the forward pass, while the
chunk's probabilities are at hand (`_FrozenHeadLogps`). That is why this module exists instead of
`model(...).logits`.
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


def _token_logps_and_hits(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head(hidden).float()
    return -F.cross_entropy(logits, targets, reduction="none"), (logits.argmax(-1) == targets).float()


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target | h) through a frozen linear head, one chunk of positions at a time.

    d log p_t / d h = W[t] - sum_v p_v W[v], known as soon as the chunk's softmax is: computing it
    in forward costs one (chunk x vocab) @ (vocab x hidden) product, the one backward would do
    anyway, and saves backward from recomputing the chunk's logits (a checkpointed chunk runs the
    head twice). Only a (positions x hidden) tensor is kept for backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int, want_hits: bool):  # type: ignore[override]
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        hits = hidden.new_zeros(hidden.shape[0] if want_hits else 0, dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            log_probs = F.linear(h, weight, bias).float().log_softmax(-1)
            logps[start : start + len(t)] = log_probs.gather(1, t[:, None]).squeeze(1)
            if want_hits:
                hits[start : start + len(t)] = (log_probs.argmax(-1) == t).float()
            probs = log_probs.exp_().to(weight.dtype)
            grad[start : start + len(t)] = (weight[t] - probs @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(hits)
        return logps, hits

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_hits: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_logps[:, None].to(grad.dtype), None, None, None, None, None


def _frozen_linear_head(head: nn.Module, hidden: torch.Tensor) -> bool:
    """The fast path applies to a plain linear head that trains nothing, under a body that does."""
    return (
        type(head) is nn.Linear
        and torch.is_grad_enabled()
        and hidden.requires_grad
        and not any(p.requires_grad for p in head.parameters())
    )


def chunked_token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, hits: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target | hidden) for N positions, materialising at most `chunk_size` x vocab logits.
    With `hits`, also whether each target is the most likely token (for SFT's token accuracy)."""
    if _frozen_linear_head(head, hidden):
        logps, hit = _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, hits)
        return (logps, hit) if hits else logps
    parts, hit_parts = [], []
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    fn = _token_logps_and_hits if hits else _token_logps
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        out = checkpoint(fn, head, h, t, use_reentrant=False) if grad else fn(head, h, t)
        if hits:
            parts.append(out[0]), hit_parts.append(out[1])
        else:
            parts.append(out)
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if hits else empty
    return (torch.cat(parts), torch.cat(hit_parts)) if hits else torch.cat(parts)


MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "score_row",
    "score_src",
    "score_tgt",
    "score_out",
    "index",
    "output_slot",
)


def _attention_mask(model: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """A 4D boolean mask as the model's attention kernel wants it: eager attention adds the mask
    to the scores, so it needs 0 / -inf rather than True / False."""
    if mask.dim() != 4:
        return mask
    impl = getattr(getattr(_unwrap_peft(model), "config", None), "_attn_implementation", None)
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
            ~mask, torch.finfo(torch.float32).min
        )
    return mask


class CompletionLogprobs(nn.Module):
    """Wraps a causal LM: forward returns each completion's summed log-prob and token count.

    The batch says which tokens to score and which position predicts each (see `batching.py`), so
    one forward serves both the separate layout and the shared-prompt layout. Wrapping (rather than
    calling a function on the model) keeps the whole computation inside one `forward`, so
    `accelerate`'s DDP/FSDP wrappers see it and synchronise gradients as usual.
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, token_accuracy: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.token_accuracy = token_accuracy  # also count argmax hits per output (SFT's metric)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        score_row: torch.Tensor,
        score_src: torch.Tensor,
        score_tgt: torch.Tensor,
        score_out: torch.Tensor,
        index: torch.Tensor,
        output_slot: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """(sums, counts), one per output (`len(output_slot)` of them): for pairs 2B, pair i's chosen
        completion at i, its rejected at B + i. With `token_accuracy`, a third tensor: per output,
        how many scored tokens were the model's most likely token."""
        mask = _attention_mask(self.model, attention_mask)
        targets = input_ids[score_row, score_tgt]
        parts = split_body_and_head(self.model)
        hits = None
        if parts is not None:
            body, head = parts
            hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)[0]
            out = chunked_token_logps(head, hidden[score_row, score_src], targets, self.chunk_size, hits=self.token_accuracy)
            token_logps, hits = out if self.token_accuracy else (out, None)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            scored = logits[score_row, score_src].float()
            token_logps = -F.cross_entropy(scored, targets, reduction="none")
            if self.token_accuracy:
                hits = (scored.argmax(-1) == targets).float()
        num_out = output_slot.shape[0]
        sums = torch.zeros(num_out, dtype=torch.float32, device=input_ids.device).index_add(0, score_out, token_logps)
        counts = torch.zeros(num_out, dtype=torch.long, device=input_ids.device).index_add(
            0, score_out, torch.ones_like(score_out)
        )
        if hits is None:
            return sums, counts
        correct = torch.zeros(num_out, dtype=torch.float32, device=input_ids.device).index_add(0, score_out, hits.detach())
        return sums, counts, correct


def completion_logps(module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Call a (possibly DDP-wrapped) `CompletionLogprobs` on a collated batch."""
    return module(*(batch[name] for name in MODEL_INPUTS))
