"""The catalog's images table has no key indexes: ids and paths stay unique by construction (planning, the
sources' de-duplication, ids never reused, replace = delete + insert), and catalogs written with the keys keep
working and are rebuilt without them by their next commit."""
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from t2c.data import store as st
from t2c.data.errors import StoreError
from t2c.data.store import Changes, Snapshot, StoreWriter, catalog_has_keys, open_store
from t2c.indexer import pipeline
from tests.test_pipeline import CLIP, make_images, run

# the images table as catalogs were written before the key indexes were dropped
KEYED_IMAGES = """CREATE TABLE IF NOT EXISTS images (
        id BIGINT PRIMARY KEY, path VARCHAR NOT NULL UNIQUE, relpath VARCHAR, content_hash VARCHAR,
        size BIGINT, width INTEGER, height INTEGER, mtime TIMESTAMP, mtime_ns BIGINT,
        status VARCHAR DEFAULT 'ok', added_at TIMESTAMP)"""


def keyed_schema():
    return [KEYED_IMAGES] + st.SCHEMA[1:]


def key_constraints(snap):
    return snap.catalog().execute(
        "SELECT constraint_type, constraint_column_names FROM duckdb_constraints() WHERE table_name = 'images' "
        "AND constraint_type <> 'NOT NULL'").fetchall()


def counts(snap):
    """(rows, distinct paths, distinct ids) of the images table."""
    return snap.catalog().execute("SELECT count(*), count(DISTINCT path), count(DISTINCT id) FROM images").fetchone()


def all_rows(snap):
    cur = snap.catalog()
    got = cur.execute("SELECT * FROM images ORDER BY id").fetchall()
    cols = [d[0] for d in cur.description]
    return {r[0]: dict(zip(cols, r)) for r in got}


def test_new_catalogs_have_no_key_indexes(tmp_path):
    make_images(tmp_path / "imgs", 5)
    run(tmp_path / "imgs", tmp_path / "st")
    snap = open_store(tmp_path / "st")
    assert key_constraints(snap) == []
    assert snap.catalog().execute("SELECT count(*) FROM duckdb_indexes() WHERE table_name = 'images'").fetchone() == (0,)
    assert not catalog_has_keys(snap.path / "catalog.duckdb")
    # the small tables keep theirs
    kept = snap.catalog().execute("SELECT table_name FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' "
                                  "ORDER BY table_name").fetchall()
    assert kept == [("errors",), ("runs",)]


def test_reindex_of_changed_files_updates_rows_in_place(tmp_path):
    """A changed file keeps its id and its one row (delete + insert by id), run after run; new files get new ids."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 10)
    run(imgs, tmp_path / "st", part_size=3)
    ids = {r["path"]: i for i, r in all_rows(open_store(tmp_path / "st")).items()}
    changed = [imgs / "d1" / "img0001.png", imgs / "d0" / "img0003.png", imgs / "d2" / "img0008.png"]
    for k in range(2):
        for j, p in enumerate(changed):
            Image.new("RGB", (40, 30 + k), (255, 10 * j, 0)).save(p)
            os.utime(p, ns=(1, 10**18 + 1000 * k + j))
        make_images(imgs, 1, seed=k + 7, start=100 + k)
        rep = run(imgs, tmp_path / "st", part_size=2)
        assert (rep.added, rep.updated) == (1, 3)
        snap = open_store(tmp_path / "st")
        assert counts(snap) == (11 + k,) * 3
        rows = all_rows(snap)
        for p in changed:
            (i,) = [i for i, r in rows.items() if r["path"] == str(p)]
            assert i == ids[str(p)] and rows[i]["height"] == 30 + k
        assert sorted(rows) == list(range(11 + k))


def test_a_file_that_turns_bad_and_back_has_one_row(tmp_path):
    """An image that becomes unreadable leaves images for errors; fixed, it comes back under a new id (ids are
    never reused) and its error row goes: the path is never in images twice, nor in both tables."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 4)
    p = imgs / "d1" / "img0001.png"
    run(imgs, tmp_path / "st")

    def where():
        snap = open_store(tmp_path / "st")
        cur = snap.catalog()
        img = cur.execute("SELECT id FROM images WHERE path = ?", [str(p)]).fetchall()
        err = cur.execute("SELECT reason FROM errors WHERE path = ?", [str(p)]).fetchall()
        assert counts(snap)[0] == counts(snap)[1] == counts(snap)[2]
        return img, err

    (first,), err = where()
    assert err == []
    p.write_bytes(b"not an image any more")
    rep = run(imgs, tmp_path / "st")
    assert (rep.removed, rep.errors) == (0, 1)
    img, err = where()
    assert img == [] and len(err) == 1
    Image.new("RGB", (40, 30), (0, 0, 255)).save(p)
    rep = run(imgs, tmp_path / "st")
    assert rep.added == 1
    assert where() == ([(4,)], []) and first != (4,)


def _index_list(lst, store, base):
    """Index a parquet list of paths the way both engines plan one (``ray_engine._resolve_source``), encoding
    locally in this process."""
    from t2c.indexer.encoders import parse_spec
    from t2c.indexer.ray_engine import _resolve_source

    t0 = time.perf_counter()
    with StoreWriter(store) as w:
        plan, label = _resolve_source(lst, "path", base, False, w)
        r = pipeline.start_run(w, parse_spec(CLIP), plan, t0, aligner=None, fit_aligner=None, clip=None,
                               fit_workers=0, progress=False, max_pixels=1 << 26, batch_size=8, device=None,
                               threads=1, part_size=3)
        if isinstance(r, pipeline.IndexReport):
            return r
        cfg = dict(r.encoder.preprocess_config(), max_pixels=1 << 26)
        n = pipeline._encode_pending(r, plan, None, cfg, 0, False, {})
        return pipeline.finish_run(w, r, plan, label, None, n, 1.0, t0)


def test_a_list_naming_a_path_twice_catalogs_it_once(tmp_path, monkeypatch):
    """A parquet list may name a file more than once (also spelled differently, in other planning batches): the
    first entry wins (its relpath, its place in the id order), one row per path; a rerun changes nothing."""
    monkeypatch.setattr(pipeline, "PLAN_BATCH", 2)
    imgs = tmp_path / "imgs"
    make_images(imgs, 6)
    files = sorted(str(p.relative_to(imgs)) for p in imgs.rglob("*.png"))
    listed = files + [f"./{files[0]}", files[3], f"d9/../{files[2]}", files[5], f"{imgs}/{files[1]}"]
    lst = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": listed}), lst)
    rep = _index_list(lst, tmp_path / "st", imgs)
    assert (rep.added, rep.errors) == (6, 0)
    snap = open_store(tmp_path / "st")
    assert counts(snap) == (6, 6, 6)
    rows = all_rows(snap)
    assert [rows[i]["relpath"] for i in range(6)] == files
    rep = _index_list(lst, tmp_path / "st", imgs)
    assert (rep.added, rep.updated, rep.unchanged) == (0, 0, 6)
    # changed files named twice are updated once, in place
    for f in (files[0], files[2]):
        Image.new("RGB", (40, 31), (9, 9, 9)).save(imgs / f)
        os.utime(imgs / f, ns=(1, 10**18))
    rep = _index_list(lst, tmp_path / "st", imgs)
    assert (rep.added, rep.updated, rep.unchanged) == (0, 2, 4)
    snap = open_store(tmp_path / "st")
    assert counts(snap) == (6, 6, 6) and sorted(all_rows(snap)) == list(range(6))
    assert all_rows(snap)[2]["height"] == 31


def test_a_commit_that_would_hold_an_id_twice_publishes_nothing(tmp_path):
    """With no key index to refuse it, the commit's id pass does: a batch naming a catalogued id twice fails the
    commit with a StoreError and CURRENT still names the previous snapshot."""
    make_images(tmp_path / "imgs", 3)
    run(tmp_path / "imgs", tmp_path / "st")
    before = open_store(tmp_path / "st")
    row = {"id": 1, "path": "/x/a.png", "relpath": "a.png", "size": 1, "mtime_ns": 1}
    with StoreWriter(tmp_path / "st") as w:
        with pytest.raises(StoreError, match="id 1 twice"):
            w.commit(Changes([row, dict(row, path="/x/b.png")], [], [], [], [], {"run_id": "dup"}),
                     manifest_fields={}, vectors_for=None, build_index=None)
    after = open_store(tmp_path / "st")
    assert after.name == before.name and counts(after) == (3, 3, 3)
    assert [p.name for p in (tmp_path / "st" / "snapshots").iterdir() if p.name.startswith(".tmp")] == []


def test_a_catalog_written_with_key_indexes_is_read_then_rebuilt_without_them(tmp_path, monkeypatch):
    """A store whose catalog still has the keys is read as before; its next commit rebuilds ``images`` without
    them in the new snapshot (rows, user columns and their types, errors and runs carried over), while the old
    snapshot is left as it was."""
    imgs = tmp_path / "imgs"
    make_images(imgs, 9)
    (imgs / "d0" / "bad.png").write_bytes(b"not an image")
    user = {f"d{i % 3}/img{i:04d}.png": {"label": i, "split": "val" if i % 2 else "train"} for i in range(9)}
    with monkeypatch.context() as m:
        m.setattr(st, "SCHEMA", keyed_schema())
        run(imgs, tmp_path / "st", user_columns=user, part_size=4)
    old = open_store(tmp_path / "st")
    assert catalog_has_keys(old.path / "catalog.duckdb")
    assert sorted(key_constraints(old)) == [("PRIMARY KEY", ["id"]), ("UNIQUE", ["path"])]
    before, cols = all_rows(old), old.columns()
    assert len(before) == 9 and all(r["label"] == user[r["relpath"]]["label"] for r in before.values())
    assert old.image_rows([3])[0] == before[3]  # read as before
    assert cols["label"] == "BIGINT" and cols["split"] == "VARCHAR"

    changed = imgs / "d1" / "img0004.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 10**18))
    (imgs / "d2" / "img0002.png").unlink()
    make_images(imgs, 2, seed=5, start=100)
    rep = run(imgs, tmp_path / "st", user_columns=user, part_size=4)
    assert (rep.added, rep.updated, rep.removed, rep.unchanged) == (2, 1, 1, 8)  # 7 images + the same bad file
    new = open_store(tmp_path / "st")
    assert not catalog_has_keys(new.path / "catalog.duckdb") and key_constraints(new) == []
    assert new.columns() == cols
    after = all_rows(new)
    assert counts(new) == (10, 10, 10)
    for i, r in before.items():
        if r["path"] == str(imgs / "d2" / "img0002.png"):
            assert i not in after
        elif r["path"] == str(changed):
            assert after[i]["height"] == 30 and after[i]["added_at"] == r["added_at"] and after[i]["label"] == 4
        else:
            assert after[i] == r  # carried over untouched
    new_ids = [i for i in after if i not in before]
    assert len(new_ids) == 2 and min(new_ids) >= old.manifest["next_id"]  # ids are never reused
    cur = new.catalog()
    assert cur.execute("SELECT path, reason FROM errors").fetchall() == \
        old.catalog().execute("SELECT path, reason FROM errors").fetchall() != []
    assert cur.execute("SELECT count(*) FROM runs").fetchone() == (2,)
    assert sorted(r[0] for r in cur.execute("SELECT constraint_type FROM duckdb_constraints() "
                                            "WHERE table_name IN ('errors', 'runs')").fetchall()).count("PRIMARY KEY") == 2
    # the previous snapshot is untouched and still reads
    prev = Snapshot(tmp_path / "st", old.name)
    assert catalog_has_keys(prev.path / "catalog.duckdb") and all_rows(prev) == before
    # and the next commit copies the rebuilt catalog as it is
    make_images(imgs, 1, seed=6, start=200)
    run(imgs, tmp_path / "st")
    assert counts(open_store(tmp_path / "st")) == (11, 11, 11)


def test_page_paths_are_read_by_row_from_the_path_file(tmp_path, monkeypatch):
    """Each snapshot keeps every row's path beside its ids (checksummed); a search's page reads its paths from
    there, equal to the catalog's, without a catalog query; a snapshot without the file still answers."""
    import json

    from t2c.query.engine import Engine

    imgs = tmp_path / "imgs"
    make_images(imgs, 12)
    (imgs / "d0" / "img0000.png").rename(imgs / "d0" / "ünï cödé.png")  # non-ASCII, multi-byte paths
    run(imgs, tmp_path / "st", part_size=5)
    snap = open_store(tmp_path / "st")
    assert {st.PATHS_BLOB, st.PATH_OFFSETS} <= set(snap.manifest["files"])
    want = dict(snap.catalog().execute("SELECT id, path FROM images").fetchall())
    rows = np.arange(len(snap.ids))[::-1]
    assert snap.paths_of_rows(rows) == [want[int(i)] for i in snap.ids[rows]]
    assert any("ünï cödé" in p for p in snap.paths_of_rows(np.arange(len(snap.ids))))

    read = []
    real = Snapshot.paths_of_rows
    monkeypatch.setattr(Snapshot, "paths_of_rows", lambda self, r: read.append(list(r)) or real(self, r))
    res = Engine(snap).search("width>=1", k=5, offset=2)  # a page of the filter's matches
    assert len(res.hits) == 5 and [h.path for h in res.hits] == [want[h.id] for h in res.hits]
    assert read == [list(snap.rows_of([h.id for h in res.hits]))]
    monkeypatch.undo()

    # an older snapshot, written before the path file: paths come from the catalog
    man = json.loads((snap.path / "manifest.json").read_text())
    for f in (st.PATHS_BLOB, st.PATH_OFFSETS):
        man["files"].pop(f)
    (snap.path / "manifest.json").write_text(json.dumps(man))
    old = Snapshot(tmp_path / "st", snap.name)
    assert old.paths_of_rows([0]) is None
    assert [h.path for h in Engine(old).search("width>=1", k=5, offset=2).hits] == [h.path for h in res.hits]


def test_a_changed_path_file_fails_verification(tmp_path):
    make_images(tmp_path / "imgs", 4)
    run(tmp_path / "imgs", tmp_path / "st")
    snap = open_store(tmp_path / "st")
    blob = snap.path / st.PATHS_BLOB
    data = bytearray(blob.read_bytes())
    data[0] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="paths.bin"):
        open_store(tmp_path / "st")
