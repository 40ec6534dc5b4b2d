"""`preftune report`: one self-contained HTML file with every section, images that decode, and
nothing fetched from the network; checked as text and in headless Chromium.

With PREFTUNE_REPORT_DOCS=RUN_DIR the browser test also renders that run's report and writes its
screenshot to docs/report.png (how the picture in the README is made).
"""

from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.errors import PreftuneError
from preftune.eval.report import SECTIONS, build_report

ROOT = Path(__file__).resolve().parent.parent


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_has_every_section_and_decodable_images(tiny_sweep, capsys):
    root, _, _ = tiny_sweep
    run = root / "sweep" / "beta=0.1"
    assert main(["report", str(run), "-o", str(root / "report.html")]) == 0
    page = (root / "report.html").read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page
    assert 'class="missing"' not in page  # settings, curves, eval, frontier and samples all found
    import matplotlib.image

    images = _images(page)
    assert len(images) == 2  # training curves, frontier
    shapes = [matplotlib.image.imread(io.BytesIO(png)).shape for png in images]
    assert all(h > 300 and w > 600 for h, w, _ in shapes)
    # self-contained: no script, no stylesheet link, no source that is not embedded
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r'src="(?!data:)', page)
    # run texts are escaped: the prompt holding markup appears as text
    assert "Say &lt;script&gt;alert(1)&lt;/script&gt; &amp; go" in page
    # the eval table and the frontier row of this run
    assert "preference accuracy" in page and "KL(tuned || reference), per-token exact" in page
    assert '<tr class="this"><td>beta=0.1</td>' in page


def test_report_of_a_run_without_evaluation_says_what_is_missing(tiny_sweep, tmp_path):
    root, _, _ = tiny_sweep
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.resolved.yaml", "metrics.jsonl"):
        (run / name).write_bytes((root / "sweep" / "beta=0.1" / name).read_bytes())
    page = build_report(run).read_text()
    assert page.count('class="missing"') == 3  # evaluation, frontier, samples
    assert "preftune eval --model" in page and len(_images(page)) == 1
    with pytest.raises(PreftuneError, match="run folder not found"):
        build_report(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PreftuneError, match="not a run folder"):
        build_report(empty)


def test_report_in_chromium(tiny_sweep, browser):
    root, _, _ = tiny_sweep
    docs_run = os.environ.get("PREFTUNE_REPORT_DOCS")
    run = Path(docs_run) if docs_run else root / "sweep" / "beta=0.5"
    path = build_report(run, root / "chromium.html")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(path.resolve().as_uri())
    assert page.title().startswith("preftune report: ")
    widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) == 2 and all(w > 600 for w in widths)
    for section in SECTIONS:
        assert page.locator(f"#{section} h2").is_visible()
    if docs_run:
        page.screenshot(path=str(ROOT / "docs" / "report.png"), full_page=True)
