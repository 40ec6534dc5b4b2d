"""A pairwise judge: a language model asked which of two responses to a prompt is better.

`--reward judge:MODEL` (MODEL a model folder, an adapter folder, the embedded alias such as
`smollm2-135m-instruct`, or `self`, the policy being evaluated or trained) puts an LLM judge where a
reward is taken (Zheng et al. 2023, arXiv:2306.05685, "Judging LLM-as-a-Judge with MT-Bench and
Chatbot Arena"; with `self` the policy judges its own samples, as in Yuan et al. 2024,
arXiv:2401.10020, "Self-Rewarding Language Models").

How one comparison is made:

- The judging prompt shows the prompt and the two responses as "A" and "B" and asks for one letter
  (`DEFAULT_PROMPT`, or a file given with `--judge-prompt` holding `{prompt}`, `{response_a}` and
  `{response_b}`). With a chat template it is the user turn, rendered with the generation prompt,
  and the answer is the token "A" or "B"; without one the text is given as is (the built-in prompt
  then ends in "Better response:") and the answer is " A" or " B".
- Nothing is generated: one forward pass per judging prompt reads the logits of the two answer
  tokens at the next position, and P(A) = exp(l_A) / (exp(l_A) + exp(l_B)), the softmax over the
  two answers only (the rest of the vocabulary says nothing about which response is better).
- LLM judges favour a position (Zheng et al. 2023, section 3.3), so every pair is asked in both
  orders: `p_ab` = P("A") with the first response shown as A, `p_ba` = P("B") with it shown as B.
  The preference P(first better) is their mean, so P(first better) + P(second better) = 1 exactly.

Position disagreement is reported two ways (`JudgeStats`): the share of pairs where the two orders
pick different winners (p_ab and p_ba on different sides of 0.5: the judge followed the position,
not the responses; Zheng et al.'s "inconsistency"), and the mean P("A") over both orders of every
pair, 0.5 when the judge has no position bias (above 0.5 it favours the first position shown).

Prompts are judged in left-padded batches, longest first, one forward each with the last position's
logits only; the model is loaded as generation loads it (`generation.load_generation_model`), and
the results depend on the inputs only, so two runs give the same numbers.

From judgements to rankings: a group of k completions of one prompt is judged on all k(k-1)/2 pairs,
and each completion's score is its mean probability of beating the others (a soft Borda count: the
maximum-likelihood order of a Bradley-Terry model is close to it, and it needs no fitting). Scores
lie in [0, 1] and mean 0.5 over a group. `collect.pairs` then pairs by these scores, so the chosen
response of every pair outranks the rejected one on all comparisons, not on one noisy judgement.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from preftune.data import Text
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")

PREFIX = "judge:"
SELF = "self"
PLACEHOLDERS = ("prompt", "response_a", "response_b")
LETTERS = ("A", "B")

DEFAULT_PROMPT = (
    "Two responses to the same prompt follow. Which response is better: more helpful, more relevant "
    "to the prompt, and better written?\n\n"
    "[Prompt]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Answer with one letter, A or B."
)
# Without a chat template the answer must follow the text directly.
PLAIN_ENDING = "\n\nBetter response:"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def is_judge_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(PREFIX)


def is_judge(reward: Any) -> bool:
    return isinstance(reward, PairwiseJudge)


# --------------------------------------------------------------------------------------- the judging prompt


@dataclass(frozen=True)
class JudgePrompt:
    """A judging prompt with `{prompt}`, `{response_a}` and `{response_b}`; `source` names it."""

    template: str = DEFAULT_PROMPT
    source: str = "built-in"

    def render(self, prompt: str, response_a: str, response_b: str) -> str:
        """The template with the three texts put in, in one pass: a response that itself holds
        "{response_b}" is shown as written, not filled in."""
        values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
        return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), self.template)


def load_judge_prompt(path: str | Path | None) -> JudgePrompt:
    """The built-in judging prompt (None) or a UTF-8 file's. Every `{name}` in the file is a
    placeholder: it must be one of {prompt}, {response_a}, {response_b}, and each must appear."""
    if path is None:
        return JudgePrompt()
    path = Path(path)
    if not path.is_file():
        raise PreftuneError(f"--judge-prompt {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PreftuneError(f"--judge-prompt {path}: not valid UTF-8 (byte {exc.start + 1} of the file)") from None
    known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
    for number, line in enumerate(text.splitlines(), start=1):
        for match in _PLACEHOLDER.finditer(line):
            if match.group(1) not in PLACEHOLDERS:
                raise PreftuneError(f"--judge-prompt {path}:{number}: unknown placeholder {match.group(0)} (the placeholders are {known})")
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in text]
    if missing:
        raise PreftuneError(f"--judge-prompt {path}: no {{{missing[0]}}} placeholder (a judging prompt shows {known})")
    return JudgePrompt(text, str(path))


def flat_text(value: Text) -> str:
    """A prompt or response as the judge reads it: text as is; chat messages as their content
    (one message) or as "role: content" lines."""
    if isinstance(value, str):
        return value
    messages = list(value)
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


# --------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Verdict:
    """One pair judged in both orders: `p_ab` = P("A") with the first response shown as A,
    `p_ba` = P("B") with the first shown as B; `p` = P(first better), their mean."""

    p_ab: float
    p_ba: float

    @property
    def p(self) -> float:
        return (self.p_ab + self.p_ba) / 2

    @property
    def orders_disagree(self) -> bool:
        """The two orders pick different winners (an exact 0.5 picks neither and disagrees with a pick)."""
        return _side(self.p_ab) != _side(self.p_ba)

    @property
    def p_answer_a(self) -> float:
        """Mean P("A") over the two orders: 0.5 when the position does not matter."""
        return (self.p_ab + 1.0 - self.p_ba) / 2


def _side(p: float) -> int:
    return 1 if p > 0.5 else -1 if p < 0.5 else 0


@dataclass
class JudgeStats:
    """What a judge saw so far: pairs judged in both orders, how often the orders disagreed, and
    the mean P("A") (0.5 = no position bias)."""

    pairs: int = 0
    disagreements: int = 0
    sum_p_answer_a: float = 0.0

    def add(self, verdicts: Sequence[Verdict]) -> None:
        self.pairs += len(verdicts)
        self.disagreements += sum(v.orders_disagree for v in verdicts)
        self.sum_p_answer_a += sum(v.p_answer_a for v in verdicts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "orders_disagree": self.disagreements / self.pairs if self.pairs else None,
            "mean_p_answer_a": self.sum_p_answer_a / self.pairs if self.pairs else None,
        }


def position_summary(name: str, stats: dict[str, Any]) -> str:
    """One line on a judge's position consistency, for logs and tables."""
    if not stats.get("pairs"):
        return f"{name}: no pairs judged"
    return (
        f"{name}: {stats['pairs']} pairs judged in both orders; the orders picked different winners on "
        f"{stats['orders_disagree']:.1%} of them; mean P(answer A) {stats['mean_p_answer_a']:.3f} (0.5 = no position bias)"
    )


# --------------------------------------------------------------------------------------- the judge


def left_padded_last_logits(model: Any, rows: Sequence[list[int]], pad_id: int, ids: Sequence[int]) -> torch.Tensor:
    """The logits of `ids` at the last position of each row, from one forward over the rows
    left-padded (`generation.left_padded`), positions counted over real tokens only."""
    from preftune.collect.generation import left_padded

    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded(rows, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
    try:
        logits = model(**inputs, logits_to_keep=1).logits
    except TypeError:  # a model without `logits_to_keep`: all positions, the last one kept
        logits = model(**inputs).logits
    return logits[:, -1, list(ids)].double().cpu()


class PairwiseJudge:
    """A language model that compares two responses (see the module docstring).

    `model` is a name `generation.load_generation_model` loads, or `self` (then `bind` gives it the
    policy). The model is loaded at the first judgement, so a spec is checked early and loaded late.
    `stats` accumulates the position figures of every pair judged.
    """

    def __init__(
        self,
        model: str,
        *,
        prompt: JudgePrompt | None = None,
        batch_size: int = 16,
        progress: bool = True,
        chat_options: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model
        self.name = PREFIX + model
        self.prompt = prompt or JudgePrompt()
        self.batch_size = batch_size
        self.progress = progress
        self.chat_options = chat_options or {}
        self.stats = JudgeStats()
        self._model: Any = None
        self._tokenizer: Any = None
        self._answer_ids: tuple[int, int] | None = None
        if batch_size < 1:
            raise PreftuneError(f"{self.name}: batch size must be >= 1, got {batch_size}")

    # -- models --------------------------------------------------------------------------------

    def bind(self, model: Any, tokenizer: Any, name: str | None = None) -> PairwiseJudge:
        """This judge's settings on a model already loaded (the policy, for `judge:self`)."""
        judge = PairwiseJudge(self.model_name, prompt=self.prompt, batch_size=self.batch_size, progress=self.progress)
        judge.name = self.name if name is None else PREFIX + name
        judge._model, judge._tokenizer = model, tokenizer
        return judge

    def for_model(self, name: str, **chat_options: Any) -> PairwiseJudge:
        """This judge's settings on another model name (`self` resolved to a round's policy)."""
        judge = PairwiseJudge(name, prompt=self.prompt, batch_size=self.batch_size, progress=self.progress, chat_options=chat_options)
        judge.name = self.name
        return judge

    @property
    def is_self(self) -> bool:
        return self.model_name == SELF and self._model is None

    def _loaded(self) -> tuple[Any, Any, tuple[int, int]]:
        if self._model is None:
            if self.model_name == SELF:
                raise PreftuneError(
                    "judge:self judges with the policy being evaluated or trained: use it with preftune eval or "
                    "preftune iterate, or name a judge model (judge:MODEL)"
                )
            from preftune.collect.generation import load_generation_model
            from preftune.models import load_tokenizer

            if not (Path(self.model_name).expanduser() / "adapter_config.json").is_file():
                answer_ids(load_tokenizer(self.model_name), self.name)  # a tokenizer that cannot answer fails before the weights load
            self._model, self._tokenizer = load_generation_model(self.model_name, **self.chat_options)
        if self._answer_ids is None:
            self._answer_ids = answer_ids(self._tokenizer, self.name)
        return self._model, self._tokenizer, self._answer_ids

    # -- judging -------------------------------------------------------------------------------

    def render(self, tokenizer: Any, prompt: Text, response_a: Text, response_b: Text) -> list[int]:
        """The ids of one judging prompt: the user turn through the chat template with the
        generation prompt, or the text (with the built-in prompt's ending) as the tokenizer reads it."""
        from preftune import chat
        from preftune.batching import encode_prompt

        text = self.prompt.render(flat_text(prompt), flat_text(response_a), flat_text(response_b))
        if chat.has_template(tokenizer):
            return encode_prompt(tokenizer, [{"role": "user", "content": text}])
        if self.prompt.source == "built-in":
            text += PLAIN_ENDING
        return encode_prompt(tokenizer, text)

    @torch.no_grad()
    def judge(self, prompts: Sequence[Text], firsts: Sequence[Text], seconds: Sequence[Text], desc: str | None = None) -> list[Verdict]:
        """Each (prompt, first, second) judged in both orders, in left-padded batches of judging
        prompts, longest first; the progress bar counts pairs."""
        from tqdm.auto import tqdm

        if not len(prompts) == len(firsts) == len(seconds):
            raise PreftuneError(f"{self.name}: {len(prompts)} prompts, {len(firsts)} first and {len(seconds)} second responses")
        if not prompts:
            return []
        model, tokenizer, ids = self._loaded()
        rows: list[list[int]] = []
        for p, a, b in zip(prompts, firsts, seconds):
            rows.append(self.render(tokenizer, p, a, b))  # first shown as A
            rows.append(self.render(tokenizer, p, b, a))  # first shown as B
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]), i))
        p_a = [0.0] * len(rows)
        with tqdm(total=len(prompts), desc=desc or f"judge ({self.name})", unit="pair", disable=not self.progress, dynamic_ncols=True) as bar:
            done = 0
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                logits = left_padded_last_logits(model, [rows[i] for i in chunk], pad, ids)
                for i, value in zip(chunk, torch.softmax(logits, dim=-1)[:, 0].tolist()):
                    p_a[i] = value
                now = (start + len(chunk)) // 2
                bar.update(now - done)
                done = now
            bar.update(len(prompts) - done)
        verdicts = [Verdict(p_a[2 * k], 1.0 - p_a[2 * k + 1]) for k in range(len(prompts))]
        bad = next((k for k, v in enumerate(verdicts) if not (math.isfinite(v.p_ab) and math.isfinite(v.p_ba))), None)
        if bad is not None:
            raise PreftuneError(f"{self.name}: the answer probabilities of pair {bad} are not finite")
        self.stats.add(verdicts)
        return verdicts

    def compare_groups(
        self, prompts: Sequence[Text], groups_x: Sequence[Sequence[Text]], groups_y: Sequence[Sequence[Text]], desc: str | None = None
    ) -> list[list[list[float]]]:
        """Per prompt, the matrix P(x_j better than y_k) over its two groups of responses; a pair of
        identical texts is 0.5 without asking (the two orders are then the same question)."""
        asks: list[tuple[int, int, int]] = []
        out = [[[0.5] * len(y) for _ in x] for x, y in zip(groups_x, groups_y, strict=True)]
        for i, (x, y) in enumerate(zip(groups_x, groups_y, strict=True)):
            asks += [(i, j, k) for j in range(len(x)) for k in range(len(y)) if x[j] != y[k]]
        verdicts = self.judge(
            [prompts[i] for i, _, _ in asks], [groups_x[i][j] for i, j, _ in asks], [groups_y[i][k] for i, _, k in asks], desc
        )
        for (i, j, k), v in zip(asks, verdicts, strict=True):
            out[i][j][k] = v.p
        return out

    def win_matrices(self, prompts: Sequence[Text], groups: Sequence[Sequence[Text]], desc: str | None = None) -> list[list[list[float]]]:
        """Per prompt, P(completion j better than completion k) of its completions: each unordered
        pair judged once (in both orders), the other half of the matrix 1 - P, the diagonal 0.5."""
        asks: list[tuple[int, int, int]] = []
        out = [[[0.5] * len(g) for _ in g] for g in groups]
        for i, g in enumerate(groups):
            asks += [(i, j, k) for j in range(len(g)) for k in range(j + 1, len(g)) if g[j] != g[k]]
        verdicts = self.judge([prompts[i] for i, _, _ in asks], [groups[i][j] for i, j, _ in asks], [groups[i][k] for i, _, k in asks], desc)
        for (i, j, k), v in zip(asks, verdicts, strict=True):
            out[i][j][k], out[i][k][j] = v.p, 1.0 - v.p
        return out

    def score_groups(self, prompts: Sequence[Text], groups: Sequence[Sequence[Text]]) -> list[list[float]]:
        """Each completion's mean probability of beating the other completions of its prompt."""
        return [mean_win_probabilities(m) for m in self.win_matrices(prompts, groups)]

    def score_records(self, records: Sequence[dict[str, Any]], progress: bool = True) -> list[dict[str, Any]]:
        """Samples records with `scores` (mean win probabilities), `reward` (the judge's name) and
        `win_probabilities` (P(row better than column)) added, as `preftune score` writes them."""
        self.progress = progress
        matrices = self.win_matrices([r["prompt"] for r in records], [r["completions"] for r in records])
        return [
            {**record, "scores": mean_win_probabilities(m), "reward": self.name, "win_probabilities": m}
            for record, m in zip(records, matrices, strict=True)
        ]

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        raise PreftuneError(
            f"{self.name} compares two responses of one prompt and gives no score to a response alone: "
            "use it where a prompt's samples are judged together (score, pairs, eval, iterate, label export)"
        )

    def summary(self) -> str:
        return position_summary(self.name, self.stats.as_dict())


def mean_win_probabilities(matrix: Sequence[Sequence[float]]) -> list[float]:
    """Row means of a win-probability matrix without its diagonal (a completion is not compared
    with itself); a lone completion scores 0.5."""
    n = len(matrix)
    if n < 2:
        return [0.5] * n
    return [(sum(row) - row[j]) / (n - 1) for j, row in enumerate(matrix)]


def answer_ids(tokenizer: Any, name: str) -> tuple[int, int]:
    """The token ids of the answers "A" and "B" as they follow the judging prompt (" A" and " B"
    without a chat template); each must be one token, or the judge cannot read its probability."""
    from preftune import chat

    space = "" if chat.has_template(tokenizer) else " "
    found = []
    for letter in LETTERS:
        spelling = space + letter
        ids = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise PreftuneError(
                f"{name}: the tokenizer has no single token for the answer {spelling!r} (it takes {len(ids)} tokens); "
                "a judge reads the probability of one token per answer"
            )
        found.append(int(ids[0]))
    if found[0] == found[1]:
        raise PreftuneError(f"{name}: the answers 'A' and 'B' are the same token ({found[0]}) for this tokenizer")
    return found[0], found[1]


# --------------------------------------------------------------------------------------- specs


def make_judge(spec: str, *, judge_prompt: str | Path | JudgePrompt | None = None, batch_size: int = 16) -> PairwiseJudge:
    """The judge a `judge:MODEL` spec names, its model checked (not loaded): one line for a spec
    with nothing after `judge:`, or a model that does not exist."""
    spec = spec.strip()
    target = spec[len(PREFIX) :].strip() if spec.startswith(PREFIX) else spec
    if not target:
        raise PreftuneError(
            "--reward judge: names no judge model: give judge:MODEL (a model folder, the embedded alias "
            "smollm2-135m-instruct) or judge:self"
        )
    prompt = judge_prompt if isinstance(judge_prompt, JudgePrompt) else load_judge_prompt(judge_prompt)
    if target != SELF:
        _check_model(target)
    return PairwiseJudge(target, prompt=prompt, batch_size=batch_size)


def _check_model(name: str) -> None:
    from preftune.models import loading_problems

    folder = Path(name).expanduser()
    adapter = folder / "adapter_config.json"
    if adapter.is_file() and not (folder / "config.json").is_file():
        try:
            base = json.loads(adapter.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError):
            raise PreftuneError(f"--reward judge:{name}: {adapter} has no readable 'base_model_name_or_path'") from None
        return _check_model(base)
    problems = loading_problems(name)
    if problems:
        raise PreftuneError(f"--reward judge:{name}: {problems[0]}")


@dataclass
class JudgedComparison:
    """Judged win rates of one set of samples against another, per prompt (eval's judged win rate)."""

    matrices: list[list[list[float]]] = field(default_factory=list)  # per prompt, P(model j beats baseline k)

    @property
    def per_prompt(self) -> list[float]:
        return [sum(sum(r) for r in m) / sum(len(r) for r in m) for m in self.matrices]

    @property
    def decided(self) -> list[float]:
        """Per prompt, the share of comparisons the judge decides for the model (P > 0.5), ties half."""
        return [sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for r in m for p in r) / sum(len(r) for r in m) for m in self.matrices]


def judged_win_rates(
    judge: PairwiseJudge, prompts: Sequence[Text], model_groups: Sequence[Sequence[str]], baseline_groups: Sequence[Sequence[str]]
) -> JudgedComparison:
    """Every sample of a prompt against every baseline sample of it, judged in both orders."""
    if any(not g for g in model_groups) or any(not g for g in baseline_groups):
        raise PreftuneError(f"{judge.name}: every prompt needs samples of both models to compare")
    return JudgedComparison(judge.compare_groups(prompts, model_groups, baseline_groups, desc=f"judge model vs baseline ({judge.name})"))


def judged_measures(judge: PairwiseJudge, judged: JudgedComparison, level: float, resamples: int, seed: int) -> dict[str, Any]:
    """The judged measures of `eval.json`, intervals bootstrapped over prompts: `judged_win_rate`
    (mean P(model's sample better)), `judged_decisions` (share of comparisons with P > 0.5, ties
    half) and `judge` (its name, prompt and position figures)."""
    from preftune.eval.evaluation import summarize

    stats = judge.stats.as_dict()
    return {
        "judged_win_rate": summarize(judged.per_prompt, level, resamples, seed),
        "judged_decisions": summarize(judged.decided, level, resamples, seed),
        "judge": {"name": judge.name, "prompt": judge.prompt.source, **stats},
    }
