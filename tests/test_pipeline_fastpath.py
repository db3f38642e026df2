"""Early decoding (the first images decode while the model builds), the bounded decode window, and the
preprocessing hints it starts from: the store is the same as the sequential path's in every case."""
import dataclasses

import numpy as np
import pytest

import t2c.indexer.encoders as E
import t2c.indexer.pipeline as pl
from t2c.indexer.pipeline import index_folder
from tests.test_pipeline import _store_state, make_images

WORLD = "world:clip"


def _spy(monkeypatch) -> list:
    """Record whether each run took over the early decoding stream."""
    taken, real = [], pl.EarlyDecode.take

    def take(self, run, cfg):
        out = real(self, run, cfg)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(pl.EarlyDecode, "take", take)
    return taken


def _same_store(a, b) -> None:
    rows_a, vec_a = _store_state(a)
    rows_b, vec_b = _store_state(b)
    assert rows_a == rows_b
    np.testing.assert_allclose(vec_a, vec_b, atol=1e-6)


def test_early_decoding_gives_the_store_of_the_sequential_path(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 40)
    taken = _spy(monkeypatch)
    rep = index_folder(tmp_path / "imgs", tmp_path / "early", WORLD, workers=1, part_size=16)
    assert taken == [True] and rep.added == 40 and rep.errors == 0
    index_folder(tmp_path / "imgs", tmp_path / "seq", WORLD, workers=0, part_size=16)  # decoded in-process
    assert taken == [True, False]
    _same_store(tmp_path / "early", tmp_path / "seq")
    index_folder(tmp_path / "imgs", tmp_path / "early", WORLD, workers=1, part_size=16)  # nothing to do
    assert taken == [True, False]


def test_a_wrong_hint_costs_time_not_features(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 24)
    index_folder(tmp_path / "imgs", tmp_path / "seq", WORLD, workers=0, part_size=8)
    wrong = {"image_size": 48, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "resize_mode": "squash"}
    monkeypatch.setitem(E._SOURCES, "world", dataclasses.replace(E._SOURCES["world"], preprocess_hint=lambda s: wrong))
    taken = _spy(monkeypatch)
    index_folder(tmp_path / "imgs", tmp_path / "st", WORLD, workers=1, part_size=8)
    assert taken == [False]
    _same_store(tmp_path / "seq", tmp_path / "st")


def test_a_resumed_run_decodes_only_its_unfinished_parts(tmp_path, monkeypatch):
    make_images(tmp_path / "imgs", 40)
    index_folder(tmp_path / "imgs", tmp_path / "ref", WORLD, workers=0, part_size=8)
    real, calls = pl._process_part, []

    def crash_after_two(*a, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(pl, "_process_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        index_folder(tmp_path / "imgs", tmp_path / "st", WORLD, workers=0, part_size=8)
    monkeypatch.setattr(pl, "_process_part", real)
    taken = _spy(monkeypatch)
    rep = index_folder(tmp_path / "imgs", tmp_path / "st", WORLD, workers=1, part_size=8)
    assert taken == [False] and rep.resumed_parts == 2 and rep.added == 40
    _same_store(tmp_path / "ref", tmp_path / "st")


def test_the_decode_window_keeps_order_and_bounds_what_is_in_flight():
    class Pool:  # stands in for a process pool: results are the paths themselves
        def __init__(self):
            self.out, self.most = 0, 0

        def map_async(self, fn, block, chunksize):
            pool = self
            pool.out += 1
            pool.most = max(pool.most, pool.out)

            class Result:
                def get(self):
                    pool.out -= 1
                    return list(block)

            return Result()

    pool = Pool()
    paths = [f"p{i}" for i in range(100)]
    w = pl._Window([pool], iter(paths), blocks=3)
    assert not w.drained  # paths are left to hand out
    got = list(w)
    assert got == paths and pool.most <= 3 and w.drained
    assert pl._Window([Pool()], iter(paths[:20]), blocks=3).drained  # every path went in at once (2 blocks)
    assert list(pl._Window([Pool()], iter([]), blocks=3)) == []

    # several pools (a decoder grown when encoding starts): blocks go to each in turn, results stay in order
    pools, many = [Pool()], [f"p{i}" for i in range(300)]
    w = pl._Window(pools, iter(many), blocks=3)
    got = [next(w) for _ in range(40)]
    pools.append(Pool())
    got += list(w)
    assert got == many and pools[1].most >= 1 and max(p.most for p in pools) <= 3
    assert pl.Decoder({"image_size": 224}, 0).window * 3 * 224 * 224 <= pl.DECODE_BUFFER_BYTES  # uint8 crops


@pytest.mark.parametrize("spec", ["world:clip", "world:pairnet?features=stages&precision=bf16",
                                  "torchvision:resnet18?weights=random", "effnet:lite0?weights=random",
                                  pytest.param("open_clip:ViT-B-32?weights=random", marks=pytest.mark.slow)])
def test_preprocess_hints_match_the_built_encoders(spec):
    if spec.startswith("effnet:"):
        pytest.importorskip("efficientnet_lite_pytorch")
    hint = E.preprocess_hint(spec)
    assert hint is not None and E.same_preprocess(hint, E.make_encoder(spec, device="cpu").preprocess_config())


def test_sources_that_cannot_tell_give_no_hint():
    assert E.preprocess_hint("python:tests.tiny_encoders:tiny_cnn?image_size=32") is None
    assert E.preprocess_hint("open_clip:ViT-B-32/openai") is None  # a pretrained tag may set its own
    assert E.preprocess_hint("open_clip:no-such-model?weights=random") is None
    assert not E.same_preprocess(None, {"image_size": 32})
    assert E.same_preprocess({"mean": [0.5, 0.5]}, {"mean": (0.5, 0.5)})


def test_in_process_decoding_leaves_the_callers_priority(tmp_path):
    """workers=0 decodes in the caller's process: it must not lower that process's priority (only pool workers
    give way to the encoder), however often it runs."""
    import os

    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "a.png")
    before = os.nice(0)
    cfg = {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, "max_pixels": 10**6}
    for _ in range(3):
        (crop, result), = list(pl.Decoder(cfg, 0).imap([str(tmp_path / "a.png")]))
        assert result.ok and crop.shape == (16, 16, 3)
    assert os.nice(0) == before


@pytest.mark.parametrize("n, grows", [(12, False), (200, True)])
def test_encoding_grows_the_early_decoder_only_while_paths_are_left(tmp_path, monkeypatch, n, grows):
    """The decode processes beyond start-up's share join when encoding starts, unless the early decoder already
    holds every path (a short run decoded while the model was built): then they would only idle."""
    monkeypatch.setattr(pl, "startup_workers", lambda: 1)
    monkeypatch.setattr(pl.Decoder, "window", property(lambda self: 64))  # 4 blocks of 16 paths in flight
    grown = []
    real = pl.Decoder.grow

    def spy(self, workers):
        if self.workers:  # not the decoder's own start
            grown.append(workers)
        return real(self, workers)

    monkeypatch.setattr(pl.Decoder, "grow", spy)
    make_images(tmp_path / "imgs", n)
    rep = index_folder(tmp_path / "imgs", tmp_path / "st", WORLD, workers=2, part_size=64)
    assert rep.added == n and rep.errors == 0
    st = rep.stage_seconds  # the encoder's own share of the loop is reported beside it
    assert 0 < st["forward"] <= st["encode_loop"] and set(st) == {"plan", "start", "encode_loop", "forward", "commit"}
    assert (grown == [1]) is grows and (grown == []) is not grows


def test_a_grown_decoder_keeps_order(tmp_path):
    """Workers added to a decoder mid-stream (start-up's share, then one per core) decode the rest in order."""
    from PIL import Image

    for i in range(40):
        Image.new("RGB", (20 + i, 24), (6 * i, 0, 255 - 6 * i)).save(tmp_path / f"{i:02d}.png")
    paths = sorted(str(p) for p in tmp_path.iterdir())
    cfg = {"image_size": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "max_pixels": 10**6}
    want = [pl.decode_crop(p, cfg)[0] for p in paths]
    dec = pl.Decoder(cfg, 1)
    try:
        it = dec.imap(paths)
        got = [next(it)[0] for _ in range(5)]
        dec.grow(1)
        dec.grow(0)
        assert dec.workers == 2 and len(dec.pools) == 2
        got += [a for a, _ in it]
    finally:
        dec.close()
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    assert dec.pools == [] and dec.workers == 2
