"""Concept vectors: prompt ensemble, world templates, caches, lazy torch import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from t2c.data.errors import InvalidInput
from t2c.data.world import vocab
from t2c.query.concepts import (DEFAULT_TEMPLATES, ConceptBank, clear_banks, concept_bank_for, reference_words,
                                templates_for)

TINY = "python:tests.tiny_encoders:tiny_clip"


def test_world_templates_use_known_words():
    tpl = templates_for("world:clip")
    assert tpl and all(t.count("{}") == 1 for t in tpl)
    for t in tpl:
        vocab.words_of(t.replace("{}", "red circle"))  # raises UnknownChoice on a word the tower lacks
    assert templates_for("open_clip:ViT-B-32/openai") == list(DEFAULT_TEMPLATES)
    assert "a photo of a {}." in templates_for("open_clip:ViT-B-32/openai")


def test_prompt_ensemble_matches_manual():
    from t2c.indexer.encoders import make_encoder

    bank = ConceptBank(TINY, templates=["a photo of a {}", "{}", "a {} thing"])
    v = bank.unit_vectors(["red dog"])[0]
    enc = make_encoder(TINY)
    e = enc.encode_texts(["a photo of a red dog", "red dog", "a red dog thing"]).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    m = e.mean(0)
    m /= np.linalg.norm(m)
    np.testing.assert_allclose(v, m, atol=1e-5)
    assert v.dtype == np.float32 and abs(np.linalg.norm(v) - 1) < 1e-5
    both = bank.unit_vectors(["red dog", "cat"])
    assert both.shape == (2, 16)
    np.testing.assert_array_equal(both[0], v)


def test_softmax_clip_concepts_are_centred_on_the_reference_vocabulary():
    bank = ConceptBank(TINY, templates=["{}", "a photo of a {}"])
    assert bank.present_score is None  # a softmax-trained CLIP: no cut of its own
    words = reference_words(TINY)
    assert len(words) == 80 and "dog" in words
    centre = bank.unit_vectors(list(words)).astype(np.float64).mean(0)
    np.testing.assert_allclose(bank.centre, centre, atol=1e-6)
    v = bank.vectors(["red dog", " cat "])
    np.testing.assert_allclose(v, bank.unit_vectors(["red dog", "cat"]) - centre, atol=1e-6)
    np.testing.assert_array_equal(bank.vector("cat"), v[1])
    # a score is the cosine less the image's mean cosine to the reference words
    x = np.random.default_rng(0).normal(size=16)
    x /= np.linalg.norm(x)
    cos = bank.unit_vectors(list(words)) @ x
    assert float(v[0] @ x) == pytest.approx(float(bank.unit_vectors(["red dog"])[0] @ x - cos.mean()), abs=1e-5)
    # vectors set directly are used as given
    bank.put("given", np.eye(16)[0])
    np.testing.assert_array_equal(bank.vectors(["given"])[0], np.eye(16, dtype=np.float32)[0])


def test_models_with_their_own_cut_and_given_vectors_are_not_centred():
    bank = ConceptBank("world:clip")
    assert bank.present_score is not None and bank.centre is None
    assert np.linalg.norm(bank.vector("red circle")) == pytest.approx(1.0, abs=1e-5)
    assert reference_words("world:clip-plain") == tuple(vocab.COLORS) + tuple(vocab.SHAPES)
    plain = ConceptBank("world:clip-plain")
    assert plain.present_score is None and plain.centre is not None

    class Boom:
        dim = 16

        def encode_texts(self, texts):
            raise AssertionError("a bank holding only given vectors must not embed reference words")

    given = ConceptBank(TINY, encoder=Boom())
    given.put("a", np.ones(16))
    assert given.vectors(["a"]).shape == (1, 16)


def test_disk_cache_roundtrip(tmp_path):
    b1 = ConceptBank(TINY, cache_dir=tmp_path)
    v = b1.unit_vectors(["sunset"])[0]
    files = list((tmp_path / "concepts").rglob("*.npy"))
    assert len(files) == 1
    b1.vector("sunset")  # centred: the reference words are embedded once and kept on disk too
    assert len(list((tmp_path / "concepts").rglob("*.npy"))) == 1 + len(reference_words(TINY)) + 1  # + cut

    class Boom:
        dim = 16

        def encode_texts(self, texts):
            raise AssertionError("cache miss")

    b2 = ConceptBank(TINY, cache_dir=tmp_path, encoder=Boom())
    np.testing.assert_array_equal(b2.unit_vectors(["sunset"])[0], v)
    np.testing.assert_array_equal(b2.vector("sunset"), b1.vector("sunset"))  # the centre came from disk too
    # other templates -> other cache key -> encoder needed
    b3 = ConceptBank(TINY, templates=["{}"], cache_dir=tmp_path, encoder=Boom())
    with pytest.raises(AssertionError):
        b3.vector("sunset")


def test_unwritable_cache_dir_is_ignored(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        v = ConceptBank(TINY, cache_dir=ro).vector("sea")
        assert v.shape == (16,)
    finally:
        ro.chmod(0o700)


def test_bad_inputs():
    with pytest.raises(InvalidInput):
        ConceptBank(TINY, templates=["no placeholder"])
    with pytest.raises(InvalidInput):
        ConceptBank(TINY, templates=[])
    with pytest.raises(InvalidInput):
        ConceptBank(TINY).vectors([""])
    with pytest.raises(InvalidInput):
        ConceptBank(TINY).put("x", np.zeros(16))


def test_bank_memoised_per_store_and_clip(tmp_path):
    clear_banks()

    class Snap:
        def __init__(self, root, clip):
            self.root, self.clip = root, clip

    a = concept_bank_for(Snap(tmp_path, TINY))
    assert concept_bank_for(Snap(tmp_path, TINY)) is a
    assert concept_bank_for(Snap(tmp_path / "other", TINY)) is not a
    assert concept_bank_for(Snap(tmp_path, TINY + "?dim=8")) is not a


def test_query_imports_without_torch():
    code = ("import sys, query, query.concepts, query.calibrate, query.engine, query.parse; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_present_score_is_cached_on_disk_beside_the_vectors(tmp_path):
    b1 = ConceptBank("world:clip", cache_dir=tmp_path)
    cut = b1.present_score
    assert cut is not None and cut == float(np.float32(b1.encoder.present_score))

    class NoTower:  # a second process with everything cached must not need the text tower
        dim = 128

        @property
        def present_score(self):
            raise AssertionError("built the text tower")

    assert ConceptBank("world:clip", cache_dir=tmp_path, encoder=NoTower()).present_score == cut
    assert ConceptBank(TINY, cache_dir=tmp_path).present_score is None  # a softmax CLIP has no cut
    assert ConceptBank("nosuch:model").present_score is None  # cannot be built here: no prior
