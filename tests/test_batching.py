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
