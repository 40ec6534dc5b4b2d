"""Preference data: loading, validation, normalisation and a data-quality report.

A preference pair is a prompt with a preferred (`chosen`) and a dispreferred (`rejected`)
completion. Two shapes are accepted, following the conventions users know from TRL:

- standard: `prompt`, `chosen`, `rejected` are strings;
- conversational: `prompt` is a list of `{"role", "content"}` messages and `chosen`/`rejected`
  are the message(s) that follow it, starting with an assistant message.

Without a `prompt` field the prompt is implicit: it is the beginning that `chosen` and
`rejected` share (see `split_implicit_prompt`).

Every problem a user can fix is reported as a `PreftuneError` whose one-line message names the
record's location (`pairs.jsonl:7`) and the field. Tokenization, truncation and batching live in
`preftune.batching`; the quality report takes token lengths from its caller.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from preftune.config import RecordLayout, field_key
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")

__all__ = [
    "Message",
    "PreferenceExample",
    "load_records",
    "validate_record",
    "load_preference_data",
    "SFTExample",
    "UnpairedExample",
    "load_sft_data",
    "load_unpaired_data",
    "check_records",
    "check_data",
    "InMemoryRecords",
    "in_memory_records",
    "dataset_names",
    "split_implicit_prompt",
    "RecordLayout",
    "SkippedRecord",
    "suggest_columns",
    "LAYOUTS",
]

Message = dict[str, str]
Text = str | list[Message]

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FIELDS = ("prompt", "chosen", "rejected")
# preftune's record fields, the targets of a `columns:` mapping. `response_a`/`response_b` with
# `winner` (which one is better) or `preference` (a signed strength) are the pairwise-choice layout.
# How `data check` names the layouts a pair can be read from.
LAYOUTS = {
    "standard": "prompt/chosen/rejected as text",
    "standard-system": "prompt/chosen/rejected as text with a system message (a system column or system_prompt): "
    "read as a conversation",
    "conversational": "prompt/chosen/rejected as messages",
    "implicit": "chosen/rejected as text sharing an implicit prompt",
    "implicit-conversational": "chosen/rejected as conversations sharing their leading turns (the prompt)",
    "prompt-and-conversations": "a string prompt beside chosen/rejected conversations that repeat it "
    "(UltraFeedback binarized, Tulu 3, orpo-dpo-mix)",
    "pairwise": "two responses with the better one named (response_a/response_b with winner or preference)",
}
# HelpSteer's preference strength runs from -3 (response 1 much better) to 3 (response 2 much better).
PREFERENCE_SCALE = 3


@dataclass
class PreferenceExample:
    """One validated preference pair, normalised so the rest of the pipeline sees one shape.

    For conversations, `prompt` is the message list before the answer and `chosen`/`rejected`
    are message lists that start with an assistant message. `location` points back into the
    source (`pairs.jsonl:12`) so later errors can name the record.
    """

    prompt: Text
    chosen: Text
    rejected: Text
    location: str
    extra: dict[str, Any] = field(default_factory=dict)
    layout: str = "standard"  # which public layout the record was read as (`LAYOUTS`)

    @property
    def is_conversational(self) -> bool:
        """True when the pair is chat messages, so the chat template must render it."""
        return isinstance(self.chosen, list)

    @property
    def tools(self) -> Any:
        """The record's function schemas, passed to the chat template as `tools=`."""
        return self.extra.get("tools")


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Unreadable:
    """An entry that could not be parsed, kept in file order so every problem can be reported."""

    message: str


# What the readers yield: (location, raw record or _Unreadable).
_Entry = tuple[str, Any]


def load_records(
    source: str | Path | InMemoryRecords, split: str = "train", errors: list[str] | None = None
) -> list[tuple[str, dict]]:
    """(location, raw record) pairs from a file, a saved `datasets` folder or a cached hub dataset.

    Accepted sources: JSONL (one object a line; blank lines skipped but counted), JSON (a list of
    objects, or an object holding the list under `split` or `"data"`), Parquet, CSV (header row,
    string cells only), a folder written by `datasets`' `save_to_disk` (a `Dataset`, or a
    `DatasetDict` from which `split` is taken), the name of a hub dataset that is already in
    the local Hugging Face cache (it is never downloaded), or records in memory
    (`in_memory_records`).

    A whole-source problem (missing file, unknown type, no records) always raises. An entry that
    cannot be parsed (a JSONL line that is not JSON, a CSV row with the wrong number of cells)
    raises too, unless `errors` is given: then its message is appended there and the entry is
    skipped, so a checker can report every bad line in one pass.
    """
    records: list[tuple[str, dict]] = []
    for location, item in _read_entries(source, split):
        if not isinstance(item, _Unreadable):
            records.append((location, item))
        elif errors is None:
            raise PreftuneError(item.message)
        else:
            errors.append(item.message)
    return records


@dataclass(frozen=True)
class InMemoryRecords:
    """Records held in memory (from a `datasets.Dataset`, a list of dicts or a pandas DataFrame),
    given to every reader in place of a file. Locations are `name row N`, N the 0-based position
    (`dataset[N]`, `df.iloc[N]`), where a file's would be `file:line`."""

    name: str
    rows: tuple[Any, ...]
    hub_name: str | None = None  # the hub dataset a `datasets.Dataset` was loaded from, when known

    def __str__(self) -> str:
        return self.name

    def entries(self) -> list[_Entry]:
        return [(f"{self.name} row {i}", row) for i, row in enumerate(self.rows)]


def _plain(value: Any) -> Any:
    """A cell as the file readers would give it: numpy arrays and scalars become Python lists and
    numbers, and pandas' missing values (NaN, NaT, NA) become None, so "missing" means one thing."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and type(value).__module__ == "numpy":
        return _plain(tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    if type(value).__module__.startswith("pandas") and type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


def in_memory_records(data: Any, name: str, split: str = "train") -> InMemoryRecords:
    """Wrap a `datasets.Dataset` (or the `split` of a `DatasetDict`), a pandas DataFrame, or a list
    of dicts so the readers validate it exactly as a file, naming rows instead of lines."""
    kind = type(data).__name__
    module = type(data).__module__
    hub_name = None
    if module.startswith("datasets"):
        if kind == "DatasetDict":
            if split not in data:
                raise PreftuneError(f"{name}: split '{split}' not in the DatasetDict (found: {', '.join(data) or 'none'})")
            data = data[split]
            kind = type(data).__name__
        if kind != "Dataset":
            raise PreftuneError(
                f"{name}: a {kind} cannot be indexed by row; pass a datasets.Dataset, a list of dicts or a DataFrame"
            )
        rows = data.to_list()
        hub_name = getattr(data.info, "dataset_name", None) or None
    elif module.startswith("pandas") and kind == "DataFrame":
        columns = [str(c) for c in data.columns]
        duplicated = [c for c, n in Counter(columns).items() if n > 1]
        if duplicated:
            raise PreftuneError(f"{name}: column '{duplicated[0]}' appears twice")
        rows = [dict(zip(columns, values)) for values in data.itertuples(index=False, name=None)]
    elif isinstance(data, (list, tuple)):
        rows = list(data)
    else:
        raise PreftuneError(
            f"{name}: expected a datasets.Dataset, a pandas DataFrame or a list of dicts, got {_type_name(data)}"
        )
    return InMemoryRecords(name, tuple(_plain(row) for row in rows), hub_name)


def dataset_names(source: str | Path | InMemoryRecords | None) -> list[str]:
    """The hub name of a source, for a model card's `datasets`: a hub id read from the local cache,
    or the dataset a `datasets.Dataset` was loaded from; local files and plain records have none."""
    if isinstance(source, InMemoryRecords):
        return [source.hub_name] if source.hub_name else []
    if not source or Path(source).exists() or _looks_like_path(str(source)):
        return []
    return [str(source)]


def _read_entries(source: str | Path | InMemoryRecords, split: str) -> list[_Entry]:
    return list(iter_entries(source, split))


def iter_entries(source: str | Path | InMemoryRecords, split: str = "train") -> Iterator[_Entry]:
    """(location, raw record or `_Unreadable`) in source order, streamed: JSONL and CSV a line at a
    time, Parquet a row group at a time, saved and cached datasets from their memory-mapped tables,
    so a source larger than memory can be read. A JSON document is parsed whole (its format has no
    smaller unit). Whole-source problems raise `PreftuneError`, also an empty source."""
    count = 0
    for entry in _iter_source(source, split):
        count += 1
        yield entry
    if count == 0:
        raise PreftuneError(f"no records in {source}: the dataset is empty")


def _iter_source(source: str | Path | InMemoryRecords, split: str) -> Iterator[_Entry]:
    if isinstance(source, InMemoryRecords):
        yield from source.entries()
        return
    path = Path(source)
    if path.is_dir():
        yield from _read_saved_dataset(path, split)
    elif path.exists():
        kind = FILE_TYPES.get(path.suffix.lower())
        if kind is None:
            known = ", ".join(sorted(set(FILE_TYPES)))
            raise PreftuneError(
                f"unsupported data file type '{path.suffix}': {source} "
                f"(expected {known}, or a folder saved with datasets' save_to_disk)"
            )
        try:
            if kind == "jsonl":
                yield from _read_jsonl(path)
            elif kind == "json":
                yield from _read_json(path, split)
            elif kind == "csv":
                yield from _read_csv(path)
            else:
                yield from _read_parquet(path)
        except OSError as exc:
            raise PreftuneError(f"cannot read data file {source}: {exc.strerror or exc}") from None
    elif _looks_like_path(str(source)):
        raise PreftuneError(f"data file not found: {source}")
    else:
        yield from _read_hub_dataset(str(source), split)


def _looks_like_path(source: str) -> bool:
    """True when a missing source cannot be a hub name (`owner/name` or `name`)."""
    return (
        Path(source).suffix.lower() in FILE_TYPES
        or source.startswith((".", "~", "/"))
        or "\\" in source
        or source.count("/") > 1
        or not source.strip()
    )


def _read_jsonl(path: Path) -> Iterator[_Entry]:
    name = path.name
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, _Unreadable(f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield where, _Unreadable(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            yield where, record


def _read_json(path: Path, split: str) -> list[_Entry]:
    name = path.name
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PreftuneError(f"{name}: not valid UTF-8 (byte {exc.start + 1} of the file)") from None
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreftuneError(f"{name}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        key = split if split in data else "data" if "data" in data else None
        if key is None or not isinstance(data[key], list):
            raise PreftuneError(
                f"{name}: expected a list of records, or an object with a list under "
                f"'{split}' or 'data' (found keys: {', '.join(map(str, data)) or 'none'})"
            )
        data = data[key]
    if not isinstance(data, list):
        raise PreftuneError(f"{name}: expected a list of records, got {_type_name(data)}")
    return [(f"{name}: record {i}", record) for i, record in enumerate(data, start=1)]


@contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # The csv module rejects cells over 128 KiB by default; long completions are legitimate.
    # The limit is process-wide, so it is restored afterwards.
    previous = csv.field_size_limit()
    csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _read_csv(path: Path) -> Iterator[_Entry]:
    name = path.name
    # 2**31 - 1: the largest limit every platform's C long accepts
    with path.open(encoding="utf-8-sig", newline="") as handle, _csv_field_limit(2**31 - 1):
        reader = csv.reader(handle)
        header: list[str] | None = None
        previous_line = 0
        while True:
            start = previous_line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                raise PreftuneError(f"{name}:{start}: not valid UTF-8") from None
            except csv.Error as exc:
                raise PreftuneError(f"{name}:{start}: malformed CSV ({exc})") from None
            previous_line = reader.line_num
            if not row:
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                duplicated = [c for c, n in Counter(header).items() if n > 1]
                if duplicated:
                    raise PreftuneError(
                        f"{name}:{start}: column '{duplicated[0]}' appears twice in the header"
                    )
                continue
            where = f"{name}:{start}"
            if len(row) != len(header):
                yield where, _Unreadable(f"{where}: row has {len(row)} cells, the header has {len(header)}")
                continue
            yield where, dict(zip(header, row))


def _read_parquet(path: Path) -> Iterator[_Entry]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
        number = 0
        for batch in handle.iter_batches(batch_size=1000):
            for row in batch.to_pylist():
                number += 1
                yield f"{path.name}: row {number}", row
    except (pyarrow.ArrowException, ValueError) as exc:
        raise PreftuneError(f"{path.name}: not a readable Parquet file ({_first_line(exc)})") from None


def _dataset_rows(dataset: Any, label: str) -> Iterator[_Entry]:
    """The rows of a memory-mapped `datasets.Dataset`, a thousand at a time."""
    number = 0
    for batch in dataset.iter(batch_size=1000):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            number += 1
            yield f"{label}: row {number}", dict(zip(names, values))


def _read_saved_dataset(path: Path, split: str) -> Iterator[_Entry]:
    from datasets import DatasetDict, load_from_disk

    is_saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if not is_saved:
        raise PreftuneError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk")
    try:
        dataset = load_from_disk(str(path))
    except Exception as exc:  # the library raises many types for a damaged folder
        raise PreftuneError(f"{path}: cannot load the saved dataset ({_first_line(exc)})") from None
    label = path.name
    if isinstance(dataset, DatasetDict):
        if split not in dataset:
            raise PreftuneError(
                f"{path}: split '{split}' not found (available: {', '.join(dataset) or 'none'})"
            )
        dataset = dataset[split]
        label = f"{path.name}[{split}]"
    yield from _dataset_rows(dataset, label)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Force offline mode so a hub name is served from the local cache or not at all.

    `datasets` and `huggingface_hub` read the environment once, at import, so their module
    flags are switched as well as the variables; everything is restored afterwards.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved_env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    saved_flags = (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved_flags
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _read_hub_dataset(name: str, split: str) -> Iterator[_Entry]:
    from datasets import load_dataset

    try:
        with _hub_offline():
            dataset = load_dataset(name, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise PreftuneError(f"dataset '{name}': split '{split}' not found in the local cache") from None
        raise PreftuneError(f"dataset '{name}': {_first_line(exc)}") from None
    except Exception:  # not cached: the library raises connection or not-found errors
        raise PreftuneError(
            f"dataset '{name}' is not available offline: no such file, and it is not in the local "
            "Hugging Face cache (download it once with network access, or pass a data file)"
        ) from None
    yield from _dataset_rows(dataset, f"{name}[{split}]")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Validation and normalisation
# ---------------------------------------------------------------------------------------------


MAX_MARGIN = 2.0  # `label export`'s margin: the mean strength, 2 when every annotator said "much better"


def margin_weight(example: PreferenceExample) -> float:
    """The pair's loss weight under `margin_weighting`: its `margin` / 2, so a pair every annotator
    called much better weighs 1 and one they called slightly better 0.5 (confident labels count
    fully, close calls half). Without a margin a pair weighs 1: nobody called it weak. A margin of 0
    or below (the annotators lean the other way on average) weighs 0."""
    margin = example.extra.get("margin")
    if margin is None:
        return 1.0
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise PreftuneError(f"{example.location}: field 'margin' must be a finite number, got {_type_name(margin)} {margin!r}")
    if not -MAX_MARGIN <= margin <= MAX_MARGIN:
        raise PreftuneError(
            f"{example.location}: field 'margin' must be between -2 and 2 (label export's mean strength), got {margin}"
        )
    return max(float(margin), 0.0) / MAX_MARGIN


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def is_empty(text: Text) -> bool:
    """Empty means nothing but whitespace: such a completion teaches nothing but the EOS."""
    if isinstance(text, str):
        return not text.strip()
    return all(not m["content"].strip() for m in text)


def _messages(name: str, value: list, start: int = 0) -> list[Message]:
    """Validated copies of chat messages; keys other than role/content are kept for templates."""
    messages: list[Message] = []
    for i, message in enumerate(value):
        label = f"{name}[{start + i}]"
        if not isinstance(message, dict):
            raise PreftuneError(f"field '{label}' must be a message object, got {_type_name(message)}")
        if message.get("role") is None or message.get("content") is None:
            raise PreftuneError(f"field '{label}' message needs 'role' and 'content'")
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise PreftuneError(f"field '{label}.{key}' must be a string, got {_type_name(message[key])}")
        if not message["role"].strip():
            raise PreftuneError(f"field '{label}.role' is empty")
        # Columnar formats (Parquet, datasets) fill keys a message lacks with null: drop those.
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def text_field(name: str, value: Any) -> Text:
    """A prompt or completion field: a string, or a list of chat messages (checked)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(name, value)
    raise PreftuneError(f"field '{name}' must be a string or a list of messages, got {_type_name(value)}")


def _check_completion(name: str, value: Text, first_index: int = 0) -> None:
    """A completion must say something, and a chat one must open with the assistant's turn.

    Checked again after an implicit split, which can leave only whitespace ("a b " / "a b  c").

    The prompt is rendered with the chat template's generation prompt (the assistant header), so
    a completion that starts with another role would be scored after the wrong header.
    """
    if is_empty(value):
        raise PreftuneError(f"field '{name}' is empty")
    if isinstance(value, list) and value[0]["role"] != "assistant":
        raise PreftuneError(
            f"field '{name}[{first_index}]' must be an assistant message, got role '{value[0]['role']}'"
        )


# ---------------------------------------------------------------------------------------------
# Column mapping and layouts
# ---------------------------------------------------------------------------------------------


class SkippedRecord(Exception):
    """A valid record that makes no training example (a tie in a pairwise-choice layout): dropped
    and counted, never an error. The message is the reason, used as the count's key."""


# File field names the public datasets use for preftune's fields, for the unmapped-layout message.
_KNOWN_NAMES = {
    "prompt": ("question", "instruction", "input", "query", "history", "context", "prompt_text", "problem", "post"),
    "system": ("system", "system_prompt", "system_message"),
    "chosen": ("chosen_response", "response_chosen", "preferred", "better"),
    "rejected": ("rejected_response", "response_rejected", "dispreferred", "worse"),
    "response_a": ("response_a", "response_1", "response1", "human_ref_a", "completion_a", "answer_a", "output_1"),
    "response_b": ("response_b", "response_2", "response2", "human_ref_b", "completion_b", "answer_b", "output_2"),
    "winner": ("winner", "labels", "preferred_response"),
    "preference": ("preference", "preference_strength", "overall_preference"),
}


def suggest_columns(record: dict) -> dict[str, str]:
    """{preftune field: file field} for the fields of an unmapped record that public datasets use
    under other names (Orca's `question`, SHP's `human_ref_A`, HelpSteer's `response1`)."""
    found: dict[str, str] = {}
    for target, names in _KNOWN_NAMES.items():
        if target in record and target != "system":
            continue
        for name in record:
            if field_key(str(name)) in names and name not in found.values():
                found[target] = str(name)
                break
    if found.get("system") and not any(k in found for k in ("prompt", "response_a", "response_b")):
        found.pop("system")  # a system column alone is read as it is
    if "chosen" in record or "rejected" in record:
        for key in ("response_a", "response_b", "winner", "preference"):
            found.pop(key, None)
    return found


def _unmapped(problem: str, record: dict) -> PreftuneError:
    """`problem` with the record's fields and the `columns:` that would map them, when some do."""
    mapping = suggest_columns(record)
    if not mapping:
        return PreftuneError(problem)
    order = [mapping[k] for k in mapping] + [str(k) for k in record if str(k) not in mapping.values()]
    spelled = ", ".join(f"{k}: {v}" for k, v in mapping.items())
    return PreftuneError(f"{problem}; the record has {', '.join(order)}: map them with columns: {{{spelled}}}")


def _choice(record: dict) -> tuple[str, float | None]:
    """('a' | 'b' | 'tie', margin or None) of a pairwise-choice record."""
    if record.get("preference") is not None:
        value = record["preference"]
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PreftuneError(f"field 'preference' must be a number (negative: response_a better), got {value!r}")
        if abs(value) > PREFERENCE_SCALE:
            raise PreftuneError(
                f"field 'preference' must be between -{PREFERENCE_SCALE} and {PREFERENCE_SCALE} (HelpSteer's scale), got {value}"
            )
        if value == 0:
            return "tie", None
        # the strength as label export's margin: 2 for "much better", 2/3 for "slightly better"
        return ("a" if value < 0 else "b"), 2.0 * abs(value) / PREFERENCE_SCALE
    if record.get("winner") is None:
        raise PreftuneError("fields 'response_a'/'response_b' need 'winner' (which is better) or 'preference' (a signed strength)")
    value = record["winner"]
    text = str(value).strip().lower() if not isinstance(value, bool) else ("a" if value else "b")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = {1: "a", 0: "b"}.get(value, text)  # SHP's labels: 1 when A is preferred
    if text.startswith("tie"):
        return "tie", None
    for side in ("a", "b"):
        if text in (side, f"response_{side}", f"model_{side}", f"{side}_preferred"):
            return side, None
    raise PreftuneError(
        f"field 'winner' must name the better response (a, b, model_a, model_b, 1 for a, 0 for b, or tie), got {value!r}"
    )


def _pairwise(record: dict) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(prompt, chosen, rejected, extra) of a pairwise-choice record; a tie is skipped."""
    for name in ("response_a", "response_b"):
        if record.get(name) is None:
            raise PreftuneError(f"field '{name}' is missing")
    side, margin = _choice(record)
    if side == "tie":
        raise SkippedRecord("tie")
    a, b = record["response_a"], record["response_b"]
    chosen, rejected = (a, b) if side == "a" else (b, a)
    extra = {k: v for k, v in record.items() if k not in ("response_a", "response_b", "winner", "preference", *FIELDS)}
    if margin is not None:
        extra["margin"] = margin
    return record.get("prompt"), chosen, rejected, extra


def _tools(value: Any) -> Any:
    """A record's function schemas: a list of objects, or that list as a JSON string (as columnar
    files often store it)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise PreftuneError("field 'tools' must be a list of function schemas (or that list as JSON)") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise PreftuneError(f"field 'tools' must be a list of function schemas, got {_type_name(value)}")
    return value


def _system_text(record: dict, layout: RecordLayout) -> str | None:
    """The record's own `system` field, else the config's `system_prompt`. An empty `system` field
    gives no system message ("" rather than None: the record is still a conversation, as in Orca,
    where some rows have an empty system column)."""
    value = record.get("system")
    if value is not None:
        if not isinstance(value, str):
            raise PreftuneError(f"field 'system' must be a string, got {_type_name(value)}")
        return value
    return layout.system_prompt


def with_system(prompt: Text, completions: Sequence[Text], system: str | None, own: bool) -> tuple[Text, list[Text]]:
    """A system message turns a string prompt into `[system, user]` and string completions into
    assistant replies; a conversation gets it in front unless it already opens with one (then a
    record's own `system` field is an error: two system messages). An empty system text (an empty
    `system` column) makes the record a conversation without a system message."""
    if system is None:
        return prompt, list(completions)
    head = [{"role": "system", "content": system}] if system.strip() else []
    if isinstance(prompt, list):
        if prompt and prompt[0]["role"] == "system":
            if own and head:
                raise PreftuneError("field 'system' is given and the prompt already opens with a system message")
            return prompt, list(completions)
        return head + prompt, [_as_messages(c) for c in completions]
    messages = head + ([{"role": "user", "content": prompt}] if prompt.strip() else [])
    if not messages:
        raise PreftuneError("field 'prompt' is empty and field 'system' is empty: the conversation has no turn before the answer")
    return messages, [_as_messages(c) for c in completions]


def _as_messages(value: Text) -> Text:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def _last_user(messages: list[Message]) -> str | None:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else None


def validate_record(location: str, record: dict, layout: RecordLayout | None = None) -> PreferenceExample:
    """Check one raw record and return it normalised; raise `PreftuneError` naming location and field.

    Rules chosen where formats are loose:
    - `layout.columns` renames the file's fields first; a `system` field (or `layout.system_prompt`)
      becomes a system message;
    - a `null` field counts as missing; without `prompt` the prompt is implicit
      (`split_implicit_prompt`);
    - an empty `prompt` is allowed (continuation data has none; the report counts them), an empty
      or whitespace-only `chosen`/`rejected` is not;
    - when `prompt` is a message list, a `chosen`/`rejected` given as a plain string is taken as
      one assistant message, and conversations that repeat the prompt's turns are cut after them;
    - a string `prompt` beside `chosen`/`rejected` conversations (UltraFeedback binarized, Tulu 3)
      means the conversations: their shared leading turns are the prompt, or, when they share none,
      the string is the user turn; `prompt_differs` in `extra` marks a string that is not the
      conversation's last user turn;
    - `response_a`/`response_b` with `winner` or `preference` (SHP, HelpSteer) become a pair; a tie
      is skipped (`SkippedRecord`), a signed strength becomes the pair's `margin`;
    - chat completions must start with an assistant message;
    - all other fields are kept untouched in `extra`.
    """
    try:
        return _validate(location, record, layout or RecordLayout())
    except PreftuneError as exc:
        raise PreftuneError(f"{location}: {exc}") from None


def _validate(location: str, record: Any, layout: RecordLayout = RecordLayout()) -> PreferenceExample:
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/chosen/rejected, got {_type_name(record)}"
        )
    original = record
    record = layout.apply(record)
    system = _system_text(record, layout)
    own_system = system is not None and record.get("system") is not None
    tools = _tools(record["tools"]) if record.get("tools") is not None else None
    consumed = (*FIELDS, "system", "tools")
    if record.get("chosen") is None and record.get("rejected") is None and (
        record.get("response_a") is not None or record.get("response_b") is not None
    ):
        raw_prompt, raw_chosen, raw_rejected, extra = _pairwise(record)
        extra = {k: v for k, v in extra.items() if k not in consumed}
        kind = "pairwise"
    else:
        for name in ("chosen", "rejected"):
            if record.get(name) is None:
                raise _unmapped(f"field '{name}' is missing", original)
        raw_prompt, raw_chosen, raw_rejected = record.get("prompt"), record["chosen"], record["rejected"]
        extra = {k: v for k, v in record.items() if k not in consumed}
        kind = ""
    if tools is not None:
        extra["tools"] = tools
    prompt = None if raw_prompt is None else text_field("prompt", raw_prompt)
    chosen = text_field("chosen", raw_chosen)
    rejected = text_field("rejected", raw_rejected)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if is_empty(value):
            raise PreftuneError(f"field '{name}' is empty")

    if prompt is None or (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)):
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise PreftuneError(
                "fields 'chosen' and 'rejected' must both be strings or both lists of messages"
            )
        if prompt is not None and chosen[0]["role"] == "assistant" and rejected[0]["role"] == "assistant":
            # Conversations holding only the answer: the string is the user's turn.
            prompt = [{"role": "user", "content": prompt}]
            return _finish(location, prompt, chosen, rejected, extra, kind or "prompt-and-conversations", system, own_system)
        string_prompt = prompt
        # A record with a prompt-like field (Orca's `question`) under another name is not
        # implicit-prompt data, even where its two answers happen to begin alike.
        prompt_like = string_prompt is None and "prompt" in suggest_columns(original)
        try:
            prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, rejected)
        except PreftuneError:
            if prompt_like:
                raise _unmapped("no 'prompt' field and 'chosen'/'rejected' share no beginning", original) from None
            raise
        if prompt_like:
            raise _unmapped(
                f"no 'prompt' field, and what 'chosen'/'rejected' share ({_preview(_flat(prompt))}) is no prompt", original
            )
        shared = len(prompt) if isinstance(prompt, list) else 0
        _check_completion("chosen", chosen_rest, shared)
        _check_completion("rejected", rejected_rest, shared)
        if string_prompt is not None:
            kind = kind or "prompt-and-conversations"
            if string_prompt.strip() != (_last_user(prompt) or "").strip():
                extra["prompt_differs"] = True
        else:
            kind = kind or ("implicit-conversational" if isinstance(prompt, list) else "implicit")
        return _finish(location, prompt, chosen_rest, rejected_rest, extra, kind, system, own_system)

    if isinstance(prompt, list):
        # A bare string answer to a conversation is the assistant's reply; a conversation that
        # repeats the prompt's turns is cut after them.
        chosen, rejected = (
            [{"role": "assistant", "content": v}] if isinstance(v, str) else v for v in (chosen, rejected)
        )
        n = len(prompt)
        if n and all(len(v) > n and v[:n] == prompt for v in (chosen, rejected)):
            chosen, rejected = chosen[n:], rejected[n:]
        kind = kind or "conversational"
    else:
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, list):
                raise PreftuneError(
                    f"field 'prompt' must be a list of messages when '{name}' is one, got a string"
                )
        kind = kind or "standard"
    _check_completion("chosen", chosen)
    _check_completion("rejected", rejected)
    return _finish(location, prompt, chosen, rejected, extra, kind, system, own_system)


def _finish(
    location: str, prompt: Text, chosen: Text, rejected: Text, extra: dict[str, Any], kind: str, system: str | None, own: bool
) -> PreferenceExample:
    prompt, (chosen, rejected) = with_system(prompt, (chosen, rejected), system, own)
    if kind == "standard" and isinstance(prompt, list):
        kind = "standard-system"
    return PreferenceExample(prompt, chosen, rejected, location, extra, kind)


def _flat(value: Text) -> str:
    return value if isinstance(value, str) else " ".join(m["content"] for m in value)


def _preview(text: str, width: int = 40) -> str:
    """A short one-line quote of user text for an error message."""
    text = text if len(text) <= width else text[: width - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two full texts into (prompt, chosen completion, rejected completion).

    Conversations: the longest run of identical leading messages is the prompt; it is an error
    if nothing is shared or if one side has nothing left after it.

    Strings: the prompt is the longest shared beginning that ends at a word boundary, and each
    completion starts with the whitespace that follows it ("The sky is blue." / "The sky is
    black." gives "The sky is", " blue.", " black."). Splitting by characters would cut a word
    ("The sky is bl" + "ue."), and byte-level and SentencePiece tokenizers attach the leading
    space to the next word, so the space belongs with the completion. Both completions must
    start with whitespace, which also keeps either from being empty.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        shared = 0
        for a, b in zip(chosen, rejected):
            if a != b:
                break
            shared += 1
        if shared == 0:
            raise PreftuneError(
                "no field 'prompt', and 'chosen' and 'rejected' share no leading message to use as the prompt"
            )
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if shared == len(value):
                raise PreftuneError(
                    f"no field 'prompt', and nothing of '{name}' remains after the messages it shares "
                    "with the other completion"
                )
        return chosen[:shared], chosen[shared:], rejected[shared:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = len(os.path.commonprefix([chosen, rejected]))
        if common == 0:
            raise PreftuneError(
                "no field 'prompt', and 'chosen' and 'rejected' share no beginning to use as the prompt"
            )
        # The last split point where both continue with whitespace, moved to the start of that
        # whitespace run so the prompt ends on a word.
        cut = min(common, len(chosen) - 1, len(rejected) - 1)
        while cut > 0 and not (chosen[cut].isspace() and rejected[cut].isspace()):
            cut -= 1
        while cut > 0 and chosen[cut - 1].isspace():
            cut -= 1
        if cut == 0:
            raise PreftuneError(
                f"no field 'prompt', and the beginning that 'chosen' and 'rejected' share "
                f"({_preview(chosen[:common])}) has no whitespace boundary to split the prompt at"
            )
        return chosen[:cut], chosen[cut:], rejected[cut:]
    raise PreftuneError("fields 'chosen' and 'rejected' must both be strings or both lists of messages")


def check_records(
    records: Iterable[tuple[str, dict]], layout: RecordLayout | None = None, skipped: Counter | None = None
) -> tuple[list[PreferenceExample], list[str]]:
    """Validate every record: the valid examples and every error message, in source order. Records
    skipped on purpose (ties) are counted by reason in `skipped`."""
    return _convert_all(records, lambda location, record: [validate_record(location, record, layout)], skipped)


def _convert_all(records: Iterable[tuple[str, Any]], convert: Any, skipped: Counter | None = None) -> tuple[list[Any], list[str]]:
    """Every record through `convert(location, record) -> list`: the examples and every error
    (each prefixed with its location), unreadable lines among them, in source order."""
    errors: list[str] = []
    examples = list(iter_checked(records, convert, errors, skipped))
    return examples, errors


def iter_checked(
    records: Iterable[tuple[str, Any]], convert: Any, errors: list[str], skipped: Counter | None = None
) -> Iterator[Any]:
    """The valid examples of `records`, one at a time (a checker streams a source of any size);
    each problem is appended to `errors` (prefixed with its location) and skipped records counted."""
    for location, record in records:
        if isinstance(record, _Unreadable):
            errors.append(record.message)
            continue
        try:
            yield from convert(location, record)
        except SkippedRecord as exc:
            if skipped is not None:
                skipped[str(exc)] += 1
        except PreftuneError as exc:
            message = str(exc)
            errors.append(message if message.startswith(f"{location}: ") else f"{location}: {message}")


def check_data(
    source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None, skipped: Counter | None = None
) -> tuple[list[PreferenceExample], list[str]]:
    """Like `check_records` on a whole source, with unparseable lines among the errors, in order."""
    return check_records(_read_entries(source, split), layout, skipped)


def _log_skipped(source: Any, skipped: Counter) -> None:
    for reason, n in skipped.items():
        if reason == "tie":
            log.info("%s: dropped %d tie%s (pairwise records that prefer neither response)", source, n, "s" if n != 1 else "")
        else:
            log.info("%s: dropped %d record%s (%s)", source, n, "s" if n != 1 else "", reason)


def load_preference_data(
    source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None
) -> list[PreferenceExample]:
    """All examples of a source, or a `PreftuneError` with the first problem and how many more."""
    skipped: Counter = Counter()
    examples = _raise_first(check_data(source, split, layout, skipped))
    _log_skipped(source, skipped)
    return examples


# ---------------------------------------------------------------------------------------------
# Supervised fine-tuning and unpaired (KTO) data
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTExample:
    """One supervised example, in one of three shapes (TRL's names):

    - `prompt` + `completion` (strings, or messages): the loss is on the completion;
    - `messages`: a whole conversation; the loss is on the assistant messages;
    - `text`: plain text; the loss is on all of it.

    A preference pair is accepted too and means its prompt and chosen completion, so a pair file
    can teach the chosen answers before preference training on the same file.
    """

    location: str
    prompt: Text | None = None
    completion: Text | None = None
    messages: list[Message] | None = None
    text: str | None = None
    tools: Any = None  # function schemas for the chat template

    @property
    def kind(self) -> str:
        return "messages" if self.messages is not None else "text" if self.text is not None else "completion"


@dataclass
class UnpairedExample:
    """One KTO example: a prompt, a completion and whether the completion is desirable."""

    prompt: Text
    completion: Text
    label: bool
    location: str
    tools: Any = None


def _prompt_and_completion(prompt: Any, completion: Any, system: str | None = None, own: bool = False) -> tuple[Text, Text]:
    """Validated prompt/completion, normalised as for pairs (a string answer to a conversation is
    one assistant message; a system message makes both messages)."""
    p = text_field("prompt", prompt)
    c = text_field("completion", completion)
    if isinstance(p, list):
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else c
    elif isinstance(c, list):
        raise PreftuneError("field 'prompt' must be a list of messages when 'completion' is one, got a string")
    _check_completion("completion", c)
    p, (c,) = with_system(p, (c,), system, own)
    return p, c


def _sft_record(location: str, record: Any, layout: RecordLayout = RecordLayout()) -> SFTExample:
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/completion, messages or text, got {_type_name(record)}"
        )
    record = layout.apply(record)
    system = _system_text(record, layout)
    own = system is not None and record.get("system") is not None
    tools = _tools(record["tools"]) if record.get("tools") is not None else None
    if record.get("messages") is not None:
        value = record["messages"]
        if not isinstance(value, list) or not value:
            raise PreftuneError("field 'messages' must be a non-empty list of messages")
        messages = _messages("messages", value)
        if not any(m["role"] == "assistant" for m in messages):
            raise PreftuneError("field 'messages' has no assistant message to learn from")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise PreftuneError("field 'messages': every assistant message is empty")
        if system is not None:
            if messages[0]["role"] == "system":
                if own:
                    raise PreftuneError("field 'system' is given and the conversation already opens with a system message")
            else:
                messages = [{"role": "system", "content": system}] + messages
        return SFTExample(location, messages=messages, tools=tools)
    if record.get("completion") is not None:
        prompt, completion = _prompt_and_completion(record.get("prompt") or "", record["completion"], system, own)
        return SFTExample(location, prompt=prompt, completion=completion, tools=tools)
    if record.get("chosen") is not None:
        pair = _validate(location, record, RecordLayout(system_prompt=layout.system_prompt))
        return SFTExample(location, prompt=pair.prompt, completion=pair.chosen, tools=pair.tools)
    if record.get("text") is not None:
        text = record["text"]
        if not isinstance(text, str):
            raise PreftuneError(f"field 'text' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise PreftuneError("field 'text' is empty")
        if own:
            raise PreftuneError("field 'system' needs a prompt or messages; a 'text' record is plain text")
        return SFTExample(location, text=text)
    raise _unmapped("record needs 'prompt' and 'completion', 'messages', 'text', or a preference pair's 'chosen'", record)


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):  # CSV cells are text
        return value.strip().lower() in ("true", "1")
    raise PreftuneError(f"field 'label' must be true (desirable) or false (undesirable), got {value!r}")


def _unpaired_records(location: str, record: Any, layout: RecordLayout = RecordLayout()) -> list[UnpairedExample]:
    """One unpaired example, or two from a preference pair (chosen desirable, rejected not)."""
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/completion/label (or a preference pair), got {_type_name(record)}"
        )
    mapped = layout.apply(record)
    if any(mapped.get(k) is not None for k in ("chosen", "rejected", "response_a", "response_b")):
        pair = _validate(location, record, layout)
        return [
            UnpairedExample(pair.prompt, pair.chosen, True, location, pair.tools),
            UnpairedExample(pair.prompt, pair.rejected, False, location, pair.tools),
        ]
    record = mapped
    if record.get("completion") is None:
        raise PreftuneError("field 'completion' is missing (KTO data is prompt/completion/label, or preference pairs)")
    if "label" not in record or record["label"] is None:
        raise PreftuneError("field 'label' is missing (true for a desirable completion, false for an undesirable one)")
    label = _label(record["label"])
    system = _system_text(record, layout)
    own = system is not None and record.get("system") is not None
    tools = _tools(record["tools"]) if record.get("tools") is not None else None
    prompt, completion = _prompt_and_completion(record.get("prompt") or "", record["completion"], system, own)
    return [UnpairedExample(prompt, completion, label, location, tools)]


def _check_all(
    source: str | Path | InMemoryRecords, split: str, convert: Any, skipped: Counter | None = None
) -> tuple[list[Any], list[str]]:
    return _convert_all(_read_entries(source, split), convert, skipped)


def _raise_first(checked: tuple[list[Any], list[str]]) -> list[Any]:
    """The examples, or a `PreftuneError` with the first problem and how many more."""
    examples, errors = checked
    if errors:
        raise first_error(errors)
    return examples


def check_sft_data(
    source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None
) -> tuple[list[SFTExample], list[str]]:
    """Like `check_data`, for supervised examples."""
    layout = layout or RecordLayout()
    return _check_all(source, split, lambda location, record: [_sft_record(location, record, layout)])


def check_unpaired_data(
    source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None, skipped: Counter | None = None
) -> tuple[list[UnpairedExample], list[str]]:
    """Like `check_data`, for KTO's unpaired examples."""
    layout = layout or RecordLayout()
    return _check_all(source, split, lambda location, record: _unpaired_records(location, record, layout), skipped)


def load_sft_data(source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None) -> list[SFTExample]:
    """Supervised examples (see `SFTExample` for the shapes); errors name the record and field."""
    return _raise_first(check_sft_data(source, split, layout))


def load_unpaired_data(
    source: str | Path | InMemoryRecords, split: str = "train", layout: RecordLayout | None = None
) -> list[UnpairedExample]:
    """KTO examples: `prompt`/`completion`/`label` records, and preference pairs split in two."""
    skipped: Counter = Counter()
    examples = _raise_first(check_unpaired_data(source, split, layout, skipped))
    _log_skipped(source, skipped)
    return examples


def converter(kind: str, layout: RecordLayout | None = None) -> Any:
    """`convert(location, record) -> list of examples` for a data family: `pairs` (preference
    pairs), `unpaired` (KTO) or `sft`, with the same validation and messages as the loaders."""
    layout = layout or RecordLayout()
    if kind == "pairs":
        return lambda location, record: [validate_record(location, record, layout)]
    if kind == "unpaired":
        return lambda location, record: _unpaired_records(location, record, layout)
    if kind == "sft":
        return lambda location, record: [_sft_record(location, record, layout)]
    raise ValueError(f"unknown data kind {kind!r}")


def first_error(errors: list[str]) -> PreftuneError:
    """The first problem and how many more, as the loaders raise it."""
    more = len(errors) - 1
    suffix = f" (and {more} more invalid record{'s' if more != 1 else ''})" if more else ""
    return PreftuneError(errors[0] + suffix)
