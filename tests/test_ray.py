"""Ray engine: a store built with Ray equals one built locally; resume skips finished parts; parquet lists."""
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from t2c.data.store import open_store  # noqa: E402
from t2c.indexer import ray_engine  # noqa: E402
from t2c.indexer.pipeline import index_folder  # noqa: E402
from t2c.indexer.staging import Staging  # noqa: E402
from tests.test_pipeline import make_images  # noqa: E402

CLIP = "python:tests.tiny_encoders:tiny_clip"
CNN = "python:tests.tiny_encoders:tiny_cnn?image_size=32"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=ray_engine.default_runtime_env(),
             log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    make_images(d, 40)
    (d / "d0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return d


def _catalog(snap):
    cur = snap.catalog()
    imgs = cur.execute("SELECT id, path, relpath, content_hash, size, width, height, mtime_ns FROM images "
                       "ORDER BY id").fetchall()
    errs = cur.execute("SELECT path, reason FROM errors ORDER BY path").fetchall()
    return imgs, errs


def assert_same_store(a_path, b_path):
    a, b = open_store(a_path), open_store(b_path)
    assert a.count == b.count > 0
    np.testing.assert_array_equal(np.asarray(a.ids), np.asarray(b.ids))
    assert _catalog(a) == _catalog(b)
    np.testing.assert_allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-5)
    fa = dict((int(i), f) for ids, feats in a.features() for i, f in zip(ids, feats))
    fb = dict((int(i), f) for ids, feats in b.features() for i, f in zip(ids, feats))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fa[k], fb[k], atol=1e-5)
    for key in ("encoder", "clip", "dim", "feature_dim", "counts", "next_id", "feature_shards"):
        assert a.manifest[key] == b.manifest[key], key
    assert a.manifest["aligner"]["digest"] == b.manifest["aligner"]["digest"]
    assert a.manifest["index"]["type"] == b.manifest["index"]["type"]


@pytest.mark.parametrize("encoder,kw", [(CLIP, {}),
                                        pytest.param(CNN, {"fit_aligner": 20, "clip": CLIP}, marks=pytest.mark.slow)])
def test_ray_store_equals_local(tmp_path, folder, encoder, kw):
    local = index_folder(folder, tmp_path / "local", encoder, workers=0, part_size=8, **kw)
    rep = ray_engine.index_folder_ray(folder, tmp_path / "ray", encoder, part_size=8, batch_size=5, **kw)
    assert (rep.added, rep.errors) == (local.added, local.errors) == (40, 1)
    assert rep.resumed_parts == 0 and rep.images_per_second > 0
    assert rep.error_reasons == local.error_reasons
    assert_same_store(tmp_path / "local", tmp_path / "ray")
    # a rerun with nothing new is a no-op
    again = ray_engine.index_folder_ray(folder, tmp_path / "ray", encoder, part_size=8, **kw)
    assert (again.added, again.unchanged) == (0, 41)


_WRITE_PART = Staging.write_part


def _die_after(monkeypatch, n: int, written: list) -> None:
    """Make the shared staging writer (both engines) fail once ``n`` parts are written."""
    def dying(self, i, *a, **k):
        if len(written) == n:
            raise RuntimeError("killed")
        _WRITE_PART(self, i, *a, **k)
        written.append(i)

    monkeypatch.setattr(Staging, "write_part", dying)


def test_resume_skips_finished_parts(tmp_path, folder, monkeypatch):
    written = []
    _die_after(monkeypatch, 2, written)
    with pytest.raises(RuntimeError):
        ray_engine.index_folder_ray(folder, tmp_path / "ray", CLIP, part_size=8)
    first = set(written)
    staged = {p.name for p in (tmp_path / "ray" / "staging").glob("part-*.json")}
    assert staged == {f"part-{i:06d}.json" for i in first}
    assert not (tmp_path / "ray" / "CURRENT").exists()

    written.clear()
    _die_after(monkeypatch, 10**9, written)
    rep = ray_engine.index_folder_ray(folder, tmp_path / "ray", CLIP, part_size=8)
    n_parts = -(-41 // 8)
    assert rep.resumed_parts == 2
    assert sorted(written) == sorted(set(range(n_parts)) - first)
    monkeypatch.undo()
    index_folder(folder, tmp_path / "local", CLIP, workers=0, part_size=8)
    assert_same_store(tmp_path / "local", tmp_path / "ray")


def test_ray_run_resumed_by_local(tmp_path, folder, monkeypatch):
    """One staging format: parts a killed Ray run wrote are kept by the local engine, which stages only the rest."""
    written = []
    _die_after(monkeypatch, 2, written)
    with pytest.raises(RuntimeError):
        ray_engine.index_folder_ray(folder, tmp_path / "st", CLIP, part_size=8)
    first, written[:] = set(written), []
    _die_after(monkeypatch, 10**9, written)
    rep = index_folder(folder, tmp_path / "st", CLIP, workers=0, part_size=8)
    assert rep.resumed_parts == 2 and rep.added == 40
    assert first.isdisjoint(written) and len(first) + len(written) == -(-41 // 8)
    monkeypatch.undo()
    index_folder(folder, tmp_path / "local", CLIP, workers=0, part_size=8)
    assert_same_store(tmp_path / "local", tmp_path / "st")


@pytest.mark.slow
def test_local_run_resumed_by_ray(tmp_path, folder, monkeypatch):
    """Same plan, same run id, same staging format: a killed local run continues under Ray."""
    written = []
    _die_after(monkeypatch, 3, written)
    with pytest.raises(RuntimeError):
        index_folder(folder, tmp_path / "st", CLIP, workers=0, part_size=8)
    monkeypatch.undo()
    rep = ray_engine.index_folder_ray(folder, tmp_path / "st", CLIP, part_size=8)
    assert rep.resumed_parts == 3 and rep.added == 40
    index_folder(folder, tmp_path / "local", CLIP, workers=0, part_size=8)
    assert_same_store(tmp_path / "local", tmp_path / "st")


def test_parquet_path_list(tmp_path, folder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")[:12]
    rel = [str(p.relative_to(folder)) for p in files] + ["d9/missing.png"]
    pq.write_table(pa.table({"path": rel, "label": list(range(len(rel)))}), folder.parent / "list.parquet")
    lst = folder.parent / "list.parquet"
    rep = ray_engine.index_folder_ray(lst, tmp_path / "st", CLIP, part_size=5, base=folder)
    assert rep.added == 12 and rep.error_reasons == {"not_found": 1}
    snap = open_store(tmp_path / "st")
    got = {r[2] for r in _catalog(snap)[0]}
    assert got == set(rel[:-1])
    assert snap.manifest["roots"] == [str(lst.resolve())]
    # adding to the list later indexes only the new paths, keeps ids
    more = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*.png")) if p.name != "broken.png"][12:20]
    pq.write_table(pa.table({"path": rel[:-1] + more}), lst)
    rep2 = ray_engine.index_folder_ray(lst, tmp_path / "st", CLIP, part_size=5, base=folder)
    assert (rep2.added, rep2.unchanged) == (8, 12)
    assert open_store(tmp_path / "st").count == 20


def test_bad_source(tmp_path):
    from t2c.data.errors import InvalidInput, NotFound

    with pytest.raises(NotFound):
        ray_engine.index_folder_ray(tmp_path / "nope", tmp_path / "st", CLIP)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(InvalidInput):
        ray_engine.index_folder_ray(tmp_path / "x.txt", tmp_path / "st", CLIP)
