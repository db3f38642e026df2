"""The web page's query by example and duplicates view, end to end in headless Chromium (see test_browser.py)."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.test_browser import red_page, server  # noqa: F401 (the server fixture)

pytestmark = pytest.mark.browser


def _similar_top(store, image_id, k):
    from t2c.data.store import open_store
    from t2c.query.engine import Engine

    return [h.id for h in Engine(open_store(store)).search(f"like:{image_id}", k=k).hits]


def test_more_like_this_upload_drop_and_duplicates(server):  # noqa: F811
    url, store = server
    with red_page(url) as (page, errors):
        first = int(page.get_attribute("[data-testid=hit]", "data-id"))
        # "more like this" on a result: the query becomes like:ID and the answer is the engine's
        page.click("[data-testid=more-like]")
        # q and "Searching…" are set in the same handler: once q changed, wait for the new answer
        page.wait_for_function(f"document.getElementById('q').value === 'like:{first}' && "
                               f"!document.getElementById('search-status').textContent.startsWith('Searching')")
        page.wait_for_function(f"document.querySelector('[data-testid=hit]').dataset.id === '{first}'")
        ids = [int(x) for x in page.eval_on_selector_all("[data-testid=hit]", "els => els.map(e => e.dataset.id)")]
        assert ids == _similar_top(store, first, len(ids))
        assert not page.locator("#lightbox").is_visible()  # the button does not open the lightbox
        # upload an indexed image's file: it comes back first, and the query text carries the upload
        from t2c.data.store import open_store

        snap = open_store(store)
        target, path = snap.catalog().execute("SELECT id, path FROM images ORDER BY id LIMIT 1 OFFSET 7").fetchone()
        page.fill("#q", "width>=10")
        page.set_input_files("#image", path)
        page.wait_for_function("document.getElementById('q').value.startsWith('like:\"sha256:') && "
                               "!document.getElementById('search-status').textContent.startsWith('Searching')")
        assert page.input_value("#q").endswith(" AND width>=10")
        page.wait_for_function(f"document.querySelector('[data-testid=hit]').dataset.id === '{target}'")
        # drop an image onto the search box
        other, opath = snap.catalog().execute("SELECT id, path FROM images ORDER BY id LIMIT 1 OFFSET 3").fetchone()
        page.fill("#q", "")
        b64 = base64.b64encode(open(opath, "rb").read()).decode()
        page.evaluate("""(b64) => {
            const bin = atob(b64); const arr = new Uint8Array(bin.length);
            for (let i = 0; i < bin.length; i++) arr[i] = bin.charCodeAt(i);
            const dt = new DataTransfer(); dt.items.add(new File([arr], "drop.png", {type: "image/png"}));
            document.getElementById("search-form").dispatchEvent(
                new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""", b64)
        page.wait_for_function(f"document.querySelector('[data-testid=hit]') && "
                               f"document.getElementById('q').value.startsWith('like:') && "
                               f"!document.getElementById('search-status').textContent.startsWith('Searching') && "
                               f"document.querySelector('[data-testid=hit]').dataset.id === '{other}'")
        # a file that is not an image: the indexing reason, no crash
        page.set_input_files("#image", files=[{"name": "x.png", "mimeType": "image/png", "buffer": b"not an image"}])
        page.wait_for_selector("#search-status.error")
        assert "not_an_image" in page.inner_text("#search-status") or "not a supported image" in \
            page.inner_text("#search-status")
        # the duplicates view
        page.click("#tab-dups")
        page.click("#run-dups")
        page.wait_for_selector("#dups-status:has-text('groups of duplicates')")
        n = page.locator("[data-testid=dup-group]").count()
        from t2c.query.duplicates import find_duplicates

        assert n == len(find_duplicates(snap).groups)
        assert not errors, errors
    assert np.isfinite(first)
