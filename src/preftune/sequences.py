"""Single sequences for supervised fine-tuning: tokenization with a loss mask, truncation, packing
and collation.

Tokens follow the scoring rule of `batching.py`, so SFT teaches exactly the sequences that DPO
later scores: a prompt/completion example is `encode_prompt` + `encode_completion` (completion
ended by EOS); a conversation is the chat template's rendering, cut turn by turn so each assistant
message is tokenized as a completion after the generation prompt; plain text is `tokenizer(text)`
plus EOS. The loss mask marks the tokens trained on: the completion (or the assistant messages), or
every token with `completion_only_loss: false`.

Packing puts several sequences in one row (best-fit decreasing, as TRL's `bfd` strategy) with
position ids restarting at each sequence and a block-diagonal causal mask, so no sequence sees
another: the log-probs equal those of the sequences run one by one, without the padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from preftune import chat
from preftune.batching import at_record, completion_text, effective_prompt_length, encode_completion, encode_prompt, segments
from preftune.data import SFTExample
from preftune.errors import PreftuneError


@dataclass
class TokenizedSequence:
    """One example's tokens; `loss_mask[t]` is True when token t is trained on (predicted from t - 1)."""

    input_ids: list[int]
    loss_mask: list[bool]
    truncated: bool = False

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss_mask[1:])


@dataclass
class SequenceRow:
    """What one batch row holds: one sequence, or several packed together."""

    index: int
    sequences: list[TokenizedSequence]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)

    @property
    def loss_tokens(self) -> int:
        return sum(s.loss_tokens for s in self.sequences)


@dataclass
class SequenceStats:
    examples: int = 0
    truncated: int = 0
    no_loss_tokens: int = 0  # examples left with nothing to learn after truncation
    rows: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    longest: int = 0
    locations: list[str] = field(default_factory=list)  # the first truncated examples

    def summary(self) -> str:
        share = 100 * self.loss_tokens / max(1, self.tokens)
        return (
            f"{self.examples} sequences in {self.rows} rows, {self.tokens} tokens ({self.loss_tokens} trained on, "
            f"{share:.0f}%); truncated: {self.truncated} (from the right); longest {self.longest} tokens"
        )


def _ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool, tools: Any = None) -> str:
    return chat.render(tokenizer, messages, generation_prompt=generation_prompt, tools=tools)


def encode_conversation(
    tokenizer: Any, messages: list[dict], location: str = "", tools: Any = None
) -> tuple[list[int], list[bool]]:
    """Ids and assistant mask of a conversation, up to its last assistant message.

    The context before the first assistant message is `encode_prompt` (the template with the
    generation prompt, tokenized once, as DPO scores it); each assistant message is
    `encode_completion` after its context; the text between turns is what the template renders
    between them. The template must render a conversation as a prefix of its continuation.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids: list[int] = []
    mask: list[bool] = []
    rendered = ""
    for i, message in enumerate(messages[: last + 1]):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i else ""
        if not ids:
            part = encode_prompt(tokenizer, messages[:i], tools) if i else []
        else:
            if not context.startswith(rendered):
                raise PreftuneError(
                    f"{location}: the chat template does not render this conversation turn by turn (a later turn "
                    "rewrites an earlier one); give it as prompt/completion records instead"
                )
            part = _ids(tokenizer, context[len(rendered) :])
        ids += part
        mask += [False] * len(part)
        completion = encode_completion(tokenizer, messages[:i], [message], tools)
        ids += completion
        mask += [True] * len(completion)
        rendered = context + completion_text(tokenizer, messages[:i], [message], tools)
    return ids, mask


def encode_example(tokenizer: Any, example: SFTExample) -> tuple[list[int], list[bool], int]:
    """(ids, loss mask, prompt length) of an example before truncation. The prompt length counts the
    tokens a prompt/completion example may lose from the left; other shapes have none (0)."""
    if example.kind == "completion":
        prompt = encode_prompt(tokenizer, example.prompt if example.prompt is not None else "", example.tools)
        completion = encode_completion(tokenizer, example.prompt or "", example.completion, example.tools)
        return prompt + completion, [False] * len(prompt) + [True] * len(completion), len(prompt)
    if example.kind == "messages":
        ids, mask = encode_conversation(tokenizer, example.messages or [], example.location, example.tools)
        return ids, mask, 0
    ids = [int(i) for i in tokenizer(example.text)["input_ids"]]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, [True] * len(ids), 0


def truncate_example(
    ids: Sequence[int],
    mask: Sequence[bool],
    prompt_length: int,
    max_seq_length: int,
    max_prompt_length: int | None,
    completion_only_loss: bool = True,
) -> TokenizedSequence:
    """A prompt cut from the left to the prompt limit (as for pairs), then the sequence from the
    right to `max_seq_length`; without `completion_only_loss` every token is trained on."""
    ids, mask = list(ids), list(mask)
    truncated = False
    if prompt_length:
        limit = effective_prompt_length(max_seq_length, max_prompt_length)
        if prompt_length > limit:
            truncated = True
            ids, mask = ids[prompt_length - limit :], mask[prompt_length - limit :]
    truncated = truncated or len(ids) > max_seq_length
    ids, mask = ids[:max_seq_length], mask[:max_seq_length]
    if not completion_only_loss:
        mask = [True] * len(ids)
    if mask:
        mask[0] = False  # nothing predicts the first token
    return TokenizedSequence(ids, mask, truncated)


def tokenize_example(
    tokenizer: Any,
    example: SFTExample,
    max_seq_length: int,
    max_prompt_length: int | None,
    completion_only_loss: bool = True,
) -> TokenizedSequence:
    """An example's ids, loss mask and truncation: a prompt is cut from the left to the prompt limit
    (as for pairs), then the sequence from the right to `max_seq_length`."""
    ids, mask, prompt_length = encode_example(tokenizer, example)
    return truncate_example(ids, mask, prompt_length, max_seq_length, max_prompt_length, completion_only_loss)


def pack(sequences: Sequence[TokenizedSequence], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: positions of `sequences` grouped into rows of at most `capacity` tokens.
    Each sequence goes, longest first, into the fullest row it fits in, or opens a new row. Pure and
    deterministic (ties keep the input order), so a resumed run packs the same rows."""
    return pack_lengths([len(s.input_ids) for s in sequences], capacity)


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """`pack` on the sequences' lengths alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    space: list[int] = []
    for i in order:
        size = lengths[i]
        best = -1
        for r, free in enumerate(space):
            if size <= free and (best < 0 or free < space[best]):
                best = r
        if best < 0:
            rows.append([i])
            space.append(capacity - size)
        else:
            rows[best].append(i)
            space[best] -= size
    return rows


def tokenize_sft(
    tokenizer: Any,
    examples: Sequence[SFTExample],
    max_seq_length: int,
    max_prompt_length: int | None,
    completion_only_loss: bool = True,
    packing: bool = False,
) -> tuple[list[SequenceRow], SequenceStats]:
    stats = SequenceStats(examples=len(examples))
    sequences = []
    for example in examples:
        with at_record(example.location):
            seq = tokenize_example(tokenizer, example, max_seq_length, max_prompt_length, completion_only_loss)
        sequences.append(seq)
        stats.truncated += seq.truncated
        stats.no_loss_tokens += seq.loss_tokens == 0
        stats.tokens += len(seq.input_ids)
        stats.loss_tokens += seq.loss_tokens
        stats.longest = max(stats.longest, len(seq.input_ids))
        if seq.truncated and len(stats.locations) < 3:
            stats.locations.append(example.location)
    groups = pack(sequences, max_seq_length) if packing else [[i] for i in range(len(sequences))]
    rows = [SequenceRow(r, [sequences[i] for i in group]) for r, group in enumerate(groups)]
    stats.rows = len(rows)
    return rows, stats


def collate_sequences(rows: Sequence[SequenceRow], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of rows in the layout `CompletionLogprobs` reads: one output per row (its trained
    tokens' summed log-prob). Each packed sequence is its own document of the row (see
    `masks.py`), so the mask built from it is block-diagonal causal: no sequence sees another."""
    width = max(r.num_tokens for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    segment = torch.full((n, width), -1, dtype=torch.long)  # the row's sequence k, -1 padding
    score: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for r, row in enumerate(rows):
        start = 0
        for k, seq in enumerate(row.sequences):
            end = start + len(seq.input_ids)
            input_ids[r, start:end] = torch.tensor(seq.input_ids, dtype=torch.long)
            position_ids[r, start:end] = torch.arange(len(seq.input_ids))
            segment[r, start:end] = k
            for t, trained in enumerate(seq.loss_mask):
                if trained and t > 0:
                    score[0].append(r), score[1].append(start + t - 1), score[2].append(start + t), score[3].append(r)
            start = end
    packed = any(len(row.sequences) > 1 for row in rows)
    return {
        "input_ids": input_ids,
        **segments(segment, torch.zeros_like(segment), position_ids, segmented=packed),
        "score_row": torch.tensor(score[0], dtype=torch.long),
        "score_src": torch.tensor(score[1], dtype=torch.long),
        "score_tgt": torch.tensor(score[2], dtype=torch.long),
        "score_out": torch.tensor(score[3], dtype=torch.long),
        "index": torch.tensor([row.index for row in rows], dtype=torch.long),
        "output_slot": torch.zeros(n, dtype=torch.long),
        "num_tokens": torch.tensor(sum(row.num_tokens for row in rows)),
    }
