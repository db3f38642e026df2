"""Bounded-memory planning: the on-disk work list, streamed path lists, and runs planned in small batches."""
import hashlib
import os

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


def test_work_list_batches_of_new_files_equal_items_added_one_by_one(tmp_path):
    """``add_new`` (a planning batch of new files) splits across record batches exactly like ``add``."""
    want = items(11)
    w = worklist.WorkListWriter(tmp_path, batch_rows=4)
    w.add(**{k: want[0][k] for k in ("path", "relpath", "size", "mtime_ns")}, id_=0, changed=False)
    for lo, hi in ((1, 7), (7, 8), (8, 11)):
        w.add_new(lo, [t["path"] for t in want[lo:hi]], [t["relpath"] for t in want[lo:hi]],
                  [t["size"] for t in want[lo:hi]], [t["mtime_ns"] for t in want[lo:hi]])
    got = w.finish()
    assert list(got) == want and got._reader.num_record_batches == 3


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


def test_seen_paths_spilled_to_files_match_a_set(tmp_path, monkeypatch):
    """Large runs go to (unlinked) files and are merged a chunk at a time: the answers stay those of a set."""
    monkeypatch.setattr(SeenPaths, "SPILL_ROWS", 64)
    monkeypatch.setattr(SeenPaths, "CHUNK", 16)
    rng = np.random.default_rng(1)
    names = [f"f{int(x)}" for x in rng.integers(0, 3000, 12000)]
    seen, ref, got, want = SeenPaths(tmp_path), set(), [], []
    s, spilled = 0, False
    while s < len(names):
        step = int(rng.integers(1, 400))
        got += seen.add_new(names[s : s + step]).tolist()
        spilled |= any(isinstance(r, np.memmap) for r in seen.runs)
        s += step
    for x in names:
        want.append(x not in ref)
        ref.add(x)
    assert got == want and spilled
    assert sum(len(r) for r in seen.runs) == len(ref)
    assert list(tmp_path.iterdir()) == []  # nothing left on disk, even while the runs are in use


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


def test_commit_appends_new_rows_and_replaced_rows_keep_id_and_added_at(tmp_path):
    """New files (ids from next_id on) are appended without a lookup; a changed file keeps its id and added_at;
    status and mtime (from mtime_ns, to the microsecond) are filled in by the catalog insert."""
    import datetime as dt
    import os

    from PIL import Image

    imgs = tmp_path / "imgs"
    make_images(imgs, 4)
    run(imgs, tmp_path / "st")
    q = "SELECT path, id, added_at, mtime, mtime_ns, status FROM images ORDER BY id"
    before = {r[0]: r for r in open_store(tmp_path / "st").catalog().execute(q).fetchall()}
    changed = imgs / "d1" / "img0001.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1_500_000_000_123_456_789))
    make_images(imgs, 2, seed=5, start=100)
    rep = run(imgs, tmp_path / "st")
    assert (rep.added, rep.updated) == (2, 1)
    after = {r[0]: r for r in open_store(tmp_path / "st").catalog().execute(q).fetchall()}
    assert after[str(changed)][1:3] == before[str(changed)][1:3]
    assert after[str(changed)][3] == dt.datetime(2017, 7, 14, 2, 40, 0, 123457)
    assert sorted(r[1] for p, r in after.items() if p not in before) == [4, 5]
    for r in after.values():
        assert r[5] == "ok" and r[3] == dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=(r[4] + 500) // 1000)


def _path_list(folder, n, per_dir=100):
    """A parquet list of ``n`` distinct existing paths: ``per_dir`` hard links to one file, reached through
    ``n / per_dir`` symlinks to their folder (cheap in inodes and time)."""
    import os

    real = folder / "real"
    real.mkdir(parents=True)
    (real / "f0.jpg").write_bytes(b"x")
    for i in range(1, per_dir):
        os.link(real / "f0.jpg", real / f"f{i}.jpg")
    for j in range(-(-n // per_dir)):
        os.symlink("real", folder / f"s{j}")
    out = folder / "list.parquet"
    pq.write_table(pa.table({"path": [f"s{k // per_dir}/f{k % per_dir}.jpg" for k in range(n)]}), out)
    return out


@pytest.mark.slow
def test_planning_memory_does_not_grow_with_the_list(tmp_path, monkeypatch):
    """Planning keeps no per-file object: with small batches, the peak of Python allocations while planning 200k
    listed files is about that of 20k (batches, the spilled set of seen paths and the work list file only)."""
    import tracemalloc

    from t2c.data.sources import SeenPaths
    from t2c.data.store import StoreWriter

    monkeypatch.setattr(pipeline, "PLAN_BATCH", 2048)
    monkeypatch.setattr(worklist, "BATCH_ROWS", 2048)
    monkeypatch.setattr(SeenPaths, "SPILL_ROWS", 4096)
    monkeypatch.setattr(SeenPaths, "CHUNK", 1024)

    def peak(n):
        lst = _path_list(tmp_path / f"l{n}", n)
        with StoreWriter(tmp_path / f"st{n}") as w:
            tracemalloc.start()
            plan = pipeline.plan_entries(w, iter_stat_paths(iter_path_list(lst, batch_rows=2048), base=lst.parent,
                                                            spill_dir=w.root))
            got = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert len(plan.todo) == n and plan.next_id == n and plan.todo[n - 1]["id"] == n - 1
            plan.todo.close()
        return got

    small, big = peak(20_000), peak(200_000)
    assert big < 1.5 * small, (small, big)  # 10x the files, not 10x the memory


def test_replanning_a_list_gives_the_same_ids(tmp_path, monkeypatch):
    """A killed run replans its list into the same work (same ids, so the same run id and its finished parts are
    kept), also when the seen-path set spills to files and batches are small; duplicates get one id."""
    from t2c.data.sources import SeenPaths
    from t2c.data.store import StoreWriter

    monkeypatch.setattr(pipeline, "PLAN_BATCH", 64)
    monkeypatch.setattr(SeenPaths, "SPILL_ROWS", 128)
    monkeypatch.setattr(SeenPaths, "CHUNK", 32)
    lst = _path_list(tmp_path / "l", 1000, per_dir=50)
    t = pq.read_table(lst)
    paths = t.column("path").to_pylist()
    pq.write_table(pa.table({"path": paths + paths[::7] + ["s0/missing.jpg"]}), lst)

    def plan():
        with StoreWriter(tmp_path / "st") as w:
            p = pipeline.plan_entries(w, iter_stat_paths(iter_path_list(lst, batch_rows=100), base=lst.parent,
                                                         spill_dir=w.root))
            h = hashlib.sha256()
            p.todo.digest_into(h)
            items_ = [(t["id"], t["relpath"]) for t in p.todo]
            p.todo.close()
            return h.hexdigest(), items_, p.skipped, p.next_id

    a, b = plan(), plan()
    assert a == b
    assert a[1] == list(enumerate(paths)) and a[3] == 1000
    assert [r for _, r in a[2]] == ["not_found"]


def test_drop_pages_keeps_the_data_and_unmaps_it(tmp_path):
    """Dropping a memory-mapped array's pages loses nothing written (dirty pages go back to the page cache) and
    takes them out of the process's resident memory; a view finds its mapping; plain arrays are left alone."""
    import os

    from t2c.data.store import drop_pages

    p = tmp_path / "v.npy"
    v = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(1 << 18, 16))  # 16 MB
    v[:] = np.arange(16, dtype=np.float32)
    drop_pages(v)
    v[:10] += 1
    drop_pages(v[5:])
    del v
    r = np.load(p, mmap_mode="r")
    assert r[0, 3] == 4 and r[-1, 3] == 3 and r[9, 0] == 1 and r[10, 0] == 0
    drop_pages(np.zeros(3))
    if not os.path.exists("/proc/self/status"):
        return

    def file_kb():
        with open("/proc/self/status") as fh:
            return int(next(ln for ln in fh if ln.startswith("RssFile")).split()[1])

    before = file_kb()
    float(r.sum())
    touched = file_kb()
    drop_pages(r)
    assert touched - before > 8000 and file_kb() - before < 2000


def test_prefetch_rows_requests_the_rows_pages_and_leaves_the_data_alone(tmp_path):
    """prefetch_rows advises MADV_WILLNEED on the pages of the given rows of a memory-mapped .npy (any dtype,
    any row order it is given sorted in, the first and the last row included); arrays in RAM and views are
    refused (False), and the rows read back unchanged."""
    import mmap

    from t2c.data.store import prefetch_rows

    p = tmp_path / "v.npy"
    v = np.lib.format.open_memmap(p, mode="w+", dtype=np.float16, shape=(5000, 24))
    v[:] = np.arange(5000, dtype=np.float16)[:, None]
    v.flush()
    del v
    r = np.load(p, mmap_mode="r")
    if not hasattr(mmap, "MADV_WILLNEED"):
        return
    for rows in (np.array([0]), np.array([4999]), np.arange(0, 5000, 7), np.array([3, 4, 5, 900, 4998])):
        assert prefetch_rows(r, rows)
        np.testing.assert_array_equal(r[rows][:, 0], np.arange(5000, dtype=np.float16)[rows])
    assert not prefetch_rows(r, np.zeros(0, np.int64))
    assert not prefetch_rows(np.zeros((10, 4)), np.array([1, 2]))
    assert not prefetch_rows(r[:, :3], np.array([1, 2]))  # a non-contiguous view
    assert prefetch_rows(r[4000:], np.array([0, 999]))  # a contiguous view: its own rows' pages


def _commit_rows(path, n: int, batch: int = 50_000, start: int = 0):
    """Commit catalog rows with ids ``start..start+n-1`` (new ones), streamed in batches, with 4-d vectors (the
    catalog is what is under test)."""
    from t2c.data.store import Changes, StoreWriter, atomic_save_npz, new_feature_shard_name
    from t2c.indexer.index_build import build_index

    def row_batches():
        for s in range(start, start + n, batch):
            yield [{"id": i, "path": f"/photos/{2018 + i % 8}/img{i:07d}.jpg", "relpath": f"img{i:07d}.jpg",
                    "content_hash": f"{i:016x}", "size": 1000, "width": 64, "height": 48,
                    "mtime_ns": 1_600_000_000_000_000_000 + i} for i in range(s, min(start + n, s + batch))]

    def unit(feats):  # a fixed unit vector per id
        f = feats[:, 0].astype(np.float32)
        return np.stack([np.sin(f), np.cos(f), np.sin(2 * f), np.cos(2 * f)], axis=1) / np.float32(np.sqrt(2))

    ids = np.arange(start, start + n, dtype=np.int64)
    with StoreWriter(path) as w:
        rel = new_feature_shard_name("t", start)
        atomic_save_npz(w.root / rel, ids=ids, feats=ids[:, None])
        w.commit(Changes([], [rel], [], [], [], {"run_id": f"t{start}"}, row_batches=row_batches),
                 manifest_fields={"dim": 4, "feature_dim": 1, "encoder": "t", "clip": "t"},
                 vectors_for=lambda _ids, feats: unit(feats), build_index=build_index)


def test_catalog_commits_in_flat_memory_without_key_indexes(tmp_path, monkeypatch):
    """The catalog's images table has no key indexes, so a commit's DuckDB memory does not grow with its rows:
    500k rows commit under 16 MB. With the key indexes the catalog had before (held in memory while DuckDB
    writes, ~25 MB at 500k rows) the same commit fails."""
    import duckdb

    from t2c.data import store as st
    from tests.test_catalog import keyed_schema

    n = 500_000
    monkeypatch.setattr(st, "CATALOG_MEMORY", 16 << 20)
    _commit_rows(tmp_path / "flat", n)
    snap = open_store(tmp_path / "flat")
    assert snap.catalog().execute("SELECT count(*), count(DISTINCT path) FROM images").fetchone() == (n, n)
    assert len(snap.ids) == n and not st.catalog_has_keys(snap.path / "catalog.duckdb")

    monkeypatch.setattr(st, "SCHEMA", keyed_schema())
    with pytest.raises(duckdb.Error, match="memory"):
        _commit_rows(tmp_path / "keyed", n)


@pytest.mark.slow
def test_a_large_keyed_catalog_is_rebuilt_in_flat_memory(tmp_path, monkeypatch):
    """A catalog written with the key indexes (500k rows) is rebuilt without them by the next commit under 16 MB
    of DuckDB memory: the rebuild streams the rows and never loads the old indexes."""
    from t2c.data import store as st
    from tests.test_catalog import keyed_schema

    n = 500_000
    with monkeypatch.context() as m:
        m.setattr(st, "SCHEMA", keyed_schema())
        _commit_rows(tmp_path / "st", n)
    old = open_store(tmp_path / "st")
    assert st.catalog_has_keys(old.path / "catalog.duckdb")
    monkeypatch.setattr(st, "CATALOG_MEMORY", 16 << 20)
    _commit_rows(tmp_path / "st", 1000, start=n)
    snap = open_store(tmp_path / "st")
    assert not st.catalog_has_keys(snap.path / "catalog.duckdb")
    assert snap.catalog().execute("SELECT count(*), count(DISTINCT path), count(DISTINCT id), max(id) FROM images"
                                  ).fetchone() == (n + 1000, n + 1000, n + 1000, n + 999)
    assert list(snap.ids[[0, n - 1, n, -1]]) == [0, n - 1, n, n + 999]
    # the rebuilt file holds no dropped table's blocks: smaller than the keyed one
    assert os.path.getsize(snap.path / "catalog.duckdb") < 0.8 * os.path.getsize(old.path / "catalog.duckdb")
