"""The fast path: precision= (identity), runtime= (not identity), OpenVINO and its cache, clear refusals."""
import numpy as np
import pytest

import t2c.indexer.fastpath as fp
from t2c.data.errors import EncoderError, UnknownChoice
from t2c.indexer.encoders import make_encoder, parse_spec

OV = pytest.mark.skipif(not fp.openvino_available(), reason="OpenVINO (the fast extra) is not installed")
CNN = "python:tests.tiny_encoders:tiny_cnn?image_size=32"


def _x(size=32, n=6):
    return np.random.default_rng(0).normal(size=(n, 3, size, size)).astype(np.float32)


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_runtime_is_a_run_time_option_and_precision_is_identity():
    assert parse_spec("world:clip?precision=bf16&runtime=torch").identity == "world:clip?precision=bf16"
    assert parse_spec("world:clip?runtime=openvino").identity == "world:clip"
    with pytest.raises(UnknownChoice, match="onnx"):
        make_encoder("world:clip?runtime=onnx")
    with pytest.raises(UnknownChoice, match="int4"):
        make_encoder("world:clip?precision=int4")


def test_precision_leaves_a_clip_text_tower_alone():
    plain, fast = make_encoder("world:clip"), make_encoder("world:clip?precision=bf16&runtime=torch")
    words = ["red circle", "small blue star"]
    np.testing.assert_array_equal(plain.encode_texts(words), fast.encode_texts(words))
    assert _cos(plain.encode_images(_x()), fast.encode_images(_x())).min() > 0.999


def test_int8_refuses_a_tower_without_linear_layers():
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(EncoderError, match="Linear layers.*none"):
        make_encoder("effnet:lite0?weights=random&precision=int8")


def test_without_openvino_bf16_stays_on_torch_and_runtime_openvino_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(fp, "openvino_available", lambda: False)
    enc = make_encoder("world:clip?precision=bf16")
    assert enc.runtime == "torch" and enc.spec == "world:clip?precision=bf16"
    with pytest.raises(EncoderError, match="fast"):
        make_encoder("world:clip?runtime=openvino")


@OV
def test_openvino_fp32_and_bf16_agree_with_torch():
    x = _x()
    ref = make_encoder("world:pairnet?features=stages+probs").encode_images(x)
    f32 = make_encoder("world:pairnet?features=stages+probs&runtime=openvino")
    assert f32.runtime == "openvino/f32" and f32.spec == "world:pairnet?features=stages+probs"
    np.testing.assert_allclose(f32.encode_images(x), ref, rtol=1e-4, atol=1e-4)
    bf16 = make_encoder("world:pairnet?features=stages+probs&precision=bf16")
    if bf16.runtime == "openvino/bf16":
        got = bf16.encode_images(x)
        assert got.dtype == np.float32 and _cos(ref, got).min() > 0.999
    # batches of any size, a last one shorter than the rest
    odd = make_encoder("world:clip?runtime=openvino", batch_size=4)
    np.testing.assert_allclose(odd.encode_images(_x(n=7)), make_encoder("world:clip").encode_images(_x(n=7)),
                               rtol=1e-4, atol=1e-4)


@OV
def test_openvino_refusals_are_clear():
    with pytest.raises(EncoderError, match="int8"):
        make_encoder("world:clip?precision=int8&runtime=openvino")
    with pytest.raises(EncoderError, match="torch module"):
        make_encoder("python:tests.tiny_encoders:tiny_clip?runtime=openvino")


@OV
def test_a_converted_model_is_found_again_without_building_it(tmp_path, monkeypatch):
    monkeypatch.setenv("T2C_CACHE_DIR", str(tmp_path / "cache"))
    first = make_encoder("world:clip?runtime=openvino")
    assert type(first).__name__ == "ModuleEncoder" and list((tmp_path / "cache" / "openvino").glob("spec-*.json"))
    built = []
    import t2c.indexer.encoders as E

    real = E._SOURCES["world"].factory
    monkeypatch.setitem(E._SOURCES, "world", __import__("dataclasses").replace(
        E._SOURCES["world"], factory=lambda spec, kw: built.append(spec) or real(spec, kw)))
    again = make_encoder("world:clip?runtime=openvino")
    assert type(again).__name__ == "CachedEncoder" and not built
    assert (again.spec, again.dim, again.has_text, again.preprocess_config(), again.present_score) == \
        (first.spec, first.dim, first.has_text, first.preprocess_config(), first.present_score)
    np.testing.assert_allclose(again.encode_images(_x()), first.encode_images(_x()), atol=1e-6)
    words = ["red circle"]
    np.testing.assert_array_equal(again.encode_texts(words), make_encoder("world:clip").encode_texts(words))
    assert built  # the text tower is the real model's, built when first asked for
    # another spec (weights, features, precision) is another entry; a damaged entry is built again
    for xml in (tmp_path / "cache" / "openvino").glob("*.xml"):
        xml.write_text("not a model")
    built.clear()
    third = make_encoder("world:clip?runtime=openvino")
    assert built and third.encode_images(_x()).shape == (6, 128)


@OV
def test_no_cache_folder_means_no_files(tmp_path, monkeypatch):
    monkeypatch.setenv("T2C_CACHE_DIR", "")
    assert fp.cache_dir() is None
    enc = make_encoder("world:clip?runtime=openvino")
    assert enc.runtime == "openvino/f32" and fp.cached_encoder(parse_spec("world:clip"), "fp32", {}) is None


def test_only_specs_known_without_building_them_are_keyed():
    assert fp.spec_key(parse_spec("world:clip")) is not None  # weights shipped in the package
    assert fp.spec_key(parse_spec("open_clip:ViT-B-32?weights=random")) is not None  # seeded
    assert fp.spec_key(parse_spec("open_clip:ViT-B-32/openai")) is None  # hub weights
    assert fp.spec_key(parse_spec(CNN)) is None  # the user's code
    assert fp.spec_key(parse_spec("world:clip?precision=bf16")) != fp.spec_key(parse_spec("world:clip"))
    assert fp.spec_key(parse_spec("world:clip?runtime=torch")) == fp.spec_key(parse_spec("world:clip"))


@OV
def test_a_warm_index_run_never_imports_torch(tmp_path):
    """With the converted model in the cache, `t2c index` decodes, encodes and commits without torch."""
    import os
    import subprocess
    import sys

    from tests.test_pipeline import make_images

    make_images(tmp_path / "imgs", 12)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo, T2C_CACHE_DIR=str(tmp_path / "cache"))
    code = ("import sys, json; from t2c.indexer.pipeline import index_folder; "
            "r = index_folder(sys.argv[1], sys.argv[2], 'world:clip?runtime=openvino', workers=1); "
            "print(json.dumps([r.added, 'torch' in sys.modules]))")
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "imgs"), str(tmp_path / f"st{i}")], env=env,
                           cwd=repo, capture_output=True, text=True, timeout=300) for i in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    assert [r.stdout.strip().splitlines()[-1] for r in runs] == ["[12, true]", "[12, false]"]
    from t2c.data.store import open_store

    a, b = open_store(tmp_path / "st0"), open_store(tmp_path / "st1")
    assert a.encoder == b.encoder == "world:clip"
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)
