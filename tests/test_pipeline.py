"""Folder indexer: store round trip, bad files, incremental updates, aligner fitting, realign, checksums."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from t2c.data.errors import AlignerError, InvalidInput, StoreError
from t2c.data.store import open_store
from t2c.indexer.pipeline import index_folder, realign_store

CLIP = "python:tests.tiny_encoders:tiny_clip"
CNN = "python:tests.tiny_encoders:tiny_cnn?image_size=32"


def make_images(folder, n, seed=0, start=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        arr = (rng.random((24 + i % 5, 40, 3)) * 255).astype(np.uint8)
        sub = folder / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i:04d}.png")


def run(folder, store, **kw):
    kw.setdefault("workers", 0)
    return index_folder(folder, store, kw.pop("encoder", CLIP), **kw)


def test_index_roundtrip(tmp_path):
    make_images(tmp_path / "imgs", 30)
    rep = run(tmp_path / "imgs", tmp_path / "st", part_size=8)
    assert (rep.added, rep.errors, rep.removed) == (30, 0, 0)
    snap = open_store(tmp_path / "st")
    assert snap.count == 30 and snap.dim == 16 and snap.manifest["aligner"]["identity"]
    np.testing.assert_allclose(np.linalg.norm(snap.vectors, axis=1), 1.0, atol=1e-5)
    assert list(snap.ids) == list(range(30))
    rows = snap.image_rows([0, 29])
    assert rows[0]["relpath"] == "d0/img0000.png" and rows[0]["width"] == 40 and rows[0]["height"] == 24
    # the FAISS index answers with catalog ids, best match = itself
    _, got = snap.index.search(np.ascontiguousarray(snap.vectors[:5]), 1)
    assert list(got[:, 0]) == list(snap.ids[:5])
    # features kept raw: same count
    assert sum(len(i) for i, _ in snap.features()) == 30
    m = snap.manifest
    assert m["index"]["type"] == "flat" and m["counts"] == {"images": 30, "errors": 0}
    assert all("digest" in v for v in m["files"].values())


def test_bad_files_are_recorded_and_skipped(tmp_path):
    from tests.imagecases import WALK_ONLY, write_cases

    cases = write_cases(tmp_path / "imgs")
    run(tmp_path / "imgs", tmp_path / "st")
    snap = open_store(tmp_path / "st")
    cur = snap.catalog()
    errors = dict(cur.execute("SELECT path, reason FROM errors").fetchall())
    indexed = {r[0] for r in cur.execute("SELECT path FROM images").fetchall()}
    for name, case in cases.items():
        p = os.path.abspath(case.path)
        if case.reason is None:
            assert p in indexed, name
        else:
            assert p not in indexed, name
            assert errors.get(p) == case.reason, (name, errors.get(p))
    assert len(indexed) + len(errors) == len(cases)
    assert WALK_ONLY <= set(cases)


def test_incremental_add_change_remove(tmp_path, monkeypatch):
    import t2c.data.store

    monkeypatch.setattr(t2c.data.store, "COPY_CHUNK", 5)  # previous vectors are carried over in several chunks
    imgs = tmp_path / "imgs"
    make_images(imgs, 12)
    run(imgs, tmp_path / "st")
    before = open_store(tmp_path / "st")
    ids_before = {r[0]: r[1] for r in before.catalog().execute("SELECT path, id FROM images").fetchall()}
    # change one, delete one, add two
    changed = imgs / "d1" / "img0001.png"
    Image.new("RGB", (40, 30), (255, 0, 0)).save(changed)
    os.utime(changed, ns=(1, 1))
    (imgs / "d2" / "img0002.png").unlink()
    make_images(imgs, 2, seed=5, start=100)
    rep = run(imgs, tmp_path / "st")
    assert (rep.added, rep.updated, rep.removed, rep.unchanged) == (2, 1, 1, 10)
    after = open_store(tmp_path / "st")
    ids_after = {r[0]: r[1] for r in after.catalog().execute("SELECT path, id FROM images").fetchall()}
    assert after.count == 13
    assert str(imgs / "d2" / "img0002.png") not in ids_after
    for p, i in ids_after.items():
        if p in ids_before:
            assert ids_before[p] == i  # ids are stable
        else:
            assert i >= 12  # new ids never reuse old ones
    row = after.rows_of([ids_after[str(changed)]])[0]
    old_row = before.rows_of([ids_before[str(changed)]])[0]
    assert not np.allclose(after.vectors[row], before.vectors[old_row])
    # every vector equals a fresh index of the final folder (carried-over rows landed in the right places)
    run(imgs, tmp_path / "fresh")
    fresh = open_store(tmp_path / "fresh")
    by_path = {r[0]: r[1] for r in fresh.catalog().execute("SELECT path, id FROM images").fetchall()}
    for p, i in ids_after.items():
        np.testing.assert_allclose(after.vectors[after.rows_of([i])[0]], fresh.vectors[fresh.rows_of([by_path[p]])[0]],
                                   rtol=1e-5, atol=1e-6)
    # nothing to do: no new snapshot
    rep = run(imgs, tmp_path / "st")
    assert rep.added == rep.updated == rep.removed == 0 and rep.snapshot == after.name


def test_fitted_aligner_does_not_depend_on_where_the_folder_lies(tmp_path):
    """The held-out split is keyed by paths relative to the folder: a moved copy fits the identical aligner."""
    from t2c.indexer.encoders import make_encoder
    from t2c.indexer.pipeline import fit_aligner_on_folder

    make_images(tmp_path / "a" / "imgs", 40)
    shutil.copytree(tmp_path / "a" / "imgs", tmp_path / "elsewhere" / "deeper" / "imgs")
    fits = []
    for base in (tmp_path / "a" / "imgs", tmp_path / "elsewhere" / "deeper" / "imgs"):
        paths = sorted(str(p) for p in base.rglob("*.png"))
        fits.append(fit_aligner_on_folder(make_encoder(CNN), CLIP, paths, workers=0))
    a, b = fits
    assert a.meta["n_heldout"] == b.meta["n_heldout"] and 0 < a.meta["n_heldout"] < 40
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.b, b.b)


def test_fit_aligner_for_encoder_without_text(tmp_path):
    make_images(tmp_path / "imgs", 60)
    with pytest.raises(AlignerError):
        run(tmp_path / "imgs", tmp_path / "st0", encoder=CNN)
    rep = run(tmp_path / "imgs", tmp_path / "st", encoder=CNN, fit_aligner=60, clip=CLIP)
    snap = open_store(tmp_path / "st")
    assert snap.dim == 16 and snap.manifest["feature_dim"] == 24
    assert snap.manifest["aligner"]["identity"] is False and rep.aligner_r2 is not None
    assert snap.manifest["clip"] == CLIP
    # realign with another aligner re-projects without re-encoding
    from t2c.indexer.aligner import fit_aligner

    ids, feats = zip(*snap.features())
    feats = np.concatenate(feats)
    rng = np.random.default_rng(0)
    al = fit_aligner(feats, rng.normal(size=(len(feats), 8)), encoder=snap.encoder, clip="other:clip")
    al.save(tmp_path / "new.safetensors")
    snap2 = realign_store(tmp_path / "st", tmp_path / "new.safetensors")
    assert snap2.dim == 8 and snap2.clip == "other:clip"
    np.testing.assert_allclose(open_store(tmp_path / "st").vectors, al.apply(feats), atol=1e-5)


def test_store_refuses_tampered_files(tmp_path):
    make_images(tmp_path / "imgs", 5)
    run(tmp_path / "imgs", tmp_path / "st")
    snap = open_store(tmp_path / "st")
    vec = snap.path / "vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-1] ^= 0xFF
    vec.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        open_store(tmp_path / "st")
    (snap.path / "index.faiss").unlink()
    with pytest.raises(StoreError, match="missing"):
        open_store(tmp_path / "st")


def test_wrong_encoder_and_bad_paths(tmp_path):
    make_images(tmp_path / "imgs", 3)
    run(tmp_path / "imgs", tmp_path / "st")
    with pytest.raises(StoreError, match="built with encoder"):
        run(tmp_path / "imgs", tmp_path / "st", encoder="python:tests.tiny_encoders:tiny_clip?dim=8")
    with pytest.raises(InvalidInput):
        run(tmp_path / "imgs", tmp_path / "imgs" / "store")
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "x.txt").write_text("hi")
    with pytest.raises(InvalidInput, match="not a t2c store"):
        run(tmp_path / "imgs", tmp_path / "notastore")


def test_second_writer_is_refused(tmp_path):
    from t2c.data.store import StoreWriter

    make_images(tmp_path / "imgs", 3)
    with StoreWriter(tmp_path / "st"):
        with pytest.raises(StoreError, match="another process"):
            run(tmp_path / "imgs", tmp_path / "st")


def test_parallel_workers_equal_in_process(tmp_path):
    make_images(tmp_path / "imgs", 20)
    run(tmp_path / "imgs", tmp_path / "a", workers=0)
    run(tmp_path / "imgs", tmp_path / "b", workers=2)
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-6)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _store_state(path):
    snap = open_store(path)
    rows = snap.catalog().execute("SELECT id, path FROM images ORDER BY id").fetchall()
    return rows, np.asarray(snap.vectors)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    import subprocess
    import sys
    import time

    imgs = tmp_path / "imgs"
    make_images(imgs, 40)
    run(imgs, tmp_path / "ref", part_size=5)
    env = dict(os.environ, T2C_TEST_ENCODE_DELAY="0.4", PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "t2c.service.cli", "index", str(imgs), "--store", str(tmp_path / "st"), "-e", CLIP,
           "--workers", "0", "--part-size", "5", "-q"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    staging = tmp_path / "st" / "staging"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("part-*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()  # SIGKILL
    proc.wait()
    assert not (tmp_path / "st" / "CURRENT").exists(), "the run finished before it was killed"
    done = len(list(staging.glob("part-*.json")))
    assert done >= 3
    rep = run(imgs, tmp_path / "st", part_size=5)
    assert rep.resumed_parts == done and rep.added == 40
    ref_rows, ref_vec = _store_state(tmp_path / "ref")
    rows, vec = _store_state(tmp_path / "st")
    assert rows == ref_rows
    np.testing.assert_allclose(vec, ref_vec, atol=1e-6)
    assert not list(staging.iterdir())  # staging cleared after commit


def test_crash_during_commit_resumes(tmp_path, monkeypatch):
    import t2c.indexer.index_build as ib

    imgs = tmp_path / "imgs"
    make_images(imgs, 12)
    run(imgs, tmp_path / "ref", part_size=4)
    real = ib.build_index

    def boom(*a, **k):
        raise RuntimeError("simulated crash while committing")

    monkeypatch.setattr(ib, "build_index", boom)
    with pytest.raises(RuntimeError):
        run(imgs, tmp_path / "st", part_size=4)
    monkeypatch.setattr(ib, "build_index", real)
    assert not (tmp_path / "st" / "CURRENT").exists()
    rep = run(imgs, tmp_path / "st", part_size=4)
    assert rep.resumed_parts == 3
    assert _store_state(tmp_path / "st")[0] == _store_state(tmp_path / "ref")[0]
    assert not [p for p in (tmp_path / "st" / "snapshots").iterdir() if p.name.startswith(".tmp")]


def test_crash_after_fitting_resumes_without_fitting_again(tmp_path, monkeypatch):
    """--fit-aligner: the fitted aligner waits in staging, so a rerun after a crash keeps it and its parts."""
    import t2c.indexer.index_build as ib
    import t2c.indexer.pipeline as pl

    imgs = tmp_path / "imgs"
    make_images(imgs, 12)
    kw = dict(encoder=CNN, fit_aligner=12, clip=CLIP, part_size=4)
    run(imgs, tmp_path / "ref", **kw)
    real = ib.build_index
    monkeypatch.setattr(ib, "build_index", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        run(imgs, tmp_path / "st", **kw)
    monkeypatch.setattr(ib, "build_index", real)
    assert len(list((tmp_path / "st" / "staging").glob("fitted-aligner-*.safetensors"))) == 1

    def no_refit(*a, **k):
        raise AssertionError("the aligner was fitted again")

    real_fit = pl.fit_aligner_on_folder
    monkeypatch.setattr(pl, "fit_aligner_on_folder", no_refit)
    rep = run(imgs, tmp_path / "st", **kw)
    assert rep.resumed_parts == 3 and rep.added == 12
    assert _store_state(tmp_path / "st")[0] == _store_state(tmp_path / "ref")[0]
    assert open_store(tmp_path / "st").manifest["aligner"] == open_store(tmp_path / "ref").manifest["aligner"]
    assert not list((tmp_path / "st" / "staging").glob("fitted-aligner-*"))  # cleared with the finished run
    # a file changed between the crash and the rerun: the sample differs, so the aligner is fitted afresh
    monkeypatch.setattr(ib, "build_index", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash")))
    monkeypatch.setattr(pl, "fit_aligner_on_folder", real_fit)
    with pytest.raises(RuntimeError):
        run(imgs, tmp_path / "st2", **kw)
    monkeypatch.setattr(ib, "build_index", real)
    monkeypatch.setattr(pl, "fit_aligner_on_folder", no_refit)
    make_images(imgs, 1, seed=5)  # rewrites img0000.png
    with pytest.raises(AssertionError, match="fitted again"):
        run(imgs, tmp_path / "st2", **kw)


def test_stage_features_index_and_keep_their_own_aligner(tmp_path):
    """A features=stages encoder is its own encoder: its store records the spec, and another's aligner is refused."""
    from t2c.data.world.generator import generate

    generate(tmp_path / "w", 60, seed=5)
    staged = "world:pairnet?features=stages"
    rep = run(tmp_path / "w" / "images", tmp_path / "st", encoder=staged, fit_aligner=60, clip="world:clip")
    snap = open_store(tmp_path / "st")
    assert snap.encoder == staged and snap.manifest["feature_dim"] == 512 and snap.dim == 128
    assert rep.aligner_r2 is not None and snap.manifest["clip"] == "world:clip"
    run(tmp_path / "w" / "images", tmp_path / "plain", encoder="world:pairnet", fit_aligner=60, clip="world:clip")
    plain_aligner = next((tmp_path / "plain" / "aligners").glob("*.safetensors"))
    with pytest.raises(AlignerError):
        run(tmp_path / "w" / "images", tmp_path / "st2", encoder=staged, aligner=str(plain_aligner))
