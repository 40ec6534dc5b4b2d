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


def _log_sq_mass(log_probs_or_logits: torch.Tensor, normalised: bool) -> torch.Tensor:
    """log sum_v p_v^2 per position (WPO's normaliser), from log-probs or from raw logits."""
    if normalised:
        return torch.logsumexp(2.0 * log_probs_or_logits, dim=-1)
    return torch.logsumexp(2.0 * log_probs_or_logits, dim=-1) - 2.0 * torch.logsumexp(log_probs_or_logits, dim=-1)


def _token_stats(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, hits: bool, sq_mass: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target), argmax hits, log sum p^2) of one chunk; the last two are empty unless asked
    for, and carry no gradient."""
    logits = head(hidden).float()
    logps = -F.cross_entropy(logits, targets, reduction="none")
    empty = logps.new_zeros(0)
    with torch.no_grad():
        hit = (logits.argmax(-1) == targets).float() if hits else empty
        sq = _log_sq_mass(logits, normalised=False) if sq_mass else empty
    return logps, hit, sq


class _FrozenHeadLogps(torch.autograd.Function):
    """log p(target | h) through a frozen linear head, one chunk of positions at a time.

    d log p_t / d h = W[t] - sum_v p_v W[v], known as soon as the chunk's softmax is: computing it
    in forward costs one (chunk x vocab) @ (vocab x hidden) product, the one backward would do
    anyway, and saves backward from recomputing the chunk's logits (a checkpointed chunk runs the
    head twice). Only a (positions x hidden) tensor is kept for backward.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int, want_hits: bool, want_sq: bool):  # type: ignore[override]
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=torch.float32)
        hits = hidden.new_zeros(n if want_hits else 0, dtype=torch.float32)
        sq = hidden.new_zeros(n if want_sq else 0, dtype=torch.float32)
        grad = torch.empty_like(hidden)
        for start in range(0, n, chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            part = slice(start, start + len(t))
            log_probs = F.linear(h, weight, bias).float().log_softmax(-1)
            logps[part] = log_probs.gather(1, t[:, None]).squeeze(1)
            if want_hits:
                hits[part] = (log_probs.argmax(-1) == t).float()
            if want_sq:
                sq[part] = _log_sq_mass(log_probs, normalised=True)
            probs = log_probs.exp_().to(weight.dtype)
            grad[part] = (weight[t] - probs @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(hits, sq)
        return logps, hits, sq

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_hits: torch.Tensor, grad_sq: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_logps[:, None].to(grad.dtype), None, None, None, None, None, None


def _frozen_linear_head(head: nn.Module, hidden: torch.Tensor) -> bool:
    """The fast path applies to a plain linear head that trains nothing, under a body that does."""
    return (
        type(head) is nn.Linear
        and torch.is_grad_enabled()
        and hidden.requires_grad
        and not any(p.requires_grad for p in head.parameters())
    )


def chunked_token_stats(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, hits: bool = False, sq_mass: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(target | hidden), hits, log sum_v p_v^2) for N positions, materialising at most
    `chunk_size` x vocab logits. `hits` (whether each target is the most likely token: SFT's token
    accuracy) and `sq_mass` (WPO's normaliser) are empty unless asked for; neither has a gradient."""
    if _frozen_linear_head(head, hidden):
        return _FrozenHeadLogps.apply(hidden, head.weight, head.bias, targets, chunk_size, hits, sq_mass)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        args = (head, h, t, hits, sq_mass)
        parts.append(checkpoint(_token_stats, *args, use_reentrant=False) if grad else _token_stats(*args))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty
    return tuple(torch.cat(column) for column in zip(*parts))  # type: ignore[return-value]


def chunked_token_logps(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, hits: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(target | hidden) for N positions (and with `hits`, the argmax hits), in chunks."""
    logps, hit, _ = chunked_token_stats(head, hidden, targets, chunk_size, hits=hits)
    return (logps, hit) if hits else logps


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

    def __init__(self, model: nn.Module, chunk_size: int = 1024, token_accuracy: bool = False, wpo: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.token_accuracy = token_accuracy  # also count argmax hits per output (SFT's metric)
        self.wpo = wpo  # also sum log p(token) - log sum_v p_v^2 per output (WPO's weights)

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
        completion at i, its rejected at B + i. Then, with `token_accuracy`, per output how many
        scored tokens were the model's most likely token; with `wpo`, per output the sum over its
        tokens of log p(token) - log sum_v p_v^2, without gradient."""
        mask = _attention_mask(self.model, attention_mask)
        targets = input_ids[score_row, score_tgt]
        parts = split_body_and_head(self.model)
        if parts is not None:
            body, head = parts
            hidden = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False)[0]
            token_logps, hits, sq = chunked_token_stats(
                head, hidden[score_row, score_src], targets, self.chunk_size, hits=self.token_accuracy, sq_mass=self.wpo
            )
        else:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
            scored = logits[score_row, score_src].float()
            token_logps = -F.cross_entropy(scored, targets, reduction="none")
            with torch.no_grad():
                hits = (scored.argmax(-1) == targets).float() if self.token_accuracy else None
                sq = _log_sq_mass(scored, normalised=False) if self.wpo else None
        num_out = output_slot.shape[0]

        def per_output(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(num_out, dtype=dtype, device=input_ids.device).index_add(0, score_out, values)

        out = [per_output(token_logps), per_output(torch.ones_like(score_out), torch.long)]
        if self.token_accuracy:
            out.append(per_output(hits.detach()))
        if self.wpo:
            out.append(per_output((token_logps.detach() - sq).float()))
        return tuple(out)


def completion_logps(module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Call a (possibly DDP-wrapped) `CompletionLogprobs` on a collated batch."""
    return module(*(batch[name] for name in MODEL_INPUTS))
