"""The review queue in a real browser: headless Chromium (DevTools protocol: real key presses)
opens the queue of a small demo store (the sample, ingested and materialised through Dagster),
answers one item "same animal" with the S key and one "different animal" with the D key, and
the database holds both decisions, in force.

Skipped only when Chromium is not installed (scripts/system-deps.sh installs it).
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from deer_pipeline import settings
from deer_pipeline.review.app import ReviewConfig, create_app
from deer_pipeline_tests.identity.test_matching import deer_of
from deer_pipeline_tests.review.browser import CHROMIUM, Browser, demo_store
from deer_pipeline_tests.review.test_app import Server

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (scripts/system-deps.sh installs it)")

ITEM = "document.getElementById('answer') && document.getElementById('answer').dataset.item"


def test_answer_the_queue_with_the_keyboard(engine, tmp_path):
    demo_store(engine, tmp_path / "sample", n_cameras=1, n_days=2, n_deer=3, encounters_per_day=(3, 3))
    server = Server(create_app(ReviewConfig(engine=engine, crop_store=settings.crop_store_dir(),
                                            reviewer="keyboard", margin=1.0)))
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(server.url + "/queue")
        first = browser.wait_for(ITEM)
        assert first.startswith("decision|") or first.startswith("merge|")
        assert browser.evaluate("document.querySelectorAll('img.crop').length") >= 2
        assert browser.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        browser.press("s")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('flash') && "
                         "document.getElementById('flash').textContent.includes(': same')")
        second = browser.wait_for(ITEM)
        assert second != first
        browser.press("d")
        browser.wait_for("document.readyState === 'complete' && document.getElementById('flash') && "
                         "document.getElementById('flash').textContent.includes(': different')")
    finally:
        browser.close()
        server.stop()
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT kind, item_key, reviewer, source, detections_a, detections_b FROM identity_reviews_status "
            "WHERE undone_by IS NULL ORDER BY review_id")).all()
    assert [(r.item_key, r.reviewer, r.source) for r in rows] == [(first, "keyboard", "web"), (second, "keyboard", "web")]
    assert [r.kind for r in rows] == [("same" if first.startswith("decision|") else "merge"), "different"]
    d = deer_of(engine)
    same, different = rows
    assert len({d[x] for x in same.detections_a + same.detections_b}) == 1          # one animal now
    assert not {d[x] for x in different.detections_a} & {d[x] for x in different.detections_b}
