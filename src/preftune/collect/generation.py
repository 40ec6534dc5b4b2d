"""Sampling completions from a causal LM: batched, seeded per prompt, resumable.

Why not plain `model.generate(do_sample=True)`: its sampler draws from the global RNG, so a row's
tokens depend on every other row of its batch and on everything sampled before. Here each sample
(prompt `i`, sample `j`) owns a generator seeded from `(seed, i, j)`, and a token is drawn with the
Gumbel-max trick (argmax of logits plus Gumbel noise is an exact draw from their softmax; Gumbel
1954, used for sampling by Maddison et al. 2014, "A* Sampling"), applied after the temperature and
top-p warpers. So a sample depends on its seed and prompt only: a rerun with the same seed gives
the same file, and a run resumed after an interruption gives the same file as one that never
stopped. The KV cache is `generate`'s own.

Prompts are encoded with the scoring rule of `preftune.batching.encode_prompt` (chat template for
messages), the ids training will later score the completions after. String prompts given to a chat
model are sent as one user message, and the samples file records the messages actually used, so a
pair built from them trains on the context it was sampled in.

The samples file is JSONL, one line per prompt:
`{"index", "prompt", "completions", "lengths", "stopped", "sampling", ...the prompt record's other fields}`.
`lengths` counts generated tokens (EOS excluded); `stopped` says whether the sample ended with EOS
rather than at `max_new_tokens`; `sampling` holds the settings, so a resume with different ones is
refused instead of mixing two distributions in one file. Sampled at several temperatures, a record
holds `num_samples` completions per temperature, in the order given, `sampling.temperature` is the
list, and `temperatures` says the temperature of each completion. Sample j at the k-th temperature
is seeded as sample k * num_samples + j, so the first temperature's samples are those a run at that
temperature alone gives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from preftune import chat
from preftune.batching import encode_prompt
from preftune.data import InMemoryRecords, Text, text_field, load_records
from preftune.errors import PreftuneError
from preftune.io import append_jsonl, write_atomic

log = logging.getLogger("preftune")

ENGINES = ("auto", "transformers", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """What decides the samples, besides the model and the prompts. Written into each record."""

    num_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0

    def check(self) -> SamplingSettings:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise PreftuneError(f"--num-samples must be a whole number >= 1, got {self.num_samples!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise PreftuneError(f"--temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PreftuneError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise PreftuneError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        return self


@dataclass
class PromptRecord:
    """One prompt to sample from, with where it came from and the fields to carry along."""

    index: int  # 0-based position among the source's prompts: keys resume and seeds
    prompt: Text
    location: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Samples:
    """The completions of one prompt."""

    completions: list[str]
    lengths: list[int]
    stopped: list[bool]
    token_ids: list[list[int]]  # generated ids, EOS included where the sample stopped


# (prompt ids of a batch, their prompt indices) -> the samples of each prompt
Sampler = Callable[[list[list[int]], list[int]], list[Samples]]


def temperature_list(settings: SamplingSettings, temperatures: Sequence[float] | None) -> list[float]:
    """The temperatures to sample at: `temperatures` when given, else the settings' one."""
    temps = [float(t) for t in temperatures] if temperatures else [settings.temperature]
    for t in temps:
        replace(settings, temperature=t).check()
    if len(set(temps)) != len(temps):
        raise PreftuneError(f"--temperature: each value once, got {' '.join(f'{t:g}' for t in temps)}")
    return temps


def sampling_record(model_name: str, settings: SamplingSettings, temps: Sequence[float]) -> dict[str, Any]:
    """The `sampling` field of a samples record: the settings, the temperature a list when several."""
    return {"model": model_name, **asdict(settings), "temperature": temps[0] if len(temps) == 1 else list(temps)}


def _joined(parts: Sequence[Samples]) -> Samples:
    """One prompt's samples at several temperatures, as one list in temperature order."""
    return Samples(
        [c for p in parts for c in p.completions],
        [n for p in parts for n in p.lengths],
        [s for p in parts for s in p.stopped],
        [t for p in parts for t in p.token_ids],
    )


# --------------------------------------------------------------------------------------- prompts


def load_prompts(path: str | Path | InMemoryRecords) -> list[PromptRecord]:
    """Prompts from a `.txt` file (one per line, blank lines skipped) or any source
    `preftune.data.load_records` reads (JSONL, JSON, Parquet, CSV, records in memory) with a
    `prompt` field that is text or a list of chat messages. Other fields are kept and copied into
    the samples."""
    path = path if isinstance(path, InMemoryRecords) else Path(path)
    if isinstance(path, Path) and path.suffix.lower() == ".txt":
        if not path.is_file():
            raise PreftuneError(f"prompts file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as exc:
            raise PreftuneError(f"{path.name}: not valid UTF-8 (byte {exc.start + 1} of the file)") from None
        prompts = []
        for number, line in enumerate(lines, start=1):
            if line.strip():
                prompts.append(PromptRecord(len(prompts), line, f"{path.name}:{number}"))
    else:
        prompts = []
        for location, record in load_records(path):
            if not isinstance(record, dict):
                raise PreftuneError(f"{location}: record must be an object with a 'prompt' field")
            if record.get("prompt") is None:
                raise PreftuneError(f"{location}: field 'prompt' is missing")
            try:
                prompt = text_field("prompt", record["prompt"])
            except PreftuneError as exc:
                raise PreftuneError(f"{location}: {exc}") from None
            if (not prompt.strip()) if isinstance(prompt, str) else not prompt:
                raise PreftuneError(f"{location}: field 'prompt' is empty")
            extra = {k: v for k, v in record.items() if k != "prompt"}
            prompts.append(PromptRecord(len(prompts), prompt, location, extra))
    if not prompts:
        raise PreftuneError(f"no prompts in {path}")
    return prompts


def as_chat(prompt: Text, tokenizer: Any, chat: bool | None) -> Text:
    """The prompt as the model will see it: a string becomes one user message when `chat` is True,
    or, with `chat=None`, when the tokenizer has a chat template (an instruct model)."""
    if isinstance(prompt, list):
        return prompt
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tokenizer, "chat_template", None):
        raise PreftuneError("--chat needs a tokenizer with a chat template; this one has none")
    return [{"role": "user", "content": prompt}] if use_chat else prompt


def chat_prompts(prompts: Sequence[PromptRecord], tokenizer: Any, chat: bool | None = None) -> list[PromptRecord]:
    """The records with each prompt in the form the model sees (`as_chat`)."""
    return [PromptRecord(p.index, as_chat(p.prompt, tokenizer, chat), p.location, p.extra) for p in prompts]


# --------------------------------------------------------------------------------------- sampling


def sample_seed(seed: int, index: int, sample: int) -> int:
    """The seed of sample `sample` of prompt `index`: a hash, so nearby seeds share no streams."""
    digest = hashlib.blake2b(f"{seed}:{index}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class _GumbelMax:
    """Logits processor that adds Gumbel noise from one generator per row; greedy decoding then
    draws from the (warped) softmax. Rows draw once per step whatever their batch holds."""

    def __init__(self, seeds: Sequence[int], device: torch.device) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=scores.device, dtype=torch.float32) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny)))
        return scores.float() + gumbel


class _FinishedSamples:
    """A stopping criterion that stops nothing: it reports samples as they end (their EOS drawn),
    so a progress bar moves during a long `generate` call instead of only after it."""

    def __init__(self, eos: Sequence[int], report: Callable[[int], None]) -> None:
        self.eos = torch.tensor(list(eos), dtype=torch.long)
        self.report = report
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        ended = torch.isin(input_ids[:, -1], self.eos.to(input_ids.device))
        if self.done is None:
            self.done = torch.zeros_like(ended)
        new = int((ended & ~self.done).sum())
        self.done |= ended  # a finished row is padded (often with EOS itself): counted once
        if new:
            self.report(new)
        return torch.zeros_like(ended)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    if chat.has_template(tokenizer) and chat.turn_end_id(tokenizer) is not None:
        ids.add(chat.turn_end_id(tokenizer))  # a chat model stops at its turn end (Gemma's <end_of_turn>)
    if not ids:
        raise PreftuneError("the tokenizer has no EOS token: generation would never stop")
    return sorted(int(i) for i in ids)


def left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of token rows padded on the left, so every row ends at the
    last column: where generation continues, and where a judge reads the next-token logits."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    return input_ids, attention_mask


def _shared_prefill(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int) -> Any:
    """The KV cache of every prompt but its last token, computed once per prompt and then
    repeated for its `n` samples: the prompt's forward pass is shared instead of run n times.
    `generate` continues from it with the last prompt token. Positions count real tokens only,
    as `generate` counts them, so left padding does not shift them."""
    from transformers import DynamicCache

    if input_ids.shape[1] < 2:
        return None
    cache = DynamicCache()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids[:, :-1],
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    if n > 1:
        cache.batch_repeat_interleave(n)
    return cache


@torch.no_grad()
def sample_batch(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    indices: Sequence[int],
    settings: SamplingSettings,
    *,
    first_sample: int = 0,
    on_samples: Callable[[int], None] | None = None,
) -> list[Samples]:
    """`settings.num_samples` completions for each prompt (given as ids), in one `generate` call.

    Rows are left-padded so every prompt ends where generation starts; each prompt's forward pass
    is run once for all its samples (`_shared_prefill`). Sample `j` of prompt
    `indices[k]` uses the generator seeded `sample_seed(settings.seed, indices[k], first_sample + j)`
    (`first_sample`: where this call's samples sit among the prompt's, at several temperatures).
    `on_samples(k)` is told of samples as they finish, all `len(prompt_ids) * num_samples` of them
    by the time this returns.
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList, TemperatureLogitsWarper, TopPLogitsWarper

    n = settings.num_samples
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = left_padded(prompt_ids, pad)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    cache = _shared_prefill(model, input_ids, attention_mask, n)

    processors = LogitsProcessorList()
    if settings.temperature > 0:
        if settings.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
        seeds = [sample_seed(settings.seed, i, first_sample + j) for i in indices for j in range(n)]
        processors.append(_GumbelMax(seeds, device))
    eos = _eos_ids(model, tokenizer)
    # A fresh config: the model's own defaults (top_k=50, repetition penalties, ...) would change
    # the distribution behind the user's back; the noise above does the sampling.
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
    )
    reported = 0

    def report(k: int) -> None:
        nonlocal reported
        reported += k
        if on_samples is not None:
            on_samples(k)

    output = model.generate(
        input_ids=input_ids.repeat_interleave(n, dim=0),
        attention_mask=attention_mask.repeat_interleave(n, dim=0),
        past_key_values=cache,
        generation_config=config,
        logits_processor=processors,
        stopping_criteria=StoppingCriteriaList([_FinishedSamples(eos, report)]),
    )
    if len(prompt_ids) * n > reported:  # the samples that ran to max_new_tokens
        report(len(prompt_ids) * n - reported)
    generated = output[:, input_ids.shape[1] :].tolist()
    results: list[Samples] = []
    for k in range(len(prompt_ids)):
        texts, lengths, stopped, token_ids = [], [], [], []
        for row in generated[k * n : (k + 1) * n]:
            end = next((t for t, tok in enumerate(row) if tok in eos), None)
            body = row if end is None else row[:end]
            texts.append(tokenizer.decode(body, skip_special_tokens=True))
            lengths.append(len(body))
            stopped.append(end is not None)
            token_ids.append(row if end is None else row[: end + 1])
        results.append(Samples(texts, lengths, stopped, token_ids))
    return results


# --------------------------------------------------------------------------------------- samples file


def check_samples_record(location: str, record: Any, *, scored: bool = False) -> tuple[list[str], list[float]]:
    """The one check of the samples shape `{"prompt", "completions": [str, ...], "scores"?}` that
    generation writes, scoring reads and pairs are built from (`scored`: scores required, one
    number per completion). Returns the completions and the scores (empty when not `scored`)."""
    if not isinstance(record, dict):
        raise PreftuneError(f"{location}: a {'scored ' if scored else ''}samples record must be an object")
    if not scored and record.get("prompt") is None:
        raise PreftuneError(f"{location}: field 'prompt' is missing")
    completions = record.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise PreftuneError(f"{location}: field 'completions' must be a list of strings")
    if not scored:
        return completions, []
    scores = record.get("scores")
    if scores is None:
        raise PreftuneError(f"{location}: field 'scores' is missing: score the samples first (preftune score)")
    if (
        not isinstance(scores, list)
        or len(scores) != len(completions)
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)
    ):
        raise PreftuneError(f"{location}: field 'scores' must be a list of {len(completions)} numbers, one per completion")
    if record.get("prompt") is None:
        raise PreftuneError(f"{location}: field 'prompt' is missing")
    return completions, [float(s) for s in scores]


def read_samples(path: str | Path) -> list[tuple[str, dict]]:
    """(location, record) of every line of a samples file, checked to hold prompt and completions."""
    records = load_records(path)
    for location, record in records:
        check_samples_record(location, record)
    return records


def _repair_tail(path: Path) -> None:
    """Drop a torn last line (a run killed mid-write leaves one without its newline), atomically."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
    write_atomic(path, data[: data.rfind(b"\n") + 1])


def _done_indices(path: Path, prompts: Sequence[PromptRecord], sampling: dict[str, Any]) -> set[int]:
    """Indices already in an earlier run's file, after checking it came from the same prompts and
    settings (a mismatch would silently mix two distributions in one file)."""
    _repair_tail(path)
    if not path.read_bytes().strip():
        return set()
    done: set[int] = set()
    for location, record in read_samples(path):
        index = record.get("index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(prompts):
            raise PreftuneError(f"{location}: field 'index' {index!r} is not a prompt of this prompts file")
        if record["prompt"] != prompts[index].prompt:
            raise PreftuneError(
                f"{location}: prompt {index} differs from {prompts[index].location}: the prompts changed since "
                "this file was written; use another --output or --overwrite"
            )
        earlier = record.get("sampling")
        if earlier != sampling:
            changed = sorted(k for k in sampling if not isinstance(earlier, dict) or earlier.get(k) != sampling[k])
            was = ", ".join(f"{k}={earlier.get(k)!r}" for k in changed) if isinstance(earlier, dict) else "no settings"
            now = ", ".join(f"{k}={sampling[k]!r}" for k in changed)
            raise PreftuneError(
                f"{location}: written with {was}, this run asks {now}; use another --output or --overwrite"
            )
        done.add(index)
    return done


def iter_samples(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    settings: SamplingSettings,
    *,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "generate",
    sampler: Sampler | Sequence[Sampler] | None = None,
    temperatures: Sequence[float] | None = None,
) -> Iterator[tuple[list[PromptRecord], list[Samples]]]:
    """Sample `prompts` (already in the form the model sees) batch by batch, in order, with a
    progress bar in samples/s; yields each batch with its samples. `temperatures` samples each
    prompt at each of them in turn (`settings.num_samples` each; see the module's docstring).
    `sampler` replaces the transformers sampler (the vLLM engine passes its own): one per
    temperature."""
    from tqdm.auto import tqdm

    settings.check()
    if batch_size < 1:
        raise PreftuneError(f"--batch-size must be >= 1, got {batch_size}")
    temps = temperature_list(settings, temperatures)
    n = settings.num_samples
    with tqdm(total=len(prompts) * n * len(temps), desc=desc, unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        counted = 0  # samples of the current call the bar has shown

        def advance(k: int) -> None:
            nonlocal counted
            counted += k
            bar.update(k)

        if sampler is None:
            samplers: list[Sampler] = [
                _transformers_sampler(model, tokenizer, replace(settings, temperature=t), k * n, advance)
                for k, t in enumerate(temps)
            ]
        else:
            samplers = [sampler] if callable(sampler) else list(sampler)
        if len(samplers) != len(temps):
            raise PreftuneError(f"{len(temps)} temperatures need {len(temps)} samplers, got {len(samplers)}")
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            ids = [encode_prompt(tokenizer, p.prompt) for p in batch]
            parts = []
            for sample in samplers:
                counted = 0
                parts.append(sample(ids, [p.index for p in batch]))
                # A sampler that does not report (vLLM's, a caller's) moves the bar once per call.
                bar.update(len(batch) * n - counted)
            yield batch, [_joined(per_prompt) for per_prompt in zip(*parts, strict=True)]


def _transformers_sampler(
    model: Any, tokenizer: Any, settings: SamplingSettings, first_sample: int, on_samples: Callable[[int], None]
) -> Sampler:
    def sample(ids: list[list[int]], indices: list[int]) -> list[Samples]:
        return sample_batch(model, tokenizer, ids, indices, settings, first_sample=first_sample, on_samples=on_samples)

    return sample


def scoring_rows(
    tokenizer: Any, prompts: Sequence[PromptRecord], samples: Sequence[Samples]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, generated ids) of every sample, prompt by prompt: the rows to score the samples
    with (`preftune.eval.evaluation.completion_logps`), the very tokens that were sampled, EOS included
    where a sample stopped."""
    prompt_rows: list[list[int]] = []
    completion_rows: list[list[int]] = []
    for p, s in zip(prompts, samples, strict=True):
        ids = encode_prompt(tokenizer, p.prompt)
        prompt_rows.extend([ids] * len(s.token_ids))
        completion_rows.extend(s.token_ids)
    return prompt_rows, completion_rows


def iter_sample_records(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    settings: SamplingSettings,
    *,
    model_name: str,
    batch_size: int = 8,
    progress: bool = True,
    sampler: Sampler | Sequence[Sampler] | None = None,
    temperatures: Sequence[float] | None = None,
) -> Iterator[list[dict[str, Any]]]:
    """The samples records of `prompts` (already in the form the model sees), batch by batch: what
    a samples file holds, one record per prompt. At several temperatures each record also says
    the temperature of each completion (`temperatures`)."""
    temps = temperature_list(settings, temperatures)
    sampling = sampling_record(model_name, settings, temps)
    per_sample = {"temperatures": [t for t in temps for _ in range(settings.num_samples)]} if len(temps) > 1 else {}
    for batch, results in iter_samples(
        model, tokenizer, prompts, settings, batch_size=batch_size, progress=progress, sampler=sampler, temperatures=temps
    ):
        yield [
            {
                **p.extra,
                "index": p.index,
                "prompt": p.prompt,
                "completions": s.completions,
                "lengths": s.lengths,
                "stopped": s.stopped,
                **per_sample,
                "sampling": sampling,
            }
            for p, s in zip(batch, results, strict=True)
        ]


def generate_file(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRecord],
    output: str | Path,
    settings: SamplingSettings,
    *,
    model_name: str,
    batch_size: int = 8,
    chat: bool | None = None,
    overwrite: bool = False,
    progress: bool = True,
    sampler: Sampler | Sequence[Sampler] | None = None,
    temperatures: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Sample every prompt not yet in `output` and append its record; returns counts and timing.

    Records are appended batch by batch in prompt order, so an interrupted run keeps every batch
    it finished and a rerun continues after it. `temperatures`: sample at each (see the module's
    docstring), instead of at `settings.temperature` only.
    """
    settings.check()
    temps = temperature_list(settings, temperatures)
    output = Path(output)
    prompts = chat_prompts(prompts, tokenizer, chat)
    sampling = sampling_record(model_name, settings, temps)
    output.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and output.exists():
        output.unlink()
    done = _done_indices(output, prompts, sampling) if output.exists() else set()
    todo = [p for p in prompts if p.index not in done]
    if done:
        log.info("%s: %d of %d prompts already sampled; sampling the other %d", output, len(done), len(prompts), len(todo))
    started = time.perf_counter()
    for records in iter_sample_records(
        model, tokenizer, todo, settings, model_name=model_name, batch_size=batch_size, progress=progress,
        sampler=sampler, temperatures=temps,
    ):
        append_jsonl(output, records)
    seconds = time.perf_counter() - started
    made = len(todo) * settings.num_samples * len(temps)
    return {
        "prompts": len(prompts),
        "skipped": len(done),
        "samples": made,
        "seconds": seconds,
        "samples_per_second": made / seconds if seconds > 0 and made else 0.0,
    }


# --------------------------------------------------------------------------------------- models and engines


def load_generation_model(
    name: str, device: torch.device | None = None, *, template_kwargs: dict | None = None, fold_system: bool = False
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for sampling: any name `preftune.models` loads, or a PEFT
    adapter folder such as a LoRA run's `final/` (loaded onto the base model it names).
    bf16 on a CUDA GPU that supports it, fp32 elsewhere (bf16 is ~10x slower on most CPUs).
    `template_kwargs` and `fold_system` are the run's chat options (`chat.configure`)."""
    from preftune import models

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    folder = Path(name).expanduser()
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file() and not (folder / "config.json").is_file():
        from peft import PeftModel

        try:
            base_name = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as exc:
            raise PreftuneError(f"{adapter_config}: no readable 'base_model_name_or_path' ({exc})") from None
        base = models.load_model(base_name, dtype=dtype, device=device)
        model = PeftModel.from_pretrained(base, folder)
    else:
        model = models.load_model(name, dtype=dtype, device=device)
    tokenizer = chat.configure(models.load_tokenizer(name), template_kwargs, fold_system)
    return model.eval(), tokenizer


def vllm_usable() -> bool:
    """vLLM is used only where it is installed and a CUDA GPU is present."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_engine(engine: str, model_name: str) -> str:
    if engine not in ENGINES:
        raise PreftuneError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    is_adapter = (Path(model_name).expanduser() / "adapter_config.json").is_file()
    if engine == "vllm":
        if not vllm_usable():
            raise PreftuneError("--engine vllm needs the vllm package and a CUDA GPU; use --engine transformers")
        if is_adapter:
            raise PreftuneError("--engine vllm takes a full model folder, not an adapter: merge it first (merge_lora: true)")
        return "vllm"
    if engine == "auto" and vllm_usable() and not is_adapter:
        return "vllm"
    return "transformers"


def vllm_samplers(model_name: str, tokenizer: Any, settings: SamplingSettings, temperatures: Sequence[float] | None = None) -> list[Sampler]:
    """`vllm_sampler` at each temperature, on one loaded engine."""
    from vllm import LLM

    from preftune.models import resolve_model_path

    temps = temperature_list(settings, temperatures)
    llm = LLM(model=str(resolve_model_path(model_name)), dtype="bfloat16", seed=settings.seed)
    n = settings.num_samples
    return [vllm_sampler(model_name, tokenizer, replace(settings, temperature=t), first_sample=k * n, llm=llm) for k, t in enumerate(temps)]


def vllm_sampler(model_name: str, tokenizer: Any, settings: SamplingSettings, *, first_sample: int = 0, llm: Any = None) -> Sampler:
    """The same contract as `sample_batch` on vLLM: prompts go in as the same token ids, each
    prompt's request is seeded from `(seed, index, first_sample)`; vLLM's own sampler draws the
    tokens, so its samples differ from the transformers engine's but follow the same settings.
    `llm`: an engine already loaded (one per model, whatever the temperatures)."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from preftune.models import resolve_model_path

    if llm is None:
        llm = LLM(model=str(resolve_model_path(model_name)), dtype="bfloat16", seed=settings.seed)
    eos = [tokenizer.eos_token_id]

    def sample(prompt_ids: list[list[int]], indices: list[int]) -> list[Samples]:
        params = [
            SamplingParams(
                n=settings.num_samples,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_new_tokens,
                seed=sample_seed(settings.seed, i, first_sample),
                stop_token_ids=eos,
            )
            for i in indices
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False)
        results = []
        for out in outputs:
            ids = [list(o.token_ids) for o in out.outputs]
            stopped = [o.finish_reason == "stop" for o in out.outputs]
            lengths = [len(t) - (1 if s and t and t[-1] in eos else 0) for t, s in zip(ids, stopped)]
            texts = [tokenizer.decode(t[:n], skip_special_tokens=True) for t, n in zip(ids, lengths)]
            results.append(Samples(texts, lengths, stopped, ids))
        return results

    return sample
