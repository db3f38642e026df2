"""Concept-to-text: the world GRU decoder (tokens, training, save/load, determinism) and the ClipCap path on
a tiny random GPT-2, through describe_vector / describe and the CLI."""
import json

import numpy as np
import pytest

from t2c.data.errors import DamagedArtefact, InvalidInput, NotFound
from t2c.indexer.world import decoder as wd
from t2c.data.world.generator import sample_dataset
from t2c.query.describe import (build_prefix_captioner, clipcap_train_step, describe, describe_vector,
                            load_prefix_captioner, save_prefix_captioner)
from tests.test_audit import make_store

torch = pytest.importorskip("torch")
TINY_GPT2 = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=40, n_positions=64, bos_token_id=0, eos_token_id=1)


def test_caption_tokens_round_trip():
    scenes, _ = sample_dataset(30, 3, image_size=None, size=16)
    for sc in scenes:
        ids = wd.encode_caption(sc.caption)
        assert ids[0] == wd.TOKEN_ID[wd.BOS] and ids[-1] == wd.TOKEN_ID[wd.EOS]
        assert wd.decode_tokens(ids) == sc.caption
    assert wd.decode_tokens([wd.TOKEN_ID["red"], wd.TOKEN_ID[wd.EOS], wd.TOKEN_ID["blue"]]) == "red"


def test_world_decoder_learns_and_is_deterministic(tmp_path):
    cfg = wd.DecoderConfig(n=8, steps=300, clip_weights="random", noise=0.0, lr=1e-2)
    model, rep = wd.train_decoder(cfg, out=tmp_path / "d.safetensors", threads=1)
    scenes, px = sample_dataset(8, cfg.seed + 1_000_003, size=cfg.render_size, image_size=32)
    emb = wd.clip_image_embeddings(px, "random")
    caps = wd.caption_vectors(model, emb)
    assert sum(c == s.caption for c, s in zip(caps, scenes)) >= 6  # it fits its training captions
    back = wd.load_decoder(tmp_path / "d.safetensors")
    assert wd.caption_vectors(back, emb) == caps
    assert (tmp_path / "d.safetensors").stat().st_size < 2_000_000
    cfg2 = wd.DecoderConfig(n=8, steps=3, clip_weights="random")
    m1, _ = wd.train_decoder(cfg2, threads=1)
    m2, _ = wd.train_decoder(cfg2, threads=1)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    # describe_vector picks the decoder from the file's format
    out = describe_vector(emb[0], "world:clip", decoder=tmp_path / "d.safetensors")
    assert out["kind"] == "world-gru" and out["caption"] == caps[0]
    with pytest.raises(InvalidInput):
        describe_vector(np.ones(16), "world:clip", decoder=tmp_path / "d.safetensors")


def test_decoder_file_errors(tmp_path):
    with pytest.raises(NotFound):
        wd.load_decoder(tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(DamagedArtefact):
        describe_vector(np.ones(64), "world:clip", decoder=bad)
    with pytest.raises(NotFound):
        describe_vector(np.ones(8), "open_clip:ViT-B-32/openai")
    with pytest.raises(InvalidInput):
        describe_vector(np.zeros(8), "open_clip:ViT-B-32/openai")


def test_clipcap_tiny_gpt2_path(tmp_path):
    model = build_prefix_captioner(TINY_GPT2, clip_dim=16, prefix_len=4)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(4, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = rng.integers(2, 40, (4, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = [clipcap_train_step(model, opt, vecs, ids) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    got = model.greedy(torch.from_numpy(vecs), max_len=5)
    assert sum(g == list(t) for g, t in zip(got, ids.tolist())) >= 3  # it learnt to caption its vectors
    path = save_prefix_captioner(model, tmp_path / "cc.safetensors", clip="python:tests.tiny_encoders:tiny_clip")
    back = load_prefix_captioner(path)
    assert back.greedy(torch.from_numpy(vecs), max_len=5) == got
    out = describe_vector(vecs[1], "python:tests.tiny_encoders:tiny_clip", decoder=path, max_len=5)
    assert out["kind"] == "clipcap" and out["caption"] == " ".join(f"<{i}>" for i in got[1])
    with pytest.raises(InvalidInput):
        describe_vector(vecs[1], "open_clip:other", decoder=path)
    with pytest.raises(InvalidInput):
        describe_vector(np.ones(8), "python:tests.tiny_encoders:tiny_clip", decoder=path)


def test_describe_store_image_and_cli(tmp_path, monkeypatch):
    store = make_store(tmp_path, n=6)
    model = build_prefix_captioner(TINY_GPT2, clip_dim=store.dim, prefix_len=3)
    path = save_prefix_captioner(model, tmp_path / "cc.safetensors", clip=store.clip)
    iid = int(store.ids[2])
    out = describe(store, iid, decoder=path, max_len=4)
    assert out["id"] == iid and out["path"].endswith("img002.png") and out["kind"] == "clipcap"
    with pytest.raises(NotFound):
        describe(store, 10_000, decoder=path)
    monkeypatch.setenv("T2C_CAPTION_DECODER", str(path))
    assert describe(store, iid, max_len=4)["caption"] == out["caption"]

    import typer
    from typer.testing import CliRunner

    from t2c.service import cli_audit

    app = typer.Typer()
    cli_audit.register(app)
    r = CliRunner().invoke(app, ["describe", str(store.root), str(iid), "--json", "--max-len", "4"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["caption"] == out["caption"]


@pytest.mark.skipif(not (wd.weights_path().is_file() and wd.weights_path().with_name("clip.safetensors").is_file()),
                    reason="shipped world weights not built")
def test_shipped_world_decoder_names_colour_and_shape():
    scenes, px = sample_dataset(40, 9_123, image_size=32, n_objects=1)
    emb = wd.clip_image_embeddings(px)
    caps = [describe_vector(e, "world:clip")["caption"] for e in emb]
    acc = wd.caption_accuracy(caps, scenes)
    assert acc["color_shape"] >= 0.9, list(zip(caps[:5], [s.caption for s in scenes[:5]]))
