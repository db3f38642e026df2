"""Concept bottleneck: the FISTA softmax solver, sparsity, save/load, training on a labelled store, CLI."""
import json

import numpy as np
import pytest

from t2c.data.errors import DamagedArtefact, InvalidInput, NotFound, UnknownChoice
from t2c.query.cbm import ConceptBottleneck, evaluate_cbm, fit_softmax, train_cbm
from tests.test_audit import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cbm"), n=48, classes=("warm", "cool", "green"))


def _toy(seed=0, n=600):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(0, 1, (n, 10))
    X[:, 0] += 2.5 * (y == 0)
    X[:, 1] += 2.5 * (y == 1)
    X[:, 2] += 2.5 * (y == 2)
    return X, y


def test_softmax_solver_learns_and_l1_sparsifies():
    X, y = _toy()
    W, b = fit_softmax(X[:400], y[:400], 3)
    acc = ((X[400:] @ W + b).argmax(1) == y[400:]).mean()
    assert acc > 0.85
    Ws, bs = fit_softmax(X[:400], y[:400], 3, l1=0.05)
    assert ((X[400:] @ Ws + bs).argmax(1) == y[400:]).mean() > 0.8
    assert (np.abs(Ws[3:]) < 1e-6).mean() > 0.8  # noise features dropped
    assert (np.abs(Ws[:3]) > 1e-6).sum() >= 3
    assert (np.abs(Ws) < 1e-6).sum() > (np.abs(W) < 1e-6).sum()


def test_train_save_load_eval(store, tmp_path):
    model, rep = train_cbm(store, "warm,cool,green,red,blue,sky", "label")
    assert rep["classes"] == ["cool", "green", "warm"] and rep["n"] == 48
    assert rep["n_train"] + rep["n_test"] == 48
    assert rep["probe_accuracy"] >= 0.9
    assert rep["cbm_accuracy"] >= 0.6
    assert set(rep["top_concepts"]) == set(rep["classes"])
    p = model.save(tmp_path / "m.safetensors")
    back = ConceptBottleneck.load(p)
    S = np.random.default_rng(0).normal(0, 0.2, (5, 6)).astype(np.float32)
    assert back.predict(S) == model.predict(S) and back.concepts == model.concepts
    ev = evaluate_cbm(store, back)
    assert ev["n"] == 48 and ev["accuracy"] >= 0.6


def test_cbm_errors(store, tmp_path):
    with pytest.raises(UnknownChoice):
        train_cbm(store, "a,b", "nope")
    with pytest.raises(NotFound):
        ConceptBottleneck.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedArtefact):
        ConceptBottleneck.load(bad)
    m, _ = train_cbm(store, "warm,cool", "label", l1=0.0, probe=False)
    m.meta["clip"] = "world:clip"
    with pytest.raises(InvalidInput):
        evaluate_cbm(store, m)


def test_cli_cbm(store, tmp_path):
    import typer
    from typer.testing import CliRunner

    from t2c.service import cli_audit

    app = typer.Typer()
    cli_audit.register(app)
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["cbm", "train", str(store.root), "--concepts", "warm,cool,green", "--labels-column",
                                 "label", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert out.is_file() and "probe_accuracy" in d and "gap" in d
    r = CliRunner().invoke(app, ["cbm", "eval", str(store.root), "--model", str(out)])
    assert r.exit_code == 0 and "accuracy:" in r.stdout
