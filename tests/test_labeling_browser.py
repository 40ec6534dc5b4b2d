"""The labeling page in real headless Chromium: name, keyboard labeling, undo, and what the database holds.

Needs Debian's `chromium` and the `playwright` package (its own browser downloads are never used).
Skipped when either is missing, unless PREFTUNE_REQUIRE_BROWSER=1 (as in CI), which makes that a
failure. With PREFTUNE_WRITE_DOCS=1 the test also writes the screenshot in docs/labeling.png.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from live_server import live_server

from preftune.labeling import LabelStore, create_app, load_items

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
        if os.environ.get("PREFTUNE_WRITE_DOCS") == "1":
            page.screenshot(path=str(ROOT / "docs" / "labeling.png"), full_page=True)

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
