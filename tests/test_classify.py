"""Zero-shot classification: prediction maths, the sidecar parquet (snapshot untouched), truth scoring, CLI."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from t2c.data.errors import InvalidInput, NotFound, UnknownChoice
from t2c.data.store import open_store
from t2c.query.classify import annotation_path, classify, confusion, predict, read_predictions
from tests.test_audit import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("classify"), n=20)


def test_predict_and_confidence():
    s = np.array([[0.1, 0.3, 0.2], [0.5, 0.1, 0.1]], np.float32)
    idx, top, conf = predict(s)
    assert list(idx) == [1, 0] and np.allclose(top, [0.3, 0.5])
    assert np.all((conf > 0.5) & (conf <= 1.0))
    assert conf[1] > conf[0]  # a larger margin means higher confidence


def test_confusion_counts():
    c = confusion(["a", "a", "b", "B", "x", None], ["a", "b", "b", "b", "a", "a"], ["a", "b"])
    assert c["accuracy"] == 3 / 4 and c["n_scored"] == 4 and c["n_truth_unknown"] == 2
    assert c["matrix"] == [[1, 1], [0, 2]]
    assert c["top_confusions"] == [{"truth": "a", "predicted": "b", "count": 1}]
    assert c["per_class"]["b"]["precision"] == 2 / 3 and c["per_class"]["a"]["recall"] == 0.5


def test_classify_writes_sidecar_not_snapshot(store):
    before = {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()}
    out = classify(store, "warm,cool", truth="label", name="temp")
    assert out["n"] == 20 and sum(out["counts"].values()) == 20
    path = annotation_path(store.root, "temp")
    assert out["annotations"] == str(path) and path.is_file()
    assert {p.name: p.stat().st_mtime_ns for p in store.path.iterdir()} == before
    open_store(store.root, verify=True)  # checksums still match
    t = read_predictions(store.root, "temp")
    assert t.column("id").to_pylist() == [int(i) for i in store.ids]
    assert set(t.column("label").to_pylist()) <= {"warm", "cool"}
    assert json.loads(t.schema.metadata[b"labels"]) == ["warm", "cool"]
    truth = dict(store.catalog().execute("SELECT id, label FROM images").fetchall())
    acc = np.mean([truth[i] == l for i, l in zip(t.column("id").to_pylist(), t.column("label").to_pylist())])
    assert out["accuracy"] == pytest.approx(acc)
    assert not list(path.parent.glob(".*tmp"))


def test_classify_errors(store, tmp_path):
    with pytest.raises(InvalidInput):
        classify(store, "only-one")
    with pytest.raises(UnknownChoice):
        classify(store, "a,b", truth="no_such_column", write=False)
    with pytest.raises(InvalidInput):
        classify(store, "a,b", name="../escape")
    with pytest.raises(NotFound):
        read_predictions(store.root, "never")
    f = tmp_path / "labels.txt"
    f.write_text("warm\ncool\n")
    out = classify(store, str(f), write=False)
    assert out["labels"] == ["warm", "cool"] and out["annotations"] is None


def test_cli_classify(store):
    import typer
    from typer.testing import CliRunner

    from t2c.service import cli_audit

    app = typer.Typer()
    cli_audit.register(app)
    r = CliRunner().invoke(app, ["classify", str(store.root), "--labels", "warm,cool", "--truth", "label", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert 0 <= d["accuracy"] <= 1 and len(d["matrix"]) == 2
    r = CliRunner().invoke(app, ["classify", str(store.root), "--labels", "warm,cool", "--truth", "label"])
    assert r.exit_code == 0 and "accuracy vs label" in r.stdout
