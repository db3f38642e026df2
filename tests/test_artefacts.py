"""One atomic artefact writer and reader: every loader reports a damaged file with the same error."""
from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from t2c.data import store as store_mod
from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import DamagedArtefact, NotFound


def _aligner(p):
    from t2c.indexer.aligner import Aligner

    return Aligner.load(p)


def _cbm(p):
    from t2c.query.cbm import ConceptBottleneck

    return ConceptBottleneck.load(p)


def _world_model(p):
    from t2c.indexer.world.models import load_world_model

    return load_world_model("pairnet", str(p))


def _world_decoder(p):
    from t2c.indexer.world.decoder import load_decoder

    return load_decoder(p)


def _caption_decoder(p):
    from t2c.query.describe import load_caption_decoder

    return load_caption_decoder(p)


def _clipcap(p):
    from t2c.query.describe import load_prefix_captioner

    return load_prefix_captioner(p)


def _checkpoint(p):
    from t2c.indexer.encoders import _load_state_dict

    return _load_state_dict(str(p))


LOADERS = [_aligner, _cbm, _world_model, _world_decoder, _caption_decoder, _clipcap, _checkpoint]
FORMATTED = [_aligner, _cbm, _world_decoder, _caption_decoder, _clipcap]  # kinds that name their format


def _garbage(path):
    path.write_bytes(b"not a safetensors file at all")


def _truncated(path):
    write_artefact(path, {"W": np.ones((64, 64), np.float32)}, {"format": "t2c-aligner-1"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_garbage, _truncated, _empty])
@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__.strip("_"))
def test_every_loader_reports_a_damaged_file_alike(tmp_path, load, damage):
    path = tmp_path / "bad.safetensors"
    damage(path)
    with pytest.raises(DamagedArtefact) as err:
        load(path)
    assert str(path) in err.value.message and "damaged" in err.value.message and err.value.hint


@pytest.mark.parametrize("load", FORMATTED, ids=lambda f: f.__name__.strip("_"))
def test_every_loader_refuses_another_kind_of_artefact(tmp_path, load):
    path = tmp_path / "other.safetensors"
    write_artefact(path, {"x": np.zeros(3, np.float32)}, {"format": "someone-elses-1"})
    with pytest.raises(DamagedArtefact, match="someone-elses-1"):
        load(path)


@pytest.mark.parametrize("load", LOADERS, ids=lambda f: f.__name__.strip("_"))
def test_every_loader_reports_a_missing_file(tmp_path, load):
    with pytest.raises(NotFound):
        load(tmp_path / "missing.safetensors")


def test_write_then_read_round_trip_and_mode(tmp_path):
    path = tmp_path / "sub" / "a.safetensors"
    write_artefact(path, {"W": np.arange(6, dtype=np.float32).reshape(2, 3)}, {"format": "f-1", "n": 3})
    md, t = read_artefact(path, "thing", fix="make one", formats="f-1", required=("W",))
    assert md == {"format": "f-1", "n": "3"}
    np.testing.assert_array_equal(t["W"], np.arange(6).reshape(2, 3))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert os.listdir(path.parent) == ["a.safetensors"]  # no temporary file left
    with pytest.raises(DamagedArtefact, match="lacks tensor"):
        read_artefact(path, "thing", fix="make one", required=("W", "b"))


def test_torch_tensors_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "t.safetensors"
    write_artefact(path, {"w": torch.ones(2, 2, requires_grad=True)}, {"format": "f-1"})
    _, t = read_artefact(path, "thing", fix="", framework="pt")
    assert torch.equal(t["w"], torch.ones(2, 2))


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    write_artefact(path, {"W": np.ones(2, np.float32)}, {"format": "f-1"})
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "replace", boom)
    with pytest.raises(OSError):
        write_artefact(path, {"W": np.zeros(2, np.float32)}, {"format": "f-1"})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]  # the temporary file is gone


def test_two_writers_never_share_a_temporary_file(tmp_path, monkeypatch):
    """Each write gets its own temporary name (a fixed ``.tmp`` name raced between writers)."""
    names = []
    real = store_mod.tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        names.append(name)
        return fd, name

    monkeypatch.setattr(store_mod.tempfile, "mkstemp", spy)
    for i in range(3):
        write_artefact(tmp_path / "a.safetensors", {"W": np.full(2, i, np.float32)})
    assert len(set(names)) == 3
