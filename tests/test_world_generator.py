"""Concept-world generator, vocabulary and ground truth (no torch needed)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from t2c.data.errors import InvalidInput, NotFound, UnknownChoice
from t2c.data.world import vocab
from t2c.data.world.generator import (
    binding_twin,
    concept_truth,
    generate,
    parse_weights,
    render,
    sample_scene,
    scene_from_labels,
    scene_rng,
)


def test_vocabulary_sizes():
    assert len(vocab.COLORS) >= 8 and len(vocab.SHAPES) >= 6
    assert vocab.SIZES == ("small", "large")
    assert len(vocab.BACKGROUNDS) >= 3
    assert any(spec[0] != "plain" for spec in vocab.BACKGROUNDS.values()), "needs a textured background"
    # object colours and background names must not collide (a bare word must mean one thing)
    assert not set(vocab.COLORS) & set(vocab.BACKGROUNDS)


def test_generator_does_not_import_torch():
    code = "import sys, t2c.data.world, t2c.data.world.generator, t2c.data.world.vocab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_writes_images_and_labels(tmp_path):
    labels_path = generate(tmp_path / "w", n=30, seed=3, size=48)
    t = pq.read_table(labels_path)
    for col in ("path", "background", "objects", "caption"):
        assert col in t.column_names
    obj_fields = {f.name for f in t.schema.field("objects").type.value_type}
    assert {"color", "shape", "size", "x", "y"} <= obj_fields
    rows = t.to_pylist()
    assert len(rows) == 30
    counts = set()
    for r in rows:
        img = Image.open(tmp_path / "w" / r["path"])
        assert img.size == (48, 48) and img.mode == "RGB"
        assert 1 <= len(r["objects"]) <= 3
        counts.add(len(r["objects"]))
        assert r["background"] in vocab.BACKGROUNDS
        for o in r["objects"]:
            assert o["color"] in vocab.COLORS and o["shape"] in vocab.SHAPES and o["size"] in vocab.SIZES
            assert 0 < o["x"] < 1 and 0 < o["y"] < 1
        assert r["caption"] == vocab.canonical_caption(r["background"], r["objects"])
    assert counts == {1, 2, 3}
    assert (tmp_path / "w" / "world.json").exists()


def test_generate_is_deterministic_and_prefix_stable(tmp_path):
    a = pq.read_table(generate(tmp_path / "a", n=12, seed=5)).to_pylist()
    b = pq.read_table(generate(tmp_path / "b", n=20, seed=5)).to_pylist()
    c = pq.read_table(generate(tmp_path / "c", n=12, seed=6)).to_pylist()
    assert a == b[:12]
    assert a != c
    for r in a:
        assert (tmp_path / "a" / r["path"]).read_bytes() == (tmp_path / "b" / r["path"]).read_bytes()


def test_render_draws_labelled_colour_at_object_centre():
    for i in range(60):
        sc = sample_scene(scene_rng(11, i), None, n_objects=1)
        img = np.asarray(render(sc, 64), dtype=np.int32)
        o = sc.objects[0]
        px = img[int(o.y * 64), int(o.x * 64)]
        assert np.abs(px - np.asarray(vocab.COLORS[o.color])).max() <= 40, (sc, px)


def test_render_differs_between_attributes():
    base = sample_scene(scene_rng(1, 0), None, n_objects=1)
    o = base.objects[0]
    swapped = scene_from_labels(base.background, [{**o.label(), "shape": "cross" if o.shape != "cross" else "circle"}],
                                seed=base.seed)
    same = scene_from_labels(base.background, [o.label()], seed=base.seed)
    a, b, c = (np.asarray(render(s, 64), np.int32) for s in (same, swapped, same))
    assert (a == c).all()
    assert np.abs(a - b).sum() > 0


def test_weights_change_frequencies():
    p = parse_weights(["color.red=5", "background.teal=0"])
    scenes = [sample_scene(scene_rng(0, i), p) for i in range(600)]
    colors = [o.color for s in scenes for o in s.objects]
    assert all(s.background != "teal" for s in scenes)
    red = colors.count("red") / len(colors)
    assert red > 0.3  # 5 / 12 expected, versus 1 / 8 unweighted
    only = parse_weights({"background.striped": 1, "background.black": 0, "background.gray": 0,
                          "background.teal": 0, "count.1": 1, "count.2": 0, "count.3": 0})
    scenes = [sample_scene(scene_rng(1, i), only) for i in range(50)]
    assert {s.background for s in scenes} == {"striped"} and {len(s.objects) for s in scenes} == {1}


@pytest.mark.parametrize("bad, err", [
    (["colour.magenta=2"], UnknownChoice),
    (["hue.red=2"], UnknownChoice),
    (["color.red"], InvalidInput),
    (["color.red=-1"], InvalidInput),
    (["color.red=abc"], InvalidInput),
    ([f"color.{c}=0" for c in vocab.COLORS], InvalidInput),
])
def test_bad_weights_are_rejected(bad, err):
    with pytest.raises(err):
        parse_weights(bad)


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidInput):
        generate(tmp_path, n=0, seed=0)
    with pytest.raises(InvalidInput):
        generate(tmp_path, n=2, seed=0, size=4)


# --- vocabulary and tokenizer ---------------------------------------------------------------------------
def test_tokenizer_accepts_templates_and_synonyms():
    for t in vocab.PROMPT_TEMPLATES:
        ids = vocab.tokenize([t.format("red circle")])
        assert ids.shape == (1, vocab.MAX_LEN) and ids[0, 0] == vocab.TOKEN_ID[vocab.CLS]
    assert vocab.words_of("an image of big red circles on a grey background") == [
        "a", "image", "of", "large", "red", "circle", "on", "a", "gray", "background"]
    assert vocab.tokenize(["a " * 100]).shape == (1, vocab.MAX_LEN)  # truncated, not an error


def test_unknown_word_lists_known_words():
    with pytest.raises(UnknownChoice) as e:
        vocab.tokenize(["a red dragon"])
    assert "dragon" in str(e.value) and "circle" in e.value.choices and "red" in e.value.choices


# --- concept ground truth --------------------------------------------------------------------------------
ROWS = [
    {"background": "teal", "objects": [{"color": "red", "shape": "circle", "size": "large", "x": .3, "y": .3}]},
    {"background": "gray", "objects": [{"color": "red", "shape": "square", "size": "small", "x": .3, "y": .3},
                                       {"color": "blue", "shape": "circle", "size": "large", "x": .7, "y": .7}]},
    {"background": "striped", "objects": [{"color": "blue", "shape": "square", "size": "large", "x": .5, "y": .5}]},
]


@pytest.mark.parametrize("concept, expected", [
    ("red", [1, 1, 0]),
    ("circle", [1, 1, 0]),
    ("red circle", [1, 0, 0]),
    ("a photo of a red circle", [1, 0, 0]),
    ("large square", [0, 0, 1]),
    ("small object", [0, 1, 0]),
    ("teal background", [1, 0, 0]),
    ("teal", [1, 0, 0]),
    ("striped", [0, 0, 1]),
    ("red square and blue circle", [0, 1, 0]),
    ("red circle on a teal background", [1, 0, 0]),
    ("blue on a gray background", [0, 1, 0]),
    ("big red circles", [1, 0, 0]),
])
def test_concept_truth(concept, expected):
    assert concept_truth(ROWS, concept).tolist() == [bool(x) for x in expected]


def test_concept_truth_accepts_tables_and_paths(tmp_path):
    path = generate(tmp_path / "w", n=15, seed=2)
    t = pq.read_table(path)
    a = concept_truth(t, "red")
    assert (a == concept_truth(str(path), "red")).all()
    assert (a == concept_truth(tmp_path / "w", "red")).all()
    assert (a == concept_truth(t.to_pandas(), "red")).all()
    assert (a == np.array(["red" in [o["color"] for o in r["objects"]] for r in t.to_pylist()])).all()
    with pytest.raises(NotFound):
        concept_truth(tmp_path / "nowhere", "red")


@pytest.mark.parametrize("concept, err", [
    ("a dragon", UnknownChoice), ("red background", UnknownChoice), ("a photo of", InvalidInput),
    ("teal and gray background", InvalidInput),
])
def test_concept_errors(concept, err):
    with pytest.raises(err):
        concept_truth(ROWS, concept)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), idx=st.integers(0, 10_000))
def test_captions_are_true_of_their_scene(seed, idx):
    sc = sample_scene(scene_rng(seed, idx))
    row = [{"background": sc.background, "objects": sc.object_labels()}]
    assert concept_truth(row, sc.caption)[0]
    rng = np.random.default_rng([seed, idx])
    for _ in range(5):
        cap = vocab.sample_caption(sc.background, sc.object_labels(), rng)
        vocab.tokenize([cap])  # every training caption is in the vocabulary
        assert concept_truth(row, cap)[0], cap


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), idx=st.integers(0, 10_000))
def test_binding_negatives_are_false_of_their_scene(seed, idx):
    sc = sample_scene(scene_rng(seed, idx))
    row = [{"background": sc.background, "objects": sc.object_labels()}]
    rng = np.random.default_rng([seed, idx, 1])
    pairs = {(o["color"], o["shape"]) for o in sc.object_labels()}
    for _ in range(5):
        neg = vocab.binding_negative(sc.object_labels(), rng)
        vocab.tokenize([neg])
        assert not concept_truth(row, neg)[0], neg
        spec = vocab.parse_concept(neg)["objects"][0]
        colors, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
        if len(colors) > 1 and len(shapes) > 1 and any(
                (c, s) not in pairs for c in colors for s in shapes):  # a swap exists: it uses the scene's words
            assert spec["color"] in colors and spec["shape"] in shapes, neg


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), idx=st.integers(0, 10_000))
def test_binding_twins_rebind_colours_and_keep_the_layout(seed, idx):
    sc = sample_scene(scene_rng(seed, idx))
    tw = binding_twin(sc, np.random.default_rng([seed, idx, 2]))
    pairs = lambda s: {(o.color, o.shape) for o in s.objects}  # noqa: E731
    assert pairs(tw) != pairs(sc)  # some colour-shape pair of the scene is gone
    assert (tw.background, tw.seed) == (sc.background, sc.seed)
    assert [(o.shape, o.size, o.x, o.y, o.r) for o in tw.objects] == [(o.shape, o.size, o.x, o.y, o.r) for o in sc.objects]
    colors = sorted(o.color for o in sc.objects)
    if len(set(colors)) > 1 and len({o.shape for o in sc.objects}) > 1:  # a permutation re-binds: same bag of words
        assert sorted(o.color for o in tw.objects) == colors
    else:  # nothing to permute: exactly one object recoloured
        assert sum(a.color != b.color for a, b in zip(sc.objects, tw.objects)) == 1
