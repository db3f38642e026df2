"""The FastAPI service: every endpoint and every bad-request kind, auth, path safety, hot reload."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from t2c.data.errors import InvalidInput, StoreError
from t2c.data.store import open_store
from t2c.indexer.pipeline import index_folder
from t2c.service.app import create_app
from t2c.service.deps import Settings, get_store

CLIP = "python:tests.tiny_encoders:tiny_clip"
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (128, 128, 128), (0, 0, 0), (255, 128, 0), (128, 0, 255)]


def make_solid(folder: Path, colours, start: int = 0, size=(48, 40)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours, start):
        Image.new("RGB", size, c).save(folder / f"c{i:03d}.png")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    make_solid(root / "imgs", COLOURS)
    index_folder(root / "imgs", root / "st", CLIP, workers=0)
    return root / "st"


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(store)) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(store):
    with TestClient(create_app(store, api_key="s3cret-key")) as c:
        yield c


def brute_force_order(store, text):
    from t2c.query.concepts import concept_bank_for

    snap = open_store(store)
    v = concept_bank_for(snap).vector(text)
    s = np.asarray(snap.vectors) @ v
    return [int(snap.ids[i]) for i in np.argsort(-s, kind="stable")]


def assert_error(r, status, error=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error", "message", "hint"} and body["message"]
    if error:
        assert body["error"] == error, body
    return body


# ------------------------------------------------------------------------------------------- basics
def test_health_info_docs_page(client, store):
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/info").json()
    assert info["count"] == len(COLOURS) and info["encoder"] == CLIP and "width" in info["columns"]
    assert info["snapshot"] == open_store(store).name
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/api/search", "/api/images/{image_id}/thumb", "/api/images/{image_id}", "/api/audit",
              "/api/classify", "/api/describe/{image_id}", "/api/health", "/api/info"):
        assert p in paths
    page = client.get("/")
    assert page.status_code == 200 and "Query syntax" in page.text and "/static/app.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert client.get("/static/app.js").status_code == 200


def test_search_get_matches_brute_force_and_engine(client, store):
    r = client.get("/api/search", params={"q": "red@-1", "k": 4, "explain": "true"})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["total"] == len(COLOURS)
    assert [h["id"] for h in res["hits"]] == brute_force_order(store, "red")[:4]
    ex = res["hits"][0]["explanation"][0]
    assert ex["concept"] == "red" and ex["passed"] and ex["threshold"] == -1.0
    page2 = client.get("/api/search", params={"q": "red@-1", "k": 4, "offset": 4}).json()
    assert [h["id"] for h in page2["hits"]] == brute_force_order(store, "red")[4:8]
    assert "explanation" not in page2["hits"][0]


def test_search_post_tree_and_string(client, store):
    from t2c.query.ast import to_json
    from t2c.query.parse import parse

    tree = to_json(parse("blue@-1 AND width>=48"))
    a = client.post("/api/search", json={"query": tree, "k": 3, "explain": True}).json()
    b = client.get("/api/search", params={"q": "blue@-1 AND width>=48", "k": 3, "explain": "true"}).json()
    c = client.post("/api/search", json={"query": "blue@-1 AND width>=48", "k": 3}).json()
    assert [h["id"] for h in a["hits"]] == [h["id"] for h in b["hits"]] == [h["id"] for h in c["hits"]]
    assert a["total"] == len(COLOURS)
    none = client.post("/api/search", json={"query": to_json(parse("blue@-1 AND width>48"))}).json()
    assert none["total"] == 0 and none["hits"] == []


# ------------------------------------------------------------------------------------------- bad requests
def test_malformed_query_is_400_with_position(client):
    body = assert_error(client.get("/api/search", params={"q": "red AND (blue"}), 400, "QuerySyntaxError")
    assert isinstance(body["position"], int) and body["position"] >= 8
    assert_error(client.get("/api/search", params={"q": "   "}), 400)
    assert_error(client.get("/api/search", params={"q": "2*"}), 400, "QuerySyntaxError")
    assert_error(client.get("/api/search", params={"q": "nosuchcolumn>3"}), 400)


def test_huge_queries_rejected(client):
    assert_error(client.get("/api/search", params={"q": "a" * 2001}), 413, "PayloadTooLarge")
    many = " OR ".join(f"w{i}" for i in range(40))
    body = assert_error(client.get("/api/search", params={"q": many}), 400)
    assert "too many terms" in body["message"]
    tree = {"type": "or", "children": [{"type": "concept", "text": f"w{i}"} for i in range(40)]}
    assert "too many terms" in assert_error(client.post("/api/search", json={"query": tree}), 400)["message"]


def test_bad_params_are_clear_422(client):
    body = assert_error(client.get("/api/search"), 422, "InvalidParameter")
    assert "q" in body["message"]
    assert "k" in assert_error(client.get("/api/search", params={"q": "red", "k": 0}), 422)["message"]
    assert "200" in assert_error(client.get("/api/search", params={"q": "red", "k": 201}), 422)["message"]
    assert_error(client.get("/api/search", params={"q": "red", "offset": -1}), 422)
    assert_error(client.get("/api/search", params={"q": "red", "offset": 10**6}), 422)
    assert_error(client.get("/api/search", params={"q": "red", "k": "many"}), 422)
    assert_error(client.get("/api/images/abc"), 422)
    assert_error(client.get("/api/images/-1"), 422)
    assert_error(client.get("/api/images/0/thumb", params={"size": 2}), 422)


def test_bad_json_bodies(client):
    body = assert_error(client.post("/api/search", json={"query": {"type": "concept", "txt": "red"}}), 400)
    assert "$" in body["message"]
    assert_error(client.post("/api/search", json={"query": {"type": "concept", "text": "r"}, "bogus": 1}), 422)
    assert_error(client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(client.post("/api/search", json=[1, 2]), 422)
    assert_error(client.post("/api/search", json={"query": {"type": "concept", "text": "red", "weight": -2}}), 400)


def test_oversized_bodies_413(client):
    big = {"query": {"type": "concept", "text": "x" * (300 << 10)}}
    assert_error(client.post("/api/search", json=big), 413, "PayloadTooLarge")

    def chunks():  # streamed without Content-Length (chunked)
        for _ in range(64):
            yield b" " * (8 << 10)

    r = client.post("/api/search", content=chunks(), headers={"content-type": "application/json"})
    assert_error(r, 413, "PayloadTooLarge")
    assert_error(client.post("/api/audit", content=b"{}", headers={"content-length": "999999999",
                                                                    "content-type": "application/json"}), 413)


def test_unknown_ids_and_routes(client):
    assert_error(client.get("/api/images/9999"), 404, "NotFound")
    assert_error(client.get("/api/images/9999/thumb"), 404, "NotFound")
    assert_error(client.get("/api/nope"), 404)
    assert_error(client.delete("/api/search"), 405)


# ------------------------------------------------------------------------------------------- images
def test_image_meta_and_thumbnail(client, store):
    meta = client.get("/api/images/2").json()
    assert meta["id"] == 2 and meta["width"] == 48 and meta["height"] == 40 and meta["relpath"] == "c002.png"
    r = client.get("/api/images/2/thumb", params={"size": 16})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    from io import BytesIO

    img = Image.open(BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) == 16
    px = np.asarray(img.convert("RGB"), float).mean((0, 1))
    assert np.allclose(px, COLOURS[2], atol=12)
    big = Image.open(BytesIO(client.get("/api/images/2/thumb", params={"size": 5000}).content))
    assert max(big.size) == 48  # never upscaled, capped by the server's limit
    cache = client.app.state.thumbs
    hits = cache.hits
    r2 = client.get("/api/images/2/thumb", params={"size": 16})
    assert r2.content == r.content and cache.hits == hits + 1
    assert client.get("/api/images/2/thumb", params={"size": 16},
                      headers={"If-None-Match": r.headers["etag"]}).status_code == 304


def test_thumbnail_never_serves_outside_roots(store, tmp_path, monkeypatch):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    with TestClient(create_app(store)) as c:
        served = c.app.state.store
        real_image = served.image
        root = served.info().roots[0]

        def rows_with(path):
            def image(image_id):
                img = real_image(image_id)
                return type(img)(img.id, path, dict(img.metadata, path=path, content_hash="x" + path), img.roots)
            return image

        for bad in (f"{root}/../{secret.name}", str(secret), f"{root}/../../../../../../etc/passwd"):
            monkeypatch.setattr(served, "image", rows_with(bad))
            assert_error(c.get("/api/images/0/thumb"), 403, "Forbidden")
        # a symlink inside the indexed folder pointing outside it
        link = Path(root) / "link.png"
        os.symlink(secret, link)
        try:
            monkeypatch.setattr(served, "image", rows_with(str(link)))
            assert_error(c.get("/api/images/0/thumb"), 403, "Forbidden")
        finally:
            link.unlink()
        # a catalogued file that has since been deleted
        monkeypatch.setattr(served, "image", rows_with(f"{root}/gone.png"))
        assert_error(c.get("/api/images/0/thumb"), 404)
        # a catalogued file replaced by garbage: 422, not 500
        junk = Path(root) / "junk.png"
        junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
        try:
            monkeypatch.setattr(served, "image", rows_with(str(junk)))
            assert_error(c.get("/api/images/0/thumb"), 422, "Unreadable")
        finally:
            junk.unlink()


# ------------------------------------------------------------------------------------------- auth
def test_api_key_required_everywhere_but_health(keyed):
    assert keyed.get("/api/health").status_code == 200
    assert keyed.get("/").status_code == 200  # the page itself holds no data; it asks for the key
    for method, url, kw in [("get", "/api/info", {}), ("get", "/api/search?q=red", {}),
                            ("post", "/api/search", {"json": {"query": "red"}}), ("get", "/api/images/0", {}),
                            ("get", "/api/images/0/thumb", {}), ("get", "/api/audit?concepts=red", {}),
                            ("post", "/api/audit", {"json": {"concepts": ["red"]}}),
                            ("post", "/api/classify", {"json": {"labels": ["red", "blue"]}}),
                            ("get", "/api/describe/0", {})]:
        r = getattr(keyed, method)(url, **kw)
        assert_error(r, 401, "Unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
        assert_error(getattr(keyed, method)(url, headers={"X-API-Key": "wrong"}, **kw), 401)
    assert keyed.get("/api/info", headers={"X-API-Key": "s3cret-key"}).status_code == 200
    assert keyed.get("/api/info", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
    assert keyed.get("/api/info", headers={"Authorization": "Basic s3cret-key"}).status_code == 401


def test_cli_serve_requires_nonempty_key_env(monkeypatch):
    import typer
    from typer.testing import CliRunner

    from t2c.service.cli_serve import register, resolve_api_key

    monkeypatch.setenv("T2C_TEST_KEY", "")
    with pytest.raises(InvalidInput, match="T2C_TEST_KEY"):
        resolve_api_key("T2C_TEST_KEY")
    monkeypatch.delenv("T2C_TEST_KEY")
    with pytest.raises(InvalidInput):
        resolve_api_key("T2C_TEST_KEY")
    monkeypatch.setenv("T2C_TEST_KEY", "abc")
    assert resolve_api_key("T2C_TEST_KEY") == "abc" and resolve_api_key(None) is None
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    monkeypatch.setenv("T2C_TEST_KEY", "")
    res = CliRunner().invoke(app, ["serve", "nowhere", "--api-key-env", "T2C_TEST_KEY"])
    assert res.exit_code != 0 and isinstance(res.exception, InvalidInput)
    res = CliRunner().invoke(app, ["serve", "--help"])
    assert "--api-key-env" in res.output and "127.0.0.1" in res.output


def test_missing_store_fails_startup(tmp_path):
    from t2c.data.errors import NotFound

    with pytest.raises(NotFound):
        with TestClient(create_app(tmp_path / "none")):
            pass


# ------------------------------------------------------------------------------------------- audit & co
def test_audit_get_and_post(client, store):
    r = client.get("/api/audit", params=[("concepts", "red"), ("concepts", "blue"), ("top", 3)])
    assert r.status_code == 200, r.text
    rows = r.json()["concepts"]
    assert [c["concept"] for c in rows] == ["red", "blue"]
    for c in rows:
        assert 0 <= c["ci_low"] <= c["prevalence"] <= c["ci_high"] <= 1 and len(c["examples"]) == 3
    assert rows[0]["examples"] == brute_force_order(store, "red")[:3] or len(set(rows[0]["examples"])) == 3
    p = client.post("/api/audit", json={"concepts": ["red", "blue"], "top": 3}).json()
    assert p["concepts"][0]["prevalence"] == rows[0]["prevalence"]
    assert_error(client.post("/api/audit", json={"concepts": []}), 400)
    assert_error(client.post("/api/audit", json={"concepts": ["  "]}), 400)
    assert_error(client.post("/api/audit", json={"concepts": [f"c{i}" for i in range(40)]}), 413)
    assert_error(client.post("/api/audit", json={"concepts": ["x" * 300]}), 413)
    assert_error(client.post("/api/audit", json={"concepts": "red"}), 422)
    assert_error(client.get("/api/audit"), 422)


def test_classify_and_describe(client, store):
    r = client.post("/api/classify", json={"labels": ["red", "blue", "green"], "limit": 3})
    assert r.status_code == 200, r.text
    out = r.json()
    assert sum(out["counts"].values()) == len(COLOURS) and len(out["predictions"]) == 3
    assert not (store / "annotations").exists() or not any((store / "annotations").iterdir())  # read-only
    assert_error(client.post("/api/classify", json={"labels": ["red"]}), 400)
    assert_error(client.post("/api/classify", json={}), 422)
    r = client.get("/api/describe/1")
    if r.status_code == 200:
        assert isinstance(r.json()["caption"], str) and r.json()["id"] == 1
    else:  # no query.describe in this build, or no caption decoder for the tiny test CLIP
        assert "describe" in assert_error(r, 501, "NotAvailable")["message"]
    try:
        import t2c.query.describe  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        assert_error(client.get("/api/describe/9999"), 404, "NotFound")


# ------------------------------------------------------------------------------------------- errors
class _Boom:
    def __init__(self, exc):
        self.exc = exc

    def search(self, *a, **k):
        raise self.exc


def test_typed_errors_and_true_bugs(store):
    app = create_app(store)
    with TestClient(app, raise_server_exceptions=False) as c:
        app.dependency_overrides[get_store] = lambda: _Boom(StoreError("store damaged", "re-index"))
        body = assert_error(c.get("/api/search", params={"q": "red"}), 409, "StoreError")
        assert body["hint"] == "re-index"
        app.dependency_overrides[get_store] = lambda: _Boom(RuntimeError("secret detail"))
        r = c.get("/api/search", params={"q": "red"})
        body = assert_error(r, 500, "InternalError")
        assert "secret" not in r.text


# ------------------------------------------------------------------------------------------- hot reload
def test_serves_through_reindex_and_sees_new_snapshot(tmp_path):
    imgs, st = tmp_path / "imgs", tmp_path / "st"
    make_solid(imgs, COLOURS[:6])
    index_folder(imgs, st, CLIP, workers=0)
    settings = Settings(store_path=st, reload_interval=0.05)
    with TestClient(create_app(st, settings=settings)) as c:
        first_snapshot = c.get("/api/health").json()["snapshot"]
        first = c.get("/api/search", params={"q": "red@-1", "k": 50}).json()
        assert first["total"] == 6
        statuses, totals, stop = [], set(), threading.Event()

        def hammer():
            while not stop.is_set():
                r = c.get("/api/search", params={"q": "red@-1", "k": 50})
                statuses.append(r.status_code)
                if r.status_code == 200:
                    totals.add(r.json()["total"])
                    assert len(r.json()["hits"]) == r.json()["total"]  # one consistent snapshot
                th = c.get("/api/images/0/thumb")
                statuses.append(th.status_code)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            make_solid(imgs, COLOURS[6:], start=6)
            index_folder(imgs, st, CLIP, workers=0)
            deadline = time.time() + 10
            while time.time() < deadline and 10 not in totals:
                time.sleep(0.05)
        finally:
            stop.set()
            t.join()
        assert statuses and set(statuses) == {200}, set(statuses)
        assert totals <= {6, 10} and 10 in totals
        res = c.get("/api/search", params={"q": "red@-1", "k": 50}).json()
        assert res["total"] == 10 and {h["id"] for h in res["hits"]} >= {6, 7, 8, 9}
        assert c.get("/api/images/9").json()["relpath"] == "c009.png"
        assert c.get("/api/health").json()["snapshot"] == open_store(st).name != first_snapshot


def test_warm_up_builds_the_text_encoder_once_and_swallows_errors(monkeypatch):
    import threading
    from types import SimpleNamespace

    import t2c.indexer.encoders
    from t2c.query.concepts import ConceptBank
    from t2c.service.app import _warm_text_encoder

    built = []
    monkeypatch.setattr(t2c.indexer.encoders, "make_encoder", lambda spec, **kw: built.append(spec) or object())
    bank = ConceptBank("world:clip", templates=["{}"])
    store = SimpleNamespace(warm_up=lambda: bank.encoder)
    threads = [threading.Thread(target=_warm_text_encoder, args=(store,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == ["world:clip"] and bank.encoder is not None  # one build, however many callers race

    def broken():
        raise RuntimeError("no live snapshot")

    _warm_text_encoder(SimpleNamespace(warm_up=broken))  # warm-up never raises; the first query reports errors
