"""Calibration: thresholds from the collection's own score distribution (mixture fit, fallbacks)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from t2c.data.errors import InvalidInput
from t2c.query.calibrate import calibrate, concept_scores, fit_gmm2, reference_threshold


@pytest.mark.parametrize("w", [0.02, 0.1, 0.3, 0.6])
def test_threshold_between_modes(w):
    rng = np.random.default_rng(0)
    n = 20000
    k = int(n * w)
    s = np.r_[rng.normal(0.1, 0.03, n - k), rng.normal(0.35, 0.04, k)]
    c = calibrate(s)
    assert c.method == "gmm"
    assert 0.17 < c.threshold < 0.28
    assert c.prevalence == pytest.approx(w, abs=0.01)
    assert c.scale == pytest.approx(0.03, rel=0.1)
    truth = np.r_[np.zeros(n - k, bool), np.ones(k, bool)]
    pred, ref = s >= c.threshold, s >= reference_threshold(s)
    f1 = lambda p: 2 * (p & truth).sum() / (p.sum() + truth.sum())  # noqa: E731
    assert f1(pred) > 0.98 and f1(pred) >= f1(ref)


def test_unequal_variances_crossing_is_where_posteriors_meet():
    rng = np.random.default_rng(1)
    s = np.r_[rng.normal(0.0, 0.05, 9000), rng.normal(0.5, 0.15, 1000)]
    c = calibrate(s)
    p = c.params
    t = c.threshold
    from t2c.query.calibrate import _norm_logpdf

    a = np.log(p["weights"][0]) + _norm_logpdf(t, p["means"][0], p["stds"][0])
    b = np.log(p["weights"][1]) + _norm_logpdf(t, p["means"][1], p["stds"][1])
    assert abs(a - b) < 0.05
    assert p["means"][0] < t < p["means"][1]


def test_degenerate_unimodal_uses_tail():
    rng = np.random.default_rng(2)
    s = rng.normal(0.2, 0.05, 10000)  # absent everywhere (or present everywhere): one population
    c = calibrate(s)
    assert c.method == "tail"
    assert c.prevalence < 0.01
    assert c.threshold > 0.2 + 3 * 0.05


def test_constant_and_tiny_inputs():
    c = calibrate(np.full(100, 0.3, np.float32))
    assert c.method == "constant" and c.prevalence == 0 and c.threshold > 0.3
    assert calibrate([0.1]).prevalence == 0
    assert calibrate([0.1, 0.9]).threshold is not None
    with pytest.raises(InvalidInput):
        calibrate([])
    with pytest.raises(InvalidInput):
        calibrate([np.nan, np.inf])


def test_deterministic_and_order_free():
    rng = np.random.default_rng(3)
    s = np.r_[rng.normal(0.1, 0.03, 5000), rng.normal(0.3, 0.04, 500)]
    a, b = calibrate(s), calibrate(rng.permutation(s))
    assert a.threshold == b.threshold and a.to_dict() == b.to_dict()


def test_prevalence_at_and_override():
    rng = np.random.default_rng(4)
    s = np.r_[rng.normal(0.1, 0.03, 5000), rng.normal(0.3, 0.04, 5000)]
    c = calibrate(s)
    assert c.prevalence_at(-1) == 1.0 and c.prevalence_at(2) == 0.0
    assert c.prevalence_at(0.2) == pytest.approx((s >= 0.2).mean(), abs=0.01)
    o = c.with_threshold(0.35)
    assert o.method == "override" and o.threshold == 0.35 and o.prevalence == pytest.approx((s >= 0.35).mean(), abs=0.01)


def test_gmm_recovers_parameters():
    rng = np.random.default_rng(5)
    s = np.r_[rng.normal(-0.2, 0.05, 6000), rng.normal(0.4, 0.1, 4000)]
    p = fit_gmm2(s)
    np.testing.assert_allclose(p["weights"], [0.6, 0.4], atol=0.01)
    np.testing.assert_allclose(p["means"], [-0.2, 0.4], atol=0.01)
    np.testing.assert_allclose(p["stds"], [0.05, 0.1], atol=0.01)


def test_concept_scores_blockwise():
    rng = np.random.default_rng(6)
    V = rng.normal(size=(1000, 8)).astype(np.float32)
    T = rng.normal(size=(3, 8)).astype(np.float32)
    np.testing.assert_allclose(concept_scores(V, T, block=97), V @ T.T, rtol=1e-5, atol=1e-5)
    rows = np.array([3, 10, 999])
    np.testing.assert_allclose(concept_scores(V, T[0], rows=rows), V[rows] @ T[:1].T, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInput):
        concept_scores(V, np.ones((1, 5)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=300))
def test_never_crashes(xs):
    c = calibrate(xs)
    assert np.isfinite(c.threshold) and 0 <= c.prevalence <= 1 and c.method in ("gmm", "otsu", "tail", "constant")


def test_compositional_concept_takes_the_top_group():
    # "red circle": images with neither word, only the shape, only the colour, and the pair itself
    rng = np.random.default_rng(7)
    groups = [(0.13, 0.04, 11000), (0.28, 0.035, 4200), (0.38, 0.035, 3300), (0.52, 0.035, 1500)]
    s = np.concatenate([rng.normal(m, sd, n) for m, sd, n in groups])
    truth = np.r_[np.zeros(18500, bool), np.ones(1500, bool)]
    c = calibrate(s)
    assert c.method == "gmm" and c.params["components"] >= 3
    assert 0.43 < c.threshold < 0.47  # between "colour only" and the pair, not above the absent bulk
    assert c.params["present_from"] == c.params["components"] - 1
    pred = s >= c.threshold
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.9
    wp, m_abs, m_pres = c.groups()
    assert wp == pytest.approx(0.075, abs=0.01) and m_pres == pytest.approx(0.52, abs=0.01) and m_abs < 0.3


def test_one_word_takes_the_widest_gap_and_a_dominant_group_stays_present():
    # "yellow" on a softmax-trained CLIP: images without yellow (cluttered ones, then single objects a little
    # higher), yellow among clutter, and a tight group of single large yellow objects above that
    rng = np.random.default_rng(9)
    groups = [(0.207, 0.036, 7400), (0.284, 0.017, 4000), (0.42, 0.05, 3200), (0.53, 0.011, 500)]
    s = np.concatenate([rng.normal(m, sd, n) for m, sd, n in groups])
    truth = np.r_[np.zeros(11400, bool), np.ones(3700, bool)]
    one, several = calibrate(s, compositional=False), calibrate(s, compositional=True)
    assert 0.3 < one.threshold < 0.37  # between "no yellow" and "yellow among clutter"
    assert several.threshold > 0.45  # the top-group rule would keep only the dominant images
    pred = s >= one.threshold
    assert 2 * (pred & truth).sum() / (pred.sum() + truth.sum()) > 0.95
    # a model with its own cut decides the gap whatever the kind of concept
    assert calibrate(s, 0.5, compositional=False).threshold > 0.45


def test_plain_concept_keeps_two_groups_under_skew():
    # a skewed absent bulk may take two components; the present group is still the whole upper mode
    rng = np.random.default_rng(8)
    absent = np.r_[rng.normal(0.10, 0.03, 12000), rng.normal(0.16, 0.03, 5000)]
    s = np.r_[absent, rng.normal(0.45, 0.04, 3000)]
    c = calibrate(s)
    assert c.method == "gmm" and 0.25 < c.threshold < 0.38
    assert c.prevalence == pytest.approx(0.15, abs=0.01)


def _mixture(parts, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(m, s, n) for n, m, s in parts])


def test_prior_keeps_a_counting_group_inside_present():
    # a sigmoid-trained CLIP scores two red objects above one red object: "present" is both upper groups
    x = _mixture([(7600, -0.14, 0.03), (2200, 0.27, 0.05), (200, 0.45, 0.035)])
    top_only = calibrate(x)
    assert top_only.threshold > 0.33  # without a prior the top separated group is "present"
    cal = calibrate(x, prior=0.11)
    assert cal.method == "gmm" and -0.05 < cal.threshold < 0.15, cal
    assert cal.params["prior"] == 0.11 and abs(cal.prevalence - 0.24) < 0.01


def test_prior_keeps_partial_matches_below_a_compositional_concept():
    # "red circle": neither word / one word / both words on different objects / the red circle itself
    x = _mixture([(5500, -0.40, 0.04), (3700, -0.16, 0.04), (400, 0.0, 0.025), (400, 0.16, 0.025)])
    cal = calibrate(x, prior=0.09)
    assert cal.method == "gmm" and 0.05 < cal.threshold < 0.12, cal
    assert abs(cal.prevalence - 0.04) < 0.01


def test_prior_is_the_threshold_when_the_collection_shows_no_groups():
    x = np.random.default_rng(3).normal(-0.2, 0.05, 5000)  # the concept is absent everywhere
    cal = calibrate(x, prior=0.1)
    assert cal.method == "prior" and cal.threshold == 0.1 and cal.prevalence == 0.0
    assert calibrate(x[:5], prior=0.1).method == "prior"  # too few scores for a fit
    assert cal.for_search().threshold == 0.1  # searches keep it (no tail rule)


def test_world_clip_exposes_its_present_score():
    from t2c.indexer.encoders import make_encoder
    from t2c.query.concepts import ConceptBank

    enc = make_encoder("world:clip")
    assert enc.present_score is not None and -1 < enc.present_score < 1
    assert enc.describe()["present_score"] == round(enc.present_score, 6)
    assert ConceptBank("world:clip", encoder=enc).present_score == enc.present_score
    assert make_encoder("world:pairnet").present_score is None  # no text tower, no cut


def test_a_non_finite_prior_is_a_clear_error():
    with pytest.raises(InvalidInput, match="finite"):
        calibrate(np.arange(100.0), prior=float("nan"))


def test_thresholds_are_kept_on_disk_per_snapshot_content(tmp_path, monkeypatch):
    """With T2C_CACHE_DIR, a new process (here: a cleared memory cache) reuses calibrations without refitting."""
    import t2c.query.calibrate as qc
    from t2c.query.concepts import ConceptBank

    rng = np.random.default_rng(3)
    d = 16
    concept = rng.normal(size=d).astype(np.float32)
    concept /= np.linalg.norm(concept)
    present = rng.random(3000) < 0.2
    V = rng.normal(size=(3000, d)).astype(np.float32) * 0.3 + np.outer(present, concept * 2.0)
    V /= np.linalg.norm(V, axis=1, keepdims=True)

    class Snap:  # the parts of a Snapshot thresholds_for reads
        def __init__(self, vectors, digest):
            self.vectors, self.name, self.root = vectors, "s-000001", tmp_path / "store"
            self.manifest = {"files": {"vectors.npy": {"digest": digest, "size": vectors.nbytes}}, "created": "t"}

    bank = ConceptBank("tests:none", templates=["{}"], encoder=object())
    bank.put("thing", concept)
    monkeypatch.setenv("T2C_CACHE_DIR", str(tmp_path / "cache"))
    qc.clear_cache()
    first = qc.thresholds_for(Snap(V, "d1"), ["thing"], bank=bank)["thing"]
    assert first.method == "gmm" and len(list((tmp_path / "cache" / "calibrations").glob("*.npz"))) == 1
    qc.clear_cache()
    monkeypatch.setattr(qc, "calibrate", lambda *a, **k: pytest.fail("recomputed a cached calibration"))
    again = qc.thresholds_for(Snap(V, "d1"), ["thing"], bank=bank)["thing"]
    assert again == first and again.threshold == first.threshold
    np.testing.assert_array_equal(again.sorted_sample, first.sorted_sample)
    assert again.prevalence_at(0.1) == first.prevalence_at(0.1)
    # other content (another checksum) is calibrated afresh
    qc.clear_cache()
    with pytest.raises(pytest.fail.Exception):
        qc.thresholds_for(Snap(V, "d2"), ["thing"], bank=bank)
    qc.clear_cache()


# ------------------------------------------------------------------------------ estimated cut (no own cut)
def _clean(seed, m_pres=0.15, s_pres=0.035):
    return _mixture([(3000, -0.07, 0.03), (1000, m_pres, s_pres)], seed)


def test_estimate_cut_is_the_clean_concepts_lower_present_point():
    from t2c.query.calibrate import estimate_cut

    cals = [calibrate(_clean(s), compositional=False) for s in range(4)]
    assert all(c.method == "gmm" and c.params["separation"] >= 4.5 for c in cals)
    cut = estimate_cut(cals)
    assert cut == pytest.approx(0.15 - 1.96 * 0.035, abs=0.01)
    # too few clean concepts: no estimate (an overlapping one does not count)
    overlapped = calibrate(_mixture([(3000, 0.0, 0.04), (1000, 0.08, 0.04)], 5), compositional=False)
    assert estimate_cut(cals[:2] + [overlapped]) is None
    # a few dozen images make spuriously clean splits: too small a sample gives no estimate
    small = [calibrate(_clean(s)[::40], compositional=False) for s in range(4)]
    assert all(c.n < 200 for c in small) and estimate_cut(small) is None


def test_an_overlapping_concept_takes_the_cut_and_a_clean_one_keeps_its_split():
    # a shape among clutter on a softmax CLIP: absent, "present among others" overlapping it, and a tight
    # group of images where it dominates; its widest gap is the dominant one, far above most true images
    rng = np.random.default_rng(11)
    absent = np.r_[rng.normal(-0.02, 0.03, 2000), rng.normal(0.06, 0.03, 700)]
    present = np.r_[rng.normal(0.11, 0.035, 1000), rng.normal(0.18, 0.01, 200)]
    x, truth = np.r_[absent, present], np.r_[np.zeros(len(absent), bool), np.ones(len(present), bool)]
    own = calibrate(x, compositional=False)
    cal = calibrate(x, compositional=False, cut=0.075)
    assert cal.method == "cut" and cal.threshold == 0.075 and cal.params["own_method"] == own.method

    def f1(t):
        p = x >= t
        return 2 * (p & truth).sum() / (p.sum() + truth.sum())

    assert f1(cal.threshold) > f1(own.threshold) + 0.05
    assert cal.prevalence == pytest.approx((x >= 0.075).mean(), abs=0.01)
    clean = _clean(3)
    assert calibrate(clean, compositional=False, cut=0.5) == calibrate(clean, compositional=False)
    # a model with its own cut ignores the estimated one; a concept absent everywhere takes it too
    assert calibrate(x, 0.1, cut=0.075).method != "cut"
    flat = calibrate(np.random.default_rng(2).normal(-0.1, 0.02, 3000), cut=0.075)
    assert flat.method == "cut" and flat.prevalence == 0.0 and flat.for_search().threshold == 0.075
    with pytest.raises(InvalidInput, match="cut"):
        calibrate(x, cut=float("inf"))


def test_thresholds_for_a_bank_without_own_cut_use_the_collection_cut():
    """A centring bank (no present score): its reference words' clean splits set the cut its other concepts use."""
    import t2c.query.calibrate as qc

    rng = np.random.default_rng(4)
    n, d, words = 4000, 32, ["w0", "w1", "w2", "w3"]
    V = rng.normal(size=(n, d)).astype(np.float32) * 0.02
    for j in range(len(words)):  # each reference word clearly present in a quarter of the images
        V[rng.random(n) < 0.25, j] += 0.15
    shape = rng.random(n) < 0.3  # a concept seen among clutter: present images spread over absent ones
    V[:, 5] += np.where(shape, rng.normal(0.10, 0.04, n), rng.normal(0.0, 0.04, n))

    class Bank:
        present_score, clip_spec = None, "tests:plain"
        centre = np.zeros(d, np.float32)

        @staticmethod
        def reference_words():
            return tuple(words)

        @staticmethod
        def vectors(texts):
            return np.stack([np.eye(d, dtype=np.float32)[5 if t == "shape" else int(t[1])] for t in texts])

    class Snap:
        vectors, name, root, manifest = V, "s-000001", "/nonexistent/cut-test", None

    qc.clear_cache()
    cut = qc.collection_cut(Snap, Bank)
    assert cut == pytest.approx(0.15 - 1.96 * 0.02, abs=0.015)
    cals = qc.thresholds_for(Snap, ["shape", "w1"], bank=Bank)
    assert cals["shape"].method == "cut" and cals["shape"].threshold == pytest.approx(cut)
    assert cals["w1"].method == "gmm"  # its own clean split
    Bank.present_score = 0.3  # a model with its own cut: no estimated cut
    qc.clear_cache()
    assert qc.collection_cut(Snap, Bank) is None and qc.thresholds_for(Snap, ["shape"], bank=Bank)["shape"].method != "cut"
    qc.clear_cache()
