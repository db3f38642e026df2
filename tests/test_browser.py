"""End to end in headless Chromium: type a query in the web page, see the expected images.

Needs Debian's chromium (``apt-get install -y chromium``) and the ``playwright`` Python package; the
Playwright-managed browsers are not used (``playwright install`` needs network).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CLIP = "python:tests.tiny_encoders:tiny_clip"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOT = Path(os.environ.get("T2C_SCREENSHOT", "/tmp/t2c-browser-test.png"))  # docs/make_screenshot.py makes the README's

pytestmark = pytest.mark.browser


def _needs():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    from t2c.indexer.pipeline import index_folder
    from t2c.service.app import create_app

    root = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(30):  # solid colours, slightly textured so thumbnails are not all alike
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 6, (64, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / "imgs" / f"img{i:03d}.png")
    index_folder(root / "imgs", root / "st", CLIP, workers=0)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(root / "st"), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", root / "st"
    srv.should_exit = True
    th.join(timeout=10)


def brute_force_top(store, text, k):
    from t2c.data.store import open_store
    from t2c.query.concepts import concept_bank_for

    snap = open_store(store)
    s = np.asarray(snap.vectors) @ concept_bank_for(snap).vector(text)
    return [int(snap.ids[i]) for i in np.argsort(-s, kind="stable")[:k]]


@contextlib.contextmanager
def red_page(url):
    """The page in headless Chromium after searching "red@-1" (12 hits); yields (page, page errors)."""
    sync_api = _needs()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 820})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_selector("#store-info:has-text('30 images')")
            page.select_option("#k", "12")
            page.fill("#q", "red@-1")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('[data-testid=hit]').length === 12")
            yield page, errors
        finally:
            browser.close()


def test_type_query_see_expected_images(server):
    url, store = server
    expected = brute_force_top(store, "red", 12)
    with red_page(url) as (page, errors):
        ids = [int(x) for x in page.eval_on_selector_all("[data-testid=hit]", "els => els.map(e => e.dataset.id)")]
        assert ids == expected
        assert "30 matching images" in page.inner_text("#search-status")
        # thumbnails loaded (blob URLs with real pixels) and explanations on hover
        page.wait_for_function("[...document.querySelectorAll('.hit img')].every(i => i.complete && i.naturalWidth > 0)")
        title = page.get_attribute("[data-testid=hit]", "title")
        assert "red" in title and "threshold" in title
        page.hover("[data-testid=hit]")
        SHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SHOT), full_page=False)
        # paging
        page.click("#next")
        page.wait_for_selector("#page-info:has-text('page 2 of 3')")
        ids2 = [int(x) for x in page.eval_on_selector_all("[data-testid=hit]", "els => els.map(e => e.dataset.id)")]
        assert ids2 == brute_force_top(store, "red", 24)[12:]
        # a malformed query shows the error with its position, not a crash
        page.fill("#q", "red AND (")
        page.click("#go")
        page.wait_for_selector("#search-status.error")
        assert "QuerySyntaxError" in page.inner_text("#search-status") and "^" in page.inner_text("#search-status")
        # audit view: bars with CI and example thumbnails
        page.click("#tab-audit")
        page.fill("#concepts", "red, blue")
        page.click("#run-audit")
        page.wait_for_function("document.querySelectorAll('[data-testid=audit-row]').length === 2")
        assert page.locator(".audit-row .examples img").count() == 12
        assert not errors, errors
    assert SHOT.stat().st_size > 1000
