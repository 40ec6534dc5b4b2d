"""Completion log-probs: the chunked computation equals the textbook full-logits one, and the
shared-prompt layout equals separate encoding, in values and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from preftune.batching import collate_pairs, truncate_pair
from preftune.logprobs import CompletionLogprobs, completion_logps, split_body_and_head
from preftune.masks import segment_mask


def naive_logps(model, pairs):
    """Each completion in its own unpadded sequence, full logits, log_softmax, sum."""
    chosen, rejected = [], []
    for p in pairs:
        for completion, out in ((p.chosen_ids, chosen), (p.rejected_ids, rejected)):
            ids = torch.tensor([p.prompt_ids + completion])
            logps = model(input_ids=ids).logits.float()[0, :-1].log_softmax(-1)
            scored = logps[len(p.prompt_ids) - 1 :].gather(-1, ids[0, len(p.prompt_ids) :, None])
            out.append(scored.sum())
    return torch.stack(chosen + rejected)


def make_pairs(vocab: int):
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    # Different prompt and completion lengths, so both layouts need padding.
    return [
        truncate_pair(0, ids(5), ids(4), ids(2), 64, 32),
        truncate_pair(1, ids(2), ids(1), ids(6), 64, 32),
        truncate_pair(2, ids(7), ids(3), ids(3), 64, 32),
    ]


@pytest.mark.parametrize("share_prompt", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layouts_and_chunking_match_separate_full_logits(share_prompt, attn):
    model = build_tiny_model(64, seed=1)
    model.config._attn_implementation = attn
    pairs = make_pairs(64)
    module = CompletionLogprobs(model, chunk_size=3)  # several chunks, one partial
    assert split_body_and_head(model) is not None

    sums, counts, *_ = completion_logps(module, collate_pairs(pairs, pad_id=0, share_prompt=share_prompt))
    sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    expected = naive_logps(model, pairs)
    expected.sum().backward()
    assert counts.tolist() == [4, 1, 3, 2, 6, 3]
    assert torch.allclose(sums, expected, atol=1e-5), (sums, expected)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_shared_layout_mask_and_positions():
    pair = truncate_pair(0, [11, 12], [21, 22], [31], 64, 32)
    batch = collate_pairs([pair], pad_id=0, share_prompt=True)
    assert batch["input_ids"].tolist() == [[11, 12, 21, 22, 31]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]  # rejected restarts after the prompt
    assert batch["doc_ids"].tolist() == [[0, 0, 0, 0, 0]] and batch["branch_ids"].tolist() == [[0, 0, 1, 1, 2]]
    allowed = segment_mask(batch["doc_ids"], batch["branch_ids"], batch["position_ids"])[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # the rejected token sees the prompt and itself, not the chosen tokens
    ]
    # Chosen tokens 2, 3 are predicted from 1, 2; the rejected token 4 from the prompt's end, 1.
    assert batch["score_src"].tolist() == [1, 2, 1] and batch["score_tgt"].tolist() == [2, 3, 4]
    assert batch["score_out"].tolist() == [0, 0, 1] and int(batch["num_tokens"]) == 5


def test_lora_model_and_no_grad_path():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(64, seed=2)
    pairs = make_pairs(64)
    with torch.no_grad():
        expected = naive_logps(model, pairs)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        sums = completion_logps(CompletionLogprobs(peft_model, chunk_size=4), collate_pairs(pairs, 0)).sums
    # Fresh LoRA (B = 0) leaves the model unchanged.
    assert torch.allclose(sums, expected, atol=1e-5)


def test_logit_transforms_take_the_generic_path():
    model = build_tiny_model(64, seed=3)
    model.config.final_logit_softcapping = 30.0  # a Gemma-2 style head: not a plain projection
    assert split_body_and_head(model) is None
    pairs = make_pairs(64)
    with torch.no_grad():
        sums = completion_logps(CompletionLogprobs(model), collate_pairs(pairs, 0)).sums
        expected = naive_logps(model, pairs)
    assert torch.allclose(sums, expected, atol=1e-5)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_frozen_head_gradient_in_forward_matches_autograd(share_prompt):
    """With the output head frozen (LoRA), d log p / d hidden is computed in forward: values, token
    hits and every gradient equal the textbook full-logits computation."""
    from preftune.logprobs import chunked_token_logps

    model = build_tiny_model(64, seed=4)
    model.get_output_embeddings().weight.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied or not, the head trains nothing
    pairs = make_pairs(64)
    module = CompletionLogprobs(model, chunk_size=3, token_accuracy=True)
    batch = collate_pairs(pairs, pad_id=0, share_prompt=share_prompt)
    sums, counts, correct, *_ = completion_logps(module, batch)
    sums.mul(torch.arange(1.0, 7.0)).sum().backward()  # a different weight per completion
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    expected = naive_logps(model, pairs)
    expected.mul(torch.arange(1.0, 7.0)).sum().backward()
    assert torch.allclose(sums, expected, atol=1e-5), (sums, expected)
    assert grads and all(torch.allclose(grads[n], p.grad, atol=1e-5) for n, p in model.named_parameters() if p.requires_grad)

    # The fast path was the one taken, and its token hits equal the checkpointed path's.
    head = model.get_output_embeddings()
    hidden = torch.randn(7, head.in_features, requires_grad=True)
    targets = torch.randint(0, 64, (7,))
    fast, fast_hits = chunked_token_logps(head, hidden, targets, chunk_size=3, hits=True)
    assert type(fast.grad_fn).__name__ == "_FrozenHeadLogpsBackward"
    head.weight.requires_grad_(True)
    slow, slow_hits = chunked_token_logps(head, hidden, targets, chunk_size=3, hits=True)
    assert type(slow.grad_fn).__name__ != "_FrozenHeadLogpsBackward"
    assert torch.allclose(fast, slow, atol=1e-6) and torch.equal(fast_hits, slow_hits)
    assert correct.sum() <= counts.sum()


def naive_wpo(model, pairs):
    """Per completion: sum over its tokens of log p(token) - log sum_v p_v^2, from full logits."""
    out = {0: [], 1: []}
    for p in pairs:
        for slot, completion in enumerate((p.chosen_ids, p.rejected_ids)):
            ids = torch.tensor([p.prompt_ids + completion])
            logps = model(input_ids=ids).logits.float()[0, :-1].log_softmax(-1)[len(p.prompt_ids) - 1 :]
            token = logps.gather(-1, ids[0, len(p.prompt_ids) :, None]).squeeze(-1)
            out[slot].append((token - torch.log((logps.exp() ** 2).sum(-1))).sum())
    return torch.stack(out[0] + out[1])


@pytest.mark.parametrize("head_trains", [True, False])
@pytest.mark.parametrize("softcap", [False, True])
def test_wpo_sums_match_full_logits(head_trains, softcap):
    model = build_tiny_model(64, seed=5)
    if softcap:
        model.config.final_logit_softcapping = 30.0  # the model's own forward: the generic path
    model.get_output_embeddings().weight.requires_grad_(head_trains)
    pairs = make_pairs(64)
    module = CompletionLogprobs(model, chunk_size=3, wpo=True)
    out = completion_logps(module, collate_pairs(pairs, pad_id=0))
    sums, counts, wpo = out.sums, out.counts, out.wpo
    with torch.no_grad():
        expected = naive_wpo(model, pairs)
    assert not wpo.requires_grad and sums.requires_grad
    assert torch.allclose(wpo, expected, atol=1e-5), (wpo, expected)
    assert torch.isfinite(wpo).all()
    assert wpo.shape == counts.shape == (6,)
