"""The labeling page in real headless Chromium: name, keyboard labeling, undo, and what the database
holds; Markdown, hostile payloads, guidelines, strength and comments; the lead's dashboard.

Needs Debian's `chromium` and the `playwright` package (its own browser downloads are never used).
Skipped when either is missing, unless PREFTUNE_REQUIRE_BROWSER=1 (as in CI), which makes that a
failure. With PREFTUNE_WRITE_DOCS=1 the tests also write the screenshots docs/labeling.png and
docs/labeling-admin.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

import pytest
from live_server import live_server

from preftune.label.server import create_app
from preftune.label.store import LabelStore, load_items

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "browser-test-token"

PAIRS = [
    {
        "prompt": "Write one sentence about the movie you saw last night.",
        "chosen": "It was a warm, funny film with a great cast, and I laughed all the way through.",
        "rejected": "Movie. It was a movie with some people in it, I think.",
    },
    {
        "prompt": "Say hello.",
        "chosen": "Hello! <b>Nice</b> to meet you.",
        "rejected": "<script>document.title = 'pwned'</script><img src=x onerror=\"document.title='pwned'\">",
    },
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
]




def test_label_with_the_keyboard_in_chromium(browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 640})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    store = LabelStore(tmp_path / "labels.sqlite", annotators_per_item=2)
    store.add_items(load_items(pairs))
    first_text = {i.id: i.first for i in store.items()}

    with live_server(create_app(store, TOKEN)) as url:
        page.goto(f"{url}/?token={TOKEN}")
        expect(page.locator("#name")).to_be_visible()
        page.fill("#name", "Alice")
        page.keyboard.press("Enter")
        expect(page.locator("#prompt")).to_have_text(PAIRS[0]["prompt"])
        expect(page.locator("#progress")).to_have_text("0 done \u00b7 4 remaining \u00b7 0/4 items complete")
        expect(page.locator("#who-name")).to_have_text("Alice")

        shown: list[tuple[str, str]] = []  # (prompt, text on the left) as the page showed them
        for key, progress in (("1", "1 done"), ("2", "2 done"), ("t", "3 done"), ("s", "4 done")):
            shown.append((page.text_content("#prompt"), page.text_content("#text-a")))
            if page.text_content("#prompt") == PAIRS[1]["prompt"]:
                # markup in a response is shown as text, and never runs
                texts = {page.text_content("#text-a"), page.text_content("#text-b")}
                assert texts == {PAIRS[1]["chosen"], PAIRS[1]["rejected"]}
                assert page.locator("#task b, #task script, #task img").count() == 0
            page.keyboard.press(key)
            expect(page.locator("#progress")).to_contain_text(progress)
        expect(page.locator("#finished")).to_be_visible()

        page.keyboard.press("u")  # take the skip back: the last item returns, the same way round
        expect(page.locator("#status")).to_have_text("Undone: your last answer (skipped) is withdrawn.")
        expect(page.locator("#task")).to_be_visible()
        expect(page.locator("#prompt")).to_have_text(PAIRS[3]["prompt"])
        assert page.text_content("#text-a") == shown[3][1]
        page.keyboard.press("2")
        expect(page.locator("#finished")).to_be_visible()
        expect(page.locator("#progress")).to_have_text("4 done \u00b7 0 remaining \u00b7 0/4 items complete")

        page.reload()  # the name is remembered; nothing is left for Alice
        expect(page.locator("#finished")).to_be_visible()
        assert page.title() == "preftune: which response is better?"

        bob = browser.new_page()  # a second annotator in another browser profile
        bob.goto(f"{url}/?token={TOKEN}")
        bob.fill("#name", "Bob")
        bob.keyboard.press("Enter")
        expect(bob.locator("#progress")).to_have_text("0 done \u00b7 4 remaining \u00b7 0/4 items complete")
        bob.keyboard.press("1")
        expect(bob.locator("#progress")).to_contain_text("1 done")
        bob.keyboard.press("t")
        expect(bob.locator("#progress")).to_have_text("2 done \u00b7 2 remaining \u00b7 2/4 items complete")

        stranger = browser.new_page()  # another browser profile, without the token
        stranger.goto(f"{url}/")
        stranger.fill("#name", "Mallory")
        stranger.keyboard.press("Enter")
        expect(stranger.locator("#status")).to_have_text(
            "missing or wrong access token: open the link with ?token=... that you were given"
        )

    with sqlite3.connect(store.path) as con:
        live = con.execute(
            "SELECT i.prompt_text, j.annotator, j.shown_left, j.choice, j.item_id FROM judgements j "
            "JOIN items i ON i.id = j.item_id WHERE j.undone_at IS NULL AND j.annotator = 'Alice' ORDER BY j.id"
        ).fetchall()
        bobs = con.execute(
            "SELECT i.prompt_text, j.choice FROM judgements j JOIN items i ON i.id = j.item_id "
            "WHERE j.annotator = 'Bob' ORDER BY j.id"
        ).fetchall()
        undone = con.execute("SELECT choice FROM judgements WHERE undone_at IS NOT NULL").fetchall()
    assert [(prompt, who, choice) for prompt, who, _, choice, _ in live] == [
        (PAIRS[0]["prompt"], "Alice", "A"),
        (PAIRS[1]["prompt"], "Alice", "B"),
        (PAIRS[2]["prompt"], "Alice", "tie"),
        (PAIRS[3]["prompt"], "Alice", "B"),
    ]
    assert undone == [("skip",)]
    assert bobs == [(PAIRS[0]["prompt"], "A"), (PAIRS[1]["prompt"], "tie")]
    # the order stored is the order the page showed
    for (prompt, left_text), (_, _, shown_left, _, item) in zip(shown, live):
        assert shown_left == ("first" if left_text == first_text[item] else "second"), prompt


GUIDELINES = """# How to judge

Pick the response a careful **expert** would rather send:

1. Correct first: a wrong answer loses, however well written.
2. Then complete and clear; shorter wins a tie.
3. Code must run as shown.

Use *slightly better* when you would not mind either.
"""

PWNED = "document.title = 'pwned'"
HOSTILE = (
    f"<script>{PWNED}</script><img src=x onerror=\"{PWNED}\"> "
    f"[click me](javascript:{PWNED}) <a href=\"javascript:alert(1)\">x</a> and [the docs](https://example.org/hello)"
)
MARKDOWN_PAIRS = [
    {
        "prompt": [
            {"role": "system", "content": "You are a concise Python tutor."},
            {"role": "user", "content": "How do I read a file line by line in Python?"},
        ],
        "chosen": "Open it in a `with` block and loop over the file object:\n\n```python\n"
        "with open(\"notes.txt\", encoding=\"utf-8\") as handle:\n    for line in handle:\n        print(line.rstrip())\n```\n\n"
        "- the file is closed even if an error occurs\n- lines are read one at a time, so large files are fine",
        "rejected": "Use `readlines()`:\n\n```python\nlines = open(\"notes.txt\").readlines()\n```\n\n"
        "This reads **everything** into memory first, and never closes the file.",
    },
    {"prompt": "Say hello <b>loudly</b>.", "chosen": "Hello! *Nice* to meet you.", "rejected": HOSTILE},
]


def test_markdown_guidelines_strength_and_comments_in_chromium(browser, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1100, "height": 600})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in MARKDOWN_PAIRS))
    store = LabelStore(tmp_path / "labels.sqlite", annotators_per_item=2, scale=5)
    store.add_items(load_items(pairs))
    first = {i.id: i.first for i in store.items()}
    app = create_app(store, TOKEN, guidelines=GUIDELINES)

    with live_server(app) as url:
        page.goto(f"{url}/?token={TOKEN}")
        page.fill("#name", "Alice")
        page.keyboard.press("Enter")
        # the guidelines come before the first item, rendered
        expect(page.locator("#guidelines")).to_be_visible()
        expect(page.locator("#guidelines-text h1")).to_have_text("How to judge")
        assert page.locator("#guidelines-text ol li").count() == 3
        assert page.locator("#task").is_hidden()
        page.keyboard.press("g")
        expect(page.locator("#task")).to_be_visible()

        # a chat prompt is a conversation with roles; Markdown is rendered, code in monospace
        expect(page.locator("#prompt-md .turn")).to_have_count(2)
        assert page.locator("#prompt-md .turn .role").all_text_contents() == ["system", "user"]
        code = page.locator("#md-a pre code").first
        expect(code).to_be_visible()
        assert "monospace" in code.evaluate("e => getComputedStyle(e).fontFamily")
        assert page.locator("#choices-5").is_visible() and page.locator("#choices-3").is_hidden()
        assert page.locator("#choices-5 button").all_text_contents() == [
            "1 A much better", "2 A slightly better", "3 Tie", "4 B slightly better", "5 B much better"
        ]
        if os.environ.get("PREFTUNE_WRITE_DOCS") == "1":
            page.screenshot(path=str(ROOT / "docs" / "labeling.png"), full_page=True)

        # the raw text is one key away, and back
        page.keyboard.press("r")
        expect(page.locator("#text-a")).to_be_visible()
        expect(page.locator("#md-a")).to_be_hidden()
        assert "```python" in page.text_content("#text-a")
        page.keyboard.press("r")
        expect(page.locator("#md-a")).to_be_visible()

        # the guidelines are one key away at any time, and the item waits
        shown_left = page.text_content("#text-a")
        page.keyboard.press("g")
        expect(page.locator("#guidelines")).to_be_visible()
        page.keyboard.press("g")
        expect(page.locator("#task")).to_be_visible()
        assert page.text_content("#text-a") == shown_left

        page.keyboard.press("2")  # A slightly better
        expect(page.locator("#status")).to_have_text("Saved: A is slightly better.")

        # the hostile payloads show as text and never run; the http(s) link stays a link
        expect(page.locator("#prompt-md")).to_have_text("Say hello <b>loudly</b>.")
        hostile = "#md-a" if page.text_content("#text-a") == HOSTILE else "#md-b"
        text = page.text_content(hostile)
        for payload in ("<script>", "onerror=", f"[click me](javascript:{PWNED})", '<a href="javascript:alert(1)">x</a>'):
            assert payload in text, payload
        assert page.locator("#task script, #task img, #task b, #task a[href^='javascript']").count() == 0
        link = page.locator(f"{hostile} a")
        expect(link).to_have_count(1)
        assert (link.get_attribute("href"), link.get_attribute("rel")) == ("https://example.org/hello", "noopener noreferrer nofollow")
        page.wait_for_timeout(200)
        assert page.title() == "preftune: which response is better?"

        # a comment goes with the next answer
        page.keyboard.press("c")
        expect(page.locator("#comment")).to_be_focused()
        page.keyboard.type("B runs <script>; A is fine")
        page.keyboard.press("Enter")
        expect(page.locator("#comment-note")).to_have_text("Your comment goes with your next answer: B runs <script>; A is fine")
        second_left = page.text_content("#text-a")
        page.keyboard.press("5")  # B much better
        expect(page.locator("#finished")).to_be_visible()
        expect(page.locator("#status")).to_have_text("Saved: B is much better, with your comment.")

    judgements = store.judgements()
    assert [(j.choice, j.strength, j.comment) for j in judgements] == [
        ("A", 1, None), ("B", 2, "B runs <script>; A is fine")
    ]
    assert judgements[1].shown_left == ("first" if second_left == first[judgements[1].item_id] else "second")


def test_dashboard_in_chromium(browser, tmp_path):
    import random

    from playwright.sync_api import expect

    from preftune.label.agreement import export_labels

    store = LabelStore(tmp_path / "labels.sqlite", annotators_per_item=3, scale=5, rng=random.Random(7))
    store.add_items(
        load_items_from(tmp_path, [{"prompt": f"Question {i}", "chosen": f"good answer {i}", "rejected": f"poor answer {i}"} for i in range(12)])
    )
    rng = random.Random(1)
    for name, share in (("Alice", 0.95), ("Bob", 0.9), ("Chen", 0.85), ("Dana", 0.6)):
        for _ in range(9):
            item = store.next_item(name)
            if item is None:
                break
            roll = rng.random()
            if roll < 0.15:
                store.judge(name, item["id"], "skip" if roll < 0.05 else "tie")
                continue
            good_left = item["a"].startswith("good")
            picks_good = rng.random() < share
            choice = "A" if picks_good == good_left else "B"
            store.judge(name, item["id"], choice, rng.choice([1, 2]), "clear" if rng.random() < 0.2 else None)
    with contextlib.closing(sqlite3.connect(store.path)) as con, con:  # answers that took people a while
        con.execute("UPDATE judgements SET shown_at = answered_at - (6 + (id * 7) % 25)")
    report = export_labels(store.path, tmp_path / "labelled.jsonl")

    page = browser.new_page(viewport={"width": 1100, "height": 600}, accept_downloads=True)
    with live_server(create_app(store, TOKEN, admin_token="lead-token")) as url:
        page.goto(f"{url}/admin")  # without its token
        expect(page.locator("#status")).to_have_text(
            "missing or wrong dashboard token: open /admin?token=... with the dashboard's own token"
        )
        assert page.locator("#dashboard").is_hidden()
        page.goto(f"{url}/admin?token={TOKEN}")  # the annotators' token does not open it
        expect(page.locator("#status")).to_contain_text("missing or wrong dashboard token")

        page.goto(f"{url}/admin?token=lead-token")
        expect(page.locator("#dashboard")).to_be_visible()
        expect(page.locator("#exported")).to_have_text(str(report["exported"]))
        expect(page.locator("#alpha")).to_have_text(f"{report['krippendorff_alpha_symmetric']:.3f}")
        expect(page.locator("#left-share")).to_have_text(f"{report['position_bias']['left_share']:.3f}")
        overview = store.overview()
        expect(page.locator("#items-complete")).to_have_text(f"{overview['complete']} / 12")
        expect(page.locator("#items-remaining")).to_have_text(str(overview["remaining"]))
        for name, figures in report["annotators"].items():
            row = page.locator(f"#annotators tr[data-annotator='{name}'] td")
            work = overview["annotators"][name]
            agree = f"{figures['agreement_with_majority']:.3f} of {figures['compared_with_majority']}"
            assert row.nth(6).text_content() == agree
            assert [row.nth(i).text_content() for i in (1, 3, 4, 8)] == [
                str(work["judgements"]), str(figures["ties"]), str(work["skips"]), f"{work['median_seconds']:.1f}"
            ]
        if os.environ.get("PREFTUNE_WRITE_DOCS") == "1":
            page.screenshot(path=str(ROOT / "docs" / "labeling-admin.png"), full_page=True)
        with page.expect_download() as info:
            page.click("button[data-download='jsonl']")
        download = info.value
        assert download.suggested_filename == "labelled.jsonl"
        assert Path(download.path()).read_bytes() == (tmp_path / "labelled.jsonl").read_bytes()


def load_items_from(tmp_path: Path, records: list[dict]) -> list:
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return load_items(path)
