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
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError

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
]

Message = dict[str, str]
Text = str | list[Message]

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
FIELDS = ("prompt", "chosen", "rejected")


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

    @property
    def is_conversational(self) -> bool:
        """True when the pair is chat messages, so the chat template must render it."""
        return isinstance(self.chosen, list)


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
    if isinstance(source, InMemoryRecords):
        entries = source.entries()
        if not entries:
            raise PreftuneError(f"no records in {source}: the dataset is empty")
        return entries
    path = Path(source)
    if path.is_dir():
        entries = _read_saved_dataset(path, split)
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
                entries = list(_read_jsonl(path))
            elif kind == "json":
                entries = _read_json(path, split)
            elif kind == "csv":
                entries = list(_read_csv(path))
            else:
                entries = _read_parquet(path)
        except OSError as exc:
            raise PreftuneError(f"cannot read data file {source}: {exc.strerror or exc}") from None
    elif _looks_like_path(str(source)):
        raise PreftuneError(f"data file not found: {source}")
    else:
        entries = _read_hub_dataset(str(source), split)
    if not entries:
        raise PreftuneError(f"no records in {source}: the dataset is empty")
    return entries


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


def _read_parquet(path: Path) -> list[_Entry]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, ValueError) as exc:
        raise PreftuneError(f"{path.name}: not a readable Parquet file ({_first_line(exc)})") from None
    return [(f"{path.name}: row {i}", row) for i, row in enumerate(rows, start=1)]


def _read_saved_dataset(path: Path, split: str) -> list[_Entry]:
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
    return [(f"{label}: row {i}", row) for i, row in enumerate(dataset.to_list(), start=1)]


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


def _read_hub_dataset(name: str, split: str) -> list[_Entry]:
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
    return [(f"{name}[{split}]: row {i}", row) for i, row in enumerate(dataset.to_list(), start=1)]


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


def validate_record(location: str, record: dict) -> PreferenceExample:
    """Check one raw record and return it normalised; raise `PreftuneError` naming location and field.

    Rules chosen where formats are loose:
    - a `null` field counts as missing; without `prompt` the prompt is implicit
      (`split_implicit_prompt`);
    - an empty `prompt` is allowed (continuation data has none; the report counts them), an empty
      or whitespace-only `chosen`/`rejected` is not;
    - when `prompt` is a message list, a `chosen`/`rejected` given as a plain string is taken as
      one assistant message; a string prompt with message-list completions is an error;
    - chat completions must start with an assistant message;
    - all other fields are kept untouched in `extra`.
    """
    try:
        return _validate(location, record)
    except PreftuneError as exc:
        raise PreftuneError(f"{location}: {exc}") from None


def _validate(location: str, record: Any) -> PreferenceExample:
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/chosen/rejected, got {_type_name(record)}"
        )
    for name in ("chosen", "rejected"):
        if record.get(name) is None:
            raise PreftuneError(f"field '{name}' is missing")
    raw_prompt = record.get("prompt")
    prompt = None if raw_prompt is None else text_field("prompt", raw_prompt)
    chosen = text_field("chosen", record["chosen"])
    rejected = text_field("rejected", record["rejected"])
    extra = {k: v for k, v in record.items() if k not in FIELDS}
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if is_empty(value):
            raise PreftuneError(f"field '{name}' is empty")

    if prompt is None:
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise PreftuneError(
                "fields 'chosen' and 'rejected' must both be strings or both lists of messages"
            )
        prompt, chosen_rest, rejected_rest = split_implicit_prompt(chosen, rejected)
        shared = len(prompt) if isinstance(prompt, list) else 0
        _check_completion("chosen", chosen_rest, shared)
        _check_completion("rejected", rejected_rest, shared)
        return PreferenceExample(prompt, chosen_rest, rejected_rest, location, extra)

    if isinstance(prompt, list):
        # A bare string answer to a conversation is the assistant's reply.
        chosen, rejected = (
            [{"role": "assistant", "content": v}] if isinstance(v, str) else v for v in (chosen, rejected)
        )
    else:
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if isinstance(value, list):
                raise PreftuneError(
                    f"field 'prompt' must be a list of messages when '{name}' is one, got a string"
                )
    _check_completion("chosen", chosen)
    _check_completion("rejected", rejected)
    return PreferenceExample(prompt, chosen, rejected, location, extra)


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


def check_records(records: Iterable[tuple[str, dict]]) -> tuple[list[PreferenceExample], list[str]]:
    """Validate every record: the valid examples and every error message, in source order."""
    return _convert_all(records, lambda location, record: [validate_record(location, record)])


def _convert_all(records: Iterable[tuple[str, Any]], convert: Any) -> tuple[list[Any], list[str]]:
    """Every record through `convert(location, record) -> list`: the examples and every error
    (each prefixed with its location), unreadable lines among them, in source order."""
    examples: list[Any] = []
    errors: list[str] = []
    for location, record in records:
        if isinstance(record, _Unreadable):
            errors.append(record.message)
            continue
        try:
            examples.extend(convert(location, record))
        except PreftuneError as exc:
            message = str(exc)
            errors.append(message if message.startswith(f"{location}: ") else f"{location}: {message}")
    return examples, errors


def check_data(source: str | Path | InMemoryRecords, split: str = "train") -> tuple[list[PreferenceExample], list[str]]:
    """Like `check_records` on a whole source, with unparseable lines among the errors, in order."""
    return check_records(_read_entries(source, split))


def load_preference_data(source: str | Path | InMemoryRecords, split: str = "train") -> list[PreferenceExample]:
    """All examples of a source, or a `PreftuneError` with the first problem and how many more."""
    return _raise_first(check_data(source, split))


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


def _prompt_and_completion(prompt: Any, completion: Any) -> tuple[Text, Text]:
    """Validated prompt/completion, normalised as for pairs (a string answer to a conversation is
    one assistant message)."""
    p = text_field("prompt", prompt)
    c = text_field("completion", completion)
    if isinstance(p, list):
        c = [{"role": "assistant", "content": c}] if isinstance(c, str) else c
    elif isinstance(c, list):
        raise PreftuneError("field 'prompt' must be a list of messages when 'completion' is one, got a string")
    _check_completion("completion", c)
    return p, c


def _sft_record(location: str, record: Any) -> SFTExample:
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/completion, messages or text, got {_type_name(record)}"
        )
    if record.get("messages") is not None:
        value = record["messages"]
        if not isinstance(value, list) or not value:
            raise PreftuneError("field 'messages' must be a non-empty list of messages")
        messages = _messages("messages", value)
        if not any(m["role"] == "assistant" for m in messages):
            raise PreftuneError("field 'messages' has no assistant message to learn from")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise PreftuneError("field 'messages': every assistant message is empty")
        return SFTExample(location, messages=messages)
    if record.get("completion") is not None:
        prompt, completion = _prompt_and_completion(record.get("prompt") or "", record["completion"])
        return SFTExample(location, prompt=prompt, completion=completion)
    if record.get("chosen") is not None:
        pair = _validate(location, record)
        return SFTExample(location, prompt=pair.prompt, completion=pair.chosen)
    if record.get("text") is not None:
        text = record["text"]
        if not isinstance(text, str):
            raise PreftuneError(f"field 'text' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise PreftuneError("field 'text' is empty")
        return SFTExample(location, text=text)
    raise PreftuneError("record needs 'prompt' and 'completion', 'messages', 'text', or a preference pair's 'chosen'")


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):  # CSV cells are text
        return value.strip().lower() in ("true", "1")
    raise PreftuneError(f"field 'label' must be true (desirable) or false (undesirable), got {value!r}")


def _unpaired_records(location: str, record: Any) -> list[UnpairedExample]:
    """One unpaired example, or two from a preference pair (chosen desirable, rejected not)."""
    if not isinstance(record, dict):
        raise PreftuneError(
            f"record must be an object with fields prompt/completion/label (or a preference pair), got {_type_name(record)}"
        )
    if record.get("chosen") is not None or record.get("rejected") is not None:
        pair = _validate(location, record)
        return [
            UnpairedExample(pair.prompt, pair.chosen, True, location),
            UnpairedExample(pair.prompt, pair.rejected, False, location),
        ]
    if record.get("completion") is None:
        raise PreftuneError("field 'completion' is missing (KTO data is prompt/completion/label, or preference pairs)")
    if "label" not in record or record["label"] is None:
        raise PreftuneError("field 'label' is missing (true for a desirable completion, false for an undesirable one)")
    label = _label(record["label"])
    prompt, completion = _prompt_and_completion(record.get("prompt") or "", record["completion"])
    return [UnpairedExample(prompt, completion, label, location)]


def _check_all(source: str | Path | InMemoryRecords, split: str, convert: Any) -> tuple[list[Any], list[str]]:
    return _convert_all(_read_entries(source, split), convert)


def _raise_first(checked: tuple[list[Any], list[str]]) -> list[Any]:
    """The examples, or a `PreftuneError` with the first problem and how many more."""
    examples, errors = checked
    if errors:
        more = len(errors) - 1
        suffix = f" (and {more} more invalid record{'s' if more != 1 else ''})" if more else ""
        raise PreftuneError(errors[0] + suffix)
    return examples


def check_sft_data(source: str | Path | InMemoryRecords, split: str = "train") -> tuple[list[SFTExample], list[str]]:
    """Like `check_data`, for supervised examples."""
    return _check_all(source, split, lambda location, record: [_sft_record(location, record)])


def check_unpaired_data(source: str | Path | InMemoryRecords, split: str = "train") -> tuple[list[UnpairedExample], list[str]]:
    """Like `check_data`, for KTO's unpaired examples."""
    return _check_all(source, split, _unpaired_records)


def load_sft_data(source: str | Path | InMemoryRecords, split: str = "train") -> list[SFTExample]:
    """Supervised examples (see `SFTExample` for the shapes); errors name the record and field."""
    return _raise_first(check_sft_data(source, split))


def load_unpaired_data(source: str | Path | InMemoryRecords, split: str = "train") -> list[UnpairedExample]:
    """KTO examples: `prompt`/`completion`/`label` records, and preference pairs split in two."""
    return _raise_first(check_unpaired_data(source, split))
