"""Faults at the edges of `t2c index`: a full disk, a read-only store, an image folder that disappears.

Each gives one clear typed error (what, where, how much, and that a rerun resumes), and the rerun does resume.
Tests run as root, so read-only folders are simulated by patching the call that writes (root ignores chmod).
"""
from __future__ import annotations

import errno
import os

import duckdb
import pytest

import t2c.data.store as store_mod
import t2c.indexer.index_build as ib
from t2c.data.errors import DiskFull, SourceGone, StoreNotWritable
from t2c.data.store import open_store, store_faults
from t2c.indexer import staging as staging_mod
from t2c.indexer.pipeline import index_folder
from t2c.indexer.staging import Staging
from t2c.service.cli import main
from tests.test_pipeline import CLIP, _store_state, make_images

PART = 5


@pytest.fixture()
def imgs(tmp_path):
    make_images(tmp_path / "imgs", 20)
    return tmp_path / "imgs"


@pytest.fixture()
def reference(tmp_path, imgs):
    index_folder(imgs, tmp_path / "ref", CLIP, workers=0, part_size=PART)
    return _store_state(tmp_path / "ref")


def _fail_after(monkeypatch, module, name, n: int, exc: Exception) -> list:
    """Patch ``module.name`` to raise ``exc`` from its (n+1)-th call on; returns the list of calls made."""
    real, calls = getattr(module, name), []

    def flaky(*a, **k):
        if len(calls) >= n:
            raise exc
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(module, name, flaky)
    return calls


def _assert_same(tmp_path, store, reference):
    rows, vec = _store_state(store)
    assert rows == reference[0]
    assert vec.shape == reference[1].shape and abs(vec - reference[1]).max() < 1e-6


def test_disk_full_while_staging_parts_says_where_how_much_and_resumes(tmp_path, imgs, reference, monkeypatch):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "st" / "staging" / "part-000002.npz"))
    _fail_after(monkeypatch, staging_mod, "atomic_save_npz", 2, full)
    with pytest.raises(DiskFull) as err:
        index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    msg = str(err.value)
    assert "disk full" in msg and "part-000002.npz" in msg and "free" in msg and "needs about" in msg
    assert "resumes" in err.value.hint
    monkeypatch.undo()
    rep = index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert rep.resumed_parts == 2 and rep.added == 20
    _assert_same(tmp_path, tmp_path / "st", reference)


def test_disk_full_in_duckdb_at_commit_keeps_the_live_snapshot(tmp_path, imgs, reference, monkeypatch):
    make_images(tmp_path / "first", 5)
    index_folder(tmp_path / "first", tmp_path / "st", CLIP, workers=0, part_size=PART)
    live = open_store(tmp_path / "st").name

    def checkpoint_fails(*a, **k):  # DuckDB reports the full disk, then invalidates the database
        try:
            raise duckdb.IOException('Could not write file "catalog.duckdb.wal": No space left on device')
        except duckdb.IOException:
            raise duckdb.FatalException("database has been invalidated because of a previous fatal error")

    monkeypatch.setattr(ib, "build_index", checkpoint_fails)
    with pytest.raises(DiskFull, match="disk full"):
        index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert open_store(tmp_path / "st").name == live
    monkeypatch.undo()
    rep = index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert rep.resumed_parts == 4 and rep.added == 20


def test_read_only_store_folder_is_one_clear_error_and_a_rerun_resumes(tmp_path, imgs, reference, monkeypatch):
    real = store_mod.tempfile.mkstemp

    def read_only(*a, dir=None, prefix="", **k):  # noqa: A002 - mkstemp's own keyword
        if "part-000001" in prefix:  # part 0 is staged; then the folder turns read-only
            raise PermissionError(errno.EROFS, "Read-only file system", str(dir))
        return real(*a, dir=dir, prefix=prefix, **k)

    monkeypatch.setattr(store_mod.tempfile, "mkstemp", read_only)
    with pytest.raises(StoreNotWritable) as err:
        index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert str(tmp_path / "st") in err.value.message and "read-only" in err.value.message
    assert "writable" in err.value.hint and "resumes" in err.value.hint
    monkeypatch.undo()
    rep = index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert rep.resumed_parts == 1 and rep.added == 20
    _assert_same(tmp_path, tmp_path / "st", reference)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_chmod_read_only_store_folder(tmp_path, imgs):
    store = tmp_path / "st"
    index_folder(imgs, store, CLIP, workers=0, part_size=PART)
    make_images(imgs, 3, start=100)
    os.chmod(store, 0o555)
    try:
        with pytest.raises(StoreNotWritable):
            index_folder(imgs, store, CLIP, workers=0, part_size=PART)
    finally:
        os.chmod(store, 0o755)


def test_permission_errors_outside_the_store_are_not_blamed_on_it(tmp_path):
    with pytest.raises(PermissionError):
        with store_faults(tmp_path / "st"):
            raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/aligner.safetensors")
    with pytest.raises(ValueError):
        with store_faults(tmp_path / "st"):
            raise ValueError("not a fault of the disk")


def test_image_folder_that_disappears_mid_run_stops_cleanly_and_resumes(tmp_path, imgs, reference, monkeypatch):
    away = tmp_path / "away"
    real = Staging.write_part

    def write_then_unmount(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == 1 and imgs.exists():
            imgs.rename(away)  # the folder goes away (an unmounted disk): mtimes survive the move back

    monkeypatch.setattr(Staging, "write_part", write_then_unmount)
    with pytest.raises(SourceGone) as err:
        index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert str(imgs) in err.value.message and "disappeared" in err.value.message
    assert "2 finished part(s)" in err.value.hint and "resumes" in err.value.hint
    monkeypatch.undo()
    away.rename(imgs)
    rep = index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert rep.resumed_parts == 2 and rep.added == 20 and rep.errors == 0
    _assert_same(tmp_path, tmp_path / "st", reference)


def test_cli_index_quiet_draws_nothing_when_it_resumes(tmp_path, imgs, monkeypatch, capsys):
    args = ["index", str(imgs), "--store", str(tmp_path / "st"), "-e", CLIP, "--workers", "0", "--part-size",
            str(PART), "-q"]
    _fail_after(monkeypatch, Staging, "write_part", 2, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        main(args)
    monkeypatch.undo()
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(args)
    out, err = capsys.readouterr()
    assert not done.value.code and err == "" and "resumed 2 parts" in out


def test_cli_disk_full_is_a_message_not_a_traceback(tmp_path, imgs, monkeypatch, capsys):
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "st" / "staging" / "x"))
    _fail_after(monkeypatch, staging_mod, "atomic_save_npz", 1, full)
    with pytest.raises(SystemExit) as done:
        main(["index", str(imgs), "--store", str(tmp_path / "st"), "-e", CLIP, "--workers", "0", "--part-size",
              str(PART), "-q"])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "disk full" in err and "Traceback" not in err and "resumes" in err


def test_one_file_deleted_mid_run_is_its_error_not_a_stop(tmp_path, imgs, monkeypatch):
    victim = sorted(p for p in imgs.rglob("*.png"))[-1]  # in the last part
    real = Staging.write_part

    def write_then_delete(self, i, *a, **k):
        real(self, i, *a, **k)
        if i == 0 and victim.exists():
            victim.unlink()

    monkeypatch.setattr(Staging, "write_part", write_then_delete)
    rep = index_folder(imgs, tmp_path / "st", CLIP, workers=0, part_size=PART)
    assert (rep.added, rep.errors, rep.error_reasons) == (19, 1, {"not_found": 1})
