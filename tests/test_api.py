"""The public Python API as a user calls it: ``import t2c``, ``t2c.open``, results, errors, concurrency."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import t2c
from tests.test_pipeline import CLIP, CNN, REPO, make_images

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
           (128, 128, 128), (0, 0, 0), (255, 128, 0), (128, 0, 255)]


def make_solid(folder: Path, colours, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(colours, start):
        Image.new("RGB", (40, 32 + i), c).save(folder / f"c{i:03d}.png")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    make_solid(root / "imgs", COLOURS)
    rep = t2c.index(root / "imgs", root / "st", encoder=CLIP, workers=0)
    assert rep.added == len(COLOURS)
    return root


@pytest.fixture()
def store(built):
    with t2c.open(built / "st") as s:
        yield s


def brute_force(store: t2c.Store, text: str) -> list[int]:
    """Ids by descending cosine score, computed from the raw vectors (the reference answer)."""
    from t2c.data.store import open_store
    from t2c.query.concepts import concept_bank_for

    snap = open_store(store.path)
    s = np.asarray(snap.vectors) @ concept_bank_for(snap).vector(text)
    return [int(snap.ids[i]) for i in np.argsort(-s, kind="stable")]


# ------------------------------------------------------------------------------------------------ import
def test_import_is_light_and_public_names_are_complete():
    code = ("import sys, t2c; assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import';"
            "print(t2c.__version__, sorted(set(t2c.__all__) - set(dir(t2c))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    version, missing = out.stdout.split(" ", 1)
    assert version == t2c.__version__ and missing.strip() == "[]"
    for name in t2c.__all__:
        assert getattr(t2c, name) is not None
    namespace: dict = {}
    exec("from t2c import *", namespace)  # noqa: S102 - a star import must not shadow the builtin open()
    assert "open" not in namespace and "index" in namespace and callable(t2c.open)
    assert not [n for n in t2c.__all__ if n.startswith("_") and n != "__version__"]
    with pytest.raises(AttributeError):
        t2c.no_such_name  # noqa: B018
    for fn in (t2c.open, t2c.index, t2c.encoders, t2c.align, t2c.Store.search, t2c.Store.audit, t2c.Store.drift,
               t2c.Store.classify, t2c.Store.describe, t2c.Store.image, t2c.Store.info, t2c.Store.table,
               t2c.Store.duplicates):
        assert "Example" in (fn.__doc__ or ""), fn.__name__


# ------------------------------------------------------------------------------------------------ open / errors
def test_open_missing_store_and_empty_folder(tmp_path):
    with pytest.raises(t2c.NotFound) as e:
        t2c.open(tmp_path / "nowhere")
    assert "does not exist" in e.value.message and "t2c index" in e.value.hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(t2c.StoreError) as e:
        t2c.open(tmp_path / "empty")
    assert e.value.hint


def test_bad_queries_raise_typed_errors(store):
    with pytest.raises(t2c.QuerySyntaxError) as e:
        store.search("red AND (blue")
    assert e.value.position >= 8 and e.value.hint and isinstance(e.value, t2c.InvalidInput)
    with pytest.raises(t2c.InvalidInput, match="unknown|column"):
        store.search("nosuchcolumn>3")
    with pytest.raises(t2c.InvalidInput, match="string or a JSON object"):
        store.search(42)  # type: ignore[arg-type]
    with pytest.raises(t2c.QuerySyntaxError):
        store.search(" AND ".join(f"c{i}" for i in range(40)), max_terms=8)
    with pytest.raises(t2c.InvalidInput):
        store.search("red", k=0)
    with pytest.raises(t2c.T2CError):
        store.image(10_000)


# ------------------------------------------------------------------------------------------------ search
def test_search_iterates_and_converts(store):
    res = store.search("red@-1", k=4, explain=True)
    assert isinstance(res, t2c.SearchResult) and res.total == len(COLOURS) and len(res) == 4
    hits = list(res)
    assert all(isinstance(h, t2c.Hit) for h in hits) and hits == res.hits and res[0] == hits[0]
    assert [h.id for h in hits] == res.ids == brute_force(store, "red")[:4]
    assert res.paths == [h.path for h in hits] and all(Path(p).is_file() for p in res.paths)
    assert hits[0].explanation[0]["concept"] == "red" and hits[0].explanation[0]["threshold"] == -1.0
    table = res.to_arrow()
    assert table.column_names[:3] == ["id", "path", "score"] and table.num_rows == 4
    assert table.column("id").to_pylist() == res.ids
    assert str(table.schema.field("id").type) == "int64"
    df = res.to_pandas()
    assert list(df["path"]) == res.paths and df["score"].is_monotonic_decreasing
    d = res.to_dict()
    assert d["snapshot"] == store.snapshot and [h["id"] for h in d["hits"]] == res.ids
    json.dumps(d)
    page2 = store.search({"type": "concept", "text": "red", "threshold": -1.0}, k=4, offset=4)
    assert page2.ids == brute_force(store, "red")[4:8] and page2.hits[0].explanation is None
    empty = store.search("red@-1 AND width>1000")
    assert empty.total == 0 and list(empty) == [] and empty.paths == []
    assert empty.to_arrow().column_names == ["id", "path", "score"] and empty.to_pandas().empty


def test_to_pandas_without_pandas_is_a_typed_error(store, monkeypatch):
    res = store.search("red@-1", k=2)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(t2c.NotAvailable, match="pandas") as e:
        res.to_pandas()
    assert "to_arrow" in e.value.hint
    assert res.to_arrow().num_rows == 2


# ------------------------------------------------------------------------------------------------ audit & co
def test_audit_rows_arrow_and_paths(store):
    res = store.audit(["red", "blue"], top=3)
    rows = list(res)
    assert [p.concept for p in rows] == ["red", "blue"] and all(isinstance(p, t2c.Prevalence) for p in rows)
    for p in rows:
        assert 0 <= p.ci_low <= p.prevalence <= p.ci_high <= 1 and len(p.examples) == 3
    assert res.n == len(COLOURS) and res.snapshot == store.snapshot
    t = res.to_arrow()
    assert t.column("concept").to_pylist() == ["red", "blue"]
    assert t.column("examples").to_pylist()[0] == list(rows[0].examples)
    assert [Path(p).name for p in res.paths["red"]] == [f"c{i:03d}.png" for i in rows[0].examples]
    assert res.to_dict()["concepts"][0]["prevalence"] == rows[0].prevalence
    with pytest.raises(t2c.InvalidInput):
        store.audit([])


def test_drift_with_a_store_or_a_path(store, built, tmp_path):
    make_solid(tmp_path / "b", [COLOURS[0]] * 6 + COLOURS[1:4], start=0)
    t2c.index(tmp_path / "b", tmp_path / "stb", encoder=CLIP, workers=0)
    with t2c.open(tmp_path / "stb") as other:
        res = store.drift(other, ["red", "blue"], top=2)
    again = store.drift(tmp_path / "stb", ["red", "blue"], top=2)
    assert [s.concept for s in res] == [s.concept for s in again]
    assert [s.rank for s in res] == [1, 2] and all(isinstance(s, t2c.Shift) for s in res)
    assert res.n_a == len(COLOURS) and res.n_b == 9 and res.to_arrow().num_rows == 2
    in_a, in_b = res.paths["red"]
    assert len(in_a) == len(in_b) == 2 and all(str(tmp_path / "b") in p for p in in_b)
    out = res.write_html(tmp_path / "drift.html")
    assert out.read_text().startswith("<!doctype html>")
    with pytest.raises(t2c.UnknownChoice):
        store.drift(other, ["red"], correction="bonferroni")


def test_classify_every_image_without_writing(store, built):
    res = store.classify(["red", "green", "blue"])
    assert len(res) == len(COLOURS) == sum(res.counts.values())
    assert all(isinstance(p, t2c.Prediction) for p in res) and res.annotations is None
    assert not (built / "st" / "annotations").exists()
    df = res.to_pandas()
    assert list(df.columns) == ["id", "path", "label", "score", "confidence"]
    assert set(df["label"]) <= {"red", "green", "blue"} and list(df["path"]) == res.paths
    d = res.to_dict(limit=3)
    assert len(d["predictions"]) == 3 and d["predictions_truncated"] and d["snapshot"] == store.snapshot


def test_image_info_describe(store, built):
    img = store.image(2)
    assert isinstance(img, t2c.ImageRecord) and Path(img.path).name == "c002.png"
    assert img.metadata["width"] == 40 and img.metadata["height"] == 34
    assert img.file() == os.path.realpath(img.path)
    pic = img.load(max_side=16)
    assert max(pic.size) == 16 and np.allclose(np.asarray(pic).mean((0, 1)), COLOURS[2], atol=12)
    json.dumps(img.to_dict())
    info = store.info(errors=True)
    assert info.count == len(COLOURS) and info.encoder == CLIP and info.snapshot == store.snapshot
    assert "width" in info.columns and info.unreadable == [] and str(built / "imgs") in info.roots[0]
    assert "unreadable" not in store.info().to_dict()
    with pytest.raises((t2c.NotAvailable, t2c.NotFound)):  # the tiny test CLIP has no caption decoder
        store.describe(1)
    with pytest.raises(t2c.NotFound):
        store.describe(9999)


# ------------------------------------------------------------------------------------------------ lifecycle
def test_context_manager_closes_and_threads_share_a_store(built):
    with t2c.open(built / "st") as s:
        expected = s.search("blue@-1", k=5).ids
        answers, errors = [], []

        def ask():
            try:
                for _ in range(5):
                    answers.append(s.search("blue@-1", k=5).ids)
                    s.audit(["blue"], top=1)
            except Exception as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(answers) == 20 and all(a == expected for a in answers)
    with pytest.raises(t2c.StoreError, match="closed"):
        s.search("blue")
    assert "closed" in repr(s)
    s.close()  # closing twice is fine


INDEX_SCRIPT = """
import sys, t2c
rep = t2c.index(sys.argv[1], sys.argv[2], encoder=sys.argv[3], workers=0, part_size=4)
print(rep.added, rep.snapshot)
"""


def test_second_process_indexing_while_an_open_store_keeps_answering(tmp_path):
    imgs, st = tmp_path / "imgs", tmp_path / "st"
    make_solid(imgs, COLOURS[:6])
    t2c.index(imgs, st, encoder=CLIP, workers=0)
    make_solid(imgs, COLOURS[6:] * 3, start=6)  # 12 more images for the second process
    pinned = t2c.open(st, refresh_interval=None)
    following = t2c.open(st, refresh_interval=0.05)
    first = pinned.snapshot
    env = dict(os.environ, PYTHONPATH=REPO, T2C_TEST_ENCODE_DELAY="0.1", T2C_CACHE_DIR="")
    proc = subprocess.Popen([sys.executable, "-c", INDEX_SCRIPT, str(imgs), str(st), CLIP], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    totals, answered_while_running = set(), 0
    try:
        while proc.poll() is None:
            assert pinned.search("red@-1", k=50).total == 6
            res = following.search("red@-1", k=50)
            assert len(res) == res.total  # one consistent snapshot per call
            totals.add(res.total)
            answered_while_running += 1
            time.sleep(0.01)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.split()[0] == "12" and answered_while_running >= 5
    assert pinned.snapshot == first and pinned.search("red@-1", k=50).total == 6
    time.sleep(0.06)
    assert following.search("red@-1", k=50).total == 18 and following.snapshot == out.split()[1]
    assert totals <= {6, 18}
    assert pinned.refresh() is True and pinned.count == 18 and pinned.refresh() is False
    pinned.close()
    following.close()


# ------------------------------------------------------------------------------------------------ writing side
def test_encoders_and_align(tmp_path):
    found = t2c.encoders()
    assert "world:clip" in found.specs and all(isinstance(e, t2c.EncoderInfo) for e in found)
    assert "stages" in found.options and found.to_pandas().shape[0] == len(found)
    make_images(tmp_path / "imgs", 30)
    al = t2c.align(tmp_path / "imgs", encoder=CNN, clip=CLIP, max_images=30, out=tmp_path / "a.safetensors")
    assert isinstance(al, t2c.Aligner) and (tmp_path / "a.safetensors").is_file()
    assert al.meta["n_train"] + al.meta["n_heldout"] == 30 and np.isfinite(al.r2_heldout)
    rep = t2c.index(tmp_path / "imgs", tmp_path / "st", encoder=CNN, aligner=tmp_path / "a.safetensors", workers=0)
    assert isinstance(rep, t2c.IndexReport) and rep.added == 30
    with pytest.raises(t2c.InvalidInput, match="safetensors"):
        t2c.align(tmp_path / "imgs", encoder=CNN, clip=CLIP, out=tmp_path / "a.pt")
    with pytest.raises(t2c.UnknownChoice):
        t2c.index(tmp_path / "imgs", tmp_path / "st", encoder=CNN, engine="spark")
    with pytest.raises(t2c.AlignerError):
        t2c.index(tmp_path / "imgs", tmp_path / "st2", encoder=CNN, workers=0)


def test_table_returns_catalog_rows_and_user_columns(tmp_path):
    make_solid(tmp_path / "imgs", COLOURS[:4])
    split = {f"c{i:03d}.png": {"split": "val" if i % 2 else "train"} for i in range(4)}
    t2c.index(tmp_path / "imgs", tmp_path / "st", encoder=CLIP, workers=0, columns=split)
    with t2c.open(tmp_path / "st") as store:
        t = store.table(["id", "relpath", "split"])
        assert t.column_names == ["id", "relpath", "split"] and t.column("id").to_pylist() == [0, 1, 2, 3]
        assert t.column("split").to_pylist() == ["train", "val", "train", "val"]
        assert {"path", "width", "split"} <= set(store.table().column_names)
        assert store.search('red@-1 AND split="val"', k=10).total == 2
        with pytest.raises(t2c.UnknownChoice):
            store.table(["id", "nope"])


def test_public_api_has_complete_type_hints():
    import inspect

    def check(fn, where):
        sig = inspect.signature(fn)
        missing = [n for n, p in sig.parameters.items() if n not in ("self", "cls")
                   and p.annotation is inspect.Parameter.empty]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (where, missing)

    for name in ("open", "index", "encoders", "align"):
        check(getattr(t2c, name), name)
    for cls in (t2c.Store, t2c.SearchResult, t2c.AuditResult, t2c.DriftResult, t2c.ClassifyResult, t2c.EncoderList,
                t2c.DuplicatesResult, t2c.DuplicateGroup,
                t2c.ImageRecord, t2c.Hit, t2c.StoreInfo, t2c.Description):
        for name, member in inspect.getmembers(cls):
            if name.startswith("_") and name not in ("__init__", "__iter__", "__len__", "__getitem__"):
                continue
            if isinstance(member, property):
                check(member.fget, f"{cls.__name__}.{name}")
            elif inspect.isfunction(member) and member.__qualname__.split(".")[0] in (cls.__name__, "Rows"):
                check(member, f"{cls.__name__}.{name}")


def test_cli_and_service_import_no_private_names_and_the_api_imports_no_service():
    import ast

    def imports(path: Path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                yield from ((a.name, None) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield from ((node.module, a.name) for a in node.names)

    bad = []
    for path in sorted((Path(REPO) / "service").rglob("*.py")):
        for module, name in imports(path):
            parts = module.split(".") + ([name] if name else [])
            if module != "__future__" and any(p.startswith("_") for p in parts):
                bad.append(f"{path.name}: {module} {name or ''}")
    assert not bad, bad
    api = [f"{p.name}: {m}" for p in sorted((Path(REPO) / "t2c").glob("*.py")) for m, _ in imports(p)
           if m.startswith("t2c.service") and p.name != "__main__.py"]
    assert not api, api


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """30 distinct textured scenes (query by example needs more than flat colours to calibrate on)."""
    from tests.test_examples import _scene

    root = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir()
    for i in range(30):
        _scene(rng).save(root / "imgs" / f"s{i:03d}.png")
    t2c.index(root / "imgs", root / "st", encoder=CLIP, workers=0)
    return root


def test_search_by_example_id_file_and_bytes(scenes):
    with t2c.open(scenes / "st") as store:
        third = store.image(3)
        by_id = store.search(like=3, k=3)
        assert by_id.ids[0] == 3 and by_id.text == "like:3"
        by_file = store.search(like=third.path, k=3)
        by_bytes = store.search(like=Path(third.path).read_bytes(), k=3)
        assert by_file.ids == by_bytes.ids == by_id.ids
        assert by_bytes.text.startswith('like:"sha256:')
        assert store.search(by_bytes.text, k=3).ids == by_bytes.ids  # the text pages through the same answer
        both = store.search("width>100", like=3, k=20)
        assert both.text == "like:3 AND width>100" and both.total == 0
        with pytest.raises(t2c.InvalidInput, match="like="):
            store.search()
        with pytest.raises(t2c.NotFound):
            store.search(like=9999)
        with pytest.raises(t2c.ImageDecodeError) as e:
            store.search(like=b"not an image")
        assert e.value.reason == "not_an_image"
    with t2c.open(scenes / "st", example_files=False) as server_side:
        with pytest.raises(t2c.InvalidInput, match="upload"):
            server_side.search(like=third.path)
        assert server_side.search(like=Path(third.path).read_bytes(), k=1).ids == [3]


def test_duplicates_groups_copies_and_is_kept_per_snapshot(tmp_path):
    make_solid(tmp_path / "imgs", COLOURS[:5])
    (tmp_path / "imgs" / "copy.png").write_bytes((tmp_path / "imgs" / "c001.png").read_bytes())
    t2c.index(tmp_path / "imgs", tmp_path / "st", encoder=CLIP, workers=0)
    with t2c.open(tmp_path / "st") as store:
        dups = store.duplicates()
        assert isinstance(dups, t2c.DuplicatesResult) and all(isinstance(g, t2c.DuplicateGroup) for g in dups)
        exact = [g for g in dups if g.kind == "exact"]
        assert [sorted(Path(p).name for p in g.paths) for g in exact] == [["c001.png", "copy.png"]]
        assert store.duplicates() is not dups and store.duplicates().to_dict() == dups.to_dict()
        assert dups.to_arrow().column_names == ["ids", "paths", "kind", "min_similarity"]
        assert dups.write_html(tmp_path / "d.html").read_text().startswith("<!doctype html>")
