"""Concept-world models: the shipped weights, the registry contract, and that training trains."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from t2c.data.errors import DamagedArtefact, EncoderError, NotFound, UnknownChoice  # noqa: E402
from t2c.data.world import vocab  # noqa: E402
from t2c.data.world.generator import render, sample_dataset, sample_scene, scene_rng  # noqa: E402
from t2c.indexer.world.models import WEIGHTS_DIR, WORLD_MODELS, load_world_model, save_world_model, weights_path  # noqa: E402
from t2c.indexer.world.train import (_encode, concept_vectors, train_model, zero_shot_accuracy,  # noqa: E402
                              attribute_concepts)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def single():
    """Held-out single-object images (a seed never used in training)."""
    return sample_dataset(240, 424242, n_objects=1)


def test_registry_contract():
    assert "clip" in WORLD_MODELS and WORLD_MODELS["clip"]["has_text"]
    no_text = [n for n, i in WORLD_MODELS.items() if not i["has_text"]]
    assert len(no_text) >= 2
    for name, info in WORLD_MODELS.items():
        assert set(info) >= {"dim", "has_text", "description"}
        m = load_world_model(name, None)
        assert not m.training
        assert m.dim == info["dim"] and m.has_text == info["has_text"]
        assert len(m.mean) == 3 and len(m.std) == 3
        x = torch.zeros(3, 3, m.image_size, m.image_size)
        assert tuple(m.encode_image(x).shape) == (3, info["dim"])
    # the non-CLIP encoders differ in architecture
    archs = {n: tuple(type(mod).__name__ for mod in load_world_model(n, "random").modules()) for n in no_text}
    assert len(set(archs.values())) == len(archs)


def test_weights_ship_and_are_small():
    for name in WORLD_MODELS:
        assert weights_path(name).exists(), f"run `t2c world train` to build {name}"
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.glob("*.safetensors"))
    assert total <= 10 * 1024 * 1024


def test_weight_options(tmp_path):
    shipped = load_world_model("pairnet", None)
    rand = load_world_model("pairnet", "random")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(shipped.encode_image(x), rand.encode_image(x))
    path = save_world_model(rand, tmp_path / "p.safetensors")
    again = load_world_model("pairnet", str(path))
    assert torch.allclose(again.encode_image(x), rand.encode_image(x))
    with pytest.raises(NotFound):
        load_world_model("pairnet", str(tmp_path / "missing.safetensors"))
    with pytest.raises(EncoderError):
        load_world_model("clip", str(path))  # pairnet weights do not fit clip
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DamagedArtefact):
        load_world_model("pairnet", str(tmp_path / "junk.safetensors"))
    with pytest.raises(UnknownChoice):
        load_world_model("resnet", None)


def test_text_tower():
    m = load_world_model("clip", None)
    e = m.encode_text(["a red circle", "a photo of a large blue square on a teal background", "an image of a star"])
    assert tuple(e.shape) == (3, m.dim)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    with pytest.raises(UnknownChoice) as err:
        m.encode_text(["a red dragon"])
    assert "circle" in err.value.choices
    # synonyms map onto the same tokens
    a, b = m.encode_text(["a big grey circle", "a large gray circle"])
    assert torch.allclose(a, b)


def test_clip_zero_shot_on_held_out_images(single):
    scenes, pixels = single
    m = load_world_model("clip", None)
    acc = zero_shot_accuracy(_encode(m, pixels), lambda t: m.encode_text(t).numpy(), scenes)
    # bench/world_fidelity.py measures the full figures (>= 0.95 colour, >= 0.93 shape) on 2000 images
    assert acc["color"] >= 0.92 and acc["shape"] >= 0.88, acc
    assert acc["background"] >= 0.9, acc


def test_registry_encoders_match_direct_models():
    from t2c.indexer.encoders import make_encoder

    sc = sample_scene(scene_rng(9, 0))
    img = render(sc, 64)
    for name in WORLD_MODELS:
        enc = make_encoder(f"world:{name}?device=cpu")
        feats = enc.encode_images(np.stack([enc.preprocess(img)]))
        assert feats.shape == (1, WORLD_MODELS[name]["dim"])
        direct = _encode(load_world_model(name, None), np.asarray(img.resize((32, 32), 3))[None])
        np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-4)
    clip = make_encoder("world:clip")
    cv = concept_vectors(clip.encode_texts, attribute_concepts("color"))
    assert cv.shape == (len(vocab.COLORS), clip.dim)


def test_pairnet_aligned_to_clip_learns_colour_without_text(single):
    """A quick version of the benchmark's headline: ridge-align pairnet to CLIP, then zero-shot colour."""
    scenes, pixels = single
    _, fit_px = sample_dataset(600, 515151)
    clip, pn = load_world_model("clip", None), load_world_model("pairnet", None)
    c, f = _encode(clip, fit_px), _encode(pn, fit_px)
    X = np.hstack([f, np.ones((len(f), 1))])
    W = np.linalg.solve(X.T @ X + 1e-2 * np.eye(X.shape[1]), X.T @ c)
    aligned = np.hstack([_encode(pn, pixels), np.ones((len(pixels), 1))]) @ W
    acc = zero_shot_accuracy(aligned, lambda t: clip.encode_text(t).numpy(), scenes, ("color", "shape"))
    assert acc["color"] >= 0.9 and acc["shape"] >= 0.8, acc


@pytest.mark.parametrize("name", list(WORLD_MODELS))
def test_short_training_lowers_the_loss(name):
    scenes, pixels = sample_dataset(192, 99)
    _, hist = train_model(name, scenes, pixels, steps=16, batch=32, lr=3e-3, seed=1, log=None)
    assert np.mean(hist[-3:]) < np.mean(hist[:3]), hist
    assert all(np.isfinite(hist))


def test_training_is_deterministic():
    scenes, pixels = sample_dataset(64, 98)
    runs = [train_model("clip", scenes, pixels, steps=3, batch=16, seed=4, log=None,
                        multi_positive=mp, hard_negatives=hn, twins=tw)[1]
            for mp, hn, tw in ((False, False, False), (False, False, False), (True, False, False),
                               (True, True, False), (True, True, False), (False, True, False),
                               (True, True, True), (True, True, True))]
    assert runs[0] == runs[1] and runs[3] == runs[4] and runs[6] == runs[7]
    assert len({tuple(r) for r in runs}) == 5  # each loss variant trains differently


@pytest.mark.parametrize("loss", ["sigmoid", "both"])
def test_sigmoid_losses_train_and_differ_from_softmax(loss):
    scenes, pixels = sample_dataset(192, 99)
    kw = dict(steps=12, batch=32, lr=3e-3, seed=1, log=None, multi_positive=True, hard_negatives=True, twins=True)
    hist = train_model("clip", scenes, pixels, loss=loss, **kw)[1]
    assert np.mean(hist[-3:]) < np.mean(hist[:3]) and all(np.isfinite(hist)), hist
    assert hist != train_model("clip", scenes, pixels, loss="softmax", **kw)[1]


def test_unknown_clip_loss_is_a_clear_error():
    from t2c.data.errors import UnknownChoice

    scenes, pixels = sample_dataset(32, 99)
    with pytest.raises(UnknownChoice, match="softmax"):
        train_model("clip", scenes, pixels, steps=1, batch=16, loss="hinge", log=None)


def test_train_all_writes_weights_and_keeps_other_models_entries(tmp_path):
    import json

    from t2c.indexer.world.train import TrainConfig, train_all

    cfg = TrainConfig(n=96, batch=32, steps={"clip": 2, "pairnet": 2, "autoenc": 2}, eval_n=20)
    train_all(tmp_path, config=cfg, models=("autoenc",), threads=1, log=None)
    rep = train_all(tmp_path, config=cfg, models=("pairnet",), threads=1, log=None)
    assert set(rep["models"]) == {"autoenc", "pairnet"}  # retraining one model keeps the other's entry
    on_disk = json.loads((tmp_path / "world_models.json").read_text())
    assert on_disk["models"]["pairnet"]["steps"] == 2 and 0 <= on_disk["models"]["pairnet"]["pair_accuracy"] <= 1
    assert on_disk["models"]["pairnet"]["threads"] == 1  # each model records the thread count it was trained on
    for name in ("autoenc", "pairnet"):
        load_world_model(name, str(tmp_path / f"{name}.safetensors"))  # loads strictly into the architecture
