"""Bounded-memory planning: the on-disk work list, streamed path lists, and runs planned in small batches."""
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from t2c.data.errors import InvalidInput
from t2c.data.sources import SeenPaths, iter_path_list, iter_stat_paths, stat_paths
from t2c.data.store import open_store
from t2c.indexer import pipeline, worklist
from t2c.indexer.worklist import WorkList
from tests.test_pipeline import make_images, run


def items(n, changed=()):
    return [{"id": i, "path": f"/x/p{i}.jpg", "relpath": f"p{i}.jpg", "size": 100 + i, "mtime_ns": 7 * i,
             "kind": "changed" if i in changed else "new"} for i in range(n)]


def test_work_list_reads_back_what_was_planned_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(worklist, "BATCH_ROWS", 4)  # several record batches
    want = items(11, changed={3, 9})
    w = WorkList.from_items(want, folder=tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked once open: nothing left behind, even if killed
    assert len(w) == 11 and list(w) == want and w[-1] == want[-1] and w[2:9] == want[2:9]
    parts = w.parts(3)
    assert [len(p) for p in parts] == [3, 3, 3, 2] and list(parts[3]) == want[9:] and w.paths(9, 20) == ["/x/p9.jpg",
                                                                                                       "/x/p10.jpg"]
    with pytest.raises(IndexError):
        w[11]


def digest(its):
    h = hashlib.sha256()
    WorkList.from_items(its).digest_into(h)
    return h.hexdigest()


def test_work_list_digest_names_the_work():
    a = items(5)
    b = items(5)
    b[2]["mtime_ns"] += 1
    assert digest(a) == digest(items(5)) and digest(a) != digest(b) and digest(a) != digest(items(4))


def test_seen_paths_matches_a_set():
    rng = np.random.default_rng(0)
    names = [f"f{int(x)}" for x in rng.integers(0, 300, 2000)]
    seen, ref, got = SeenPaths(), set(), []
    for s in range(0, len(names), 37):
        got += seen.add_new(names[s : s + 37]).tolist()
    for x in names:
        got_ref = x not in ref
        ref.add(x)
        assert got.pop(0) == got_ref
    assert len(seen.runs) < 12  # runs are merged as they grow


def test_streamed_stat_equals_stat_paths(tmp_path):
    make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "sub.png").mkdir()
    listed = ["d0/img0000.png", "d1/img0001.png", "missing.png", "d0/img0000.png", "./d1/img0001.png",
              "sub.png", "d2/img0005.png"]
    batches = [listed[s : s + 2] for s in range(0, len(listed), 2)]
    streamed = list(iter_stat_paths(batches, base=tmp_path / "imgs"))
    ref = stat_paths(listed, base=tmp_path / "imgs")
    assert [e for e in streamed if len(e) == 4] == ref.files
    assert [tuple(e) for e in streamed if len(e) == 2] == [tuple(s) for s in ref.skipped]


def test_path_list_is_streamed_and_bad_rows_are_named(tmp_path):
    f = tmp_path / "l.parquet"
    pq.write_table(pa.table({"path": [f"a{i}.jpg" for i in range(10)]}), f)
    assert [len(b) for b in iter_path_list(f, batch_rows=4)] == [4, 4, 2]
    pq.write_table(pa.table({"path": ["a.jpg"] * 5 + [""] + ["b.jpg"]}), f)
    with pytest.raises(InvalidInput, match="row 5"):
        list(iter_path_list(f, batch_rows=4))
    with pytest.raises(InvalidInput, match="column 'file' not found"):
        list(iter_path_list(f, column="file"))


def catalog(store):
    snap = open_store(store)
    rows = snap.catalog().execute("SELECT id, path, size, width FROM images ORDER BY id").fetchall()
    errs = snap.catalog().execute("SELECT path, reason FROM errors ORDER BY path").fetchall()
    return rows, errs, np.asarray(snap.vectors).copy()


def test_small_planning_batches_give_the_same_store(tmp_path, monkeypatch):
    """Planning PLAN_BATCH files at a time, work lists of tiny batches and one-image parts change nothing."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 9)
    (imgs / "d0" / "bad.png").write_bytes(b"not an image")

    def both(**kw):
        a = run(imgs, tmp_path / "big", **kw)
        with monkeypatch.context() as m:
            m.setattr(pipeline, "PLAN_BATCH", 2)
            m.setattr(worklist, "BATCH_ROWS", 3)
            b = run(imgs, tmp_path / "small", part_size=1, **kw)
        assert (a.added, a.updated, a.removed, a.errors, a.unchanged) == \
            (b.added, b.updated, b.removed, b.errors, b.unchanged)
        ca, cb = catalog(tmp_path / "big"), catalog(tmp_path / "small")
        assert ca[:2] == cb[:2]
        np.testing.assert_allclose(ca[2], cb[2], atol=1e-6)
        return b

    rep = both()
    assert (rep.added, rep.errors) == (9, 1)
    (imgs / "d1" / "img0004.png").unlink()
    make_images(imgs, 3, seed=3, start=50)
    (imgs / "d0" / "bad.png").unlink()
    rep = both()
    assert (rep.added, rep.removed, rep.unchanged) == (3, 1, 8)
    assert catalog(tmp_path / "small")[1] == []  # the removed bad file's error row is cleared
