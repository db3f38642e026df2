"""Real weights, real images: the effnet source, a classifier head as a closed vocabulary, and EfficientNet-Lite0
aligned into EfficientNet-Lite2 on Fashion-MNIST, against floors measured on this data.

The tests that need the weights or the images skip when the `real` extra or Debian's dataset-fashion-mnist is
missing; the vocabulary tests run everywhere (a small fake head, no torch).
"""
from __future__ import annotations

import numpy as np
import pytest

from t2c.data.errors import AlignerError, EncoderError, InvalidInput, UnknownChoice
from t2c.indexer.encoders import HeadVocabulary, list_encoders, make_encoder, parse_spec
from t2c.query.head_concepts import HeadConceptBank, is_head_spec, normalise_name

NAMES = ("jersey, T-shirt, tee shirt", "running shoe", "sandal", "Cardigan, Cardigan Welsh corgi", "cardigan",
         "crane", "crane", "backpack, back pack, knapsack")
IDS = tuple(f"n{i:08d}" for i in range(len(NAMES)))


class FakeHead:
    """An encoder stand-in whose head has 8 named classes (rows = one-hot directions in 8-d)."""

    dim = 8
    present_score = None

    def __init__(self):
        self.vocabulary = HeadVocabulary(NAMES, IDS, np.eye(8, dtype=np.float32) * 3, np.zeros(8, np.float32),
                                         "fake:head")


def test_effnet_is_listed_and_validated():
    rows = {r["spec"]: r for r in list_encoders()}
    for name in ("lite0", "lite1", "lite2"):
        assert rows[f"effnet:{name}"]["dim"] == 1280 and rows[f"effnet:{name}"]["vocabulary"]
    with pytest.raises(UnknownChoice, match="lite0"):
        make_encoder("effnet:b7")
    assert is_head_spec("effnet:lite2") and is_head_spec("effnet:lite2?device=cpu")
    assert not is_head_spec("effnet:lite2?features=probs") and not is_head_spec("world:clip")
    assert not is_head_spec("not a spec")


def test_head_vocabulary_names_synonyms_case_and_plurals():
    bank = HeadConceptBank("fake:head", encoder=FakeHead())
    assert bank.templates == ("{}",) and bank.present_score is None
    np.testing.assert_allclose(bank.vector("T-shirt"), np.eye(8)[0])  # a synonym, hyphen kept or not
    for text in ("tee shirt", "T shirt", "JERSEY", "jerseys"):
        np.testing.assert_array_equal(bank.vector(text), bank.vector("jersey"))
    np.testing.assert_allclose(bank.vector("running shoes"), np.eye(8)[1])
    np.testing.assert_allclose(bank.vector("cardigan"), np.eye(8)[4])  # the sweater, spelled as the head does
    np.testing.assert_allclose(bank.vector("Cardigan"), np.eye(8)[3])  # the corgi
    np.testing.assert_allclose(bank.vector(IDS[2]), np.eye(8)[2])  # a WordNet id
    assert bank.class_of("knapsack") == (IDS[7], NAMES[7])
    assert normalise_name("  Running_shoe ") == "running shoe"


def test_head_vocabulary_errors_list_close_names():
    bank = HeadConceptBank("fake:head", encoder=FakeHead())
    with pytest.raises(UnknownChoice) as e:
        bank.vector("sandle")
    assert "sandal" in e.value.hint and "close class names" in e.value.hint
    with pytest.raises(UnknownChoice) as e:
        bank.vector("shirt")  # a word inside class names
    assert "T-shirt" in e.value.hint or "tee shirt" in e.value.hint
    with pytest.raises(InvalidInput, match="names 2 classes") as e:
        bank.vector("crane")
    assert IDS[5] in e.value.hint and IDS[6] in e.value.hint


def test_encoder_without_vocabulary_is_an_error():
    class NoHead:
        dim = 8
        vocabulary = None

    with pytest.raises(EncoderError, match="no named classifier head"):
        HeadConceptBank("fake:none", encoder=NoHead()).vector("sandal")


def test_alignment_target_needs_text_or_head(tmp_path):
    from t2c.indexer.pipeline import fit_aligner_on_folder

    enc = make_encoder("python:tests.tiny_encoders:tiny_cnn")
    with pytest.raises(AlignerError, match="no text tower and no named classifier head"):
        fit_aligner_on_folder(enc, "python:tests.tiny_encoders:tiny_cnn", [str(tmp_path / "x.png")])


# ------------------------------------------------------------------------------------------------
# with the installed architecture (random weights: no download, no weights package needed)
# ------------------------------------------------------------------------------------------------
def test_effnet_features_stages_and_probs_random_weights():
    pytest.importorskip("efficientnet_lite_pytorch")
    enc = make_encoder("effnet:lite0?weights=random&threads=1")
    assert enc.dim == 1280 and enc.image_size == 224 and enc.mean == (0.5, 0.5, 0.5)
    assert enc.preprocess_config()["crop_pct"] == pytest.approx(224 / 256)
    assert len(enc.vocabulary.names) == 1000 and enc.vocabulary.weight.shape == (1000, 1280)
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    final = enc.encode_images(x)
    probs = make_encoder("effnet:lite0?weights=random&threads=1&features=probs")
    assert probs.vocabulary is None  # its output is no longer the space the head rows live in
    out = probs.encode_images(x)
    assert out.shape == (2, 2280)
    np.testing.assert_allclose(out[:, :1280], final, atol=1e-4)
    np.testing.assert_allclose(out[:, 1280:].sum(1), 1.0, atol=1e-4)
    stages = make_encoder("effnet:lite0?weights=random&threads=1&features=stages")
    assert stages.dim == 1280 + 2 * (80 + 112 + 192 + 320)  # avg + max of the last four stages
    assert str(parse_spec("effnet:lite2?features=probs+stages")) == "effnet:lite2?features=stages+probs"


def test_effnet_checkpoint_without_head_is_an_error(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    import torch

    sd = make_encoder("effnet:lite0?weights=random").module.m.state_dict()
    path = tmp_path / "nohead.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("_fc")}, path)
    with pytest.raises(EncoderError, match="no ImageNet head"):
        make_encoder(f"effnet:lite0?weights={path}")


# ------------------------------------------------------------------------------------------------
# real weights, real images
# ------------------------------------------------------------------------------------------------
# Floors: measured by this module's own fixture (aligner fitted on 240 train-split images, 160 test-split images
# indexed, seeds 0 and 1, images inverted to dark-on-light) on the development machine (2 shared CPU cores,
# torch 2.14.1), 2026-11-30, identical on two runs: R² 0.466, same-class P@10 0.632 (chance 0.10), lite2 head
# top-1 agreement 0.475 on 80 images, "jersey AND NOT sweatshirt" F1 0.345 (P 0.385, R 0.312; answering 26
# random images of 160 would give about 0.18). Each floor sits below its measurement by a margin for other BLAS
# builds; the figures on 1,000 / 500 images are in README "Real weights, real images".
FLOORS = {"r2": 0.40, "p_at_10": 0.55, "head_top1": 0.40, "and_not_f1": 0.28}
AND_NOT = "jersey AND NOT sweatshirt"  # T-shirt/top and Shirt share "jersey"; Pullover is "sweatshirt"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    from t2c.service.cli_demo_real import build_real_store, real_available

    if not real_available():
        pytest.skip("needs the `real` extra (EfficientNet-Lite weights) and Debian's dataset-fashion-mnist")
    out = tmp_path_factory.mktemp("real")
    return build_real_store(out, n_fit=240, n_index=160, seed=0, echo=lambda *a: None)


@pytest.fixture(scope="module")
def real_engine(real_store):
    from t2c.query.engine import Engine

    return Engine.for_store(real_store["store"])


def test_real_alignment_r2(real_store):
    print("measured r2", real_store["r2"])
    assert real_store["r2"] >= FLOORS["r2"], real_store["r2"]


def test_real_same_class_precision_at_10(real_engine):
    from t2c.service.cli_demo_real import labels_by_id, precision_at_10

    _, lab = labels_by_id(real_engine.snapshot)
    p = precision_at_10(real_engine.snapshot.vectors, lab)
    print("measured P@10", p)
    assert p >= FLOORS["p_at_10"], p


def test_real_head_agreement(real_store, real_engine):
    """lite2's head on aligned lite0 features agrees with lite2's own top-1 on 80 indexed images."""
    from t2c.indexer.aligner import Aligner

    snap = real_engine.snapshot
    rel = dict(snap.catalog().execute("SELECT id, relpath FROM images").fetchall())
    feats = {int(i): f for ids, fs in snap.features() for i, f in zip(ids, fs)}
    pick = sorted(feats)[::2][:80]
    lite2 = make_encoder("effnet:lite2")
    x = np.stack([lite2.preprocess(_open(real_store["store"].parent / "images" / rel[i])) for i in pick])
    f2 = lite2.encode_images(x).astype(np.float64)
    v = lite2.vocabulary
    own = (f2 @ v.weight.T + v.bias).argmax(1)
    a = Aligner.load(real_store["aligner"]).apply(np.stack([feats[i] for i in pick]))
    a = a * np.linalg.norm(f2, axis=1).mean()  # the aligner predicts unit vectors; the head has a bias
    agree = float(((a @ v.weight.T + v.bias).argmax(1) == own).mean())
    print("measured head top-1 agreement", agree)
    assert agree >= FLOORS["head_top1"], agree


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_real_and_not_query_f1(real_engine):
    from t2c.service.cli_demo_real import score_queries

    (row,) = score_queries(real_engine, [AND_NOT])
    print("measured AND/NOT", row)
    assert row["truth"] == 32  # T-shirts/tops and shirts of 160 balanced images
    assert row["f1"] >= FLOORS["and_not_f1"], row


def test_real_vocabulary_through_every_query_feature(real_engine):
    from t2c.query.audit import audit
    from t2c.query.classify import classify

    res = real_engine.search("sandal OR running shoe", k=5, explain=True)
    assert res.hits and res.hits[0].explanation
    with pytest.raises(UnknownChoice) as e:
        real_engine.search("sneaker AND NOT sandal")
    assert "close class names" in e.value.hint
    rep = classify(real_engine.snapshot, ["sandal", "running shoe", "cowboy boot", "jersey"], truth="label",
                   write=False)
    assert rep["n"] == 160 and sum(rep["counts"].values()) == 160
    au = audit(real_engine.snapshot, ["sandal", "purse"]).to_dict()
    assert {r["concept"] for r in au["concepts"]} == {"sandal", "purse"}


def test_real_drift_finds_the_changed_class(real_store, real_engine):
    """A second store of bags only (same aligner): "purse" is the concept that shifted most, and significantly."""
    from t2c.data.store import open_store
    from t2c.indexer.pipeline import index_folder
    from t2c.query.audit import drift

    b = real_store["store"].parent / "store-bags"
    index_folder(real_store["store"].parent / "images" / "c8", b, "effnet:lite0", aligner=str(real_store["aligner"]),
                 clip="effnet:lite2")
    rows = drift(real_engine.snapshot, open_store(b), ["cowboy boot", "purse"]).to_dict()["concepts"]
    print("measured drift", [(r["concept"], r["diff"], r["significant"]) for r in rows])
    assert rows[0]["concept"] == "purse" and rows[0]["significant"] and abs(rows[0]["diff"]) > 0.3
