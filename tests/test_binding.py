"""Binding at query time, estimated precision/recall, and the bounded snapshot caches."""
from __future__ import annotations

import re

import numpy as np
import pytest

from t2c.query.binding import (BASIC_COLOURS, MAX_SCENE_WORDS, MIN_BINDING, Binding, binding_of, binding_strength,
                               bound_mask, joint_share, reading_share, rule_agreement)
from t2c.query.estimate import answer_estimate, bound_posterior, bound_rates, concept_rates, reading_rates
from t2c.query.lru import LRUCache


def test_binding_of_world_pair_lists_rivals_sharing_a_word():
    b = binding_of("orange star", "world:clip")
    assert b.words == ("orange", "star")
    assert "orange circle" in b.same_attribute and "orange star" not in b.same_attribute
    assert "blue star" in b.same_object and len(b.same_object) == 7 and len(b.same_attribute) == 5


@pytest.mark.parametrize("text", ["orange", "star", "star orange", "large red circle", "teal background"])
def test_binding_of_other_concepts_is_none(text):
    assert binding_of(text, "world:clip") is None


def test_binding_of_open_vocabulary_uses_colour_words_only():
    b = binding_of("red car", "open_clip:ViT-B-32/openai")
    assert b.same_attribute == () and len(b.same_object) == len(BASIC_COLOURS) - 1
    assert binding_of("fast car", "open_clip:ViT-B-32/openai") is None


def test_world_pairs_use_the_scene_rule_and_open_vocabularies_the_rival_rule():
    assert binding_of("red circle", "world:clip").to_dict()["rule"] == "scene"
    b = binding_of("red circle", "world:clip")
    assert len(b.texts()) == len(set(b.texts())) == 1 + 14 + 48 - 1  # the pair itself is one of the 48
    assert binding_of("red car", "open_clip:ViT-B-32/openai").to_dict()["rule"] == "rivals"


def _scene_scores(b, n, present_words, pairs):
    """Scores over n rows: every word of ``present_words[row]`` at 1, every (pair, row) of ``pairs`` set."""
    scores = {t: np.zeros(n, np.float32) for t in b.texts()}
    for row, words in enumerate(present_words):
        for w in words:
            scores[w][row] = 1.0
    for (text, row), v in pairs.items():
        scores[text][row] = v
    return scores


def test_scene_rule_picks_the_best_smallest_explanation_of_the_present_words():
    b = binding_of("red circle", "world:clip")
    thr = {w: 0.5 for w in b.scene_words()}
    words = [("red", "blue", "circle", "square")] * 3 + [("red", "circle")]
    pairs = {  # row 0: red square + blue circle; row 1: red circle + blue square; row 2: a close call
        ("red square", 0): 0.6, ("blue circle", 0): 0.6, ("red circle", 0): 0.5, ("blue square", 0): 0.2,
        ("red square", 1): 0.3, ("blue circle", 1): 0.3, ("red circle", 1): 0.5, ("blue square", 1): 0.5,
        ("red square", 2): 0.41, ("blue circle", 2): 0.4, ("red circle", 2): 0.4, ("blue square", 2): 0.4,
        ("red circle", 3): 0.1}  # row 3: one object, whatever its pair score
    present, margin = bound_mask(b, _scene_scores(b, 4, words, pairs), thr)
    assert present.tolist() == [False, True, False, True]
    from t2c.query.binding import _judge  # one enumeration gives the reading shares too

    judged = _judge(b, _scene_scores(b, 4, words, pairs), thr)
    assert judged[2].tolist() == reading_share(b, _scene_scores(b, 4, words, pairs), thr).tolist() == [.5, .5, .5, 1]
    assert margin[0] == pytest.approx(0.35 - 0.6) and margin[1] == pytest.approx(0.5 - 0.3)
    assert margin[2] == pytest.approx(-0.005, abs=1e-6) and margin[3] > 0
    # a red square + blue circle whose circle looks a little red: "red circle" beats "blue circle", so the
    # rival rule calls it present; the scene rule reads the whole image and does not
    pairs = {("red square", 0): 0.6, ("blue circle", 0): 0.45, ("red circle", 0): 0.5, ("blue square", 0): 0.1}
    scores = _scene_scores(b, 1, words[:1], pairs)
    rivals = Binding(b.text, b.words, b.same_attribute, b.same_object)
    assert bound_mask(rivals, scores, thr)[0].tolist() == [True]
    assert bound_mask(b, scores, thr)[0].tolist() == [False]


def test_a_tower_that_does_not_bind_is_judged_by_its_words_with_reading_shares():
    b = binding_of("red circle", "world:clip-plain")
    thr = {w: 0.5 for w in b.scene_words()}
    words = [("red", "blue", "circle", "square")] * 2 + [("red", "circle"), ("red", "square")]
    # a bag-of-words tower: every reading of rows 0 and 1 scores (almost) the same
    pairs = {("red square", 0): 0.401, ("blue circle", 0): 0.401, ("red circle", 0): 0.4, ("blue square", 0): 0.4,
             ("red square", 1): 0.4, ("blue circle", 1): 0.4, ("red circle", 1): 0.401, ("blue square", 1): 0.401}
    scores = _scene_scores(b, 4, words, pairs)
    bound, margin = bound_mask(b, scores, thr)
    assert bound.tolist() == [False, True, True, False]  # the scene rule follows the noise
    by_words, margin2 = bound_mask(b, scores, thr, binds=False)
    assert by_words.tolist() == [True, True, True, False] and np.array_equal(margin, margin2)
    assert reading_share(b, scores, thr).tolist() == [0.5, 0.5, 1.0, 0.0]
    ok = by_words
    strength = binding_strength(margin, ok, scores["red circle"])
    assert strength is None  # fewer than 5 rows where both words pass: no verdict
    rng = np.random.default_rng(0)
    many = rng.normal(0, 0.3, 200)
    assert binding_strength(rng.normal(0, 0.001, 200), np.ones(200, bool), many) < MIN_BINDING
    assert binding_strength(rng.normal(0, 0.3, 200), np.ones(200, bool), many) > MIN_BINDING
    rates = reading_rates(np.array([0.5, 0.5, 1.0, 0.0]), ok, [{"precision": 1.0, "recall": 0.9, "miss": 0.01}] * 2)
    assert rates["precision"] == pytest.approx(2 / 3) and rates["recall"] == pytest.approx(0.81)
    assert reading_rates(np.zeros(4), np.zeros(4, bool), [{"precision": 1, "recall": 1, "miss": 0}]) is None


def test_joint_share_needs_one_reading_that_holds_every_pair():
    pt, pc, rc = (binding_of(t, "world:clip-plain") for t in ("purple triangle", "purple circle", "red circle"))
    thr = {w: 0.5 for w in pt.scene_words()}
    words = [("purple", "red", "triangle", "circle"),  # two objects: {pt, rc} or {pc, rt}
             ("purple", "triangle", "circle"),  # one colour, two shapes: {pt, pc} is the only reading
             ("purple", "red", "blue", "triangle", "circle", "star"),  # 3 x 3: six readings
             ("purple", "triangle")]  # "circle" fails
    scores = _scene_scores(pt, len(words), words, {})
    assert joint_share([pt, pc], scores, thr).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert joint_share([pt, rc], scores, thr).tolist() == pytest.approx([0.5, 0.0, 1 / 6, 0.0])
    for b in (pt, pc):  # one concept alone: its reading share
        assert joint_share([b], scores, thr).tolist() == reading_share(b, scores, thr).tolist()
    others = tuple(c for c in pt.scene[0] if c != "purple")[:MAX_SCENE_WORDS]
    every = [("purple", *others, "triangle", "circle")]  # too many colours to enumerate: no verdict
    assert joint_share([pt, pc], _scene_scores(pt, 1, every, {}), thr).tolist() == [1.0]


def test_scene_rule_falls_back_to_rivals_when_too_many_words_fire():
    b = binding_of("red circle", "world:clip")
    thr = {w: 0.5 for w in b.scene_words()}
    every = [tuple(b.scene[0][:MAX_SCENE_WORDS + 1]) + ("circle",)]
    scores = _scene_scores(b, 1, every, {("red circle", 0): 0.9})
    rivals = Binding(b.text, b.words, b.same_attribute, b.same_object)
    assert bound_mask(b, scores, thr)[1][0] == pytest.approx(bound_mask(rivals, scores, thr)[1][0])


def test_bound_mask_rejects_images_where_both_kinds_of_rival_win():
    w = binding_of("red circle", "world:clip")
    b = Binding(w.text, w.words, w.same_attribute, w.same_object)  # the rival rule (as for open vocabularies)
    n = 3
    scores = {t: np.zeros(n, np.float32) for t in b.texts()}
    scores["red"][:] = scores["circle"][:] = 1.0
    scores["red circle"][:] = 0.5
    scores["red square"][:] = [0.9, 0.9, 0.1]   # same colour, another shape
    scores["blue circle"][:] = [0.9, 0.1, 0.1]  # same shape, another colour
    present, margin = bound_mask(b, scores, {"red": 0.5, "circle": 0.5})
    # row 0: an unbound red square + blue circle; row 1: only one kind of rival wins; row 2: none wins
    assert present.tolist() == [False, True, True]
    assert margin[0] < 0 <= margin[1] <= margin[2]
    scores["circle"][2] = 0.0  # a word that is absent fails the concept whatever its margin
    assert bound_mask(b, scores, {"red": 0.5, "circle": 0.5})[0].tolist() == [False, True, False]


class _Cal:
    def __init__(self, threshold, method="gmm", params=None):
        self.threshold, self.method, self.params = threshold, method, params or {}


def test_concept_rates_from_a_mixture_match_the_closed_form():
    from statistics import NormalDist

    params = {"weights": [0.8, 0.2], "means": [0.0, 1.0], "stds": [0.2, 0.2], "present_from": 1}
    r = concept_rates(_Cal(0.5, params=params))
    q = 1 - NormalDist(1.0, 0.2).cdf(0.5)
    fp = 1 - NormalDist(0.0, 0.2).cdf(0.5)
    assert r["recall"] == pytest.approx(q)
    assert r["precision"] == pytest.approx(0.2 * q / (0.2 * q + 0.8 * fp))
    assert concept_rates(_Cal(0.5, "tail", {"median": 0.0})) is None


def test_bound_rates_are_probabilities_and_none_without_both_outcomes():
    rng = np.random.default_rng(0)
    margin = np.r_[rng.normal(0.1, 0.03, 50), rng.normal(-0.1, 0.03, 50)]
    ok = np.ones(100, bool)
    r = bound_rates(margin, ok, margin >= 0, [])
    assert 0.9 < r["precision"] <= 1 and 0.9 < r["recall"] <= 1 and 0 <= r["miss"] < 0.1
    assert bound_rates(margin, ok, np.ones(100, bool), []) is None
    post = bound_posterior(np.array([-5.0, -0.1, 0.0, 0.1, 5.0]), r["sides"])  # far margins: 0 or 1, no NaN
    assert np.all(np.diff(post) > -1e-12) and post[0] == pytest.approx(0) and post[-1] == pytest.approx(1)
    assert np.all(np.isfinite(post)) and post[1] < 0.1 < 0.9 < post[3]
    # the mean posterior over the passing margins is the concept's precision
    assert r["precision"] == pytest.approx(bound_posterior(margin[margin >= 0], r["sides"]).mean())


def test_answer_estimate_combines_leaves_as_independent():
    from t2c.query.parse import parse

    node = parse("a AND NOT b")
    a, b = node.children[0], node.children[1].child
    leaves = [(a, True), (b, False)]
    fit = {"weights": [0.5, 0.5], "means": [0.0, 1.0], "stds": [0.1, 0.1], "present_from": 1}
    cals = {id(a): _Cal(0.5, params=fit), id(b): _Cal(0.5, params=fit)}
    passed = {id(a): np.array([True, True, False]), id(b): np.array([False, True, False])}
    match = np.array([True, False, False])
    est = answer_estimate(node, leaves, cals, passed, None, match)
    ra = concept_rates(cals[id(a)])
    assert est["precision"] == pytest.approx(ra["precision"] * (1 - ra["miss"]), abs=1e-4)
    assert 0 < est["recall"] <= 1 and set(est["concepts"]) == {"a", "b"}


def test_answer_estimate_uses_row_shares_and_joint_readings_when_given():
    from t2c.query.parse import parse

    node = parse('"purple triangle" AND "purple circle"')
    a, b = node.children
    rates = {"precision": 0.5, "recall": 1.0, "miss": 0.0, "words_precision": 0.9}
    cals = {id(a): _Cal(0.1, "bound", {"rates": rates}), id(b): _Cal(0.1, "bound", {"rates": rates})}
    passed = {id(a): np.ones(3, bool), id(b): np.ones(3, bool)}
    match = np.ones(3, bool)
    share = np.array([0.5, 1.0, 0.5])
    independent = answer_estimate(node, [(a, True), (b, True)], cals, passed, None, match)
    assert independent["precision"] == pytest.approx(0.25)  # the mean precisions, multiplied
    per_row = {id(a): share, id(b): share}
    rows = answer_estimate(node, [(a, True), (b, True)], cals, passed, None, match, readings=per_row)
    assert rows["precision"] == pytest.approx(np.mean((share * 0.9) ** 2), abs=1e-4)
    joint = np.array([0.0, 1.0, 0.5])
    est = answer_estimate(node, [(a, True), (b, True)], cals, passed, None, match, readings=per_row,
                          joint=lambda n: ([a, b], joint * 0.81) if n is node else None)
    assert est["precision"] == pytest.approx(np.mean(joint * 0.81), abs=1e-4)


def test_lru_cache_bounds_entries_and_forgets_older_snapshots():
    c = LRUCache(3)
    for i in range(5):
        c.setdefault(i, i)
    assert len(c) == 3 and c.get(0) is None and c.get(4) == 4
    c = LRUCache(10)
    c.setdefault("x1", 1, scope="store", generation="s-000001")
    c.setdefault("y", 9, scope="other", generation="s-000001")
    c.setdefault("x2", 2, scope="store", generation="s-000002")
    assert c.get("x1") is None and c.get("x2") == 2 and c.get("y") == 9
    # a request still on the old snapshot gets its value back, but it is not kept
    assert c.setdefault("x1", 1, scope="store", generation="s-000001") == 1 and c.get("x1") is None


def test_calibration_cache_keeps_only_the_live_snapshot(tmp_path):
    from t2c.query import calibrate as cal

    class Snap:
        def __init__(self, name, vectors):
            self.root, self.name, self.vectors, self.manifest = tmp_path, name, vectors, {}

    class Bank:
        clip_spec = "test:none"
        present_score = None

        def vectors(self, texts):
            return np.stack([np.eye(4, dtype=np.float32)[hash(t) % 4] for t in texts])

    rng = np.random.default_rng(0)
    v = rng.normal(size=(200, 4)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    cal.clear_cache()
    cal.thresholds_for(Snap("s-000001", v), ["a", "b"], bank=Bank())
    assert len(cal._CACHE) == 2
    cal.thresholds_for(Snap("s-000002", v), ["a"], bank=Bank())
    assert len(cal._CACHE) == 1
    cal.clear_cache()


@pytest.fixture(scope="module")
def world_store(tmp_path_factory):
    from t2c.data.world.generator import generate
    from t2c.indexer.pipeline import index_folder

    root = tmp_path_factory.mktemp("bind")
    generate(root / "w", 400, 31337)
    index_folder(root / "w" / "images", root / "st", "world:clip", workers=0, batch_size=200)
    index_folder(root / "w" / "images", root / "plain", "world:clip-plain", workers=0, batch_size=200)
    return root


def _cals_by_text(eng, q: str) -> dict:
    """{concept text: its calibration} for the scored concepts of query ``q``."""
    from t2c.query import ast as qa

    node = eng.parse_query(q)
    cals = eng.calibrations(node)
    return {leaf.text: cals[id(leaf)] for leaf in qa.scored(node)}


def test_a_plain_clip_gets_the_collection_cut_and_judges_pairs_by_their_words(world_store):
    """world:clip-plain (no own cut, a bag-of-words text tower): estimated cut, words rule; world:clip: neither."""
    from t2c.data.store import open_store
    from t2c.query.calibrate import collection_cut
    from t2c.query.engine import Engine

    plain = Engine(open_store(world_store / "plain", verify=False))
    cut = collection_cut(plain.snapshot, plain.bank)
    assert cut is not None and 0 < cut < 0.3
    q = '"red circle" AND NOT star'
    cals = _cals_by_text(plain, q)
    assert cals["red circle"].method == "bound" and cals["red circle"].params["binds"] is False
    assert cals["red circle"].params["binding"]["rule"] == "words"
    assert cals["star"].method in ("cut", "gmm") and (cals["star"].method == "gmm" or cals["star"].threshold == cut)
    res = plain.search(q, k=10_000, explain=True)
    assert np.array_equal(np.sort(res.all_ids), plain.reference_answer(q))
    assert 0 < res.estimate["concepts"]["red circle"]["precision"] <= 1
    clip = Engine(open_store(world_store / "st", verify=False))
    assert collection_cut(clip.snapshot, clip.bank) is None
    assert _cals_by_text(clip, q)["red circle"].params["binds"] is True


def test_two_pairs_on_a_plain_clip_need_one_reading_that_holds_both(world_store):
    """A bag-of-words tower judges each pair by its words; ANDed, the pairs must also fit one reading."""
    from t2c.data.store import open_store
    from t2c.query.binding import binding_of, joint_share
    from t2c.query.calibrate import concept_scores
    from t2c.query.engine import Engine

    eng = Engine(open_store(world_store / "plain", verify=False))
    b1, b2 = binding_of("red circle", "world:clip-plain"), binding_of("red square", "world:clip-plain")
    words = b1.scene_words()
    sc = concept_scores(eng.snapshot, eng.bank.vectors(words))
    q = '"red circle" AND "red square"'
    cals = eng.calibrations(eng.parse_query(q))
    thr = next(iter(cals.values())).params["word_thresholds"]
    share = joint_share([b1, b2], {w: sc[:, j] for j, w in enumerate(words)}, thr)
    res = eng.search(q, k=10_000, explain=True)
    got = np.sort(res.all_ids)
    assert np.array_equal(got, np.sort(np.asarray(eng.snapshot.ids)[share > 0]))
    assert np.array_equal(got, eng.reference_answer(q))
    indexed = Engine(eng.snapshot, exact_rows=10).search(q, k=10_000)  # candidates from the index, not a scan
    assert indexed.plan["strategy"] != "exact_scan" and np.array_equal(np.sort(indexed.all_ids), got)
    each = [set(eng.search(f'"{t}"', k=10_000).all_ids.tolist()) for t in ("red circle", "red square")]
    dropped = len(each[0] & each[1]) - len(got)
    assert dropped > 0  # images with red and circle and square but, say, a blue circle: no reading holds both
    assert res.plan["joint_readings"] == [{"concepts": ["red circle", "red square"], "dropped": dropped}]
    assert 0 < res.estimate["precision"] <= 1  # from the joint reading shares of the answer
    # under OR or NOT the check sits on the AND node it belongs to
    neg = set(eng.search(f'red AND NOT ({q})', k=10_000).all_ids.tolist())
    assert neg == set(eng.search("red", k=10_000).all_ids.tolist()) - set(got.tolist())


def test_cli_explain_names_the_joint_reading_check(world_store, capsys):
    from t2c.service.cli import main

    try:
        main(["query", str(world_store / "plain"), '"red circle" AND "red square"', "--explain", "--no-verify"])
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert re.search(r"one reading: 'red circle' AND 'red square' must hold together .* \((\d+) images", out)


def test_a_store_records_its_shipped_weights_and_a_search_warns_when_they_change(world_store, monkeypatch):
    import hashlib

    from t2c.data.store import open_store
    from t2c.indexer import encoders
    from t2c.indexer.encoders import parse_spec, shipped_weights_digest, weights_file
    from t2c.query.engine import Engine

    snap = open_store(world_store / "st", verify=False)
    shipped = weights_file(parse_spec("world:clip"))
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()[:16]
    assert snap.manifest["weights"] == {"encoder": digest, "clip": digest} and shipped_weights_digest("world:clip") == digest
    assert shipped_weights_digest("world:clip?weights=/some/checkpoint.safetensors") is None  # not hashed
    assert shipped_weights_digest("python:tests.tiny_encoders:tiny_clip") is None
    assert not Engine(snap).search("red", k=1).warnings
    monkeypatch.setattr(encoders, "shipped_weights_digest", lambda spec: "0" * 16)  # the install's weights changed
    warned = Engine(snap).search("red", k=1).warnings
    assert any("index it again" in w and digest in w for w in warned)


def test_rule_agreement_is_the_jaccard_of_two_masks():
    a = np.array([1, 1, 0, 0, 1], bool)
    b = np.array([1, 0, 0, 1, 1], bool)
    assert rule_agreement(a, b, min_images=1) == pytest.approx(2 / 4)
    assert rule_agreement(a, a, min_images=1) == 1.0
    assert rule_agreement(a, ~a, min_images=1) == 0.0
    assert rule_agreement(np.zeros(3, bool), np.zeros(3, bool), min_images=1) is None
    assert rule_agreement(a, a) is None  # 3 images: too few to tell (MIN_AGREEMENT_IMAGES)
    many = np.arange(40) % 2 == 0
    assert rule_agreement(many, many) == 1.0


@pytest.fixture
def own_agreement(monkeypatch):
    """Set ``binding.OWN_AGREEMENT`` for one test, with the calibration cache emptied before and after."""
    from t2c.query import binding, calibrate

    def set_to(value: float) -> None:
        monkeypatch.setattr(binding, "OWN_AGREEMENT", value)
        calibrate.clear_cache()

    yield set_to
    calibrate.clear_cache()


def test_a_tower_that_binds_a_pair_by_itself_keeps_the_pairs_own_threshold(world_store, own_agreement):
    """Where the pair's own calibrated threshold and the scene rule agree on OWN_AGREEMENT of the sample, the
    pair keeps its own calibration (rule "own"): no rival or reading check, so its answer is its threshold's."""
    from t2c.data.store import open_store
    from t2c.query import binding
    from t2c.query.engine import Engine

    snap = open_store(world_store / "st", verify=False)
    q = '"red circle" AND "blue square" OR "orange cross"'  # 12-27 images each, enough to compare the two
    own_agreement(binding.OWN_AGREEMENT)
    shipped = _cals_by_text(Engine(snap), q)
    for c in shipped.values():  # the shipped setting: each pair as its agreement says
        agree = c.params["agreement"]
        assert agree is not None
        assert 0 <= agree <= 1 and (c.params["binding"]["rule"] == "own") == (agree >= binding.OWN_AGREEMENT)
        assert (c.method == "bound") == (c.params["binding"]["rule"] != "own")
    assert any(c.params["binding"]["rule"] == "own" for c in shipped.values())  # world:clip binds its pairs

    own_agreement(0.0)  # every pair that binds at all keeps its own threshold
    eng = Engine(snap)
    cals, plain = _cals_by_text(eng, q), _cals_by_text(Engine(snap, binding=False), q)
    for t, c in cals.items():
        assert c.method != "bound" and c.params["binding"]["rule"] == "own" and c.params["binds"] is True
        assert c.threshold == plain[t].threshold and c.method == plain[t].method
    res = eng.search(q, k=10_000, explain=True)
    assert np.array_equal(np.sort(res.all_ids), np.sort(Engine(snap, binding=False).search(q, k=10_000).all_ids))
    assert np.array_equal(np.sort(res.all_ids), eng.reference_answer(q))
    assert "joint_readings" not in res.plan or not res.plan["joint_readings"]
    assert res.hits and all(e["rule"] == "own" for h in res.hits for e in h.explanation)  # --explain names it
    assert res.estimate is not None and 0 < res.estimate["precision"] <= 1

    own_agreement(2.0)  # never: the scene rule judges every pair
    eng = Engine(snap)
    assert {c.method for c in _cals_by_text(eng, q).values()} == {"bound"}
    assert all(e["rule"] == "scene" for h in eng.search(q, k=5, explain=True).hits for e in h.explanation)


def test_a_pair_on_too_few_images_keeps_the_binding_rule(world_store, own_agreement):
    """Agreement over fewer than MIN_AGREEMENT_IMAGES picked images says nothing: the rule stays."""
    from t2c.data.store import open_store
    from t2c.query import binding
    from t2c.query.engine import Engine

    own_agreement(0.0)
    eng = Engine(open_store(world_store / "st", verify=False))
    cals = _cals_by_text(eng, '"red circle" OR "green star"')  # 22 and 8 images in the 400
    assert cals["red circle"].params["binding"]["rule"] == "own"
    assert cals["green star"].method == "bound" and cals["green star"].params["agreement"] is None
    assert cals["green star"].prevalence * len(eng.snapshot.ids) < binding.MIN_AGREEMENT_IMAGES


def test_a_plain_clip_never_keeps_a_pairs_own_threshold(world_store, own_agreement):
    """A tower that does not bind judges pairs by their words, whatever OWN_AGREEMENT says."""
    from t2c.data.store import open_store
    from t2c.query.engine import Engine

    own_agreement(0.0)
    cals = _cals_by_text(Engine(open_store(world_store / "plain", verify=False)), '"red circle"')
    assert cals["red circle"].method == "bound" and cals["red circle"].params["binding"]["rule"] == "words"
    assert cals["red circle"].params["agreement"] is None


def test_bound_concepts_on_world_clip_agree_with_brute_force_and_carry_estimates(world_store, own_agreement):
    from t2c.data.store import open_store
    from t2c.query.engine import Engine

    own_agreement(2.0)  # the scene rule on every pair (world:clip binds most of them by itself)
    snap = open_store(world_store / "st", verify=False)
    for q in ['"red circle" AND NOT purple', '"blue square" OR "yellow star"', 'green AND NOT "green triangle"']:
        eng = Engine(snap)
        res = eng.search(q, k=10_000, explain=True)
        assert np.array_equal(np.sort(res.all_ids), eng.reference_answer(q))
        methods = {c.method for c in eng.calibrations(eng.parse_query(q)).values()}
        assert "bound" in methods
        est = res.estimate
        assert est is not None and set(est["concepts"]) <= {"red circle", "purple", "blue square", "yellow star",
                                                             "green", "green triangle"}
        assert all(h.explanation for h in res.hits)
        st = eng._begin(q, 10_000, 0, False)  # per-row binding posteriors kept for the estimate
        eng._answer(st)
        post = eng._bound_posteriors(st)
        assert post and all(np.all((p >= 0) & (p <= 1)) for p in post.values())
        plain = Engine(snap, binding=False)
        assert "bound" not in {c.method for c in plain.calibrations(plain.parse_query(q)).values()}


def test_audits_on_a_plain_clip_use_the_estimated_cut(world_store):
    from t2c.data.store import open_store
    from t2c.query.audit import audit, drift
    from t2c.query.calibrate import collection_cut, pooled_cut
    from t2c.query.concepts import concept_bank_for

    snap = open_store(world_store / "plain", verify=False)
    bank = concept_bank_for(snap)
    cut = collection_cut(snap, bank)
    rows = {r["concept"]: r for r in audit(snap, ["star", "red"], n_boot=20).to_dict()["concepts"]}
    assert rows["star"]["calibration"] in ("cut", "gmm") and rows["red"]["calibration"] == "gmm"
    if rows["star"]["calibration"] == "cut":
        assert rows["star"]["threshold"] == pytest.approx(cut)
    assert pooled_cut([snap, snap], bank) == pytest.approx(cut, abs=0.02)
    same = drift(snap, snap, ["star", "red"]).to_dict()
    assert not any(r["significant"] for r in same["concepts"])
