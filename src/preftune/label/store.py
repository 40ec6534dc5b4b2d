"""Human preference labeling: items from a data file and the SQLite store of judgements (the web
app around it is `preftune.label.server`).

People judge pairs of responses as the usual preference methodology has it: a prompt with two
responses, the annotator picks A, B, a tie, or skips, several annotators judge each item, and only
confident majority labels are kept (`preftune.label.agreement` does the vote and the report).

Design points:

- An *item* is a prompt with two responses, `first` and `second`. For a pairs file `first` is the
  file's `chosen` and `second` its `rejected`; the page never says which is which. A samples file
  (`{"prompt", "completions": [...]}`) gives one item per unordered pair of distinct completions.
  Item ids are content hashes, so serving the same file again adds nothing and a restart resumes.
- Which response is shown on the left is drawn at random per annotator and item and stored with the
  judgement, so position bias can be measured and undone (Zheng et al. 2023, "Judging LLM-as-a-Judge
  with MT-Bench and Chatbot Arena", sec. 3.3, report the same bias in model judges).
- Each item goes to at most `annotators_per_item` distinct annotators. Handing an item out takes a
  *lease* (a row in `assignments`); leases of others and their ratings fill the item's slots, so
  several browsers at once never over-fill an item. A lease left idle longer than `lease_seconds`
  stops holding its slot. Every write runs in a `BEGIN IMMEDIATE` transaction, which SQLite
  serialises, and the database runs in WAL mode so readers never block the writer.
- A skip is not a rating: it frees the slot for someone else and the item is not shown to that
  annotator again. Undo marks the annotator's latest judgement as undone (it stays in the table for
  the record) and gives the item back to them first, shown the same way round. An undone rating
  held its slot, so it always comes back; an undone skip comes back only if a slot is still free,
  because others may have taken the slot it gave up, and an undo never takes a slot someone holds.
- With `scale=5` a side pick also says how much better it is (`strength` 1 slightly, 2 much; a tie
  is 0), so export can keep the confident pairs and pass the strength on as a `margin`. An optional
  comment (the annotator's rationale) goes with any judgement.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.data import load_records, validate_record
from preftune.errors import PreftuneError

__all__ = [
    "Item",
    "LabelStore",
    "Conflict",
    "InvalidAnswer",
    "UnknownItem",
    "load_items",
]

log = logging.getLogger("preftune")

SIDES = ("first", "second")
CHOICES = ("A", "B", "tie", "skip")
SCALES = (3, 5)  # A/B/tie, or A much / A slightly / tie / B slightly / B much
STRENGTHS = {1: "slightly", 2: "much"}
MAX_COMMENT_LENGTH = 2000
SCHEMA_VERSION = "2"
TOKEN_HEADER = "X-Label-Token"
MAX_NAME_LENGTH = 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,          -- order of first appearance, so items are served in file order
    source TEXT NOT NULL,               -- where it came from: "pairs.jsonl:7"
    prompt TEXT NOT NULL,               -- the original values as JSON, written back by export
    first TEXT NOT NULL,
    second TEXT NOT NULL,
    prompt_text TEXT NOT NULL,          -- the same as the page shows them
    first_text TEXT NOT NULL,
    second_text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    shown_left TEXT NOT NULL CHECK (shown_left IN ('first', 'second')),
    assigned_at REAL NOT NULL,          -- unix time the item was last shown to this annotator
    PRIMARY KEY (item_id, annotator)
);
CREATE TABLE IF NOT EXISTS judgements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    item_id TEXT NOT NULL REFERENCES items(id),
    annotator TEXT NOT NULL,
    shown_left TEXT NOT NULL CHECK (shown_left IN ('first', 'second')),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),   -- A is the left response
    shown_at REAL NOT NULL,
    answered_at REAL NOT NULL,
    undone_at REAL,                     -- set by undo; the row is kept
    strength INTEGER CHECK (strength IN (0, 1, 2)),   -- with --scale 5: 0 tie, 1 slightly, 2 much
    comment TEXT                        -- the annotator's rationale, if they gave one
);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_judgement
    ON judgements (item_id, annotator) WHERE undone_at IS NULL;
CREATE INDEX IF NOT EXISTS judgements_by_annotator ON judgements (annotator, id);
"""


# ---------------------------------------------------------------------------------------------
# Items from a data file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """A prompt and two responses, as stored (`prompt`, `first`, `second`: the original values)."""

    id: str
    source: str
    prompt: Any
    first: Any
    second: Any

    @property
    def texts(self) -> tuple[str, str, str]:
        """Prompt, first and second as the page shows them."""
        return display_text(self.prompt), display_text(self.first), display_text(self.second)


def display_text(value: Any) -> str:
    """A text as is; chat messages as "role: content" lines (one assistant reply: its content)."""
    if isinstance(value, str):
        return value
    if len(value) == 1 and value[0]["role"] == "assistant":
        return value[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in value)


def item_id(prompt: Any, first: Any, second: Any) -> str:
    """A content hash, so the same pair from the same or another file is one item."""
    canonical = json.dumps([prompt, first, second], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(field: str, value: list, first_role: str | None = None) -> None:
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise PreftuneError(f"field '{field}[{i}]' must be a message with string 'role' and 'content'")
    if not value:
        raise PreftuneError(f"field '{field}' is an empty list")
    if first_role and value[0]["role"] != first_role:
        raise PreftuneError(f"field '{field}[0]' must be an {first_role} message, got role '{value[0]['role']}'")


def _sample_items(location: str, record: dict) -> list[Item]:
    """Items from one samples record: every unordered pair of distinct completions, in order."""
    prompt = record.get("prompt")
    if prompt is None:
        raise PreftuneError("field 'prompt' is missing")
    if isinstance(prompt, list):
        _check_messages("prompt", prompt)
    elif not isinstance(prompt, str):
        raise PreftuneError(f"field 'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
    completions = record["completions"]
    if not isinstance(completions, list):
        raise PreftuneError(f"field 'completions' must be a list, got {_type_name(completions)}")
    normalised: list[Any] = []
    for i, completion in enumerate(completions):
        field = f"completions[{i}]"
        if isinstance(completion, str):
            if not completion.strip():
                raise PreftuneError(f"field '{field}' is empty")
            # A bare reply to a conversation is the assistant's turn, as in pair files.
            normalised.append([{"role": "assistant", "content": completion}] if isinstance(prompt, list) else completion)
        elif isinstance(completion, list):
            if isinstance(prompt, str):
                raise PreftuneError(f"field '{field}' is a list of messages but 'prompt' is a string")
            _check_messages(field, completion, first_role="assistant")
            normalised.append(completion)
        else:
            raise PreftuneError(f"field '{field}' must be a string or a list of messages, got {_type_name(completion)}")
    distinct: list[Any] = []
    for completion in normalised:
        if completion not in distinct:
            distinct.append(completion)
    return [
        Item(item_id(prompt, a, b), location, prompt, a, b)
        for i, a in enumerate(distinct)
        for b in distinct[i + 1 :]
    ]


def load_items(source: str | Path) -> list[Item]:
    """Items to label from a pairs or samples file (any format `preftune.data` reads).

    A record with `completions` is a sample (one item per unordered pair of distinct completions);
    any other record is a preference pair, validated by `preftune.data.validate_record`, whose
    `chosen` becomes `first`. Duplicates (same prompt and responses) are kept once. Every invalid
    record is collected; the first is raised with the count of the others.
    """
    items: dict[str, Item] = {}
    errors: list[str] = []
    for location, record in load_records(source):
        try:
            if isinstance(record, dict) and "completions" in record:
                new = _sample_items(location, record)
            else:
                pair = validate_record(location, record)
                new = [Item(item_id(pair.prompt, pair.chosen, pair.rejected), location, pair.prompt, pair.chosen, pair.rejected)]
        except PreftuneError as exc:
            message = str(exc)
            errors.append(message if message.startswith(location) else f"{location}: {message}")
            continue
        for item in new:
            items.setdefault(item.id, item)
    if errors:
        more = len(errors) - 1
        raise PreftuneError(errors[0] + (f" (and {more} more invalid record{'s' if more != 1 else ''})" if more else ""))
    if not items:
        raise PreftuneError(f"{Path(source).name}: no item to label (every sample has fewer than two distinct completions)")
    return list(items.values())


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


class UnknownItem(PreftuneError):
    """A request names an item the database does not hold."""


class Conflict(PreftuneError):
    """A request that clashes with what is stored (already labelled, item full, nothing to undo)."""


class InvalidAnswer(PreftuneError):
    """An answer that does not fit this session's scale (a strength missing, or not asked for)."""


@dataclass(frozen=True)
class Judgement:
    """One stored judgement, as export reads it."""

    id: int
    item_id: str
    annotator: str
    shown_left: str
    choice: str
    shown_at: float
    answered_at: float
    strength: int | None = None
    comment: str | None = None


# The slots of an item taken by annotators other than :me: their live ratings, plus their leases
# that are still fresh and not yet answered.
_LOAD = """
    (SELECT COUNT(*) FROM judgements j
        WHERE j.item_id = i.id AND j.undone_at IS NULL AND j.choice != 'skip' AND j.annotator != :me)
  + (SELECT COUNT(*) FROM assignments a
        WHERE a.item_id = i.id AND a.annotator != :me AND a.assigned_at > :cutoff
          AND NOT EXISTS (SELECT 1 FROM judgements j2 WHERE j2.item_id = a.item_id
                          AND j2.annotator = a.annotator AND j2.undone_at IS NULL))
"""
_MINE = "EXISTS (SELECT 1 FROM judgements m WHERE m.item_id = i.id AND m.annotator = :me AND m.undone_at IS NULL)"


# Columns added after schema 1, so a database labelled with an older version opens as it is.
_ADDED_COLUMNS = {
    "strength": "INTEGER CHECK (strength IN (0, 1, 2))",
    "comment": "TEXT",
}


def _add_missing_columns(con: sqlite3.Connection) -> None:
    have = {row[1] for row in con.execute("PRAGMA table_info(judgements)")}
    for name, definition in _ADDED_COLUMNS.items():
        if name not in have:
            con.execute(f"ALTER TABLE judgements ADD COLUMN {name} {definition}")


class LabelStore:
    """The labeling database: items, leases and judgements in one SQLite file in WAL mode.

    Each thread gets its own connection, kept open for the store's life (closing the last
    connection of a WAL database checkpoints it, which would cost a disk flush per request), so
    the store is safe to share between the web server's worker threads; SQLite's lock orders the
    writers and the busy timeout makes them wait their turn.
    """

    def __init__(
        self,
        path: str | Path,
        annotators_per_item: int | None = None,
        lease_seconds: float = 1800.0,
        rng: random.Random | None = None,
        create: bool = True,
        scale: int = 3,
    ) -> None:
        if scale not in SCALES:
            raise PreftuneError(f"--scale must be 3 (A/B/tie) or 5 (with strength), got {scale}")
        self.path = Path(path)
        self.scale = scale
        self.lease_seconds = lease_seconds
        self._rng = rng or random.SystemRandom()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not self.path.exists() and not create:
            raise PreftuneError(f"labeling database not found: {self.path}")
        if create and not self.path.parent.is_dir():
            raise PreftuneError(f"cannot create {self.path}: folder {self.path.parent} does not exist")
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise PreftuneError(f"{self.path}: SQLite cannot use WAL mode here (got '{mode}')")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "judgements" not in tables:
                raise PreftuneError(f"{self.path}: an SQLite database, but not a preftune labeling database")
            con.executescript(SCHEMA)
            _add_missing_columns(con)
            con.execute(
                "INSERT INTO meta VALUES ('schema', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (SCHEMA_VERSION,),
            )
            if annotators_per_item is not None:
                if annotators_per_item < 1:
                    raise PreftuneError(f"annotators per item must be at least 1, got {annotators_per_item}")
                con.execute(
                    "INSERT INTO meta VALUES ('annotators_per_item', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (str(annotators_per_item),),
                )
            row = con.execute("SELECT value FROM meta WHERE key = 'annotators_per_item'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise PreftuneError(f"{self.path}: cannot open the labeling database ({exc})") from None
        finally:
            con.close()
        self.annotators_per_item = int(row[0]) if row else 1

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        # In WAL mode NORMAL loses nothing when the process stops or crashes; only a power cut can
        # take the last commits. FULL would flush the disk on every answer.
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        con = getattr(self._local, "con", None)
        if con is None:
            con = self._local.con = self._open()
            with self._lock:
                self._connections.append(con)
        yield con

    def close(self) -> None:
        """Close every thread's connection (the last close checkpoints the WAL into the file)."""
        with self._lock:
            for con in self._connections:
                con.close()
            self._connections.clear()
        self._local = threading.local()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One serialised write transaction: taken before reading, so checks and writes agree."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- items ---------------------------------------------------------------------------------

    def add_items(self, items: Sequence[Item]) -> int:
        """Store items not yet present (by id); returns how many were new."""
        with self._write() as con:
            start = con.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()[0]
            added = 0
            for item in items:
                prompt_text, first_text, second_text = item.texts
                cursor = con.execute(
                    "INSERT OR IGNORE INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        item.id,
                        start + added,
                        item.source,
                        json.dumps(item.prompt, ensure_ascii=False),
                        json.dumps(item.first, ensure_ascii=False),
                        json.dumps(item.second, ensure_ascii=False),
                        prompt_text,
                        first_text,
                        second_text,
                    ),
                )
                added += cursor.rowcount
        return added

    def items(self) -> list[Item]:
        with self._connect() as con:
            rows = con.execute("SELECT id, source, prompt, first, second FROM items ORDER BY position").fetchall()
        return [Item(r[0], r[1], json.loads(r[2]), json.loads(r[3]), json.loads(r[4])) for r in rows]

    def judgements(self, include_undone: bool = False) -> list[Judgement]:
        """Stored judgements in the order they were made; undone ones only when asked."""
        where = "" if include_undone else "WHERE undone_at IS NULL"
        with self._connect() as con:
            rows = con.execute(
                "SELECT id, item_id, annotator, shown_left, choice, shown_at, answered_at, strength, comment "
                f"FROM judgements {where} ORDER BY id"
            ).fetchall()
        return [Judgement(*r) for r in rows]

    # -- the annotator's queue -------------------------------------------------------------------

    def _params(self, annotator: str) -> dict[str, Any]:
        return {"me": annotator, "cutoff": time.time() - self.lease_seconds, "k": self.annotators_per_item}

    def _shown(self, con: sqlite3.Connection, item: str, shown_left: str) -> dict[str, Any]:
        """The item as the page shows it: the texts (for the raw view) and their rendered HTML."""
        from preftune.label.rendering import render_value

        prompt, first, second, prompt_json, first_json, second_json = con.execute(
            "SELECT prompt_text, first_text, second_text, prompt, first, second FROM items WHERE id = ?", (item,)
        ).fetchone()
        left, right = (first, second) if shown_left == "first" else (second, first)
        left_json, right_json = (first_json, second_json) if shown_left == "first" else (second_json, first_json)
        html = {key: render_value(json.loads(value)) for key, value in (("prompt", prompt_json), ("a", left_json), ("b", right_json))}
        return {"id": item, "prompt": prompt, "a": left, "b": right, "html": html}

    def next_item(self, annotator: str) -> dict[str, str] | None:
        """The item to show this annotator now (taking a lease on it), or None when none is left.

        Their own unanswered items come first (an undone one, or the one a reload asks for again),
        shown the same way round as before; then the item with the most slots already taken, so
        items reach their full count of annotators early, and input order among equals.
        """
        with self._write() as con:
            params = self._params(annotator)
            now = time.time()
            own = con.execute(
                f"SELECT a.item_id, a.shown_left, {_LOAD} AS load FROM assignments a JOIN items i ON i.id = a.item_id "
                f"WHERE a.annotator = :me AND NOT {_MINE} ORDER BY a.assigned_at DESC",
                params,
            ).fetchall()
            for item, shown_left, load in own:
                if load < params["k"]:
                    con.execute(
                        "UPDATE assignments SET assigned_at = ? WHERE item_id = ? AND annotator = ?",
                        (now, item, annotator),
                    )
                    return self._shown(con, item, shown_left)
                # Its lease lapsed and others filled the item meanwhile.
                con.execute("DELETE FROM assignments WHERE item_id = ? AND annotator = ?", (item, annotator))
            row = con.execute(
                f"SELECT id FROM (SELECT i.id, i.position, {_LOAD} AS load FROM items i WHERE NOT {_MINE}) "
                "WHERE load < :k ORDER BY load DESC, position LIMIT 1",
                params,
            ).fetchone()
            if row is None:
                return None
            shown_left = self._rng.choice(SIDES)
            con.execute(
                "INSERT INTO assignments VALUES (?, ?, ?, ?) ON CONFLICT(item_id, annotator) "
                "DO UPDATE SET shown_left = excluded.shown_left, assigned_at = excluded.assigned_at",
                (row[0], annotator, shown_left, now),
            )
            return self._shown(con, row[0], shown_left)

    def _strength(self, choice: str, strength: int | None) -> int | None:
        """The strength to store: required for a side pick on the 5-point scale, 0 for its tie,
        and never asked on the 3-point one."""
        if self.scale == 3:
            if strength is not None:
                raise InvalidAnswer("this labeling session asks no strength (serve with --scale 5 for it)")
            return None
        if choice == "skip":
            return None
        if choice == "tie":
            if strength not in (None, 0):
                raise InvalidAnswer(f"a tie has no strength, got {strength}")
            return 0
        if strength not in STRENGTHS:
            raise InvalidAnswer(f"with --scale 5 a pick of {choice} needs a strength: 1 (slightly) or 2 (much), got {strength}")
        return strength

    def judge(
        self, annotator: str, item: str, choice: str, strength: int | None = None, comment: str | None = None
    ) -> int:
        """Store one judgement of an item shown to this annotator; returns its row id.

        Sending the same judgement twice (a retried request) returns the stored row instead of
        failing; a different one for the same item needs an undo first. An empty comment is none.
        """
        if choice not in CHOICES:
            raise PreftuneError(f"choice must be one of {', '.join(CHOICES)}, got '{choice}'")
        strength = self._strength(choice, strength)
        comment = (comment or "").strip() or None
        if comment is not None and len(comment) > MAX_COMMENT_LENGTH:
            raise InvalidAnswer(f"the comment is longer than {MAX_COMMENT_LENGTH} characters")
        with self._write() as con:
            if con.execute("SELECT 1 FROM items WHERE id = ?", (item,)).fetchone() is None:
                raise UnknownItem(f"no item '{item}' in this database")
            existing = con.execute(
                "SELECT id, choice, strength FROM judgements WHERE item_id = ? AND annotator = ? AND undone_at IS NULL",
                (item, annotator),
            ).fetchone()
            if existing is not None:
                if (existing[1], existing[2]) == (choice, strength):
                    return int(existing[0])
                said = existing[1] + (f" ({STRENGTHS[existing[2]]})" if existing[2] in STRENGTHS else "")
                raise Conflict(f"you already answered '{said}' for item '{item}': undo it first to change it")
            lease = con.execute(
                "SELECT shown_left, assigned_at FROM assignments WHERE item_id = ? AND annotator = ?", (item, annotator)
            ).fetchone()
            if lease is None:
                raise Conflict(f"item '{item}' was not shown to '{annotator}': ask for the next item first")
            load = self._load(con, annotator, item)
            if choice != "skip" and load >= self.annotators_per_item:
                raise Conflict(
                    f"item '{item}' already has its {self.annotators_per_item} annotator(s): "
                    "it was passed on while you were away"
                )
            cursor = con.execute(
                "INSERT INTO judgements (item_id, annotator, shown_left, choice, shown_at, answered_at, strength, comment) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item, annotator, lease[0], choice, lease[1], time.time(), strength, comment),
            )
            return int(cursor.lastrowid)

    def _load(self, con: sqlite3.Connection, annotator: str, item: str) -> int:
        """Slots of this item that annotators other than this one hold now."""
        (load,) = con.execute(
            f"SELECT {_LOAD} FROM items i WHERE i.id = :item", {**self._params(annotator), "item": item}
        ).fetchone()
        return int(load)

    def undo(self, annotator: str) -> dict[str, Any]:
        """Withdraw the annotator's latest live judgement; the item comes back to them next.

        A rating held its slot, so its item always comes back. A skip gave its slot up: others may
        hold every slot since, and then the skip is withdrawn but the item does not come back
        (`returned` is false); reviving the lease would push one of them out.
        """
        with self._write() as con:
            row = con.execute(
                "SELECT id, item_id, shown_left, choice FROM judgements WHERE annotator = ? AND undone_at IS NULL "
                "ORDER BY id DESC LIMIT 1",
                (annotator,),
            ).fetchone()
            if row is None:
                raise Conflict(f"nothing to undo for '{annotator}'")
            now = time.time()
            con.execute("UPDATE judgements SET undone_at = ? WHERE id = ?", (now, row[0]))
            returned = row[3] != "skip" or self._load(con, annotator, row[1]) < self.annotators_per_item
            if returned:
                con.execute(
                    "INSERT INTO assignments VALUES (?, ?, ?, ?) ON CONFLICT(item_id, annotator) "
                    "DO UPDATE SET shown_left = excluded.shown_left, assigned_at = excluded.assigned_at",
                    (row[1], annotator, row[2], now),
                )
            else:
                con.execute("DELETE FROM assignments WHERE item_id = ? AND annotator = ?", (row[1], annotator))
        return {"item_id": row[1], "choice": row[3], "returned": returned}

    def progress(self, annotator: str) -> dict[str, int]:
        """What this annotator did, what is left for them, and how far the whole set is."""
        params = self._params(annotator)
        with self._connect() as con:
            done, skipped = con.execute(
                "SELECT COUNT(*), COALESCE(SUM(choice = 'skip'), 0) FROM judgements WHERE annotator = :me AND undone_at IS NULL",
                params,
            ).fetchone()
            (remaining,) = con.execute(
                f"SELECT COUNT(*) FROM (SELECT {_LOAD} AS load FROM items i WHERE NOT {_MINE}) WHERE load < :k",
                params,
            ).fetchone()
            items, complete = self._completion(con)
        return {
            "done": int(done),
            "skipped": int(skipped),
            "remaining": int(remaining),
            "items": items,
            "complete": complete,
            "annotators_per_item": self.annotators_per_item,
        }

    def _completion(self, con: sqlite3.Connection) -> tuple[int, int]:
        """Items, and those with their full count of live ratings."""
        items, complete = con.execute(
            "SELECT COUNT(*), COALESCE(SUM(n >= :k), 0) FROM (SELECT i.id, (SELECT COUNT(*) FROM judgements j "
            "WHERE j.item_id = i.id AND j.undone_at IS NULL AND j.choice != 'skip') AS n FROM items i)",
            {"k": self.annotators_per_item},
        ).fetchone()
        return int(items), int(complete)

    def overview(self, now: float | None = None) -> dict[str, Any]:
        """The whole set and each annotator's work, for the lead's dashboard.

        Pace is the median time from showing an item to its answer, and the answers of the last
        hour; both over live judgements (undone ones are not work that counts).
        """
        import statistics

        now = time.time() if now is None else now
        with self._connect() as con:
            items, complete = self._completion(con)
        per: dict[str, list[Judgement]] = {}
        for j in self.judgements():
            per.setdefault(j.annotator, []).append(j)
        annotators = {}
        for name in sorted(per):
            mine = per[name]
            annotators[name] = {
                "judgements": len(mine),
                "ratings": sum(j.choice != "skip" for j in mine),
                "skips": sum(j.choice == "skip" for j in mine),
                "comments": sum(j.comment is not None for j in mine),
                "median_seconds": statistics.median(j.answered_at - j.shown_at for j in mine),
                "last_hour": sum(j.answered_at > now - 3600 for j in mine),
                "last_answer_at": max(j.answered_at for j in mine),
            }
        return {
            "items": items,
            "complete": complete,
            "remaining": items - complete,
            "annotators_per_item": self.annotators_per_item,
            "scale": self.scale,
            "annotators": annotators,
        }
