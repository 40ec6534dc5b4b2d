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

import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from preftune.masks import AttentionSpec, attention_spec, base_model, build_attention_mask, text_config

# Config attributes that post-process logits after the head: such models take the generic path.
# The list is a first guess only; `check_paths` compares the fast head with the model's own
# forward at the start of every run, which catches what the list misses.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "lm_head_multiplier",
    "logits_soft_cap",
)


def split_body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(transformer body, output head) of an HF causal LM, or None where the head is not a plain
    projection (logit soft-capping or scaling) and the model's own forward must be used."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None:
        return None
    configs = {id(c): c for c in (config, text_config(base))}.values()
    if any(getattr(c, name, None) not in (None, 1.0) for c in configs for name in _LOGIT_TRANSFORMS):
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
    "doc_ids",
    "branch_ids",
    "segmented",
    "score_row",
    "score_src",
    "score_tgt",
    "score_out",
    "index",
    "output_slot",
)


class Scored(NamedTuple):
    """Per output of a batch (`len(output_slot)` of them; for pairs 2B, pair i's chosen at i, its
    rejected at B + i): the summed log-prob of its scored tokens and their count; with
    `token_accuracy`, how many were the model's most likely token; with `wpo`, the sum of log
    p(token) - log sum_v p_v^2 (no gradient); and, when a MoE model trains with its router
    load-balancing loss, that loss for the whole batch (a scalar)."""

    sums: torch.Tensor
    counts: torch.Tensor
    hits: torch.Tensor | None = None
    wpo: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class RouterAux:
    """A MoE model's router load-balancing loss, as its own causal-LM class computes it
    (`load_balancing_loss_func` of its modeling module, its expert count and top-k), times `coef`."""

    loss_fn: Callable[..., Any]
    num_experts: int
    top_k: int
    coef: float


def router_aux(model: nn.Module, coef: float | None = None) -> RouterAux | None:
    """The model's router aux loss, or None for a dense model (or `coef` 0). `coef` None takes the
    model config's `router_aux_loss_coef`."""
    import sys

    base = base_model(model)
    loss_fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
    num_experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
    if loss_fn is None or not num_experts or not top_k:
        return None
    if coef is None:
        coef = getattr(base, "router_aux_loss_coef", None)
        if coef is None:
            coef = getattr(text_config(base), "router_aux_loss_coef", 0.0)
    if not coef:
        return None
    return RouterAux(loss_fn, int(num_experts), int(top_k), float(coef))


class CompletionLogprobs(nn.Module):
    """Wraps a causal LM: forward returns each completion's summed log-prob and token count.

    The batch says which tokens to score and which position predicts each (see `batching.py`), so
    one forward serves both the separate layout and the shared-prompt layout; the attention mask is
    built here from the batch's segments, in the form this model's attention needs (`masks.py`).
    Wrapping (rather than calling a function on the model) keeps the whole computation inside one
    `forward`, so `accelerate`'s DDP/FSDP wrappers see it and synchronise gradients as usual.

    `fast_head`: None decides from the model's structure (`split_body_and_head`); False forces the
    model's own forward (set when `check_paths` found the fast head wrong for this model).
    `router_aux`: a MoE model's load-balancing loss, computed in training forwards (with grad).
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 1024,
        token_accuracy: bool = False,
        wpo: bool = False,
        fast_head: bool | None = None,
        router_aux: RouterAux | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.token_accuracy = token_accuracy  # also count argmax hits per output (SFT's metric)
        self.wpo = wpo  # also sum log p(token) - log sum_v p_v^2 per output (WPO's weights)
        self.fast_head = fast_head
        self.router_aux = router_aux
        self._spec: AttentionSpec | None = None

    @property
    def spec(self) -> AttentionSpec:
        if self._spec is None:
            self._spec = attention_spec(self.model)
        return self._spec

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        branch_ids: torch.Tensor,
        segmented: torch.Tensor,
        score_row: torch.Tensor,
        score_src: torch.Tensor,
        score_tgt: torch.Tensor,
        score_out: torch.Tensor,
        index: torch.Tensor,
        output_slot: torch.Tensor,
    ) -> Scored:
        rows = {"attention_mask": attention_mask, "position_ids": position_ids, "doc_ids": doc_ids,
                "branch_ids": branch_ids, "segmented": segmented}
        mask = build_attention_mask(self.spec, rows)
        targets = input_ids[score_row, score_tgt]
        parts = split_body_and_head(self.model) if self.fast_head is not False else None
        aux = self.router_aux if (self.router_aux is not None and parts is not None and torch.is_grad_enabled()) else None
        extra = {"output_router_logits": True} if aux is not None else {}
        if parts is not None:
            body, head = parts
            out = body(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **extra)
            hidden = out[0]
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

        aux_loss = None
        if aux is not None:
            # Padding is left out of the expert load, as the model's own forward does with its 2D mask.
            aux_loss = aux.loss_fn(out.router_logits, aux.num_experts, aux.top_k, (doc_ids >= 0).long())
        return Scored(
            per_output(token_logps),
            per_output(torch.ones_like(score_out), torch.long),
            per_output(hits.detach()) if self.token_accuracy else None,
            per_output((token_logps.detach() - sq).float()) if self.wpo else None,
            aux_loss,
        )


def completion_logps(module: nn.Module, batch: dict[str, torch.Tensor]) -> Scored:
    """Call a (possibly DDP- or FSDP-wrapped) `CompletionLogprobs` on a collated batch, each tensor
    by its name: a reordered field can then never feed the wrong argument."""
    return module(**{name: batch[name] for name in MODEL_INPUTS})


# ---------------------------------------------------------------------------------------------
# Fast paths that prove themselves


@dataclass
class PathCheck:
    """Which fast paths a model takes, and how far each was from the model's own forward."""

    fast_head: bool
    segments: bool  # shared prompt / packing: several segments in one row
    head_error: float | None = None  # max |fast - own| over outputs, nats (None: not tried)
    segment_error: float | None = None
    head_reason: str = ""  # why the fast head was left, if it was
    segment_reason: str = ""  # why segments were left, if they were
    outputs: int = 0
    seconds: float = 0.0

    def summary(self, what: str) -> str:
        """One line: the paths taken, why any fast one was left, and what the check cost."""
        head = "chunked output head" if self.fast_head else f"the model's own forward ({self.head_reason})"
        layout = f"several segments a row ({what})" if self.segments else "one sequence a row"
        if self.segment_reason:
            layout += f" ({self.segment_reason})"
        errors = [e for e in (self.head_error, self.segment_error) if e is not None]
        if not errors:
            return f"{head}; {layout}; no fast path to check"
        checked = f"checked against the model's own forward on {self.outputs} sequences in {self.seconds:.2f}s"
        return f"{head}; {layout}; {checked}, max |diff| {max(errors):.1e} nats"


def tolerance(model: nn.Module) -> float:
    """Allowed |fast - own| per scored token: fp32 agrees to ~1e-6; TF32 matmuls (fp32 weights on
    a GPU that allows them) keep 10 mantissa bits; 16-bit and quantised weights round differently
    with a different row layout."""
    params = [p for p in base_model(model).parameters() if p.is_floating_point()]
    if {p.dtype for p in params} != {torch.float32}:
        return 5e-2
    on_cuda = any(p.device.type == "cuda" for p in params)
    return 1e-2 if on_cuda and torch.backends.cuda.matmul.allow_tf32 else 1e-4


@torch.no_grad()
def own_forward_sums(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The yardstick: each row of a one-sequence-a-row batch through the model's own forward alone
    (no padding, no mask, the model's own head and logits), its scored tokens' log-probs summed per
    output. The head runs over the scored tail only (`logits_to_keep`, where the model takes it):
    a long prompt's full-vocabulary logits would cost more memory than a training step."""
    sums = torch.zeros(batch["output_slot"].shape[0], dtype=torch.float64)
    device = batch["input_ids"].device
    for r in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][r].sum())
        ids = batch["input_ids"][r : r + 1, :length]
        sel = (batch["score_row"] == r).nonzero(as_tuple=True)[0]
        if not len(sel):
            continue
        src = batch["score_src"][sel]
        first = int(src.min())
        try:
            logits = model(input_ids=ids, use_cache=False, logits_to_keep=length - first).logits[0]
        except TypeError:  # a model without `logits_to_keep`
            logits = model(input_ids=ids, use_cache=False).logits[0]
        offset = length - logits.shape[0]  # the positions kept start here (0: all of them)
        targets = batch["input_ids"][r, batch["score_tgt"][sel]]
        logps = logits[src - offset].float().log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        sums.index_add_(0, batch["score_out"][sel].cpu(), logps.double().cpu())
    return sums.to(device)


@torch.no_grad()
def check_paths(
    model: nn.Module,
    plain: dict[str, torch.Tensor],
    segmented: dict[str, torch.Tensor] | None = None,
    group: torch.Tensor | None = None,
) -> PathCheck:
    """Compare the fast paths with the model's own forward on a few real rows, once per model.

    `plain` holds one sequence a row; `segmented` (optional) the same sequences in the layout the
    run wants (shared prompt, packing), whose output j sums the plain outputs i with `group[i] ==
    j` (identity when None). The fast head is kept where it agrees within `tolerance` per token,
    then the segment layout is tried with the head so chosen: where the model's structure rules
    segment masks out (`masks.attention_spec`), or where they disagree, the run takes one sequence
    a row. Nothing a model names is trusted on its own: this catches heads and attentions that no
    list of names foresaw."""
    import time

    started = time.perf_counter()
    report = PathCheck(fast_head=split_body_and_head(model) is not None, segments=segmented is not None)
    if not report.fast_head:
        report.head_reason = "its output head post-processes the logits"
    blocker = attention_spec(model).blocker if segmented is not None else None
    if blocker is not None:
        report.segments, report.segment_reason = False, blocker
    if not (report.fast_head or report.segments):
        return report  # the structure leaves nothing fast to check
    was_training = model.training
    model.eval()
    try:
        own = own_forward_sums(model, plain)
        ones = torch.ones_like(plain["score_out"], dtype=own.dtype)
        counts = torch.zeros_like(own).index_add_(0, plain["score_out"], ones)
        allowed = tolerance(model) * counts.clamp_min(1)
        report.outputs = int(own.shape[0])
        if report.fast_head:
            fast = completion_logps(CompletionLogprobs(model, fast_head=True), plain).sums.double()
            report.head_error = float((fast - own).abs().max()) if own.numel() else 0.0
            if ((fast - own).abs() > allowed).any():
                report.fast_head = False
                report.head_reason = f"the chunked output head was off by {report.head_error:.3g} nats"
        if report.segments:
            if group is not None:  # several plain outputs make one segmented output (packed rows)
                n = segmented["output_slot"].shape[0]
                group = group.to(own.device)
                own = own.new_zeros(n).index_add_(0, group, own)
                allowed = allowed.new_zeros(n).index_add_(0, group, allowed)
            try:
                got = completion_logps(CompletionLogprobs(model, fast_head=report.fast_head), segmented).sums.double()
                report.segment_error = float((got - own).abs().max()) if own.numel() else 0.0
                wrong = bool(((got - own).abs() > allowed).any())
                why = f"segment masks give log-probs off by {report.segment_error:.3g} nats"
            except Exception as exc:  # a model whose forward refuses such masks
                wrong, why = True, f"the model's forward refuses segment masks ({type(exc).__name__}: {str(exc)[:120]})"
            if wrong:
                report.segments, report.segment_reason = False, why
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - started
    return report


def prove_paths(
    model: nn.Module,
    batches: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, torch.Tensor | None] | None,
    main_says: Callable[[bool], bool] = lambda answer: answer,
) -> PathCheck | None:
    """`check_paths` on a strategy's check batches (plain, segmented, group; None: nothing fast to
    check), moved to the model's device. Every process takes the main process's verdict
    (`main_says`): processes that split rows differently would plan different steps and hang in
    the collectives."""
    if batches is None:
        return None
    device = next(model.parameters()).device
    plain, segmented, group = batches
    plain = {k: v.to(device) for k, v in plain.items()}
    segmented = {k: v.to(device) for k, v in segmented.items()} if segmented is not None else None
    report = check_paths(model, plain, segmented, group)
    report.fast_head, report.segments = main_says(report.fast_head), main_says(report.segments)
    return report


_PROVEN_HEADS: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def proven_head(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool | None:
    """The output head evaluation and scoring use for `model`, as training chooses it: the chunked
    fast head (None) once `check_paths` has found it equal to the model's own forward on `batch`
    (one sequence a row), else the model's own forward (False). Proven once per model object."""
    if model not in _PROVEN_HEADS:
        report = check_paths(model, batch)
        _PROVEN_HEADS[model] = report.fast_head
        if not report.fast_head and report.head_reason:
            import logging

            logging.getLogger("preftune").info("scoring with the model's own forward: %s", report.head_reason)
    return None if _PROVEN_HEADS[model] else False
