"""Tokenization by the scoring rule, truncation and collation."""

from __future__ import annotations

from preftune.batching import (
    collate_pairs,
    completion_text,
    encode_completion,
    encode_prompt,
    tokenize_dataset,
    truncate_pair,
)
from preftune.data import PreferenceExample


def ex(prompt, chosen, rejected):
    return PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, location="t:1", extra={})


def test_plain_text_prompt_and_completion(tiny_tokenizer):
    tok = tiny_tokenizer
    assert encode_prompt(tok, "The sky is") == tok("The sky is")["input_ids"]
    ids = encode_completion(tok, "The sky is", " blue.")
    assert ids == tok(" blue.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # An EOS already there is not doubled.
    assert encode_completion(tok, "x", " blue.<|im_end|>") == ids


def test_chat_prompt_has_one_bos_and_completion_stops_at_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = [{"role": "user", "content": "hello"}]
    ids = encode_prompt(tok, prompt)
    rendered = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2  # user + assistant turns only
    completion = [{"role": "assistant", "content": "hi"}]
    assert completion_text(tok, prompt, completion) == "hi<|im_end|>"  # template's trailing newline cut
    cids = encode_completion(tok, prompt, completion)
    assert cids[-1] == tok.eos_token_id and cids.count(tok.eos_token_id) == 1


def test_empty_prompt_gets_a_start_token(tiny_tokenizer):
    assert encode_prompt(tiny_tokenizer, "") == [tiny_tokenizer.bos_token_id]


def test_truncation_rules():
    # Prompt keeps its last 3 tokens; completions are cut from the right to fit 6 in total.
    pair = truncate_pair(0, [1, 2, 3, 4, 5], [10, 11, 12, 13], [20, 21], max_seq_length=6, max_prompt_length=3)
    assert pair.prompt_ids == [3, 4, 5]
    assert pair.chosen_ids == [10, 11, 12] and pair.chosen_truncated
    assert pair.rejected_ids == [20, 21] and not pair.rejected_truncated
    assert pair.prompt_truncated
    # A prompt limit as long as the sequence still leaves room for a completion.
    pair = truncate_pair(0, list(range(10)), [50, 51], [60], max_seq_length=4, max_prompt_length=8)
    assert pair.prompt_ids == [8, 9] and pair.chosen_ids == [50, 51] and pair.rejected_ids == [60]


def test_tokenize_dataset_counts_truncation(tiny_tokenizer):
    data = [ex("The sky is", " blue.", " black."), ex("I loved this movie, it was wonderful and great.", " yes", " no")]
    pairs, stats = tokenize_dataset(tiny_tokenizer, data, max_seq_length=64, max_prompt_length=4)
    assert stats.pairs == 2 and stats.prompts_truncated == 1 and stats.chosen_truncated == 0
    assert [p.index for p in pairs] == [0, 1]
    assert len(pairs[1].prompt_ids) == 4


def test_collate_separate_layout():
    pairs = [
        truncate_pair(7, [1, 2], [3], [4, 5, 6], 16, 8),
        truncate_pair(9, [1], [3, 3], [4], 16, 8),
    ]
    batch = collate_pairs(pairs, pad_id=0, share_prompt=False)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 3, 3, 0, 0], [1, 2, 4, 5, 6], [1, 4, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # Scored tokens: row, predicting position, own position, which completion.
    assert batch["score_row"].tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert batch["score_src"].tolist() == [1, 0, 1, 1, 2, 3, 0]
    assert batch["score_tgt"].tolist() == [2, 1, 2, 2, 3, 4, 1]
    assert batch["score_out"].tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert batch["index"].tolist() == [7, 9] and int(batch["num_tokens"]) == 3 + 3 + 5 + 2


def test_mismatched_partners_never_share_the_prompt_when_they_can_avoid_it():
    from preftune.batching import mismatched_partners

    prompts = ["a", "a", "b", "b", "c", "c", [{"role": "user", "content": "d"}]]
    partners = mismatched_partners(prompts, seed=0)
    assert all(prompts[p] != prompts[i] for i, p in enumerate(partners))
    assert partners == mismatched_partners(prompts, seed=0)  # fixed by the seed
    assert mismatched_partners(["same"] * 3, seed=1) != [0, 1, 2]  # all alike: another example still


def test_unpaired_items_carry_another_examples_completion(tiny_tokenizer):
    from preftune.batching import mismatched_partners, tokenize_unpaired
    from preftune.data import UnpairedExample

    examples = [
        UnpairedExample("The sky is", " blue.", True, "t:1"),
        UnpairedExample("I loved this movie", " yes", False, "t:2"),
        UnpairedExample("Question: two plus two?", " four.", True, "t:3"),
    ]
    items, stats = tokenize_unpaired(tiny_tokenizer, examples, 64, None, seed=4)
    partners = mismatched_partners([e.prompt for e in examples], 4)
    for item, example, partner in zip(items, examples, partners):
        assert item.completion_ids == encode_completion(tiny_tokenizer, example.prompt, example.completion)
        assert item.kl_ids == encode_completion(tiny_tokenizer, example.prompt, examples[partner].completion)
        assert item.label == example.label
    # Slot 1 alone collates the KL sequences: prompt + mismatched completion, one output per item.
    batch = collate_pairs(items, pad_id=0, share_prompt=True, slots=(1,))
    assert batch["output_slot"].tolist() == [1, 1, 1] and batch["score_out"].max() == 2
    assert batch["input_ids"][0, : len(items[0].prompt_ids) + len(items[0].kl_ids)].tolist() == items[0].prompt_ids + items[0].kl_ids
