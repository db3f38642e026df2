"""Audits and drift: estimator accuracy on synthetic mixtures, multiple-testing corrections, store round
trips with a tiny CLIP, the HTML report and the CLI."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from t2c.data.errors import InvalidInput, UnknownChoice
from t2c.data.store import open_store
from t2c.query.audit import (audit, benjamini_hochberg, check_same_space, cohens_h, drift, drift_from_scores,
                         estimate_prevalence, holm, parse_concept_list, two_proportion_z, wilson)

CLIP = "python:tests.tiny_encoders:tiny_clip"


def make_store(tmp_path, name="st", n=24, seed=0, clip=CLIP, classes=("warm", "cool")):
    """A tiny store of noisy warm/cool images, with a user column ``label`` holding the class."""
    from t2c.indexer.pipeline import index_folder

    rng = np.random.default_rng(seed)
    folder = tmp_path / f"{name}_imgs"
    folder.mkdir(parents=True, exist_ok=True)
    cols = {}
    base = {"warm": (220, 60, 40), "cool": (40, 80, 220), "green": (40, 200, 60)}
    for i in range(n):
        cls = classes[i % len(classes)]
        arr = np.clip(np.array(base[cls]) + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
        rel = f"img{i:03d}.png"
        Image.fromarray(arr).save(folder / rel)
        cols[rel] = {"label": cls}
    index_folder(folder, tmp_path / name, clip, workers=0, user_columns=cols)
    return open_store(tmp_path / name)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("audit"))


# ------------------------------------------------------------------------------------------ estimators
@pytest.mark.parametrize("p", [0.03, 0.2, 0.5])
def test_mixture_estimate_recovers_prevalence(p):
    rng = np.random.default_rng(1)
    n = 4000
    k = int(p * n)
    s = np.r_[rng.normal(0.10, 0.03, n - k), rng.normal(0.30, 0.04, k)]
    est = estimate_prevalence(s, n_boot=100)
    assert est["method"] == "mixture"
    assert abs(est["prevalence"] - p) < 0.01
    assert est["ci_low"] <= p <= est["ci_high"]
    assert est["ci_high"] - est["ci_low"] < 0.05


def test_mixture_beats_count_when_components_overlap():
    rng = np.random.default_rng(2)
    n, p = 6000, 0.1
    k = int(p * n)
    s = np.r_[rng.normal(0.10, 0.04, n - k), rng.normal(0.26, 0.04, k)]  # separation 4 sd: overlap
    mix = estimate_prevalence(s, n_boot=50)
    cnt = estimate_prevalence(s, method="count")
    assert abs(mix["prevalence"] - p) < 0.012
    assert cnt["method"] == "count" and cnt["ci_low"] <= cnt["prevalence"] <= cnt["ci_high"]
    assert abs(mix["prevalence"] - p) <= abs(cnt["prevalence"] - p) + 0.002


def test_one_population_falls_back_to_count():
    s = np.random.default_rng(3).normal(0.1, 0.02, 3000)
    est = estimate_prevalence(s)
    assert est["method"] == "count" and est["prevalence"] < 0.01


def test_estimator_rejects_bad_input():
    with pytest.raises(InvalidInput):
        estimate_prevalence(np.array([np.nan]))
    with pytest.raises(UnknownChoice):
        estimate_prevalence(np.arange(10.0), method="vote")


def test_wilson_and_z():
    lo, hi = wilson(0, 100)
    assert lo == 0 and 0.03 < hi < 0.04
    lo, hi = wilson(50, 100)
    assert lo < 0.5 < hi and math.isclose(0.5 - lo, hi - 0.5, rel_tol=1e-9)
    z, p = two_proportion_z(10, 100, 30, 100)
    assert z > 3 and p < 0.001
    assert two_proportion_z(10, 100, 10, 100) == (0.0, 1.0)


def test_corrections_match_hand_computation():
    p = [0.01, 0.04, 0.03, 0.5]
    np.testing.assert_allclose(benjamini_hochberg(p), [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    np.testing.assert_allclose(holm(p), [0.04, 0.09, 0.09, 0.5])
    assert cohens_h(0.1, 0.3) > 0 > cohens_h(0.3, 0.1)
    assert math.isclose(cohens_h(0.5, 0.5), 0.0, abs_tol=1e-12)


def _scores(rng, n, prevalences):
    cols = []
    for p in prevalences:
        k = rng.binomial(n, p)
        col = np.r_[rng.normal(0.1, 0.03, n - k), rng.normal(0.3, 0.04, k)]
        cols.append(rng.permutation(col))
    return np.stack(cols, 1)


def test_drift_ranks_the_changed_concept_first_and_flags_only_it():
    rng = np.random.default_rng(4)
    names = [f"c{i}" for i in range(8)]
    base = [0.1, 0.2, 0.3, 0.15, 0.25, 0.1, 0.2, 0.3]
    changed = list(base)
    changed[5] = 0.3
    rows = drift_from_scores(_scores(rng, 800, base), _scores(rng, 800, changed), names)
    rows.sort(key=lambda r: -abs(r["cohens_h"]))
    assert rows[0]["concept"] == "c5" and rows[0]["significant"] and rows[0]["diff"] > 0.1
    assert not any(r["significant"] for r in rows[1:])
    with pytest.raises(UnknownChoice):
        drift_from_scores(_scores(rng, 10, [0.5]), _scores(rng, 10, [0.5]), ["x"], correction="sidak")


def test_parse_concept_list(tmp_path):
    assert parse_concept_list("red, circle ,red,,") == ["red", "circle"]
    f = tmp_path / "c.txt"
    f.write_text("# colours\nred\n\nblue  # a comment\n")
    assert parse_concept_list(str(f)) == ["red", "blue"]
    assert parse_concept_list(["a", "b"]) == ["a", "b"]
    with pytest.raises(InvalidInput):
        parse_concept_list(" , ")


# ------------------------------------------------------------------------------------------ stores
def test_audit_on_a_store(store):
    from t2c.query.concepts import concept_bank_for

    rep = audit(store, "warm red,cool blue", top=3, n_boot=50)
    d = rep.to_dict()
    assert d["n"] == 24 and [c["concept"] for c in d["concepts"]] == ["warm red", "cool blue"]
    vecs = concept_bank_for(store).vectors(["warm red", "cool blue"])
    brute = np.asarray(store.vectors) @ vecs.T
    for j, c in enumerate(d["concepts"]):
        assert 0 <= c["ci_low"] <= c["prevalence"] <= c["ci_high"] <= 1
        expected = [int(store.ids[i]) for i in np.argsort(-brute[:, j], kind="stable")[:3]]
        assert c["examples"] == expected
        assert c["count"] == int((brute[:, j] >= c["threshold"] - 1e-6).sum())
    json.dumps(d)


def test_drift_between_stores_and_space_check(tmp_path, store):
    other = make_store(tmp_path, "b", n=18, seed=5, classes=("warm", "cool", "green"))
    rep = drift(store, other, ["warm red", "cool blue", "green"], top=2)
    d = rep.to_dict()
    assert [r["rank"] for r in d["concepts"]] == [1, 2, 3]
    hs = [abs(r["cohens_h"]) for r in d["concepts"]]
    assert hs == sorted(hs, reverse=True)
    assert all(len(r["examples_b"]) == 2 and set(r["examples_b"]) <= set(map(int, other.ids)) for r in d["concepts"])
    with pytest.raises(InvalidInput):
        check_same_space(SimpleNamespace(clip="a", dim=16), SimpleNamespace(clip="b", dim=16))
    with pytest.raises(InvalidInput):
        check_same_space(SimpleNamespace(clip="a", dim=16), SimpleNamespace(clip="a", dim=8))
    small = make_store(tmp_path, "c", n=6, clip=CLIP + "?dim=8")
    with pytest.raises(InvalidInput):
        drift(store, small, ["warm red"])


def test_html_report_is_self_contained(tmp_path, store):
    from t2c.query.report import audit_html, drift_html, write_html

    rep = audit(store, ["<b>warm</b>", "cool"], top=2, n_boot=20)
    html = audit_html(rep, store)
    assert html.count("<svg") >= 2 and html.count("data:image/png;base64,") == 4
    assert "<b>warm</b>" not in html and "&lt;b&gt;warm&lt;/b&gt;" in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "<script" not in html
    d = drift(store, store, ["warm", "cool"], top=1)
    html2 = drift_html(d, store, store)
    assert html2.count("data:image/png;base64,") == 4 and "Concept drift" in html2
    p = write_html(tmp_path / "r" / "a.html", html)
    assert p.read_text(encoding="utf-8") == html


def test_cli_audit_and_drift(tmp_path, store):
    import typer
    from typer.testing import CliRunner

    from t2c.service import cli_audit

    app = typer.Typer()
    cli_audit.register(app)
    r = CliRunner().invoke(app, ["audit", str(store.root), "--concepts", "warm,cool", "--json", "--top", "2",
                                 "--html", str(tmp_path / "a.html")])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert len(d["concepts"]) == 2 and len(d["concepts"][0]["examples"]) == 2
    assert (tmp_path / "a.html").read_text().startswith("<!doctype html>")
    r = CliRunner().invoke(app, ["audit", str(store.root), "--concepts", "warm,cool", "--against", str(store.root)])
    assert r.exit_code == 0, r.output
    assert "1." in r.stdout and "2." in r.stdout
