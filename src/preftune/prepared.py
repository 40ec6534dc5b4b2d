"""Data prepared once: records read, validated and tokenized into memory-mapped Arrow tables.

A Python list of token ids costs ~42 bytes a token, so a million pairs of ~500 tokens held as lists
need ~20 GB before the model is loaded. Here every source goes through `datasets`' Arrow files
instead: the readers' records are validated one at a time (the same one-line errors, naming file,
line and field) and written to an Arrow file; a batched `Dataset.map`, on `dataset_num_proc`
processes, renders chat templates and tokenizes with the fast tokenizer's batched call into int32
columns. The tables are memory-mapped: a batch reads its rows from the page cache.

The token table is stored **untruncated** and keyed by what determines its ids: the data's bytes,
the split, the column mapping, the tokenizer (vocabulary, special tokens, template), the chat
options, the data family and the format version. Truncation, the eval split, KTO's mismatched
partners and SFT's packing are views over it (`PairItems`, `UnpairedItems`, `SequenceItems`), so a
new `max_seq_length` or seed reuses the table. A cache entry is written in a temporary folder and
renamed into place when complete: a killed preparation leaves nothing a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from preftune import __version__, chat
from preftune.batching import (
    TokenizedPair,
    TokenizedUnpaired,
    at_record,
    effective_prompt_length,
    encode_completions,
    encode_prompts,
    mismatched_partners,
    truncate_pair,
)
from preftune.data import (
    InMemoryRecords,
    PreferenceExample,
    RecordLayout,
    SFTExample,
    SkippedRecord,
    UnpairedExample,
    converter,
    first_error,
    margin_weight,
    iter_entries,
    _Unreadable,
)
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")

FORMAT = 1
KINDS = ("pairs", "unpaired", "sft")
# Columns of each family's token table (besides `location`).
_TOKEN_COLUMNS = {
    "pairs": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "unpaired": ("prompt_ids", "completion_ids"),
    "sft": ("input_ids",),
}


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _hash_file(h: Any, path: Path) -> None:
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)


def source_fingerprint(source: str | Path | InMemoryRecords, split: str) -> str:
    """A hash of the data itself: a file's bytes, every file of a saved dataset, the cached files of a
    hub dataset, or the records held in memory. A one-byte change gives another fingerprint."""
    h = hashlib.sha256()
    h.update(f"split={split}\n".encode())
    if isinstance(source, InMemoryRecords):
        h.update(b"memory\n")
        for row in source.rows:
            h.update(json.dumps(row, sort_keys=True, default=str).encode())
        return h.hexdigest()
    path = Path(source)
    if path.is_file():
        h.update(path.suffix.lower().encode())
        _hash_file(h, path)
    elif path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(file.relative_to(path)).encode())
            _hash_file(h, file)
    else:  # a hub dataset in the local cache: its prepared files
        from datasets import load_dataset

        from preftune.data import _hub_offline

        try:
            with _hub_offline():
                dataset = load_dataset(str(source), split=split)
        except Exception:
            list(iter_entries(source, split))  # raises the readers' one-line error
            raise
        for file in dataset.cache_files:
            _hash_file(h, Path(file["filename"]))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the ids: vocabulary and pre/post-processing (the backend's
    serialisation), special tokens, chat template, the run's chat options and the turn end."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    opts = chat.options(tokenizer)
    h.update(json.dumps([opts.template_kwargs, opts.fold_system], sort_keys=True, default=str).encode())
    h.update(str(chat.turn_end(tokenizer)).encode())
    return h.hexdigest()


def cache_key(kind: str, source_hash: str, layout: RecordLayout, tokenizer_hash: str) -> str:
    payload = json.dumps(
        {"format": FORMAT, "version": __version__, "kind": kind, "data": source_hash,
         "layout": [list(layout.columns), layout.system_prompt], "tokenizer": tokenizer_hash},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Reading and tokenizing
# ---------------------------------------------------------------------------------------------


def _example_json(example: Any) -> str:
    """What tokenization needs of an example, as JSON text (the Arrow table holds text)."""
    if isinstance(example, PreferenceExample):
        data = {"prompt": example.prompt, "chosen": example.chosen, "rejected": example.rejected, "tools": example.tools}
    elif isinstance(example, UnpairedExample):
        data = {"prompt": example.prompt, "completion": example.completion, "label": example.label, "tools": example.tools}
    else:
        data = {k: v for k, v in asdict(example).items() if k != "location"}
    return json.dumps(data, ensure_ascii=False)


def _weight(example: Any) -> tuple[float, str | None]:
    """The pair's `margin_weighting` weight (`data.margin_weight`), or the message of a bad margin
    (raised only by runs that weigh pairs)."""
    if not isinstance(example, PreferenceExample):
        return 1.0, None
    try:
        return margin_weight(example), None
    except PreftuneError as exc:
        return 1.0, str(exc)


def _prompt_key(prompt: Any) -> int:
    """A 63-bit hash of a prompt: KTO's mismatched partners only ask whether two prompts are equal."""
    digest = hashlib.blake2b(json.dumps(prompt, sort_keys=True).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def write_examples(
    source: str | Path | InMemoryRecords, split: str, kind: str, layout: RecordLayout, path: Path, progress: bool
) -> tuple[int, Counter]:
    """Read, validate and normalise every record into an Arrow file at `path`; (examples, skipped).
    Every invalid record is collected: the first is raised with the count of the others, as the
    loaders do. Memory stays bounded: records are written a thousand at a time."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    features = Features({
        "location": Value("string"), "example": Value("string"), "weight": Value("float64"),
        "weight_error": Value("string"), "label": Value("bool"), "prompt_key": Value("int64"),
    })
    convert = converter(kind, layout)
    errors: list[str] = []
    skipped: Counter = Counter()
    count = 0
    bar = tqdm(desc=f"read {Path(str(source)).name}", unit=" records", disable=not progress, leave=False)
    with ArrowWriter(path=str(path), features=features, writer_batch_size=1000) as writer:
        for location, record in iter_entries(source, split):
            bar.update(1)
            if isinstance(record, _Unreadable):
                errors.append(record.message)
                continue
            try:
                examples = convert(location, record)
            except SkippedRecord as exc:
                skipped[str(exc)] += 1
                continue
            except PreftuneError as exc:
                message = str(exc)
                errors.append(message if message.startswith(f"{location}: ") else f"{location}: {message}")
                continue
            if errors:
                continue  # nothing is kept once a record is invalid; keep counting problems
            for example in examples:
                weight, weight_error = _weight(example)
                writer.write({
                    "location": location,
                    "example": _example_json(example),
                    "weight": weight,
                    "weight_error": weight_error,
                    "label": getattr(example, "label", None),
                    "prompt_key": _prompt_key(example.prompt) if kind == "unpaired" else None,
                })
                count += 1
        writer.finalize()
    bar.close()
    if errors:
        raise first_error(errors)
    return count, skipped


def _tokenize_batch(batch: dict[str, list], *, tokenizer: Any, kind: str) -> dict[str, list]:
    """One batch of examples to untruncated token ids (top-level, so worker processes can run it)."""
    examples = [json.loads(e) for e in batch["example"]]
    locations = batch["location"]
    tools = [e.get("tools") for e in examples]
    if kind == "pairs":
        prompts = [e["prompt"] for e in examples]
        return {
            "prompt_ids": encode_prompts(tokenizer, prompts, tools, locations),
            "chosen_ids": encode_completions(tokenizer, prompts, [e["chosen"] for e in examples], tools, locations),
            "rejected_ids": encode_completions(tokenizer, prompts, [e["rejected"] for e in examples], tools, locations),
        }
    if kind == "unpaired":
        prompts = [e["prompt"] for e in examples]
        return {
            "prompt_ids": encode_prompts(tokenizer, prompts, tools, locations),
            "completion_ids": encode_completions(tokenizer, prompts, [e["completion"] for e in examples], tools, locations),
        }
    from preftune.sequences import encode_example

    ids, masks, prompt_lengths = [], [], []
    for e, location in zip(examples, locations):
        with at_record(location):
            i, m, p = encode_example(tokenizer, SFTExample(location, **e))
        ids.append(i), masks.append(m), prompt_lengths.append(p)
    return {"input_ids": ids, "loss_mask": masks, "prompt_length": prompt_lengths}


def _token_features(kind: str) -> Any:
    from datasets import Features, Sequence as Seq, Value

    columns = {"location": Value("string"), "weight": Value("float64"), "weight_error": Value("string"),
               "label": Value("bool"), "prompt_key": Value("int64")}
    for name in _TOKEN_COLUMNS[kind]:
        columns[name] = Seq(Value("int32"))
    if kind == "sft":
        columns["loss_mask"] = Seq(Value("bool"))
        columns["prompt_length"] = Value("int32")
    return Features(columns)


def default_num_proc() -> int:
    """The processes tokenization may use: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _tokenize_file(examples_path: Path, folder: Path, kind: str, tokenizer: Any, num_proc: int, count: int, progress: bool) -> list[str]:
    """Tokenize the examples file into Arrow shard files in `folder`; their names, in order."""
    import datasets

    dataset = datasets.Dataset.from_file(str(examples_path))
    num_proc = max(1, min(num_proc, count // 1000 or 1))  # a process per thousand examples at most
    if not progress:
        datasets.disable_progress_bars()
    try:
        dataset.map(
            partial(_tokenize_batch, tokenizer=tokenizer, kind=kind),
            batched=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["example"],
            features=_token_features(kind),
            cache_file_name=str(folder / "tokens.arrow"),
            load_from_cache_file=False,
            desc="tokenize",
        )
    finally:
        if not progress:
            datasets.enable_progress_bars()
    return sorted(p.name for p in folder.glob("tokens*.arrow"))


# ---------------------------------------------------------------------------------------------
# The prepared table
# ---------------------------------------------------------------------------------------------


class ListColumn:
    """Rows of a list<int32> (or list<bool>) column of a memory-mapped Arrow table, read without
    copying the column: numpy views of each chunk's values, sliced by its offsets."""

    def __init__(self, chunked: Any) -> None:
        self.values: list[np.ndarray] = []
        self.offsets: list[np.ndarray] = []
        starts = [0]
        for chunk in chunked.chunks:
            self.offsets.append(chunk.offsets.to_numpy(zero_copy_only=False))
            self.values.append(chunk.values.to_numpy(zero_copy_only=False))
            starts.append(starts[-1] + len(chunk))
        self.starts = np.asarray(starts, dtype=np.int64)

    def row(self, r: int) -> np.ndarray:
        c = int(np.searchsorted(self.starts, r, side="right")) - 1
        o = self.offsets[c]
        i = r - int(self.starts[c])
        return self.values[c][o[i] : o[i + 1]]

    def lengths(self) -> np.ndarray:
        if not self.offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o).astype(np.int64) for o in self.offsets])


@dataclass
class PreparedData:
    """One source, validated and tokenized: the memory-mapped token table and what it took."""

    kind: str
    table: Any  # datasets.Dataset of the token columns, `location`, `margin`, `label`, `prompt_key`
    folder: Path | None  # the cache entry (None: a temporary preparation)
    from_cache: bool
    seconds: float
    skipped: Counter = field(default_factory=Counter)
    name: str = ""  # the source, for messages
    _columns: dict[str, ListColumn] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def fingerprint(self) -> str:
        return self.folder.name if self.folder is not None else str(getattr(self.table, "_fingerprint", ""))

    def ids(self, name: str) -> ListColumn:
        if name not in self._columns:
            self._columns[name] = ListColumn(self.table.data.table.column(name))
        return self._columns[name]

    def scalars(self, name: str) -> np.ndarray:
        return self.table.data.table.column(name).to_numpy(zero_copy_only=False)

    def location(self, r: int) -> str:
        return str(self.table.data.table.column("location")[int(r)].as_py())


def _cache_root(cache_dir: str | None) -> Path:
    from preftune.models import cache_dir as default_cache

    return Path(cache_dir).expanduser() if cache_dir else default_cache()


def _open(kind: str, folder: Path, from_cache: bool, seconds: float, skipped: Counter) -> PreparedData:
    import datasets

    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [datasets.Dataset.from_file(str(folder / name)) for name in manifest["files"]]
    table = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
    return PreparedData(kind, table, folder, from_cache, seconds, Counter(manifest.get("skipped", {})) if from_cache else skipped)


def _remove_dead_work(root: Path) -> None:
    """Remove the temporary folders of preparations whose process is gone (killed mid-way)."""
    for work in root.glob(".tmp-*"):
        try:
            pid = int(work.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(work, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def prepare(
    source: str | Path | InMemoryRecords,
    split: str,
    kind: str,
    tokenizer: Any,
    layout: RecordLayout | None = None,
    *,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
) -> PreparedData:
    """The source's token table: mapped from the cache when this data, tokenizer and mapping were
    prepared before, else read, validated and tokenized, then stored under the cache (records in
    memory are prepared in a temporary folder, kept while the process lives)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}")
    layout = layout or RecordLayout()
    started = time.perf_counter()
    key = cache_key(kind, source_fingerprint(source, split), layout, tokenizer_fingerprint(tokenizer))
    root = _cache_root(cache_dir) / "data"
    folder = root / key
    name = str(source)
    if (folder / "manifest.json").is_file():
        try:
            data = _open(kind, folder, True, time.perf_counter() - started, Counter())
            data.name = name
            return data
        except Exception as exc:  # a damaged entry is prepared again, never trusted
            log.warning("data cache entry %s unreadable (%s): preparing the data again", folder, exc)
            shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    _remove_dead_work(root)
    work = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        count, skipped = write_examples(source, split, kind, layout, work / "examples.arrow", progress)
        files = _tokenize_file(work / "examples.arrow", work, kind, tokenizer, num_proc or default_num_proc(), count, progress)
        (work / "examples.arrow").unlink()
        from preftune.io import write_atomic

        write_atomic(work / "manifest.json", json.dumps({"format": FORMAT, "kind": kind, "files": files,
                                                         "examples": count, "skipped": dict(skipped)}, indent=1))
        try:
            os.replace(work, folder)
        except OSError:  # another process finished the same entry first: use theirs
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    data = _open(kind, folder, False, time.perf_counter() - started, skipped)
    data.name = name
    return data


# ---------------------------------------------------------------------------------------------
# Views: truncation, splits, partners and packing over the table
# ---------------------------------------------------------------------------------------------


def split_rows(n: int, eval_split: float, seed: int, what: str = "pairs") -> tuple[np.ndarray, np.ndarray]:
    """Seeded random hold-out as row numbers, the same rows `trainer.split_for_eval` holds out."""
    import torch

    if not eval_split:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    n_eval = int(eval_split) if eval_split >= 1 else max(1, round(eval_split * n))
    if n_eval >= n:
        raise PreftuneError(f"'eval_split' {eval_split:g} leaves no training {what} out of {n}")
    held = np.zeros(n, dtype=bool)
    held[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_eval].numpy()] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def subset_rows(n: int, max_train_samples: int | float | None, seed: int, what: str = "pairs") -> np.ndarray:
    """Positions (ascending) of the first `max_train_samples` of one seeded permutation of `n`
    training rows: a count, or a fraction in (0, 1] of `n` (rounded, at least 1). For one seed the
    subsets are nested, each inside every larger one, so the points of a learning curve differ only
    by the data added. A count above `n` is an error rather than clamped: the curve's x value would
    otherwise say more data than was trained on."""
    if max_train_samples is None:
        return np.arange(n)
    if isinstance(max_train_samples, float):
        k = max(1, round(max_train_samples * n))
    else:
        k = int(max_train_samples)
        if k > n:
            raise PreftuneError(
                f"'max_train_samples' {k} is more than the {n} training {what} (after the eval split); "
                f"use at most {n}, or a fraction such as 0.5"
            )
    # Its own stream (the eval split uses torch's generator with `seed`), so the subset is not the
    # split's permutation continued.
    order = np.random.default_rng([seed % 2**32, 0x7E57]).permutation(n)
    return np.sort(order[:k])


def take_train_samples(examples: Any, max_train_samples: int | float | None, seed: int, what: str = "pairs") -> tuple[Any, int]:
    """The training examples as the trainer holds them (a list, or a (table, rows) view) cut to
    `subset_rows`, and how many there were before."""
    if isinstance(examples, tuple):
        data, rows = examples
        return (data, np.asarray(rows)[subset_rows(len(rows), max_train_samples, seed, what)]), len(rows)
    return [examples[int(i)] for i in subset_rows(len(examples), max_train_samples, seed, what)], len(examples)


class TableItems(Sequence):
    """Items built on access from rows of a prepared table; `index` is `offset` + the position in
    the view (what keys the reference log-probs). `lengths` gives every item's `num_tokens` without
    building the items."""

    def __init__(self, data: PreparedData, rows: np.ndarray, offset: int = 0) -> None:
        self.data = data
        self.rows = np.asarray(rows, dtype=np.int64)
        self.offset = offset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return Subset(self, np.arange(len(self))[j])
        if j < 0:
            j += len(self)
        if not 0 <= j < len(self):
            raise IndexError(j)
        return self.item(int(j))

    def item(self, j: int) -> Any:
        raise NotImplementedError

    def locations(self, mask: np.ndarray, limit: int = 3) -> list[str]:
        return [self.data.location(self.rows[j]) for j in np.flatnonzero(mask)[:limit]]

    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(type(self).__name__.encode())
        h.update(self.data.fingerprint.encode())
        h.update(json.dumps(self.view_settings(), sort_keys=True).encode())
        h.update(self.rows.tobytes())
        h.update(str(self.offset).encode())
        return h.hexdigest()

    def view_settings(self) -> dict[str, Any]:
        return {}


class PairItems(TableItems):
    """`TokenizedPair`s of a pair table, truncated as `batching.truncate_pair` does."""

    def __init__(self, data: PreparedData, rows: np.ndarray, offset: int, max_seq_length: int,
                 max_prompt_length: int | None, weighted: bool = False) -> None:
        super().__init__(data, rows, offset)
        self.max_seq_length, self.max_prompt_length, self.weighted = max_seq_length, max_prompt_length, weighted
        self.prompt, self.chosen, self.rejected = (data.ids(n) for n in _TOKEN_COLUMNS["pairs"])
        self._full = np.stack([c.lengths()[self.rows] for c in (self.prompt, self.chosen, self.rejected)]) if len(self.rows) else np.zeros((3, 0), dtype=np.int64)
        if weighted:
            errors = data.table.data.table.column("weight_error")
            if errors.null_count < len(errors):  # some record has a bad margin: the first in file order
                for r in self.rows:
                    message = errors[int(r)].as_py()
                    if message is not None:
                        raise PreftuneError(message)
            self.weights = data.scalars("weight")[self.rows].astype(np.float64)

    def view_settings(self) -> dict[str, Any]:
        return {"max_seq_length": self.max_seq_length, "max_prompt_length": self.max_prompt_length}

    def _truncated(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        limit = effective_prompt_length(self.max_seq_length, self.max_prompt_length)
        p, c, r = self._full
        prompt = np.minimum(p, limit)
        budget = self.max_seq_length - prompt
        return prompt, np.minimum(c, budget), np.minimum(r, budget)

    @property
    def lengths(self) -> np.ndarray:
        p, c, r = self._truncated()
        return 2 * p + c + r

    def item(self, j: int) -> TokenizedPair:
        r = int(self.rows[j])
        pair = truncate_pair(
            self.offset + j, self.prompt.row(r).tolist(), self.chosen.row(r).tolist(), self.rejected.row(r).tolist(),
            self.max_seq_length, self.max_prompt_length,
        )
        if self.weighted:
            from preftune.batching import WeightedPair

            return WeightedPair(**vars(pair), weight=float(self.weights[j]))
        return pair

    def summary(self) -> tuple[str, list[str]]:
        """The truncation report of `batching.TruncationStats` and the first truncated examples."""
        limit = effective_prompt_length(self.max_seq_length, self.max_prompt_length)
        p, c, r = self._full
        prompt = np.minimum(p, limit)
        budget = self.max_seq_length - prompt
        flags = (p > limit, c > budget, r > budget)
        longest_completion = int(max(c.max(initial=0), r.max(initial=0)))
        text = (
            f"{len(self)} pairs tokenized; truncated: {int(flags[0].sum())} prompts (from the left), "
            f"{int(flags[1].sum())} chosen and {int(flags[2].sum())} rejected completions (from the right); "
            f"longest prompt {int(p.max(initial=0))} tokens, longest completion {longest_completion} tokens"
        )
        return text, self.locations(flags[0] | flags[1] | flags[2])


class UnpairedItems(TableItems):
    """KTO's `TokenizedUnpaired`s: each example with the completion of its mismatched partner
    (`batching.mismatched_partners`, over this view's examples), truncated like a pair."""

    def __init__(self, data: PreparedData, rows: np.ndarray, offset: int, max_seq_length: int,
                 max_prompt_length: int | None, seed: int) -> None:
        super().__init__(data, rows, offset)
        self.max_seq_length, self.max_prompt_length, self.seed = max_seq_length, max_prompt_length, seed
        self.prompt, self.completion = (data.ids(n) for n in _TOKEN_COLUMNS["unpaired"])
        self.labels = data.scalars("label")[self.rows].astype(bool)
        keys = data.scalars("prompt_key")[self.rows].tolist()
        self.partners = np.asarray(mismatched_partners(keys, seed), dtype=np.int64) if len(keys) else np.zeros(0, dtype=np.int64)
        self._full = (self.prompt.lengths()[self.rows], self.completion.lengths()[self.rows])

    def view_settings(self) -> dict[str, Any]:
        return {"max_seq_length": self.max_seq_length, "max_prompt_length": self.max_prompt_length, "seed": self.seed}

    @property
    def lengths(self) -> np.ndarray:
        limit = effective_prompt_length(self.max_seq_length, self.max_prompt_length)
        p, c = self._full
        prompt = np.minimum(p, limit)
        return prompt + np.minimum(c, self.max_seq_length - prompt)

    def item(self, j: int) -> TokenizedUnpaired:
        r = int(self.rows[j])
        partner = int(self.rows[self.partners[j]])
        pair = truncate_pair(
            self.offset + j, self.prompt.row(r).tolist(), self.completion.row(r).tolist(),
            self.completion.row(partner).tolist(), self.max_seq_length, self.max_prompt_length,
        )
        return TokenizedUnpaired(
            index=pair.index, prompt_ids=pair.prompt_ids, completion_ids=pair.chosen_ids, kl_ids=pair.rejected_ids,
            label=bool(self.labels[j]), prompt_truncated=pair.prompt_truncated, completion_truncated=pair.chosen_truncated,
        )

    def summary(self) -> tuple[str, list[str]]:
        limit = effective_prompt_length(self.max_seq_length, self.max_prompt_length)
        p, c = self._full
        prompt = np.minimum(p, limit)
        flags = (p > limit, c > self.max_seq_length - prompt)
        desirable = int(self.labels.sum())
        text = (
            f"{len(self)} examples tokenized ({desirable} desirable, {len(self) - desirable} undesirable); truncated: "
            f"{int(flags[0].sum())} prompts (from the left), {int(flags[1].sum())} completions (from the right); "
            f"longest prompt {int(p.max(initial=0))} tokens, longest completion {int(c.max(initial=0))} tokens"
        )
        return text, self.locations(flags[0] | flags[1])


class SequenceItems(TableItems):
    """SFT's `SequenceRow`s: each example truncated as `sequences.truncate_example` does, then one
    a row, or packed best-fit decreasing (`sequences.pack`) into rows of `max_seq_length`."""

    def __init__(self, data: PreparedData, rows: np.ndarray, offset: int, max_seq_length: int,
                 max_prompt_length: int | None, completion_only_loss: bool, packing: bool) -> None:
        from preftune.sequences import pack_lengths

        super().__init__(data, rows, offset)
        self.max_seq_length, self.max_prompt_length = max_seq_length, max_prompt_length
        self.completion_only_loss, self.packing = completion_only_loss, packing
        self.ids, self.mask = data.ids("input_ids"), data.ids("loss_mask")
        self.prompt_length = data.scalars("prompt_length")[self.rows].astype(np.int64)
        full = self.ids.lengths()[self.rows]
        limit = effective_prompt_length(max_seq_length, max_prompt_length)
        cut = np.where(self.prompt_length > limit, self.prompt_length - limit, 0)
        self.truncated = (cut > 0) | (full - cut > max_seq_length)
        self.example_lengths = np.minimum(full - cut, max_seq_length)
        groups = pack_lengths(self.example_lengths.tolist(), max_seq_length) if packing else [[i] for i in range(len(self.rows))]
        self.groups = groups

    def view_settings(self) -> dict[str, Any]:
        return {"max_seq_length": self.max_seq_length, "max_prompt_length": self.max_prompt_length,
                "completion_only_loss": self.completion_only_loss, "packing": self.packing}

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([int(self.example_lengths[g].sum()) for g in self.groups], dtype=np.int64)

    def sequence(self, k: int) -> Any:
        from preftune.sequences import truncate_example

        r = int(self.rows[k])
        return truncate_example(self.ids.row(r).tolist(), self.mask.row(r).astype(bool).tolist(), int(self.prompt_length[k]),
                                self.max_seq_length, self.max_prompt_length, self.completion_only_loss)

    def item(self, j: int) -> Any:
        from preftune.sequences import SequenceRow

        return SequenceRow(self.offset + j, [self.sequence(k) for k in self.groups[j]])

    def summary(self) -> tuple[str, list[str], int]:
        """The report of `sequences.SequenceStats`, the first truncated examples, and how many
        examples have no trained token left."""
        from preftune.sequences import SequenceStats

        stats = SequenceStats(examples=len(self.rows), rows=len(self.groups))
        stats.truncated = int(self.truncated.sum())
        stats.tokens = int(self.example_lengths.sum())
        stats.longest = int(self.example_lengths.max(initial=0))
        for k in range(len(self.rows)):
            trained = self.sequence(k).loss_tokens
            stats.loss_tokens += trained
            stats.no_loss_tokens += trained == 0
        return stats.summary(), self.locations_of(self.truncated), stats.no_loss_tokens

    def locations_of(self, mask: np.ndarray, limit: int = 3) -> list[str]:
        return [self.data.location(self.rows[k]) for k in np.flatnonzero(mask)[:limit]]


def item_lengths(items: Sequence[Any]) -> np.ndarray:
    """Every item's `num_tokens`: from a table view's lengths, else item by item."""
    lengths = getattr(items, "lengths", None)
    if lengths is not None:
        return np.asarray(lengths)
    return np.asarray([item.num_tokens for item in items], dtype=np.int64)


class Subset(Sequence):
    """Some positions of an item view (a process's share of the eval set), built on access, with
    their own `index` kept."""

    def __init__(self, parent: Sequence[Any], positions: np.ndarray) -> None:
        self.parent, self.positions = parent, np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return Subset(self.parent, self.positions[j])
        return self.parent[int(self.positions[j])]

    @property
    def lengths(self) -> np.ndarray:
        return item_lengths(self.parent)[self.positions]


def longest(items: Sequence[Any], k: int) -> list[Any]:
    """The `k` items with the most tokens (ties in order), without building the others."""
    order = np.argsort(-item_lengths(items), kind="stable")[:k]
    return [items[int(j)] for j in order]


class Chain(Sequence):
    """Two item sequences as one (train then eval, for the reference pass), without copying."""

    def __init__(self, first: Sequence[Any], second: Sequence[Any]) -> None:
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first) + len(self.second)

    def __getitem__(self, j: Any) -> Any:
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(len(self)))]
        n = len(self.first)
        return self.first[j] if j < n else self.second[j - n]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([item_lengths(self.first), item_lengths(self.second)])

    def fingerprint(self) -> str | None:
        parts = [getattr(s, "fingerprint", None) for s in (self.first, self.second)]
        if any(p is None for p in parts):
            return None
        return hashlib.blake2b("".join(p() for p in parts).encode(), digest_size=16).hexdigest()
