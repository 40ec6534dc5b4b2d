"""SFT sequences: which tokens are trained on, truncation, packing, and that a packed row scores
each sequence exactly as if it ran alone."""

from __future__ import annotations

import torch

from preftune.batching import encode_completion, encode_prompt
from preftune.data import SFTExample
from preftune.logprobs import CompletionLogprobs, completion_logps
from preftune.sequences import SequenceRow, TokenizedSequence, collate_sequences, pack, tokenize_example, tokenize_sft


def test_completion_only_loss_marks_the_completion_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    seq = tokenize_example(tok, SFTExample("t:1", prompt="The sky is", completion=" blue."), 64, None)
    prompt = encode_prompt(tok, "The sky is")
    completion = encode_completion(tok, "The sky is", " blue.")
    assert seq.input_ids == prompt + completion
    assert seq.loss_mask == [False] * len(prompt) + [True] * len(completion)
    assert seq.loss_tokens == len(completion) and completion[-1] == tok.eos_token_id
    every = tokenize_example(tok, SFTExample("t:1", prompt="The sky is", completion=" blue."), 64, None, completion_only_loss=False)
    assert every.loss_mask == [False] + [True] * (len(seq.input_ids) - 1)  # nothing predicts token 0


def test_conversation_trains_on_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "is the sky blue?"},
        {"role": "assistant", "content": "yes"},
    ]
    seq = tokenize_example(tok, SFTExample("t:1", messages=messages), 128, None)
    # The ids are the rendered conversation, and the trained tokens are exactly the two replies.
    assert tok.decode(seq.input_ids) == tok.apply_chat_template(messages, tokenize=False).rstrip("\n")
    trained = [i for i, m in zip(seq.input_ids, seq.loss_mask) if m]
    assert tok.decode(trained) == "hi<|im_end|>yes<|im_end|>"
    # The context before the first reply is the prompt exactly as DPO encodes it.
    first = encode_prompt(tok, messages[:1])
    assert seq.input_ids[: len(first)] == first and not any(seq.loss_mask[: len(first)])


def test_plain_text_trains_on_everything_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    seq = tokenize_example(tok, SFTExample("t:1", text="I loved this movie."), 64, None)
    assert seq.input_ids == tok("I loved this movie.")["input_ids"] + [tok.eos_token_id]
    assert seq.loss_mask == [False] + [True] * (len(seq.input_ids) - 1)


def test_truncation_cuts_the_prompt_from_the_left_and_the_rest_from_the_right(tiny_tokenizer):
    tok = tiny_tokenizer
    example = SFTExample("t:1", prompt="I loved this movie, it was wonderful and great.", completion=" yes yes yes yes")
    seq = tokenize_example(tok, example, max_seq_length=8, max_prompt_length=3)
    prompt = encode_prompt(tok, example.prompt)
    assert seq.truncated and len(seq.input_ids) == 8
    assert seq.input_ids[:3] == prompt[-3:] and seq.loss_mask == [False] * 3 + [True] * 5


def test_best_fit_decreasing_packing():
    seqs = [TokenizedSequence([1] * n, [True] * n) for n in (6, 5, 4, 3, 2)]
    # 6 opens row 0 (4 free), 5 opens row 1 (5 free), 4 fits row 0 best (exactly), 3 goes to row 1
    # (2 left), and 2 fits there exactly.
    assert pack(seqs, capacity=10) == [[0, 2], [1, 3, 4]]
    assert pack(seqs, capacity=6) == [[0], [1], [2, 4], [3]]


def test_a_packed_row_scores_each_sequence_as_alone(tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer
    examples = [
        SFTExample("t:1", prompt="The sky is", completion=" blue."),
        SFTExample("t:2", text="I hated this film, it was terrible."),
        SFTExample("t:3", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]),
    ]
    rows, stats = tokenize_sft(tok, examples, max_seq_length=64, max_prompt_length=None, packing=True)
    assert len(rows) == 1 and len(rows[0].sequences) == 3 and stats.rows == 1
    module = CompletionLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), token_accuracy=True)
    with torch.no_grad():
        packed, counts, correct, *_ = completion_logps(module, collate_sequences(rows, tok.eos_token_id))
        alone = [
            completion_logps(module, collate_sequences([SequenceRow(0, [s])], tok.eos_token_id))
            for s in rows[0].sequences
        ]
    assert torch.allclose(packed, sum(a[0] for a in alone), atol=1e-4)
    assert int(counts[0]) == rows[0].loss_tokens == sum(int(a[1][0]) for a in alone)
    assert float(correct[0]) == sum(float(a[2][0]) for a in alone)
    # Batched unpacked rows (padding, plain mask) give the same per-row values (the packed row holds
    # the sequences longest first).
    unpacked, _ = tokenize_sft(tok, examples, max_seq_length=64, max_prompt_length=None, packing=False)
    lengths = [len(r.sequences[0].input_ids) for r in unpacked]
    order = sorted(range(3), key=lambda i: -lengths[i])
    assert [unpacked[i].sequences[0] for i in order] == rows[0].sequences
    with torch.no_grad():
        batched = completion_logps(module, collate_sequences(unpacked, tok.eos_token_id))[0]
    assert torch.allclose(batched[order], torch.cat([a[0] for a in alone]), atol=1e-4)
