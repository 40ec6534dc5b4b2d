"""Tokenization, truncation and collation of preference pairs.

The scoring rule (shared with every evaluator of this project): prompt and completion are tokenized
separately and concatenated, so no token spans the boundary. Prompt ids are `tokenizer(prompt)` with
the tokenizer's own special tokens, or the chat template with the generation prompt for messages;
completion ids are `tokenizer(completion, add_special_tokens=False)` followed by EOS unless already
there; a chat completion is the template's rendering of the assistant turn up to and including its
turn end (`<end_of_turn>`, `<|end|>`, ...), which then closes it in place of EOS (`preftune.chat`).
Tokenizing the two parts separately is also what lets a pair's prompt be encoded once and
shared by both completions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterator, Sequence

import json

import torch

from preftune import chat
from preftune.data import PreferenceExample, UnpairedExample, margin_weight
from preftune.errors import PreftuneError


@dataclass
class TokenizedPair:
    """One preference pair as token ids, after truncation."""

    index: int  # position in the dataset: keys precomputed reference log-probs
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool = False
    chosen_truncated: bool = False
    rejected_truncated: bool = False

    @property
    def num_tokens(self) -> int:
        """Real tokens of the two sequences the pair is scored on (prompt counted for each)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def completions(self) -> tuple[list[int], list[int]]:
        """The completions that share the prompt, by slot: 0 chosen, 1 rejected."""
        return self.chosen_ids, self.rejected_ids


@dataclass
class TokenizedUnpaired:
    """One KTO example: a prompt, its completion with a desirable/undesirable label, and the
    completion of another example (a mismatched pair) for KTO's KL estimate."""

    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    kl_ids: list[int]  # another example's completion, scored after this prompt
    label: bool
    prompt_truncated: bool = False
    completion_truncated: bool = False

    @property
    def num_tokens(self) -> int:
        """Real tokens of the sequence trained on (the KL sequence runs without gradients)."""
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def completions(self) -> tuple[list[int], list[int]]:
        """By slot: 0 the completion, 1 the mismatched (KL) completion."""
        return self.completion_ids, self.kl_ids


@dataclass
class TruncationStats:
    pairs: int = 0
    prompts_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    longest_prompt: int = 0
    longest_completion: int = 0
    examples: list[str] = field(default_factory=list)  # locations of the first truncated pairs

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs tokenized; truncated: {self.prompts_truncated} prompts (from the left), "
            f"{self.chosen_truncated} chosen and {self.rejected_truncated} rejected completions (from the right); "
            f"longest prompt {self.longest_prompt} tokens, longest completion {self.longest_completion} tokens"
        )


def _ids(encoded: Any) -> list[int]:
    """Plain ids from whatever a tokenizer call returned (list, BatchEncoding or dict)."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def encode_prompt(tokenizer: Any, prompt: str | list[dict], tools: Any = None) -> list[int]:
    """Prompt ids: the tokenizer's own special tokens, or the chat template with the generation
    prompt (`chat.render`, the run's template arguments and the record's tools). The template's text
    is tokenized without adding special tokens again (no doubled BOS)."""
    if isinstance(prompt, list):
        ids = _ids(tokenizer(chat.render(tokenizer, prompt, generation_prompt=True, tools=tools), add_special_tokens=False))
    else:
        ids = _ids(tokenizer(prompt))
    if not ids:
        # An empty prompt leaves the first completion token without context; give it the
        # sequence-start token a language model was trained to continue from.
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    return ids


def completion_text(tokenizer: Any, prompt: str | list[dict], completion: str | list[dict], tools: Any = None) -> str:
    """The text of a completion: a string as it is; for messages, the template's rendering of the
    assistant turn up to and including its turn end (`chat.completion_text`)."""
    if isinstance(completion, str):
        return completion
    return chat.completion_text(tokenizer, list(prompt), list(completion), tools)


def completion_end_id(tokenizer: Any, completion: str | list[dict]) -> int:
    """The token a completion ends on: the template's turn end for messages (`<end_of_turn>`,
    `<|end|>`, `<|eot_id|>`, ...), where the template has one, else EOS."""
    if isinstance(completion, list):
        end = chat.turn_end_id(tokenizer)
        if end is not None:
            return end
    return tokenizer.eos_token_id


def encode_completion(tokenizer: Any, prompt: str | list[dict], completion: str | list[dict], tools: Any = None) -> list[int]:
    ids = _ids(tokenizer(completion_text(tokenizer, prompt, completion, tools), add_special_tokens=False))
    end = completion_end_id(tokenizer, completion)
    if not ids or ids[-1] != end:
        ids.append(end)
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[Any], tools: Sequence[Any], locations: Sequence[str]) -> list[list[int]]:
    """`encode_prompt` for many prompts: conversations rendered one by one, then every text
    tokenized in one batched call (a fast tokenizer encodes a list on all its threads). Equal, id for
    id, to calling `encode_prompt` on each."""
    texts: list[str] = []
    chat_rows: list[int] = []
    plain_rows: list[int] = []
    for i, (prompt, t, location) in enumerate(zip(prompts, tools, locations)):
        if isinstance(prompt, list):
            with at_record(location):
                texts.append(chat.render(tokenizer, prompt, generation_prompt=True, tools=t))
            chat_rows.append(i)
        else:
            texts.append(prompt)
            plain_rows.append(i)
    out: list[list[int]] = [[] for _ in texts]
    for rows, special in ((plain_rows, True), (chat_rows, False)):
        if rows:
            encoded = tokenizer([texts[i] for i in rows], add_special_tokens=special)["input_ids"]
            for i, ids in zip(rows, encoded):
                out[i] = [int(x) for x in ids]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [ids if ids else [start] for ids in out]


def encode_completions(
    tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any], tools: Sequence[Any], locations: Sequence[str]
) -> list[list[int]]:
    """`encode_completion` for many completions, the texts tokenized in one batched call."""
    texts = []
    for prompt, completion, t, location in zip(prompts, completions, tools, locations):
        with at_record(location):
            texts.append(completion_text(tokenizer, prompt, completion, t))
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = []
    for ids, completion in zip(encoded, completions):
        ids = [int(x) for x in ids]
        end = completion_end_id(tokenizer, completion)
        if not ids or ids[-1] != end:
            ids.append(end)
        out.append(ids)
    return out


@contextmanager
def at_record(location: str) -> Iterator[None]:
    """Name the record in a rendering or tokenization error (`pairs.jsonl:3: the chat template ...`)."""
    try:
        yield
    except PreftuneError as exc:
        message = str(exc)
        raise PreftuneError(message if message.startswith(f"{location}: ") else f"{location}: {message}") from None



@dataclass
class WeightedPair(TokenizedPair):
    """A tokenized pair with its loss weight (`margin_weighting`; see `data.margin_weight`)."""

    weight: float = 1.0


def with_margin_weights(items: Sequence[TokenizedPair], examples: Sequence[PreferenceExample]) -> list[WeightedPair]:
    """Each pair with the loss weight its label strength gives it (`margin_weighting`)."""
    return [
        WeightedPair(**{f.name: getattr(item, f.name) for f in fields(item)}, weight=margin_weight(example))
        for item, example in zip(items, examples)
    ]

def effective_prompt_length(max_seq_length: int, max_prompt_length: int | None) -> int:
    """The prompt limit in force: half the sequence when unset, and never so long that it leaves no
    room for a completion (half the sequence then too)."""
    if max_prompt_length is None or max_prompt_length >= max_seq_length:
        return max(1, max_seq_length // 2)
    return max_prompt_length


def truncate_pair(
    index: int,
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_seq_length: int,
    max_prompt_length: int | None,
) -> TokenizedPair:
    """Prompt cut from the left (its end is what the answer follows), then each completion cut from
    the right so prompt + completion fits `max_seq_length`. Both completions obey the same rule, and
    each keeps at least one token, so no pair scores an empty completion."""
    max_prompt_length = effective_prompt_length(max_seq_length, max_prompt_length)
    prompt_truncated = len(prompt_ids) > max_prompt_length
    if prompt_truncated:
        prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_seq_length - len(prompt_ids)
    chosen_truncated = len(chosen_ids) > budget
    rejected_truncated = len(rejected_ids) > budget
    return TokenizedPair(
        index=index,
        prompt_ids=list(prompt_ids),
        chosen_ids=list(chosen_ids[:budget]),
        rejected_ids=list(rejected_ids[:budget]),
        prompt_truncated=prompt_truncated,
        chosen_truncated=chosen_truncated,
        rejected_truncated=rejected_truncated,
    )


def tokenize_dataset(
    tokenizer: Any,
    examples: Sequence[PreferenceExample],
    max_seq_length: int,
    max_prompt_length: int | None,
) -> tuple[list[TokenizedPair], TruncationStats]:
    pairs: list[TokenizedPair] = []
    stats = TruncationStats()
    for i, example in enumerate(examples):
        with at_record(example.location):
            tools = example.tools
            prompt_ids = encode_prompt(tokenizer, example.prompt, tools)
            chosen_ids = encode_completion(tokenizer, example.prompt, example.chosen, tools)
            rejected_ids = encode_completion(tokenizer, example.prompt, example.rejected, tools)
        stats.longest_prompt = max(stats.longest_prompt, len(prompt_ids))
        stats.longest_completion = max(stats.longest_completion, len(chosen_ids), len(rejected_ids))
        pair = truncate_pair(i, prompt_ids, chosen_ids, rejected_ids, max_seq_length, max_prompt_length)
        stats.pairs += 1
        stats.prompts_truncated += pair.prompt_truncated
        stats.chosen_truncated += pair.chosen_truncated
        stats.rejected_truncated += pair.rejected_truncated
        if (pair.prompt_truncated or pair.chosen_truncated or pair.rejected_truncated) and len(stats.examples) < 3:
            stats.examples.append(example.location)
        pairs.append(pair)
    return pairs, stats


def mismatched_partners(prompts: Sequence[Any], seed: int) -> list[int]:
    """For each example, another example whose completion serves as its mismatched completion in
    KTO's KL estimate (y_j after x_i, j != i). A seeded shuffle fixes the pairing once, so the
    reference's log-probs of these pairs can be precomputed; each example takes the next one in the
    shuffled order that has a different prompt (a pair split in two must not score its own
    rejected answer as "mismatched"), or simply the next one when every prompt is the same."""
    n = len(prompts)
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    partners = [0] * n
    for k, i in enumerate(order):
        partner = order[(k + 1) % n]
        for j in range(1, n):
            candidate = order[(k + j) % n]
            if keys[candidate] != keys[i]:
                partner = candidate
                break
        partners[i] = partner
    return partners


def tokenize_unpaired(
    tokenizer: Any,
    examples: Sequence[UnpairedExample],
    max_seq_length: int,
    max_prompt_length: int | None,
    seed: int,
) -> tuple[list[TokenizedUnpaired], TruncationStats]:
    """KTO examples by the scoring rule, each with its mismatched completion (see
    `mismatched_partners`), truncated like a pair whose rejected side is the mismatched one."""
    partners = mismatched_partners([e.prompt for e in examples], seed)
    items: list[TokenizedUnpaired] = []
    stats = TruncationStats()
    for i, example in enumerate(examples):
        with at_record(example.location):
            tools = example.tools
            prompt_ids = encode_prompt(tokenizer, example.prompt, tools)
            completion_ids = encode_completion(tokenizer, example.prompt, example.completion, tools)
            kl_ids = encode_completion(tokenizer, example.prompt, examples[partners[i]].completion, tools)
        pair = truncate_pair(i, prompt_ids, completion_ids, kl_ids, max_seq_length, max_prompt_length)
        stats.pairs += 1
        stats.prompts_truncated += pair.prompt_truncated
        stats.chosen_truncated += pair.chosen_truncated
        stats.longest_prompt = max(stats.longest_prompt, len(prompt_ids))
        stats.longest_completion = max(stats.longest_completion, len(completion_ids))
        if (pair.prompt_truncated or pair.chosen_truncated) and len(stats.examples) < 3:
            stats.examples.append(example.location)
        items.append(
            TokenizedUnpaired(
                index=i,
                prompt_ids=pair.prompt_ids,
                completion_ids=pair.chosen_ids,
                kl_ids=pair.rejected_ids,
                label=example.label,
                prompt_truncated=pair.prompt_truncated,
                completion_truncated=pair.chosen_truncated,
            )
        )
    return items, stats


def _scores(rows: list[int], sources: list[int], targets: list[int], outs: list[int]) -> dict[str, torch.Tensor]:
    return {
        "score_row": torch.tensor(rows, dtype=torch.long),
        "score_src": torch.tensor(sources, dtype=torch.long),
        "score_tgt": torch.tensor(targets, dtype=torch.long),
        "score_out": torch.tensor(outs, dtype=torch.long),
    }


def segments(doc_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, segmented: bool) -> dict[str, torch.Tensor]:
    """The row description every collate function returns (see `masks.py`): segment ids, position
    ids, the 2D padding mask, and whether any row holds several segments."""
    return {
        "attention_mask": (doc_ids >= 0).long(),
        "position_ids": position_ids,
        "doc_ids": doc_ids,
        "branch_ids": branch_ids,
        "segmented": torch.tensor(bool(segmented)),
    }


def collate_separate(pairs: Sequence[Any], pad_id: int, slots: Sequence[int] = (0, 1)) -> dict[str, torch.Tensor]:
    """The textbook layout: for each slot in turn, B right-padded `prompt + completion` rows (for
    pairs: the B `prompt + chosen` sequences, then the B `prompt + rejected` ones). Every prompt is
    encoded once per completion; kept as the yardstick and for attention kernels that take no
    custom mask (flash-attention)."""
    rows = [p.prompt_ids + p.completions[s] for s in slots for p in pairs]
    prompt_lengths = [len(p.prompt_ids) for p in pairs] * len(slots)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    doc_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    score: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for r, (row, start) in enumerate(zip(rows, prompt_lengths)):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        doc_ids[r, : len(row)] = 0
        position_ids[r, : len(row)] = torch.arange(len(row))
        for t in range(start, len(row)):  # token t is predicted by the output at t - 1
            score[0].append(r), score[1].append(t - 1), score[2].append(t), score[3].append(r)
    return {
        "input_ids": input_ids,
        **segments(doc_ids, torch.zeros_like(doc_ids), position_ids, segmented=False),
        **_scores(*score),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "output_slot": torch.tensor([s for s in slots for _ in pairs], dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(r) for r in rows)),  # real tokens read: what tokens/s counts
    }


def collate_shared(pairs: Sequence[Any], pad_id: int, slots: Sequence[int] = (0, 1)) -> dict[str, torch.Tensor]:
    """One row per item, `prompt + completion(s)`, so the prompt is encoded once for all of them.

    For a pair the row is `prompt + chosen + rejected`: a block attention mask lets the chosen
    tokens see the prompt and themselves, and the rejected tokens see the prompt and themselves
    (never the chosen ones); position ids restart at the prompt's end for each completion block.
    Each completion then sees exactly what it would see in its own sequence, so the log-probs equal
    the separate layout's, at the cost of the prompt once, not twice. The row is described by
    segments (the prompt is branch 0 of document 0, completion k is branch k + 1), from which
    `masks.build_attention_mask` makes the mask each model needs. `slots` picks which of each
    item's completions go in, in order.
    """
    width = max(len(p.prompt_ids) + sum(len(p.completions[s]) for s in slots) for p in pairs)
    n = len(pairs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    doc_ids = torch.full((n, width), -1, dtype=torch.long)
    branch_ids = torch.zeros((n, width), dtype=torch.long)
    score: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
    for r, p in enumerate(pairs):
        lp = len(p.prompt_ids)
        ids = list(p.prompt_ids)
        position_ids[r, :lp] = torch.arange(lp)
        start = lp
        for k, s in enumerate(slots):
            completion = p.completions[s]
            end = start + len(completion)
            ids += completion
            position_ids[r, start:end] = torch.arange(lp, lp + len(completion))
            branch_ids[r, start:end] = k + 1
            for t in range(start, end):
                # The first token of each completion follows the prompt, not the completion before it.
                score[0].append(r), score[1].append(t - 1 if t > start else lp - 1), score[2].append(t)
                score[3].append(k * n + r)
            start = end
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        doc_ids[r, : len(ids)] = 0
    return {
        "input_ids": input_ids,
        # One completion after the prompt is a plain sequence: only several need segment masks.
        **segments(doc_ids, branch_ids, position_ids, segmented=len(slots) > 1),
        **_scores(*score),
        "index": torch.tensor([p.index for p in pairs], dtype=torch.long),
        "output_slot": torch.tensor([s for s in slots for _ in pairs], dtype=torch.long),
        "num_tokens": torch.tensor(sum(len(p.prompt_ids) + sum(len(p.completions[s]) for s in slots) for p in pairs)),
    }


def collate_pairs(
    pairs: Sequence[Any], pad_id: int, share_prompt: bool = True, slots: Sequence[int] = (0, 1)
) -> dict[str, torch.Tensor]:
    """A batch of pairs in the shared-prompt layout (default) or the separate one.

    Either way the batch carries the scoring plan: for each scored token, its row, the position whose
    output predicts it (`score_src`), its own position (`score_tgt`) and which completion it belongs
    to (`score_out`: pair i's chosen is i, its rejected is B + i; in general slot k of item i is
    k * B + i). Prompt and padding tokens are never scored. `index` carries dataset positions for
    cached reference log-probs, `output_slot` which completion of its item each output is. Any item
    with `prompt_ids` and `completions` collates here (pairs, and KTO's unpaired examples).
    """
    return collate_shared(pairs, pad_id, slots) if share_prompt else collate_separate(pairs, pad_id, slots)


def reward_input_ids(tokenizer: Any, prompt: Any, completion: Any) -> list[int]:
    """The token ids a reward model reads for one (prompt, completion), in training (preftune's
    `strategy: reward`) and in scoring alike: with a chat template, the conversation (the prompt's
    messages, or the prompt text as a user message) followed by the completion as the assistant's
    reply, rendered by the template and tokenized without adding special tokens again; without one,
    the prompt and completion as a text pair, with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        messages += list(completion) if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    flat_prompt = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
    flat_completion = completion if isinstance(completion, str) else "\n".join(m["content"] for m in completion)
    return [int(i) for i in tokenizer(flat_prompt, flat_completion)["input_ids"]]
