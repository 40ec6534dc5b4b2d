"""Human labeling: items from files, the store's rules, the API, concurrency, export and agreement."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import random
import sqlite3
import threading
from collections import Counter
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import live_server

from preftune.label.agreement import (
    agreement_report,
    category,
    coincidences,
    export_labels,
    krippendorff_alpha,
    majority,
    observed_agreement,
    pair_margin,
    symmetric_alpha,
)
from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.label.server import PAGE_DIR, create_app
from preftune.label.store import Item, LabelStore, item_id, load_items

TOKEN = "s3cret-token"
AUTH = {"X-Label-Token": TOKEN}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def simple_items(n: int) -> list[Item]:
    return [Item(item_id(f"p{i}", f"good {i}", f"bad {i}"), f"gen:{i + 1}", f"p{i}", f"good {i}", f"bad {i}") for i in range(n)]


def make_store(tmp_path: Path, n: int = 3, k: int = 2, **kwargs) -> LabelStore:
    store = LabelStore(tmp_path / "labels.sqlite", annotators_per_item=k, **kwargs)
    store.add_items(simple_items(n))
    return store


def rows(db: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, args).fetchall()


# ---------------------------------------------------------------------------------------------
# Items from files
# ---------------------------------------------------------------------------------------------


def test_pairs_file_gives_items_with_chosen_first(tmp_path):
    path = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
            {"chosen": "The sky is blue.", "rejected": "The sky is black."},
            {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Go away."},  # duplicate: kept once
        ],
    )
    items = load_items(path)
    assert [i.source for i in items] == ["pairs.jsonl:1", "pairs.jsonl:2", "pairs.jsonl:3"]
    assert items[0].texts == ("Say hi", "Hi!", "Go away.")
    assert items[1].texts == ("system: Be brief.\nuser: 2+2?", "4", "5")
    assert items[1].first == [{"role": "assistant", "content": "4"}]  # normalised as preftune.data does
    assert items[2].texts == ("The sky is", " blue.", " black.")


def test_samples_file_pairs_every_two_distinct_completions(tmp_path):
    path = write_jsonl(
        tmp_path / "samples.jsonl",
        [
            {"prompt": "Review:", "completions": ["great", "bad", "fine", "great"], "scores": [0.9, -0.5, 0.1, 0.9]},
            {  # as the generate command writes it
                "index": 1,
                "prompt": [{"role": "user", "content": "Hi"}],
                "completions": ["Hello", "Hey"],
                "lengths": [2, 2],
                "stopped": [True, True],
                "sampling": {"temperature": 0.7, "seed": 0},
            },
            {"prompt": "Same", "completions": ["x", "x"]},  # one distinct completion: nothing to compare
        ],
    )
    items = load_items(path)
    assert [(i.first, i.second) for i in items[:3]] == [("great", "bad"), ("great", "fine"), ("bad", "fine")]
    assert items[3].texts == ("user: Hi", "Hello", "Hey")
    assert items[3].second == [{"role": "assistant", "content": "Hey"}]
    assert len(items) == 4


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p", "completions": "abc"}, "samples.jsonl:2: field 'completions' must be a list, got str"),
        ({"prompt": "p", "completions": ["a", "  "]}, "samples.jsonl:2: field 'completions[1]' is empty"),
        ({"completions": ["a", "b"]}, "samples.jsonl:2: field 'prompt' is missing"),
        ({"prompt": "p", "completions": ["a", 3]}, "samples.jsonl:2: field 'completions[1]' must be a string or a list of messages, got int"),
        ({"prompt": "p", "chosen": "a"}, "samples.jsonl:2: field 'rejected' is missing"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "ok", "completions": ["a", "b"]}, record])
    with pytest.raises(PreftuneError) as info:
        load_items(path)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# Store rules
# ---------------------------------------------------------------------------------------------


def test_database_is_wal_and_adding_items_twice_adds_nothing(tmp_path):
    store = make_store(tmp_path, n=3)
    assert store.add_items(simple_items(4)) == 1
    assert rows(store.path, "PRAGMA journal_mode") == [("wal",)]
    assert [r[0] for r in rows(store.path, "SELECT position FROM items ORDER BY position")] == [0, 1, 2, 3]


def test_each_item_goes_to_the_configured_number_of_distinct_annotators(tmp_path):
    store = make_store(tmp_path, n=2, k=2)
    seen: dict[str, list[str]] = {}
    for name in ("ann", "bob", "cy"):
        while (item := store.next_item(name)) is not None:
            seen.setdefault(name, []).append(item["id"])
            store.judge(name, item["id"], "A")
    ids = [i.id for i in store.items()]
    assert seen == {"ann": ids, "bob": ids}  # cy finds every item full
    assert store.progress("cy") == {"done": 0, "skipped": 0, "remaining": 0, "items": 2, "complete": 2, "annotators_per_item": 2}


def test_a_lease_holds_the_slot_and_a_reload_gets_the_same_item_the_same_way_round(tmp_path):
    store = make_store(tmp_path, n=2, k=1)
    first = store.next_item("ann")
    assert store.next_item("ann") == first  # a reload shows the same thing
    assert store.next_item("bob")["id"] != first["id"]  # ann's lease holds item 1's only slot
    assert store.next_item("cy") is None


def test_skip_frees_the_slot_for_someone_else(tmp_path):
    store = make_store(tmp_path, n=1, k=1)
    item = store.next_item("ann")
    store.judge("ann", item["id"], "skip")
    assert store.next_item("ann") is None
    assert store.next_item("bob")["id"] == item["id"]


def test_undo_withdraws_the_last_answer_and_shows_the_item_again(tmp_path):
    store = make_store(tmp_path, n=2, k=1)
    one = store.next_item("ann")
    store.judge("ann", one["id"], "A")
    two = store.next_item("ann")
    store.judge("ann", two["id"], "tie")
    assert store.undo("ann") == {"item_id": two["id"], "choice": "tie", "returned": True}
    assert store.next_item("bob") is None  # the undone item is ann's again, not free for others
    assert store.next_item("ann") == two  # same item, same sides
    store.judge("ann", two["id"], "B")
    history = rows(store.path, "SELECT item_id, choice, undone_at IS NOT NULL FROM judgements ORDER BY id")
    assert history == [(one["id"], "A", 0), (two["id"], "tie", 1), (two["id"], "B", 0)]
    assert [j.choice for j in store.judgements()] == ["A", "B"]
    store.undo("ann")
    store.undo("ann")
    with pytest.raises(PreftuneError, match="nothing to undo for 'ann'"):
        store.undo("ann")


def test_an_expired_lease_lets_others_take_the_item(tmp_path):
    store = make_store(tmp_path, n=1, k=1, lease_seconds=0.0)
    item = store.next_item("ann")
    assert store.next_item("bob")["id"] == item["id"]
    store.judge("bob", item["id"], "B")
    with pytest.raises(PreftuneError, match=r"already has its 1 annotator\(s\): it was passed on while you were away"):
        store.judge("ann", item["id"], "A")
    assert store.next_item("ann") is None


def test_restart_loses_nothing_and_resumes_each_queue(tmp_path):
    store = make_store(tmp_path, n=3, k=2)
    a = store.next_item("ann")
    store.judge("ann", a["id"], "A")
    shown = store.next_item("ann")
    bob = store.next_item("bob")
    again = LabelStore(store.path, annotators_per_item=2)
    assert again.next_item("ann") == shown
    assert again.next_item("bob") == bob
    assert again.progress("ann")["done"] == 1
    assert [(j.annotator, j.item_id, j.choice) for j in again.judgements()] == [("ann", a["id"], "A")]


def test_a_file_that_is_no_labeling_database_is_refused(tmp_path):
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    with pytest.raises(PreftuneError, match="not a preftune labeling database"):
        LabelStore(other)
    text = tmp_path / "notes.sqlite"
    text.write_text("hello " * 1000)
    with pytest.raises(PreftuneError, match="cannot open the labeling database"):
        LabelStore(text)


# ---------------------------------------------------------------------------------------------
# API through the framework's test client
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def client(tmp_path):
    store = make_store(tmp_path, n=3, k=2)
    with TestClient(create_app(store, TOKEN)) as api:  # one event loop for all requests
        yield api, store


def test_page_is_plain_files_with_a_strict_content_policy(client):
    api, _ = client
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="static/app.js"></script>' in page.text
    script = api.get("/static/app.js")
    assert script.status_code == 200 and script.text == (PAGE_DIR / "app.js").read_text()
    assert "innerHTML" not in script.text and "textContent" in script.text
    assert api.get("/static/../labeling.py").status_code == 404
    assert api.get("/static/secrets.txt").json() == {"detail": "no file 'secrets.txt'"}


def test_markdown_is_rendered_with_raw_html_escaped_and_only_http_links():
    from preftune.label.rendering import render_markdown, render_value

    assert render_markdown("- one\n- **two**\n\n```py\nx < 1\n```") == (
        "<ul>\n<li>one</li>\n<li><strong>two</strong></li>\n</ul>\n<pre><code class=\"language-py\">x &lt; 1\n</code></pre>\n"
    )
    hostile = "<script>alert(1)</script> <img src=x onerror=alert(1)> [a](javascript:alert(1)) <javascript:alert(1)> [b](https://x.org)"
    assert render_markdown(hostile) == (
        "<p>&lt;script&gt;alert(1)&lt;/script&gt; &lt;img src=x onerror=alert(1)&gt; [a](javascript:alert(1)) "
        "&lt;javascript:alert(1)&gt; <a href=\"https://x.org\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">b</a></p>\n"
    )
    assert render_markdown("![x](https://t.example/p.png)").startswith("<p>!<a href=")  # images are not loaded
    conversation = render_value([{"role": "user", "content": "Hi"}, {"role": "<b>bot</b>", "content": "*yo*"}])
    assert conversation == (
        '<div class="conversation"><div class="turn" data-role="user"><div class="role">user</div>'
        '<div class="content"><p>Hi</p>\n</div></div><div class="turn" data-role="&lt;b&gt;bot&lt;/b&gt;">'
        '<div class="role">&lt;b&gt;bot&lt;/b&gt;</div><div class="content"><p><em>yo</em></p>\n</div></div></div>'
    )
    assert render_value([{"role": "assistant", "content": "**4**"}]) == "<p><strong>4</strong></p>\n"


def test_next_item_carries_its_rendered_html_and_the_session_its_guidelines(tmp_path):
    store = LabelStore(tmp_path / "l.sqlite", annotators_per_item=1)
    store.add_items([Item(item_id("p", "a", "b"), "gen:1", [{"role": "user", "content": "Q?"}], "**yes**", "<i>no</i>")])
    with TestClient(create_app(store, TOKEN, guidelines="# Rules\n<script>x</script>")) as api:
        assert api.post("/api/session", json={}, headers=AUTH).json() == {
            "scale": 3, "guidelines": "<h1>Rules</h1>\n<p>&lt;script&gt;x&lt;/script&gt;</p>\n"
        }
        assert api.post("/api/session", json={}).status_code == 401
        item = api.post("/api/next", json={"annotator": "ann"}, headers=AUTH).json()["item"]
    html = {item["a"]: item["html"]["a"], item["b"]: item["html"]["b"]}
    assert html == {"**yes**": "<p><strong>yes</strong></p>\n", "<i>no</i>": "<p>&lt;i&gt;no&lt;/i&gt;</p>\n"}
    assert item["prompt"] == "user: Q?" and 'data-role="user"' in item["html"]["prompt"]


def test_token_is_required_when_set(client):
    api, _ = client
    for headers in ({}, {"X-Label-Token": "wrong"}):
        response = api.post("/api/next", json={"annotator": "ann"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["detail"].startswith("missing or wrong access token")
    assert api.post("/api/next", json={"annotator": "ann"}, headers=AUTH).status_code == 200


def test_label_round_trip_records_the_shown_order(client):
    api, store = client
    data = api.post("/api/next", json={"annotator": " ann  lee "}, headers=AUTH).json()
    item = data["item"]
    assert data["progress"] == {"done": 0, "skipped": 0, "remaining": 3, "items": 3, "complete": 0, "annotators_per_item": 2}
    assert {item["a"], item["b"]} == {"good 0", "bad 0"} and item["prompt"] == "p0"
    assert "chosen" not in json.dumps(data) and "first" not in json.dumps(data)
    response = api.post("/api/judgements", json={"annotator": "ann lee", "item_id": item["id"], "choice": "A"}, headers=AUTH)
    assert response.status_code == 200 and response.json()["progress"]["done"] == 1
    [(annotator, shown_left, choice, shown_at, answered_at)] = rows(
        store.path, "SELECT annotator, shown_left, choice, shown_at, answered_at FROM judgements"
    )
    assert annotator == "ann lee" and choice == "A" and shown_at <= answered_at
    assert shown_left == ("first" if item["a"] == "good 0" else "second")
    # the same answer again is a retry, not a second row
    again = api.post("/api/judgements", json={"annotator": "ann lee", "item_id": item["id"], "choice": "A"}, headers=AUTH)
    assert again.json()["stored"] == response.json()["stored"]
    assert rows(store.path, "SELECT COUNT(*) FROM judgements") == [(1,)]


def test_order_is_random_per_annotator(tmp_path):
    store = make_store(tmp_path, n=40, k=2, rng=random.Random(0))
    for name in ("ann", "bob"):
        while (item := store.next_item(name)) is not None:
            store.judge(name, item["id"], "tie")
    sides = Counter(rows(store.path, "SELECT shown_left FROM judgements"))
    assert sides[("first",)] + sides[("second",)] == 80
    assert 25 <= sides[("first",)] <= 55  # 80 fair coin flips
    per_item = rows(store.path, "SELECT COUNT(DISTINCT shown_left) FROM judgements GROUP BY item_id")
    assert Counter(n for (n,) in per_item)[2] > 5  # the two annotators often saw an item differently


@pytest.mark.parametrize(
    "body, status, detail",
    [
        (b"{not json", 422, "the request body is not valid JSON"),
        (b"[1, 2]", 422, "the request body must be a JSON object (Content-Type: application/json)"),
        (b"", 422, "the request body must be a JSON object (Content-Type: application/json)"),
        (b"{}", 422, "field 'annotator': Field required; field 'item_id': Field required; field 'choice': Field required"),
        (b'{"annotator": "ann", "item_id": "x", "choice": "C"}', 422, "field 'choice': Input should be 'A', 'B', 'tie' or 'skip'"),
        (b'{"annotator": "   ", "item_id": "x", "choice": "A"}', 422, "field 'annotator': the annotator name is empty"),
        (b'{"annotator": "' + b"n" * 65 + b'", "item_id": "x", "choice": "A"}', 422, "field 'annotator': the annotator name is longer than 64 characters"),
        (b'{"annotator": "a\\u0007", "item_id": "x", "choice": "A"}', 422, "field 'annotator': the annotator name holds control characters"),
        (b'{"annotator": "ann", "item_id": "x", "choice": "A", "chosen": 1}', 422, "field 'chosen': Extra inputs are not permitted"),
        (b'{"annotator": "ann", "item_id": 7, "choice": "A"}', 422, "field 'item_id': Input should be a valid string"),
        (b'{"annotator": "ann", "item_id": "nope", "choice": "A"}', 404, "no item 'nope' in this database"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_clear_message(client, body, status, detail):
    api, _ = client
    response = api.post("/api/judgements", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == status
    assert response.json() == {"detail": detail}


def test_conflicts_are_409(client):
    api, store = client
    unseen = store.items()[2].id
    response = api.post("/api/judgements", json={"annotator": "ann", "item_id": unseen, "choice": "A"}, headers=AUTH)
    assert response.status_code == 409 and response.json()["detail"] == f"item '{unseen}' was not shown to 'ann': ask for the next item first"
    item = api.post("/api/next", json={"annotator": "ann"}, headers=AUTH).json()["item"]
    api.post("/api/judgements", json={"annotator": "ann", "item_id": item["id"], "choice": "A"}, headers=AUTH)
    response = api.post("/api/judgements", json={"annotator": "ann", "item_id": item["id"], "choice": "B"}, headers=AUTH)
    assert response.status_code == 409 and "you already answered 'A'" in response.json()["detail"]
    assert api.post("/api/undo", json={"annotator": "ann"}, headers=AUTH).json()["undone"] == {"item_id": item["id"], "choice": "A", "returned": True}
    response = api.post("/api/undo", json={"annotator": "ann"}, headers=AUTH)
    assert response.status_code == 409 and response.json() == {"detail": "nothing to undo for 'ann'"}
    assert api.get("/api/next").status_code == 405


def test_no_request_shape_gets_a_500(client):
    api, _ = client
    rng = random.Random(1)
    values = ["", "A", "skip", None, 0, [], {}, "x" * 300, "ann", "\u202e", True]
    for _ in range(60):
        body = {key: rng.choice(values) for key in rng.sample(["annotator", "item_id", "choice", "extra"], rng.randint(0, 4))}
        for path in ("/api/next", "/api/judgements", "/api/undo", "/api/progress"):
            assert api.post(path, json=body, headers=AUTH).status_code < 500, (path, body)


def test_undoing_a_skip_never_takes_a_slot_that_others_hold(tmp_path):
    """The sequence that over-booked an item: 1 skips, 2 and 3 take both slots, 1 undoes the skip.
    Before the fix the undo revived 1's lease: 2's and 3's answers got 409 and 1's next dropped the item."""
    store = make_store(tmp_path, n=1, k=2)
    with TestClient(create_app(store, TOKEN)) as api:
        def post(path: str, **body):
            return api.post(path, json=body, headers=AUTH)

        item = post("/api/next", annotator="one").json()["item"]["id"]
        assert post("/api/judgements", annotator="one", item_id=item, choice="skip").status_code == 200
        assert post("/api/next", annotator="two").json()["item"]["id"] == item
        assert post("/api/next", annotator="three").json()["item"]["id"] == item
        undo = post("/api/undo", annotator="one")
        assert undo.status_code == 200
        assert undo.json()["undone"] == {"item_id": item, "choice": "skip", "returned": False}
        assert undo.json()["detail"] == (
            f"your skip is withdrawn, but item '{item}' has meanwhile gone to its 2 annotator(s), so it does not come back"
        )
        two = post("/api/judgements", annotator="two", item_id=item, choice="A")
        three = post("/api/judgements", annotator="three", item_id=item, choice="B")
        assert (two.status_code, three.status_code) == (200, 200), (two.text, three.text)
        assert three.json()["progress"]["complete"] == 1
        assert post("/api/next", annotator="one").json()["item"] is None
    assert rows(store.path, "SELECT annotator, choice, undone_at IS NOT NULL FROM judgements ORDER BY id") == [
        ("one", "skip", 1), ("two", "A", 0), ("three", "B", 0)
    ]
    assert rows(store.path, "SELECT annotator FROM assignments ORDER BY annotator") == [("three",), ("two",)]


def test_an_undone_skip_comes_back_while_a_slot_is_free(tmp_path):
    store = make_store(tmp_path, n=1, k=2)
    shown = store.next_item("one")
    store.judge("one", shown["id"], "skip")
    assert store.next_item("two")["id"] == shown["id"]  # one slot of two taken
    assert store.undo("one") == {"item_id": shown["id"], "choice": "skip", "returned": True}
    assert store.next_item("three") is None  # one's lease is back: the item is full again
    assert store.next_item("one") == shown  # the same way round
    store.judge("one", shown["id"], "B")
    store.judge("two", shown["id"], "tie")
    assert store.progress("three")["complete"] == 1


# ---------------------------------------------------------------------------------------------
# Strength of preference and rationales
# ---------------------------------------------------------------------------------------------


def answer(store: LabelStore, name: str, item: dict, rating: str, strength: int | None = None, comment: str | None = None) -> None:
    """Answer as a rating in the item's own order (first/second/tie), whichever side it was shown on."""
    if rating == "tie":
        store.judge(name, item["id"], "tie", comment=comment)
        return
    first_text = {i.id: i.first for i in store.items()}[item["id"]]
    left_is_first = item["a"] == first_text
    store.judge(name, item["id"], "A" if (rating == "first") == left_is_first else "B", strength, comment)


# item -> annotator -> (rating in item order, strength, comment)
STRENGTH_PLAN = {
    0: {"ann": ("first", 2, "clear and correct"), "bob": ("first", 1, None), "cy": ("first", 2, None)},
    1: {"ann": ("second", 1, None), "bob": ("second", 1, None), "cy": ("first", 1, "both fine")},
    2: {"ann": ("first", 2, None), "bob": ("tie", None, None), "cy": ("first", 1, None)},
}


@pytest.fixture
def strength_db(tmp_path) -> Path:
    (tmp_path / "five").mkdir()
    store = make_store(tmp_path / "five", n=3, k=3, scale=5)
    index = {item.id: n for n, item in enumerate(store.items())}
    for name in ("ann", "bob", "cy"):
        while (item := store.next_item(name)) is not None:
            answer(store, name, item, *STRENGTH_PLAN[index[item["id"]]][name])
    store.close()
    return store.path


def test_pair_margin_is_the_signed_mean_strength():
    assert pair_margin([2, 1, 2]) == pytest.approx(5 / 3)
    assert pair_margin([1, 1, -1]) == pytest.approx(1 / 3)
    assert pair_margin([2, 0, 1]) == pytest.approx(1.0)
    assert pair_margin([2, None]) is None  # a rating on the 3-point scale has no strength
    assert pair_margin([]) is None


def test_strength_and_comment_round_trip_to_the_export(strength_db, tmp_path):
    assert rows(strength_db, "SELECT COUNT(*), SUM(strength IS NULL), SUM(strength = 0) FROM judgements") == [(9, 0, 1)]
    out = tmp_path / "strong.jsonl"
    report = export_labels(strength_db, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # item 0: 2 + 1 + 2 over 3; item 1: second wins, +1 +1 -1 (cy dissents); item 2: 2 + 0 (tie) + 1
    assert [(r["chosen"], r["votes"], r["margin"]) for r in records] == [
        ("good 0", {"chosen": 3, "rejected": 0, "tie": 0}, pytest.approx(5 / 3)),
        ("bad 1", {"chosen": 2, "rejected": 1, "tie": 0}, pytest.approx(1 / 3)),
        ("good 2", {"chosen": 2, "rejected": 0, "tie": 1}, pytest.approx(1.0)),
    ]
    assert [r["rationales"] for r in records] == [
        [{"annotator": "ann", "rating": "chosen", "strength": 2, "comment": "clear and correct"}],
        [{"annotator": "cy", "rating": "rejected", "strength": 1, "comment": "both fine"}],
        [],
    ]
    assert report["mean_margin"] == pytest.approx((5 / 3 + 1 / 3 + 1) / 3)


@pytest.mark.parametrize(
    "min_strength, kept, weak", [("0", ["good 0", "bad 1", "good 2"], 0), ("1", ["good 0", "good 2"], 1), ("1.5", ["good 0"], 2)]
)
def test_min_strength_drops_weak_pairs(strength_db, tmp_path, capsys, min_strength, kept, weak):
    out = tmp_path / "strong.jsonl"
    assert main(["label", "export", "--db", str(strength_db), "--out", str(out), "--min-strength", min_strength]) == 0
    assert [json.loads(line)["chosen"] for line in out.read_text().splitlines()] == kept
    report = json.loads((tmp_path / "strong.agreement.json").read_text())
    assert (report["exported"], report["dropped_weak"], report["dropped_no_strength"]) == (len(kept), weak, 0)
    printed = capsys.readouterr().out
    assert f"exported pairs        {len(kept)} (dropped: 0 tie majority, 0 no majority, {weak} below strength {float(min_strength):g}, 0 without strength)" in printed
    assert "mean margin" in printed


def test_min_strength_needs_strengths_and_a_sane_value(labelled_db, strength_db, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert main(["label", "export", "--db", str(labelled_db), "--out", str(out), "--min-strength", "1"]) == 2
    assert capsys.readouterr().err == (
        "preftune: error: --min-strength needs strengths, and no judgement has one: serve with --scale 5 to ask for them\n"
    )
    assert main(["label", "export", "--db", str(strength_db), "--out", str(out), "--min-strength", "3"]) == 2
    assert capsys.readouterr().err == (
        "preftune: error: --min-strength must be between 0 and 2 (1 = slightly better, 2 = much better), got 3.0\n"
    )
    assert not out.exists()


def test_the_scale_decides_whether_a_strength_is_asked(tmp_path):
    five = make_store(tmp_path, n=2, k=1, scale=5)
    with TestClient(create_app(five, TOKEN)) as api:
        assert api.post("/api/session", json={}, headers=AUTH).json() == {"scale": 5, "guidelines": None}
        item = api.post("/api/next", json={"annotator": "ann"}, headers=AUTH).json()["item"]
        body = {"annotator": "ann", "item_id": item["id"], "choice": "A"}
        response = api.post("/api/judgements", json=body, headers=AUTH)
        assert (response.status_code, response.json()) == (
            422, {"detail": "with --scale 5 a pick of A needs a strength: 1 (slightly) or 2 (much), got None"}
        )
        response = api.post("/api/judgements", json={**body, "choice": "tie", "strength": 2}, headers=AUTH)
        assert (response.status_code, response.json()) == (422, {"detail": "a tie has no strength, got 2"})
        response = api.post("/api/judgements", json={**body, "strength": 3}, headers=AUTH)
        assert response.status_code == 422 and response.json()["detail"] == "field 'strength': Input should be 0, 1 or 2"
        response = api.post("/api/judgements", json={**body, "comment": "x" * 2001, "strength": 1}, headers=AUTH)
        assert response.json()["detail"] == "field 'comment': String should have at most 2000 characters"
        stored = api.post("/api/judgements", json={**body, "strength": 1, "comment": "  the list is complete  "}, headers=AUTH)
        assert stored.status_code == 200
        again = api.post("/api/judgements", json={**body, "strength": 2}, headers=AUTH)
        assert again.json()["detail"] == f"you already answered 'A (slightly)' for item '{item['id']}': undo it first to change it"
    assert rows(five.path, "SELECT choice, strength, comment FROM judgements") == [("A", 1, "the list is complete")]
    three = LabelStore(tmp_path / "three.sqlite", annotators_per_item=1)
    three.add_items(simple_items(1))
    shown = three.next_item("ann")
    with pytest.raises(PreftuneError, match=r"this labeling session asks no strength \(serve with --scale 5 for it\)"):
        three.judge("ann", shown["id"], "A", strength=2)
    three.judge("ann", shown["id"], "A", comment="   ")  # a blank comment is none
    assert rows(three.path, "SELECT strength, comment FROM judgements") == [(None, None)]
    with pytest.raises(PreftuneError, match="--scale must be 3 \\(A/B/tie\\) or 5 \\(with strength\\), got 4"):
        LabelStore(tmp_path / "four.sqlite", scale=4)


def test_a_database_from_before_strengths_opens_and_exports(tmp_path):
    db = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema', '1'), ('annotators_per_item', '1');"
            "CREATE TABLE items (id TEXT PRIMARY KEY, position INTEGER NOT NULL, source TEXT NOT NULL, prompt TEXT NOT NULL,"
            " first TEXT NOT NULL, second TEXT NOT NULL, prompt_text TEXT NOT NULL, first_text TEXT NOT NULL, second_text TEXT NOT NULL);"
            "CREATE TABLE assignments (item_id TEXT NOT NULL, annotator TEXT NOT NULL, shown_left TEXT NOT NULL,"
            " assigned_at REAL NOT NULL, PRIMARY KEY (item_id, annotator));"
            "CREATE TABLE judgements (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, annotator TEXT NOT NULL,"
            " shown_left TEXT NOT NULL, choice TEXT NOT NULL, shown_at REAL NOT NULL, answered_at REAL NOT NULL, undone_at REAL);"
            "INSERT INTO items VALUES ('i1', 0, 'p.jsonl:1', '\"q\"', '\"yes\"', '\"no\"', 'q', 'yes', 'no');"
            "INSERT INTO judgements (item_id, annotator, shown_left, choice, shown_at, answered_at) VALUES ('i1', 'ann', 'second', 'B', 1, 2);"
        )
    report = export_labels(db, tmp_path / "o.jsonl", min_annotators=1)
    assert report["exported"] == 1
    assert json.loads((tmp_path / "o.jsonl").read_text())["margin"] is None
    assert rows(db, "SELECT value FROM meta WHERE key = 'schema'") == [("2",)]
    assert [r[1] for r in rows(db, "PRAGMA table_info(judgements)")][-2:] == ["strength", "comment"]


# ---------------------------------------------------------------------------------------------
# Concurrency: real HTTP, four annotators at once
# ---------------------------------------------------------------------------------------------


def test_four_annotators_posting_50_judgements_each_at_once(tmp_path):
    store = make_store(tmp_path, n=120, k=3)
    app = create_app(store, TOKEN)
    barrier = threading.Barrier(4)
    failures: list[str] = []

    def annotate(name: str) -> None:
        rng = random.Random(name)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            barrier.wait()
            for _ in range(50):
                item = http.post("/api/next", json={"annotator": name}).json()["item"]
                choice = rng.choice(["A", "B", "tie"])
                response = http.post("/api/judgements", json={"annotator": name, "item_id": item["id"], "choice": choice})
                if response.status_code != 200:
                    failures.append(f"{name}: {response.status_code} {response.text}")

    with live_server(app) as url:
        threads = [threading.Thread(target=annotate, args=(f"annotator-{i}",)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []
    total = rows(store.path, "SELECT COUNT(*), COUNT(DISTINCT item_id || '/' || annotator) FROM judgements")
    per_annotator = dict(rows(store.path, "SELECT annotator, COUNT(*) FROM judgements GROUP BY annotator"))
    per_item = Counter(n for (n,) in rows(store.path, "SELECT COUNT(*) FROM judgements GROUP BY item_id"))
    print(f"rows={total[0][0]} distinct={total[0][1]} per annotator={per_annotator} items by count={dict(per_item)}")
    assert total == [(200, 200)]
    assert per_annotator == {f"annotator-{i}": 50 for i in range(4)}
    assert max(per_item) == 3 and per_item[3] >= 50  # items fill to the limit, never past it


def test_eight_annotators_skipping_and_undoing_at_once_never_over_book_an_item(tmp_path):
    """Each undoes some of its skips a moment later, when others may have taken the slot: an
    answer to an item just handed out must never be refused, and no item ever gets more than k."""
    store = make_store(tmp_path, n=40, k=2)
    barrier = threading.Barrier(8)
    failures: list[str] = []
    undos = Counter()

    def annotate(name: str) -> None:
        rng = random.Random(name)
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http:
            barrier.wait()
            pending_undo = False
            for _ in range(15):
                if pending_undo:
                    undone = http.post("/api/undo", json={"annotator": name}).json()["undone"]
                    undos[undone["returned"]] += 1
                    pending_undo = False
                item = http.post("/api/next", json={"annotator": name}).json()["item"]
                if item is None:
                    break
                choice = rng.choice(["A", "B", "tie", "skip", "skip"])
                response = http.post("/api/judgements", json={"annotator": name, "item_id": item["id"], "choice": choice})
                if response.status_code != 200:
                    failures.append(f"{name}: {response.status_code} {response.text}")
                pending_undo = choice == "skip" and rng.random() < 0.6

    with live_server(create_app(store, TOKEN)) as url:
        threads = [threading.Thread(target=annotate, args=(f"annotator-{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(f"undone skips that came back / did not: {undos[True]} / {undos[False]}")
    assert failures == []
    assert sum(undos.values()) > 10
    ratings = rows(store.path, "SELECT COUNT(*) FROM judgements WHERE undone_at IS NULL AND choice != 'skip' GROUP BY item_id")
    assert max(n for (n,) in ratings) <= 2


# ---------------------------------------------------------------------------------------------
# Export: majority vote and agreement, hand-computed
# ---------------------------------------------------------------------------------------------

# (item, annotator, shown_left, choice): the comment gives the rating in the item's own order.
JUDGEMENTS = [
    (1, "ann", "first", "A"), (1, "bob", "second", "B"), (1, "cy", "first", "A"),  # first first first
    (2, "ann", "second", "B"), (2, "bob", "first", "A"), (2, "cy", "first", "B"),  # first first second
    (3, "ann", "first", "B"), (3, "bob", "second", "A"), (3, "cy", "first", "tie"),  # second second tie
    (4, "ann", "first", "A"), (4, "bob", "second", "A"), (4, "cy", "second", "tie"),  # first second tie
    (5, "ann", "first", "tie"), (5, "bob", "second", "tie"), (5, "cy", "second", "B"),  # tie tie first
    (6, "ann", "first", "A"), (6, "bob", "second", "A"), (6, "cy", "first", "skip"),  # first second (skip)
]


@pytest.fixture
def labelled_db(tmp_path) -> Path:
    db = tmp_path / "labels.sqlite"
    store = LabelStore(db, annotators_per_item=3)
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(1, 7)]
    )
    store.add_items(load_items(pairs))
    ids = {int(i.prompt[1:]): i.id for i in store.items()}
    store.close()
    # Closed explicitly (sqlite3's `with` only commits): the last close checkpoints the WAL into the
    # file now, not whenever the garbage collector gets to it, so the file's bytes are final here.
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute(  # withdrawn by undo: must not count
            "INSERT INTO judgements (item_id, annotator, shown_left, choice, shown_at, answered_at, undone_at) "
            "VALUES (?, 'cy', 'first', 'A', 1, 2, 3)",
            (ids[6],),
        )
        for n, (item, annotator, shown_left, choice) in enumerate(JUDGEMENTS):
            con.execute(
                "INSERT INTO judgements (item_id, annotator, shown_left, choice, shown_at, answered_at) VALUES (?, ?, ?, ?, ?, ?)",
                (ids[item], annotator, shown_left, choice, 10.0 + n, 11.0 + n),
            )
    return db


def test_vote_helpers():
    assert [category(c, s) for c, s in [("A", "first"), ("A", "second"), ("B", "first"), ("B", "second"), ("tie", "first"), ("skip", "first")]] == [
        "first", "second", "second", "first", "tie", None
    ]
    assert majority(["first", "first", "second"]) == "first"
    assert majority(["first", "second"]) is None
    assert majority(["first", "second", "tie"]) is None
    assert majority(["tie", "tie", "first"]) == "tie"
    # hand-computed in test_export_majority_and_agreement: o_ff=4, o_ss=1, o_tt=1, every off-diagonal pair 1.5
    assert krippendorff_alpha([[3, 0, 0], [2, 1, 0], [0, 2, 1], [1, 1, 1], [1, 0, 2]]) == pytest.approx(0.125)
    assert krippendorff_alpha([[3, 0, 0], [0, 3, 0]]) == pytest.approx(1.0)
    assert krippendorff_alpha([[3, 0, 0], [3, 0, 0]]) is None  # one category only: undefined
    # the same table with chance equal for first and second: n_first = n_second = 5.5, n_tie = 4,
    # alpha = 1 - 14 * 9 / (225 - 5.5^2 - 5.5^2 - 4^2) = 1 - 126/148.5 = 5/33
    assert symmetric_alpha([[3, 0, 0], [2, 1, 0], [0, 2, 1], [1, 1, 1], [1, 0, 2]]) == pytest.approx(5 / 33)
    assert observed_agreement([[3, 0, 0], [2, 1, 0], [0, 2, 1], [1, 1, 1], [1, 0, 2]]) == pytest.approx(6 / 15)
    symmetric = [[2, 1, 0], [1, 2, 0], [0, 1, 2], [1, 0, 2]]  # first and second already balanced
    assert symmetric_alpha(symmetric) == pytest.approx(krippendorff_alpha(symmetric))
    # everyone always prefers the input's chosen: no disagreement beyond the input's own label
    # to explain in the input's order, perfect agreement on which response is better
    assert symmetric_alpha([[3, 0, 0], [3, 0, 0]]) == pytest.approx(1.0)
    # first, first, second: ordered pairs (f, f) x2, (f, s) x2, (s, f) x2, each weighted 1 / (3 - 1)
    assert coincidences([[2, 1, 0]]).tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_export_majority_and_agreement(labelled_db, tmp_path, capsys):
    out = tmp_path / "voted.jsonl"
    code = main(["label", "export", "--db", str(labelled_db), "--out", str(out), "--min-annotators", "3"])
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    # item 1: 3 of 3 for first; item 2: 2 of 3 for first; item 3: 2 of 3 for second, so the file's
    # rejected becomes chosen. Item 4 has no majority, item 5 a tie majority, item 6 two ratings.
    assert [(r["prompt"], r["chosen"], r["rejected"], r["votes"]) for r in records] == [
        ("q1", "yes 1", "no 1", {"chosen": 3, "rejected": 0, "tie": 0}),
        ("q2", "yes 2", "no 2", {"chosen": 2, "rejected": 1, "tie": 0}),
        ("q3", "no 3", "yes 3", {"chosen": 2, "rejected": 0, "tie": 1}),
    ]
    assert [r["source"] for r in records] == ["pairs.jsonl:1", "pairs.jsonl:2", "pairs.jsonl:3"]
    report = json.loads((tmp_path / "voted.agreement.json").read_text())
    # Krippendorff's alpha over items 1-5 (nominal): coincidences o_ff=4, o_ss=1, o_tt=1 and 1.5 in
    # each of the six off-diagonal cells; n=15, n_f=7, n_s=4, n_t=4.
    # D_o = 9/15, D_e = (15^2 - 7^2 - 4^2 - 4^2) / (15 * 14) = 144/210, alpha = 1 - (9/15)/(144/210) = 1/8.
    assert report["krippendorff_alpha"] == pytest.approx(0.125)
    assert report["krippendorff_alpha_symmetric"] == pytest.approx(5 / 33)  # see test_vote_helpers
    assert report["observed_agreement"] == pytest.approx(6 / 15)  # (o_ff + o_ss + o_tt) / n
    assert {k: report[k] for k in ("items", "items_rated", "items_with_too_few_ratings", "items_unrated", "exported", "dropped_tie", "dropped_no_majority", "ratings")} == {
        "items": 6, "items_rated": 5, "items_with_too_few_ratings": 1, "items_unrated": 0,
        "exported": 3, "dropped_tie": 1, "dropped_no_majority": 1, "ratings": 15,
    }
    # left (A) picks among side picks, items 1-6: 8 of 13
    assert report["position_bias"] == {"left": 8, "right": 5, "left_share": pytest.approx(8 / 13)}
    # agreement with the majority over items 1, 2, 3 and 5 (the items that have one)
    assert report["annotators"] == {
        "ann": {"ratings": 6, "ties": 1, "skips": 0, "agreement_with_majority": 1.0, "compared_with_majority": 4, "left_share": pytest.approx(3 / 5)},
        "bob": {"ratings": 6, "ties": 1, "skips": 0, "agreement_with_majority": 1.0, "compared_with_majority": 4, "left_share": pytest.approx(4 / 5)},
        "cy": {"ratings": 5, "ties": 2, "skips": 1, "agreement_with_majority": 0.25, "compared_with_majority": 4, "left_share": pytest.approx(1 / 3)},
    }
    printed = capsys.readouterr().out
    assert "Krippendorff's alpha  0.152 either response first, 0.125 in the input's order (nominal, 15 ratings" in printed
    assert "observed agreement    0.400 of rating pairs within an item" in printed
    assert "left picked 0.615 of 13 side picks" in printed
    assert "cy" in printed and "0.250 of 4" in printed


def test_export_with_fewer_annotators_votes_on_more_items(labelled_db, tmp_path):
    db_before = hashlib.sha256(labelled_db.read_bytes()).hexdigest()
    from preftune.label.store import LabelStore as Store

    report, labels = agreement_report(Store(labelled_db).judgements(), [i.id for i in Store(labelled_db).items()], 2)
    assert (report["items_rated"], report["exported"], report["dropped_no_majority"]) == (6, 3, 2)  # item 6 splits 1-1
    assert len(labels) == 3
    gc.collect()  # connections left to the collector close (and checkpoint) now, not at a random moment
    assert hashlib.sha256(labelled_db.read_bytes()).hexdigest() == db_before


def test_exported_pairs_train_as_preference_data(labelled_db, tmp_path):
    from preftune.data import load_preference_data

    out = tmp_path / "voted.jsonl"
    export_labels(labelled_db, out)
    examples = load_preference_data(out)
    assert [(e.chosen, e.rejected) for e in examples] == [("yes 1", "no 1"), ("yes 2", "no 2"), ("no 3", "yes 3")]
    assert examples[0].extra["votes"] == {"chosen": 3, "rejected": 0, "tie": 0}


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_export_as_parquet_or_a_saved_dataset_trains_like_the_jsonl(strength_db, tmp_path, fmt):
    from preftune.data import load_preference_data

    export_labels(strength_db, tmp_path / "pairs.jsonl")
    out = tmp_path / ("pairs.parquet" if fmt == "parquet" else "pairs-dataset")
    assert main(["label", "export", "--db", str(strength_db), "--out", str(out), "--format", fmt]) == 0
    assert out.is_file() if fmt == "parquet" else (out / "state.json").is_file()
    expected = load_preference_data(tmp_path / "pairs.jsonl")
    loaded = load_preference_data(out)
    assert [(e.prompt, e.chosen, e.rejected) for e in loaded] == [(e.prompt, e.chosen, e.rejected) for e in expected]
    assert [e.extra["margin"] for e in loaded] == pytest.approx([5 / 3, 1 / 3, 1.0])
    assert [e.extra["votes"] for e in loaded] == [e.extra["votes"] for e in expected]
    assert loaded[0].extra["rationales"][0]["comment"] == "clear and correct"
    report = json.loads((out.with_suffix(".agreement.json")).read_text())
    assert (report["format"], report["exported"]) == (fmt, 3)
    # a second export replaces the first whole
    assert main(["label", "export", "--db", str(strength_db), "--out", str(out), "--format", fmt, "--min-strength", "1.5"]) == 0
    assert len(load_preference_data(out)) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_as_csv_for_a_spreadsheet(strength_db, tmp_path):
    import csv

    out = tmp_path / "pairs.csv"
    assert main(["label", "export", "--db", str(strength_db), "--out", str(out), "--format", "csv"]) == 0
    with out.open(newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [(r["prompt"], r["chosen"], r["votes_chosen"], r["votes_tie"]) for r in table] == [
        ("p0", "good 0", "3", "0"), ("p1", "bad 1", "2", "0"), ("p2", "good 2", "2", "1")
    ]
    assert float(table[0]["margin"]) == pytest.approx(5 / 3)
    assert json.loads(table[1]["rationales"]) == [{"annotator": "cy", "rating": "rejected", "strength": 1, "comment": "both fine"}]
    assert table[2]["rationales"] == ""


# ---------------------------------------------------------------------------------------------
# The lead's dashboard
# ---------------------------------------------------------------------------------------------

ADMIN = {"X-Admin-Token": "lead-only"}


def test_dashboard_refuses_without_its_own_token(labelled_db):
    store = LabelStore(labelled_db)
    with TestClient(create_app(store, TOKEN, admin_token="lead-only")) as api:
        for headers in ({}, {"X-Admin-Token": "wrong"}, AUTH, {"X-Admin-Token": TOKEN}):
            for path in ("/api/admin/summary", "/api/admin/download"):
                response = api.post(path, json={}, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json() == {
                    "detail": "missing or wrong dashboard token: open /admin?token=... with the dashboard's own token"
                }
        assert api.post("/api/next", json={"annotator": "x"}, headers=ADMIN).status_code == 401  # no labeling with it
        assert api.get("/admin").status_code == 200  # the page itself holds no data
    with TestClient(create_app(store, TOKEN)) as api:
        response = api.post("/api/admin/summary", json={}, headers=ADMIN)
        assert (response.status_code, response.json()["detail"]) == (403, "the dashboard is off: serve with --admin-token to turn it on")


def test_dashboard_figures_equal_the_exports(labelled_db, tmp_path):
    out = tmp_path / "voted.jsonl"
    assert main(["label", "export", "--db", str(labelled_db), "--out", str(out), "--min-annotators", "3"]) == 0
    exported = json.loads((tmp_path / "voted.agreement.json").read_text())
    store = LabelStore(labelled_db)
    with TestClient(create_app(store, TOKEN, admin_token="lead-only")) as api:
        data = api.post("/api/admin/summary", json={"min_annotators": 3}, headers=ADMIN).json()
        jsonl = api.post("/api/admin/download", json={"min_annotators": 3, "format": "jsonl"}, headers=ADMIN)
        report = api.post("/api/admin/download", json={"min_annotators": 3, "format": "report"}, headers=ADMIN)
        csv_file = api.post("/api/admin/download", json={"min_annotators": 3, "format": "csv"}, headers=ADMIN)
        bad = api.post("/api/admin/summary", json={"min_annotators": 0}, headers=ADMIN)
    for key in ("output", "format"):  # where the file went, which the dashboard has not
        exported.pop(key)
    assert data["report"] == exported  # alpha, agreement with majority, position bias: the same figures
    assert data["report"]["krippendorff_alpha"] == pytest.approx(0.125)
    assert data["report"]["position_bias"]["left_share"] == pytest.approx(8 / 13)
    assert data["report"]["annotators"]["cy"]["agreement_with_majority"] == pytest.approx(0.25)
    assert jsonl.content == out.read_bytes()
    assert jsonl.headers["content-disposition"] == 'attachment; filename="labelled.jsonl"'
    assert json.loads(report.content) == exported
    assert main(["label", "export", "--db", str(labelled_db), "--out", str(tmp_path / "v.csv"), "--format", "csv"]) == 0
    assert csv_file.content == (tmp_path / "v.csv").read_bytes()
    assert bad.status_code == 422 and bad.json()["detail"] == "field 'min_annotators': Input should be greater than or equal to 1"
    overview = data["overview"]
    # 6 items, 3 annotators each: items 1-5 have 3 ratings, item 6 two ratings and a skip
    assert {k: overview[k] for k in ("items", "complete", "remaining", "annotators_per_item")} == {
        "items": 6, "complete": 5, "remaining": 1, "annotators_per_item": 3
    }
    # the fixture shows each item 1 s before its answer; the undone judgement does not count
    assert overview["annotators"]["cy"] == {
        "judgements": 6, "ratings": 5, "skips": 1, "comments": 0, "median_seconds": 1.0, "last_hour": 0, "last_answer_at": 28.0
    }
    assert store.overview(now=30.0)["annotators"]["ann"]["last_hour"] == 6


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "p", "completions": ["a"]}, {"prompt": "p", "completions": [None, "b"]}])
    assert main(["label", "serve", "--input", str(bad), "--db", str(tmp_path / "l.sqlite")]) == 2
    err = capsys.readouterr().err
    assert err == "preftune: error: s.jsonl:2: field 'completions[0]' must be a string or a list of messages, got null\n"
    assert main(["label", "export", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert capsys.readouterr().err == f"preftune: error: labeling database not found: {tmp_path / 'none.sqlite'}\n"
    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert main(["label", "serve", "--input", str(good), "--db", str(tmp_path / "l.sqlite"), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "preftune: error: --port must be between 1 and 65535, got 70000\n"
    assert main(["label", "serve", "--input", str(good), "--db", str(tmp_path / "l.sqlite"), "--annotators-per-item", "0"]) == 2
    assert capsys.readouterr().err == "preftune: error: annotators per item must be at least 1, got 0\n"
    missing = tmp_path / "rules.md"
    assert main(["label", "serve", "--input", str(good), "--db", str(tmp_path / "l.sqlite"), "--guidelines", str(missing)]) == 2
    assert capsys.readouterr().err == f"preftune: error: --guidelines: file not found: {missing}\n"
    missing.write_bytes(b"caf\xe9")
    assert main(["label", "serve", "--input", str(good), "--db", str(tmp_path / "l.sqlite"), "--guidelines", str(missing)]) == 2
    assert capsys.readouterr().err == f"preftune: error: --guidelines: {missing} is not UTF-8 text (byte 3)\n"


def test_serve_never_modifies_the_input_and_refuses_a_taken_port(tmp_path, capsys):
    import socket

    good = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "<b>b</b>"}])
    before = good.read_bytes()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["label", "serve", "--input", str(good), "--db", str(tmp_path / "l.sqlite"), "--port", str(port)])
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert good.read_bytes() == before
    assert [i.second for i in LabelStore(tmp_path / "l.sqlite").items()] == ["<b>b</b>"]


# ---------------------------------------------------------------------------------------------
# The documented HTTP API
# ---------------------------------------------------------------------------------------------


def test_the_http_api_text_names_every_route_and_is_in_the_readme_and_the_help(tmp_path, capsys):
    from preftune.label.http_api import HTTP_API

    app = create_app(make_store(tmp_path), TOKEN, admin_token="lead")
    for route in app.routes:
        methods = getattr(route, "methods", set()) or set()
        if "POST" in methods:
            assert f"POST {route.path} " in HTTP_API, route.path
        elif route.path.startswith("/static/"):
            assert all(f"/static/{name}" in HTTP_API for name in ("app.js", "admin.js", "style.css"))
        elif "GET" in methods:
            assert f"{route.path} (" in HTTP_API, route.path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"```text\n{HTTP_API}```" in readme
    with pytest.raises(SystemExit) as done:
        main(["label", "serve", "--help"])
    assert done.value.code == 0
    assert HTTP_API in capsys.readouterr().out


def test_the_http_api_answers_as_documented(tmp_path):
    store = make_store(tmp_path, n=2, k=1, scale=5)
    progress_keys = {"done", "skipped", "remaining", "items", "complete", "annotators_per_item"}
    with TestClient(create_app(store, TOKEN, admin_token="lead")) as api:
        assert api.post("/api/session", json={}).status_code == 401
        assert api.post("/api/session", json={}, headers=AUTH).json() == {"scale": 5, "guidelines": None}
        shown = api.post("/api/next", json={"annotator": "  ana  "}, headers=AUTH).json()
        assert set(shown) == {"item", "progress"} and set(shown["progress"]) == progress_keys
        assert set(shown["item"]) == {"id", "prompt", "a", "b", "html"} and set(shown["item"]["html"]) == {"prompt", "a", "b"}
        item = shown["item"]["id"]
        again = api.post("/api/next", json={"annotator": "ana"}, headers=AUTH).json()["item"]
        assert (again["id"], again["a"]) == (item, shown["item"]["a"])  # held, the same way round
        no_strength = api.post("/api/judgements", json={"annotator": "ana", "item_id": item, "choice": "A"}, headers=AUTH)
        assert no_strength.status_code == 422
        assert no_strength.json() == {"detail": "with --scale 5 a pick of A needs a strength: 1 (slightly) or 2 (much), got None"}
        body = {"annotator": "ana", "item_id": item, "choice": "A", "strength": 2, "comment": "clearer"}
        stored = api.post("/api/judgements", json=body, headers=AUTH).json()
        assert set(stored) == {"stored", "progress"} and stored["progress"]["done"] == 1
        assert api.post("/api/judgements", json=body, headers=AUTH).json()["stored"] == stored["stored"]  # sent twice
        other = api.post("/api/judgements", json={**body, "choice": "B"}, headers=AUTH)
        assert other.status_code == 409
        assert api.post("/api/next", json={"annotator": "ana", "extra": 1}, headers=AUTH).status_code == 422
        undone = api.post("/api/undo", json={"annotator": "ana"}, headers=AUTH).json()
        assert undone["undone"] == {"item_id": item, "choice": "A", "returned": True} and "detail" not in undone
        assert set(api.post("/api/progress", json={"annotator": "ana"}, headers=AUTH).json()) == {"progress"}
        assert api.post("/api/admin/summary", json={}, headers=AUTH).status_code == 401  # the annotators' token
        summary = api.post("/api/admin/summary", json={}, headers={"X-Admin-Token": "lead"}).json()
        assert set(summary) == {"report", "overview"}
        download = api.post("/api/admin/download", json={"format": "csv"}, headers={"X-Admin-Token": "lead"})
        assert download.headers["content-disposition"] == 'attachment; filename="labelled.csv"'
        assert api.post("/api/judgements", json={**body, "item_id": "nope"}, headers=AUTH).status_code == 404
