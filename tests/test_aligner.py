"""Aligner: exactness against numpy lstsq, streaming equivalence, held-out R², safetensors round trip."""
import numpy as np
import pytest

from t2c.data.errors import AlignerError, DamagedArtefact, InvalidInput, NotFound
from t2c.indexer.aligner import Aligner, RidgeAccumulator, _holdout_mask, fit_aligner


def _data(n=600, dx=12, dy=5, noise=0.1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dx))
    w = rng.normal(size=(dx, dy))
    b = rng.normal(size=dy)
    y = x @ w + b + noise * rng.normal(size=(n, dy))
    return x, y, w, b


def test_unregularised_fit_equals_lstsq_on_train_rows():
    x, y, _, _ = _data()
    al = fit_aligner(x, y, alphas=(0.0,), seed=3)
    held = _holdout_mask(list(range(len(x))), 0.2, 3)
    xa = np.hstack([x[~held], np.ones((int((~held).sum()), 1))])
    ref = np.linalg.lstsq(xa, y[~held], rcond=None)[0]
    np.testing.assert_allclose(al.W, ref[:-1], atol=1e-5)
    np.testing.assert_allclose(al.b, ref[-1], atol=1e-5)


def test_heldout_r2_matches_direct_computation():
    x, y, _, _ = _data(noise=0.5)
    al = fit_aligner(x, y, seed=1)
    held = _holdout_mask(list(range(len(x))), 0.2, 1)
    pred = x[held] @ al.W + al.b
    sse = ((y[held] - pred) ** 2).sum()
    sst = ((y[held] - y[held].mean(0)) ** 2).sum()
    assert al.r2_heldout == pytest.approx(1 - sse / sst, rel=1e-4)
    assert 0.5 < al.r2_heldout < 1.0
    assert al.r2_per_dim.shape == (5,)


def test_streaming_in_any_batches_with_keys_equals_in_memory():
    x, y, _, _ = _data()
    keys = [f"img{i}" for i in range(len(x))]
    full = fit_aligner(x, y, keys=keys)
    acc = RidgeAccumulator(x.shape[1], y.shape[1])
    order = np.random.default_rng(0).permutation(len(x))
    for chunk in np.array_split(order, 7):
        acc.add(x[chunk], y[chunk], keys=[keys[i] for i in chunk])
    streamed = acc.fit()
    np.testing.assert_allclose(streamed.W, full.W, atol=1e-4)
    assert streamed.meta["alpha"] == full.meta["alpha"]


def test_ridge_chosen_when_features_outnumber_rows():
    x, y, _, _ = _data(n=60, dx=80, noise=1.0)
    al = fit_aligner(x, y)
    assert al.meta["alpha"] > 0


def test_apply_normalises_and_checks_dim():
    x, y, _, _ = _data()
    al = fit_aligner(x, y)
    a = al.apply(x[:10])
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    with pytest.raises(AlignerError):
        al.apply(np.zeros((2, 3)))


def test_save_load_roundtrip(tmp_path):
    x, y, _, _ = _data()
    al = fit_aligner(x, y, encoder="timm:a", clip="world:clip")
    p = al.save(tmp_path / "a.safetensors")
    back = Aligner.load(p)
    np.testing.assert_array_equal(back.W, al.W)
    assert back.meta["encoder"] == "timm:a" and back.digest == al.digest
    back.check_pair("timm:a", "world:clip")
    with pytest.raises(AlignerError):
        back.check_pair("timm:b")


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(NotFound):
        Aligner.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedArtefact):
        Aligner.load(bad)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(InvalidInput):
        fit_aligner(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(AlignerError):
        fit_aligner(np.zeros((2, 2)), np.zeros((2, 2)))


def test_identity_aligner_only_normalises():
    al = Aligner.identity(4, "world:clip")
    v = np.array([[3.0, 0, 4, 0]])
    np.testing.assert_allclose(al.apply(v), [[0.6, 0, 0.8, 0]], atol=1e-6)


def test_typed_errors_survive_pickling():
    import pickle

    from t2c.data.errors import ImageDecodeError, UnknownChoice

    for err in (ImageDecodeError("bomb", "too many pixels"), UnknownChoice("thing", "x", ["a", "b"]),
                InvalidInput("bad", "fix it")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err) and back.hint == err.hint
