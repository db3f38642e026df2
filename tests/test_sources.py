"""Folder walk (order, symlinks, loops, permissions) and parquet path lists."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from t2c.data import sources
from t2c.data.errors import InvalidInput, NotFound
from t2c.data.sources import (
    IMAGE_EXTENSIONS,
    SKIP_REASONS,
    FileEntry,
    Skipped,
    read_path_list,
    stat_paths,
    walk_folder,
)
from tests import imagecases


def touch(p: Path, data: bytes = b"x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def rels(res) -> list[str]:
    return [f.relpath for f in res.files]


def reasons(res) -> dict[str, str]:
    return {s.path: s.reason for s in res.skipped}


# ---------------------------------------------------------------- plain walks


def test_walk_finds_images_recursively_sorted_with_stats(tmp_path):
    touch(tmp_path / "b.png", b"12345")
    touch(tmp_path / "a" / "z.JPG")
    touch(tmp_path / "a" / "deep" / "q.TiFf")
    touch(tmp_path / "a-b" / "x.webp")
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "a" / "noext")
    touch(tmp_path / "c.jpeg.bak")
    res = walk_folder(tmp_path)
    expected = sorted(["b.png", "a/z.JPG", "a/deep/q.TiFf", "a-b/x.webp"])
    assert rels(res) == expected  # global sort by relpath ("a-b/..." before "a/...")
    assert res.n_ignored == 3 and res.skipped == []
    for f in res:
        assert isinstance(f, FileEntry)
        assert os.path.isabs(f.path) and f.path == os.path.normpath(f.path)
        assert f.path == os.path.join(str(tmp_path), f.relpath)
        st = os.stat(f.path)
        assert (f.size, f.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert res.files[rels(res).index("b.png")].size == 5
    assert len(res) == 4


def test_walk_order_does_not_depend_on_creation_order(tmp_path):
    names = [f"d{i % 3}/sub{i % 2}/img{i}.png" for i in range(30)]
    results = []
    for seed in (0, 1):
        root = tmp_path / f"r{seed}"
        shuffled = names[:]
        random.Random(seed).shuffle(shuffled)
        for n in shuffled:
            touch(root / n)
        results.append(rels(walk_folder(root)))
    assert results[0] == results[1] == sorted(names)


def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch):
    touch(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    res = walk_folder("photos/./")
    assert res.root == str(tmp_path / "photos")
    assert res.files[0].path == str(tmp_path / "photos" / "a.png")


def test_extensions_option(tmp_path):
    touch(tmp_path / "a.png")
    touch(tmp_path / "b.JPG")
    touch(tmp_path / "c.raw")
    assert rels(walk_folder(tmp_path, extensions=".PNG")) == ["a.png"]
    assert rels(walk_folder(tmp_path, extensions=["raw", ".jpg"])) == ["b.JPG", "c.raw"]
    with pytest.raises(InvalidInput):
        walk_folder(tmp_path, extensions=[])
    assert IMAGE_EXTENSIONS == {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}


def test_root_errors(tmp_path):
    with pytest.raises(NotFound):
        walk_folder(tmp_path / "missing")
    f = touch(tmp_path / "file.png")
    with pytest.raises(InvalidInput):
        walk_folder(f)


def test_root_symlink_is_followed(tmp_path):
    touch(tmp_path / "real" / "a.png")
    os.symlink(tmp_path / "real", tmp_path / "link")
    res = walk_folder(tmp_path / "link")
    assert rels(res) == ["a.png"] and res.files[0].path == str(tmp_path / "link" / "a.png")


def test_fifo_with_image_name_is_skipped(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    touch(tmp_path / "ok.jpg")
    res = walk_folder(tmp_path)
    assert rels(res) == ["ok.jpg"]
    assert res.skipped == [Skipped(str(tmp_path / "pipe.jpg"), "not_a_regular_file")]


# ---------------------------------------------------------------- symlinks


@pytest.fixture
def linked(tmp_path):
    """root/ with a real subdir, links to a file, a dir outside, a dir inside, a loop, a broken link."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    touch(root / "real" / "r.png")
    touch(outside / "o.png")
    touch(outside / "o.txt")
    os.symlink(outside / "o.png", root / "file_link.png")
    os.symlink(outside / "o.txt", root / "text_link.txt")
    os.symlink(outside, root / "out_link")
    os.symlink(root / "real", root / "in_link")
    os.symlink(".", root / "real" / "loop")
    os.symlink(root / "gone.png", root / "broken.png")
    os.symlink("self.jpg", root / "self.jpg")  # ELOOP when resolved
    return root


def test_symlinks_not_followed_by_default(linked):
    res = walk_folder(linked)
    assert rels(res) == ["real/r.png"]
    r = lambda name: str(linked / name)  # noqa: E731
    assert reasons(res) == {
        r("file_link.png"): "symlink",
        r("out_link"): "symlink",
        r("in_link"): "symlink",
        r("real/loop"): "symlink",
        r("broken.png"): "symlink",
        r("self.jpg"): "symlink",
    }  # text_link.txt: a link to a non-image file is not worth reporting


def test_follow_symlinks_is_loop_safe(linked):
    res = walk_folder(linked, follow_symlinks=True)
    assert rels(res) == ["file_link.png", "out_link/o.png", "real/r.png"]
    assert res.files[0].path == str(linked / "file_link.png")  # link path kept, not resolved
    assert res.files[0].size == os.path.getsize(linked.parent / "outside" / "o.png")
    r = lambda name: str(linked / name)  # noqa: E731
    assert reasons(res) == {
        r("in_link"): "duplicate_dir",  # real/ is walked anyway
        r("real/loop"): "symlink_loop",
        r("broken.png"): "broken_symlink",
        r("self.jpg"): "symlink_loop",
    }
    assert set(reasons(res).values()) <= SKIP_REASONS


def test_mutual_symlink_loop_through_outside_dir(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    touch(root / "a.png")
    touch(other / "b.png")
    os.symlink(other, root / "to_other")
    os.symlink(root, other / "back")  # root -> other -> root -> ...
    res = walk_folder(root, follow_symlinks=True)
    assert rels(res) == ["a.png", "to_other/b.png"]
    assert reasons(res) == {str(root / "to_other" / "back"): "symlink_loop"}


def test_two_links_to_one_outside_dir_walk_it_once(tmp_path):
    root, other = tmp_path / "root", tmp_path / "other"
    touch(other / "b.png")
    root.mkdir()
    os.symlink(other, root / "l1")
    os.symlink(other, root / "l2")
    res = walk_folder(root, follow_symlinks=True)
    assert rels(res) == ["l1/b.png"]
    assert reasons(res) == {str(root / "l2"): "duplicate_dir"}


def test_imagecases_folder(tmp_path):
    cases = imagecases.write_cases(tmp_path)
    res = walk_folder(tmp_path)
    file_cases = {c.path for n, c in cases.items() if n not in imagecases.WALK_ONLY}
    assert {f.path for f in res} == file_cases
    assert reasons(res) == {cases[n].path: cases[n].reason for n in imagecases.WALK_ONLY}
    res = walk_folder(tmp_path, follow_symlinks=True)
    assert {f.path for f in res} == file_cases
    assert reasons(res) == {cases[n].path: imagecases.FOLLOW_REASONS[n] for n in imagecases.WALK_ONLY}


# ---------------------------------------------------------------- permissions


def test_unlistable_directory_is_skipped(tmp_path, monkeypatch):
    touch(tmp_path / "ok" / "a.png")
    touch(tmp_path / "locked" / "b.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(sources.os, "scandir", scandir)
    res = walk_folder(tmp_path)
    assert rels(res) == ["ok/a.png"]
    assert res.skipped == [Skipped(str(tmp_path / "locked"), "permission_denied")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_unlistable_directory_real_chmod(tmp_path):
    touch(tmp_path / "locked" / "b.png")
    touch(tmp_path / "a.png")
    os.chmod(tmp_path / "locked", 0)
    try:
        res = walk_folder(tmp_path)
    finally:
        os.chmod(tmp_path / "locked", 0o755)
    assert rels(res) == ["a.png"]
    assert res.skipped == [Skipped(str(tmp_path / "locked"), "permission_denied")]


# ---------------------------------------------------------------- property: walk == brute-force listing

_name = st.text(alphabet="abAB-_.0", min_size=1, max_size=5).filter(lambda s: s not in (".", ".."))
_ext = st.sampled_from(["png", "JPG", "txt", "jpeg", "", "Tiff"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.lists(_name, max_size=3), _name, _ext), max_size=12))
def test_walk_matches_brute_force(spec):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        for dirs, stem, ext in spec:
            p = root.joinpath(*dirs, stem + (f".{ext}" if ext else ""))
            try:
                touch(p)
            except (IsADirectoryError, NotADirectoryError, FileExistsError):
                continue  # a name already used as the other kind
        expect = sorted(
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and p.suffix[1:].lower() in IMAGE_EXTENSIONS
        )
        assert rels(walk_folder(root)) == expect


# ---------------------------------------------------------------- path lists


def test_read_path_list(tmp_path):
    f = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "sub/b.png"], "label": [1, 2]}), f)
    assert read_path_list(f) == ["a.jpg", "sub/b.png"]
    g = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"file": pa.array(["x.png", "x.png"]).dictionary_encode()}), g)
    assert read_path_list(g, column="file") == ["x.png", "x.png"]


def test_read_path_list_errors(tmp_path):
    f = tmp_path / "list.parquet"
    pq.write_table(pa.table({"filename": ["a.jpg"], "label": [1]}), f)
    with pytest.raises(InvalidInput) as ei:
        read_path_list(f)
    assert "filename" in str(ei.value) and "label" in str(ei.value)
    with pytest.raises(InvalidInput):
        read_path_list(f, column="label")  # not strings
    with pytest.raises(NotFound):
        read_path_list(tmp_path / "missing.parquet")
    junk = touch(tmp_path / "junk.parquet", b"not parquet at all")
    with pytest.raises(InvalidInput):
        read_path_list(junk)
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", None, ""]}), nulls)
    with pytest.raises(InvalidInput) as ei:
        read_path_list(nulls)
    assert "row 1" in str(ei.value)


def test_stat_paths(tmp_path, monkeypatch):
    touch(tmp_path / "a.jpg", b"abc")
    (tmp_path / "d.png").mkdir()
    monkeypatch.chdir(tmp_path)
    res = stat_paths(["a.jpg", str(tmp_path / "a.jpg"), "missing.png", "d.png"])
    assert [(f.path, f.relpath, f.size) for f in res] == [(str(tmp_path / "a.jpg"), "a.jpg", 3)]
    assert reasons(res) == {str(tmp_path / "missing.png"): "not_found", str(tmp_path / "d.png"): "not_a_regular_file"}
    res = stat_paths(["a.jpg"], base=tmp_path)
    assert res.files[0].path == str(tmp_path / "a.jpg")
