"""Reward functions: one interface, one registry, resolved from the string a user types.

A reward function takes a batch of prompts and completions and returns one float per completion:
`reward(prompts, completions) -> list[float]`. A prompt is the text or the list of chat messages
the completion answers, as stored in the samples file. `get_reward(spec)` understands:

- a registered name: `sentiment` (VADER's compound score of the completion, in [-1, 1]; Hutto &
  Gilbert 2014, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social Media
  Text"), `length` (the completion's number of whitespace-separated words);
- a local folder holding a Hugging Face sequence-classification model (a reward model): its score
  of the prompt and completion together (see `SequenceClassifierReward`); a Bradley-Terry reward
  model trained by preftune is such a folder;
- `module:function` or `path/to/file.py:function`: a Python callable with the same signature;
- `judge:MODEL`: a pairwise LLM judge (`preftune.collect.judge`). It compares two completions of a
  prompt instead of scoring one, so it scores a prompt's completions together (`score_groups`,
  `score_records`: each completion's mean probability of beating the others), and evaluation asks it
  for a judged win rate.

`register_reward(name, factory)` adds a name; factories are called once per `get_reward`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from preftune.batching import reward_input_ids
from preftune.data import Text
from preftune.errors import PreftuneError, require


@runtime_checkable
class RewardFunction(Protocol):
    """Scores a batch: one float per (prompt, completion), higher is better."""

    name: str

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]: ...


class NamedReward:
    """A plain function given a name, so every reward reports what it is in the files it writes."""

    def __init__(self, name: str, function: Callable[[Sequence[Text], Sequence[str]], Sequence[float]]) -> None:
        self.name = name
        self.function = function

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return self.function(prompts, completions)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------- built-ins


class SentimentReward:
    """VADER's compound sentiment of the completion alone, in [-1, 1] (the prompt is ignored, as in
    the controlled-sentiment task of the DPO paper, Rafailov et al. 2023, arXiv:2305.18290)."""

    name = "sentiment"

    def __init__(self) -> None:
        require("sentiment", "vaderSentiment", what="the 'sentiment' reward")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return [float(self.analyzer.polarity_scores(c)["compound"]) for c in completions]


class LengthReward:
    """The completion's length in whitespace-separated words: a transparent reward for tests and for
    studying length bias."""

    name = "length"

    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        return [float(len(c.split())) for c in completions]


class SequenceClassifierReward:
    """A local `AutoModelForSequenceClassification` folder used as a reward model.

    Input: with a chat template, the conversation (the prompt's messages, or the prompt text as a
    user message) followed by the completion as the assistant's reply; without one, the prompt and
    completion as a text pair, as reward models such as OpenAssistant's are trained. Score: the
    logit of a one-label model (a Bradley-Terry reward model); for two labels, the log-odds of label
    1 (the positive class of a binary classifier), logit[1] - logit[0]. More labels are refused:
    which one is "good" is not knowable.
    """

    def __init__(self, folder: Path, batch_size: int = 16, device: str | torch.device | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = str(folder)
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModelForSequenceClassification.from_pretrained(folder).to(self.device).eval()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PreftuneError(f"reward model {folder}: could not load a sequence-classification model ({first})") from exc
        labels = int(self.model.config.num_labels)
        if labels not in (1, 2):
            raise PreftuneError(
                f"reward model {folder}: it has {labels} labels; a reward model has one (or two: the log-odds of label 1)"
            )
        # Padding must be known to the model too: it scores the last token that is not padding.
        if self.tokenizer.pad_token is None:
            if self.model.config.pad_token_id is not None:
                self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(self.model.config.pad_token_id)
            else:
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _encode(self, prompts: Sequence[Text], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        rows = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        limit = self.tokenizer.model_max_length
        if isinstance(limit, int) and 0 < limit < 10**9:
            rows = [ids[:limit] for ids in rows]
        return self.tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            batch = self._encode(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits.float()
            values = logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
            scores.extend(values.cpu().tolist())
        return scores


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[[], RewardFunction]] = {
    "sentiment": SentimentReward,
    "length": LengthReward,
}


def register_reward(name: str, factory: Callable[[], RewardFunction]) -> None:
    """Make `name` usable wherever a reward is asked for (`--reward name`)."""
    _REGISTRY[name] = factory


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


def _load_callable(spec: str) -> RewardFunction:
    """`module:function` or `file.py:function` as a named reward."""
    target, _, attribute = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise PreftuneError(f"--reward {spec}: file not found: {path}")
        module_name = f"preftune_user_reward_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise PreftuneError(f"--reward {spec}: cannot load {path} as Python")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise PreftuneError(f"--reward {spec}: {path} failed to import: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise PreftuneError(f"--reward {spec}: cannot import module '{target}' ({exc})") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise PreftuneError(f"--reward {spec}: '{target}' has no attribute '{attribute}'")
    if not callable(function):
        raise PreftuneError(f"--reward {spec}: '{attribute}' is not callable")
    return NamedReward(spec, function)


def get_reward(spec: str, *, judge_prompt: str | Path | None = None) -> RewardFunction:
    """The reward function a spec names (see the module docstring for the forms); `judge_prompt`
    is a judging-prompt file for a `judge:MODEL` spec (`--judge-prompt`)."""
    spec = str(spec).strip()
    if not spec:
        raise PreftuneError("--reward is empty: give a name (" + ", ".join(reward_names()) + "), a model folder, or module:function")
    from preftune.collect import judge

    if judge.is_judge_spec(spec):
        return judge.make_judge(spec, judge_prompt=judge_prompt)  # type: ignore[return-value]
    if judge_prompt is not None:
        raise PreftuneError(f"--judge-prompt is for a judge (--reward judge:MODEL), not for --reward {spec}")
    if spec in _REGISTRY:
        return _REGISTRY[spec]()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PreftuneError(f"--reward {spec}: the folder has no config.json, so it is not a reward model")
        return SequenceClassifierReward(path)
    if ":" in spec and not path.exists():
        return _load_callable(spec)
    from preftune.errors import suggest

    raise PreftuneError(
        f"--reward: unknown reward '{spec}'{suggest(spec, reward_names())} (give one of {', '.join(reward_names())}, "
        "a reward-model folder, or module:function / file.py:function)"
    )


def as_reward(
    reward: str | RewardFunction | Callable[[Sequence[Text], Sequence[str]], Sequence[float]], *, judge_prompt: str | Path | None = None
) -> RewardFunction:
    """A reward spec (`get_reward`), a reward function as is, or a plain function given its name."""
    if isinstance(reward, str):
        return get_reward(reward, judge_prompt=judge_prompt)
    if callable(reward):
        if isinstance(getattr(reward, "name", None), str):
            return reward  # type: ignore[return-value]
        return NamedReward(getattr(reward, "__name__", "custom"), reward)
    raise PreftuneError(f"reward: expected a name, a folder, module:function or a function, got {type(reward).__name__}")


def score(reward: RewardFunction, prompts: Sequence[Text], completions: Sequence[str]) -> list[float]:
    """Call a reward and check its answer: one finite float per completion, or a one-line error."""
    try:
        values = reward(list(prompts), list(completions))
    except PreftuneError:
        raise
    except Exception as exc:
        raise PreftuneError(f"reward '{reward.name}' failed: {type(exc).__name__}: {exc}") from exc
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PreftuneError(f"reward '{reward.name}' must return a list of numbers, got {type(values).__name__}") from None
    if len(values) != len(completions):
        raise PreftuneError(f"reward '{reward.name}' returned {len(values)} scores for {len(completions)} completions")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise PreftuneError(f"reward '{reward.name}' returned a non-finite score ({values[bad]}) for completion {bad}")
    return values


def score_groups(reward: RewardFunction, prompts: Sequence[Text], groups: Sequence[Sequence[str]]) -> list[list[float]]:
    """The scores of each prompt's completions (`groups[i]` answers `prompts[i]`), in one call; a
    judge's are each completion's mean probability of beating the group's others."""
    from preftune.collect.judge import is_judge

    if is_judge(reward):
        return reward.score_groups(prompts, groups)  # type: ignore[attr-defined]
    flat = score(reward, [p for p, g in zip(prompts, groups, strict=True) for _ in g], [c for g in groups for c in g])
    out, position = [], 0
    for g in groups:
        out.append(flat[position : position + len(g)])
        position += len(g)
    return out


def score_records(
    reward: RewardFunction, records: Sequence[dict[str, Any]], batch_size: int = 64, progress: bool = True
) -> list[dict[str, Any]]:
    """Samples records with `scores` (one per completion) and `reward` (its name) added, scored in
    batches of about `batch_size` completions with a progress bar. A judge judges each record's
    completions together (`PairwiseJudge.score_records`)."""
    from tqdm.auto import tqdm

    from preftune.collect.judge import is_judge

    if is_judge(reward):
        return reward.score_records(records, progress=progress)  # type: ignore[attr-defined]

    flat = [(r, c) for r, record in enumerate(records) for c in record["completions"]]
    scores: list[float] = []
    with tqdm(total=len(flat), desc=f"score ({reward.name})", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(flat), batch_size):
            chunk = flat[start : start + batch_size]
            scores.extend(score(reward, [records[r]["prompt"] for r, _ in chunk], [c for _, c in chunk]))
            bar.update(len(chunk))
    out, position = [], 0
    for record in records:
        n = len(record["completions"])
        out.append({**record, "scores": scores[position : position + n], "reward": reward.name})
        position += n
    return out
