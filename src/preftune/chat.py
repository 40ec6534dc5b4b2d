"""Conversations as the model sees them at inference: the chat template's own text, cut at the turn end.

A conversational pair is scored on two pieces, each taken from the template's own rendering:

- the **context** is what generation sees: `apply_chat_template(prompt, add_generation_prompt=True)`;
- the **completion** is the template's rendering of the assistant turn that follows, up to and
  including the token that ends the turn (what generation stops on), and nothing after it.

Templates differ in what they write after a turn (Gemma: `<end_of_turn>\\n`, then `<eos>` at the
end of a conversation; Phi-3: `<|end|>\\n<|endoftext|>`; ChatML: `<|im_end|>\\n`), so the turn end
is found from the template and the tokenizer (`turn_end`), never from a list of family names. Some
templates render the prompt differently once an answer follows (Mistral v0.3 moves a system
message onto the last user turn only when nothing follows it); then the completion is the
template's rendering of the assistant turn after the context's last text (`completion_text`).

Options that belong to a run rather than to a record (`chat_template_kwargs` such as Qwen3's
`enable_thinking`, folding a refused system message into the first user turn) travel with the
tokenizer (`configure`), so every rendering (training, sampling, evaluation) uses the same ones.
A record's own `tools` (function schemas) are passed to each rendering as `tools=`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from preftune.errors import PreftuneError

Message = dict[str, Any]

_OPTIONS_ATTR = "_preftune_chat_options"
# Contents no real conversation holds, to see where a template puts a message's text.
_PROBE_USER = "preftune-probe-question"
_PROBE_ANSWER = "preftune-probe-answer"


@dataclass
class ChatOptions:
    """How a run renders conversations: extra template variables, and what to do with a system
    message the template refuses. `turn_end` caches the detected end-of-turn text."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)
    fold_system: bool = False
    turn_end: str | None = None
    turn_end_of: str | None = None  # the template `turn_end` was found for (a changed template is probed again)


def configure(tokenizer: Any, template_kwargs: dict[str, Any] | None = None, fold_system: bool = False) -> Any:
    """Attach a run's chat options to its tokenizer (and return it), so every rendering of the run
    uses them. The tokenizer's own files are unchanged."""
    setattr(tokenizer, _OPTIONS_ATTR, ChatOptions(dict(template_kwargs or {}), bool(fold_system)))
    return tokenizer


def options(tokenizer: Any) -> ChatOptions:
    found = getattr(tokenizer, _OPTIONS_ATTR, None)
    if found is None:
        found = ChatOptions()
        try:
            setattr(tokenizer, _OPTIONS_ATTR, found)
        except AttributeError:  # a tokenizer-like object that takes no attributes: no cache
            pass
    return found


def has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fold_system_message(messages: Sequence[Message]) -> list[Message]:
    """The system message put at the start of the first user turn, separated by a blank line (what
    Gemma 3's own template does with one), for templates that refuse the system role."""
    messages = [dict(m) for m in messages]
    if not messages or messages[0].get("role") != "system":
        return messages
    system = messages.pop(0)["content"]
    for m in messages:
        if m.get("role") == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return messages
    return [{"role": "user", "content": system}] + messages


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool, tools: Any = None) -> str:
    """The template's text for `messages`, with the run's template arguments and the record's tools.

    A template that refuses a system message (Gemma 2 raises "System role not supported") ends in
    a one-line error naming the way out, unless the run folds system messages into the first user
    turn. Other template errors are one line too; the caller adds the record's location.
    """
    if not has_template(tokenizer):
        raise PreftuneError(
            "the record is a conversation but the tokenizer has no chat template (use plain-text records, or a chat model)"
        )
    opts = options(tokenizer)
    messages = list(messages)
    if opts.fold_system:
        messages = fold_system_message(messages)
    kwargs = dict(opts.template_kwargs)
    if tools is not None:
        kwargs["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)
    except Exception as exc:  # jinja2's TemplateError and whatever a template raises itself
        reason = _first_line(exc)
        if any(m.get("role") == "system" for m in messages):
            try:
                tokenizer.apply_chat_template(
                    fold_system_message(messages), add_generation_prompt=generation_prompt, tokenize=False, **kwargs
                )
            except Exception:
                pass
            else:
                raise PreftuneError(
                    f"the chat template refuses a system message ({reason}): remove it, or set "
                    "fold_system_message: true to put it at the start of the first user turn, as Gemma 3's template does"
                ) from None
        raise PreftuneError(f"the chat template cannot render this conversation ({reason})") from None


def _generation_eos_texts(tokenizer: Any) -> list[str]:
    """Stop tokens of the model's generation config, when it sits beside the tokenizer's files."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    try:
        ids = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return []
    ids = ids if isinstance(ids, list) else [ids]
    texts = []
    for i in ids:
        if isinstance(i, int) and 0 <= i < len(tokenizer):
            texts.append(tokenizer.convert_ids_to_tokens(i))
    return [t for t in texts if t]


def _stop_candidates(tokenizer: Any) -> list[str]:
    """Texts that can end a turn: the EOS, the generation config's stop tokens, and every special
    token (`<end_of_turn>`, `<|end|>`, `<|eot_id|>`, `<|im_end|>` are special in their tokenizers)."""
    found: list[str] = []
    for text in [getattr(tokenizer, "eos_token", None), *_generation_eos_texts(tokenizer), *getattr(tokenizer, "all_special_tokens", [])]:
        if text and text not in found:
            found.append(text)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        text = getattr(token, "content", None)
        if getattr(token, "special", False) and text and text not in found:
            found.append(text)
    return found


def turn_end(tokenizer: Any) -> str | None:
    """The text that ends an assistant turn in this tokenizer's template, or None when the template
    writes no stop token after an answer (then EOS closes a completion, as for plain text).

    Found by rendering a probe exchange and taking, among the stop candidates, the one that comes
    first after the answer (the longest where several start at the same place).
    """
    opts = options(tokenizer)
    template = str(getattr(tokenizer, "chat_template", None))
    if opts.turn_end_of == template:
        return opts.turn_end
    result = None
    if has_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}],
                tokenize=False,
                **opts.template_kwargs,
            )
        except Exception:
            text = ""
        if _PROBE_ANSWER in text:
            tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :]
            best: tuple[int, int] | None = None
            for candidate in _stop_candidates(tokenizer):
                at = tail.find(candidate)
                if at >= 0 and (best is None or (at, -len(candidate)) < best):
                    best, result = (at, -len(candidate)), candidate
    opts.turn_end, opts.turn_end_of = result, template
    return result


def turn_end_id(tokenizer: Any) -> int | None:
    """The id of `turn_end`, when it is one token."""
    text = turn_end(tokenizer)
    if text is None:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def _assistant_turn_start(full: str, context: str, completion: Sequence[Message]) -> int:
    """Where the rendering of the assistant turn begins in `full` when `full` does not start with
    `context` (the template rewrote the prompt once an answer followed): right after the longest
    ending of `context` that `full` holds before the answer's text."""
    anchor = str(completion[0].get("content") or "").strip()[:64]
    common = 0
    for a, b in zip(full, context):
        if a != b:
            break
        common += 1
    answer_at = full.find(anchor, common) if anchor else -1
    if answer_at < 0:
        return -1
    # A tail of the context found before the answer means every shorter tail is found too, so the
    # longest one is found by bisection.
    lo, hi = 0, len(context)
    while lo < hi:
        k = (lo + hi + 1) // 2
        if full.rfind(context[-k:], 0, answer_at) >= 0:
            lo = k
        else:
            hi = k - 1
    if lo == 0:
        return -1
    return full.rfind(context[-lo:], 0, answer_at) + lo


def completion_text(tokenizer: Any, prompt: Sequence[Message], completion: Sequence[Message], tools: Any = None) -> str:
    """The template's text of the assistant turn(s) after `prompt`, up to and including the last
    turn end, with nothing after it."""
    context = render(tokenizer, prompt, generation_prompt=True, tools=tools)
    full = render(tokenizer, list(prompt) + list(completion), generation_prompt=False, tools=tools)
    if full.startswith(context):
        text = full[len(context) :]
    else:
        start = _assistant_turn_start(full, context, completion)
        # No anchor found: the contents alone, closed by the turn end below.
        text = full[start:] if start >= 0 else "".join(str(m.get("content") or "") for m in completion)
    end = turn_end(tokenizer)
    if end is None:
        end = getattr(tokenizer, "eos_token", None)
    if end and end in text:
        text = text[: text.rindex(end) + len(end)]
    return text
