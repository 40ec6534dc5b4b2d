"""Chunked completion log-probs equal the textbook full-logits computation, values and gradients."""

from __future__ import annotations

import torch

from conftest import build_tiny_model
from preftune.logprobs import CompletionLogprobs, split_body_and_head


def naive_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = completion_mask[:, 1:].float()
    return (logps * mask).sum(-1), mask.sum(-1).long()


def make_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (4, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[3, 5:] = 0
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[0, 3:9] = 1
    completion_mask[1, 2:7] = 1
    completion_mask[2, 6:9] = 1
    completion_mask[3, 4:5] = 1
    return input_ids, attention_mask, completion_mask


def test_chunked_equals_full_logits_values_and_gradients():
    model = build_tiny_model(64, seed=1)
    batch = make_batch(64)
    module = CompletionLogprobs(model, chunk_size=3)  # several chunks, one partial
    assert split_body_and_head(model) is not None

    sums, lengths = module(*batch)
    sums.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref_sums, ref_lengths = naive_logps(model, *batch)
    ref_sums.sum().backward()
    assert lengths.tolist() == ref_lengths.tolist() == [6, 5, 3, 1]
    assert torch.allclose(sums, ref_sums, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_no_grad_path_and_lora_model():
    from peft import LoraConfig, get_peft_model

    model = build_tiny_model(64, seed=2)
    batch = make_batch(64)
    with torch.no_grad():
        expected, _ = naive_logps(model, *batch)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        sums, _ = CompletionLogprobs(peft_model, chunk_size=4)(*batch)
    # Fresh LoRA (B = 0) leaves the model unchanged.
    assert torch.allclose(sums, expected, atol=1e-5)


def test_logit_transforms_take_the_generic_path():
    model = build_tiny_model(64, seed=3)
    model.config.final_logit_softcapping = 30.0  # a Gemma-2 style head: not a plain projection
    assert split_body_and_head(model) is None
    batch = make_batch(64)
    with torch.no_grad():
        sums, _ = CompletionLogprobs(model)(*batch)
        expected, _ = naive_logps(model, *batch)
    assert torch.allclose(sums, expected, atol=1e-5)
