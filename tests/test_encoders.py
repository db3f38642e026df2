"""Encoder registry: spec parsing, errors listing choices, real loading paths on tiny random models."""
import numpy as np
import pytest
import torch

from t2c.data.errors import EncoderError, InvalidInput, NotFound, UnknownChoice
from t2c.indexer import encoders as E
from t2c.indexer.encoders import make_encoder, parse_spec


def test_parse_spec_options_and_identity():
    s = parse_spec("timm:resnet50.a1_in1k?weights=random&device=cpu&batch_size=8")
    assert (s.source, s.name, s.weights) == ("timm", "resnet50.a1_in1k", "random")
    assert s.identity == "timm:resnet50.a1_in1k?weights=random"


@pytest.mark.parametrize("bad", ["", "resnet50", "timm:", 5])
def test_malformed_specs(bad):
    with pytest.raises(InvalidInput):
        parse_spec(bad)


def test_unknown_source_lists_valid_ones():
    with pytest.raises(UnknownChoice) as ei:
        parse_spec("tfhub:resnet")
    for src in ("timm", "open_clip", "torchvision", "world", "python"):
        assert src in ei.value.hint


def test_unknown_timm_and_torchvision_models_list_choices():
    with pytest.raises(UnknownChoice) as ei:
        make_encoder("timm:resnet_does_not_exist?weights=random")
    assert ei.value.choices
    with pytest.raises(UnknownChoice):
        make_encoder("torchvision:nonsense?weights=random")


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError):
        E.register_source("timm")(lambda spec, kw: None)


def test_missing_weights_file_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        make_encoder(f"timm:test_resnet?weights={tmp_path / 'nope.safetensors'}")


def _batch(enc, n=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3, enc.image_size, enc.image_size)).astype(np.float32)


def _timm_checkpoint(path, seed=0, num_classes=0):
    """A random-init timm test_resnet and a safetensors checkpoint of it at ``path`` (with a head if num_classes)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    ref = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).eval()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return ref, path


def test_timm_random_and_local_checkpoint_path_give_same_model(tmp_path):
    ref, ckpt = _timm_checkpoint(tmp_path / "test_resnet.safetensors")
    enc = make_encoder(f"timm:test_resnet?weights={ckpt}&device=cpu")
    assert enc.dim == ref.num_features and not enc.has_text
    x = _batch(enc)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(enc.encode_images(x), want, rtol=1e-4, atol=1e-5)
    # a torch-format checkpoint (read with weights_only=True) works too
    pt = tmp_path / "test_resnet.pth"
    torch.save({"state_dict": ref.state_dict()}, pt)
    enc2 = make_encoder(f"timm:test_resnet?weights={pt}")
    np.testing.assert_allclose(enc2.encode_images(x), want, rtol=1e-4, atol=1e-5)


def test_checkpoint_of_other_architecture_is_rejected(tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"foo.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(EncoderError):
        make_encoder(f"timm:test_resnet?weights={bad}")


def test_torchvision_random_weights_builds_feature_extractor():
    enc = make_encoder("torchvision:resnet18?weights=random", batch_size=2)
    assert enc.dim == 512
    assert enc.encode_images(_batch(enc, 3)).shape == (3, 512)


def test_torchvision_probs_are_the_removed_heads_softmax(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    enc = make_encoder("torchvision:resnet18?weights=random&features=probs", batch_size=2)
    assert enc.dim == 512 + 1000
    x = _batch(enc, 2)
    torch.manual_seed(0)  # weights=random seeds the build the same way
    ref = torchvision.models.get_model("resnet18", weights=None).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).softmax(1).numpy()
    got = enc.encode_images(x)
    np.testing.assert_allclose(got[:, 512:], want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got[:, :512], make_encoder("torchvision:resnet18?weights=random").encode_images(x),
                               rtol=1e-5, atol=1e-6)
    headless = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items() if not k.startswith("fc.")}, str(headless))
    with pytest.raises(EncoderError) as ei:
        make_encoder(f"torchvision:resnet18?weights={headless}&features=probs")
    assert "classifier head" in str(ei.value)
    assert make_encoder(f"torchvision:resnet18?weights={headless}").dim == 512


def test_encode_images_batches_and_validates_shape():
    enc = make_encoder("timm:test_vit?weights=random", batch_size=2)
    assert enc.encode_images(_batch(enc, 5)).shape == (5, enc.dim)
    with pytest.raises(InvalidInput):
        enc.encode_images(np.zeros((2, 4, 8, 8), np.float32))
    with pytest.raises(EncoderError):
        enc.encode_texts(["a dog"])


def test_python_source_module_and_encoder_factories():
    enc = make_encoder("python:tests.tiny_encoders:tiny_cnn?dim=10&image_size=32")
    assert enc.dim == 10 and enc.spec == "python:tests.tiny_encoders:tiny_cnn?dim=10&image_size=32"
    clip = make_encoder("python:tests.tiny_encoders:tiny_clip")
    assert clip.has_text and clip.encode_texts(["red", "blue"]).shape == (2, 16)
    with pytest.raises(NotFound):
        make_encoder("python:no_such_module_xyz:f")
    with pytest.raises(InvalidInput):
        make_encoder("python:justamodule")


def test_preprocess_shapes_and_normalisation():
    from PIL import Image

    enc = make_encoder("timm:test_resnet?weights=random")
    arr = enc.preprocess(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert arr.shape == (3, enc.image_size, enc.image_size) and arr.dtype == np.float32
    assert arr[0].mean() > arr[1].mean()


def test_open_clip_tiny_config_random_weights(tmp_path):
    """The open_clip path (model config + tokenizer + image/text towers) on a tiny random-init model."""
    import json

    import open_clip

    cfg = {"embed_dim": 32,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "t2c-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    enc = make_encoder("open_clip:t2c-tiny-clip?weights=random")
    assert enc.has_text and enc.dim == 32
    assert enc.encode_images(_batch(enc, 2)).shape == (2, 32)
    assert enc.encode_texts(["a photo of a dog", "a cat"]).shape == (2, 32)
    # the local-checkpoint path: save this model, load it back through ?weights=PATH
    model = open_clip.create_model("t2c-tiny-clip", pretrained=None)
    ck = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ck)
    enc2 = make_encoder(f"open_clip:t2c-tiny-clip?weights={ck}")
    t1 = enc2.encode_texts(["a dog"])
    with torch.no_grad():
        want = model.encode_text(open_clip.get_tokenizer("t2c-tiny-clip")(["a dog"])).numpy()
    np.testing.assert_allclose(t1, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnknownChoice):
        make_encoder("open_clip:ViT-B-32/not-a-tag")


def test_stage_features_timm_checkpoint_against_forward_intermediates(tmp_path):
    """features=stages: the pooled output, then mean and max over space of the last 4 stages (timm's own list)."""
    ref, ckpt = _timm_checkpoint(tmp_path / "r.safetensors", seed=1)
    enc = make_encoder(f"timm:test_resnet?weights={ckpt}&features=stages")
    assert "features=stages" in enc.spec and not enc.has_text
    x = _batch(enc, n=2)
    with torch.no_grad():
        pooled = ref(torch.from_numpy(x)).numpy()
        maps = ref.forward_intermediates(torch.from_numpy(x), intermediates_only=True)[-E.MAX_STAGES:]
    want = np.concatenate([pooled] + [np.concatenate([m.mean((2, 3)).numpy(), m.amax((2, 3)).numpy()], 1)
                                      for m in maps], 1)
    assert enc.dim == want.shape[1] == ref.num_features + 2 * sum(m.shape[1] for m in maps)
    np.testing.assert_allclose(enc.encode_images(x), want, rtol=1e-4, atol=1e-5)
    # the default mode is the pooled output alone
    np.testing.assert_allclose(make_encoder(f"timm:test_resnet?weights={ckpt}").encode_images(x), pooled,
                               rtol=1e-4, atol=1e-5)


def test_stage_features_world_model_extend_the_pooled_output():
    plain = make_encoder("world:pairnet")
    staged = make_encoder("world:pairnet?features=stages")
    assert staged.spec == "world:pairnet?features=stages" and staged.dim == 128 + 2 * (32 + 32 + 64 + 64)
    x = _batch(plain, n=4)
    a, b = plain.encode_images(x), staged.encode_images(x)
    np.testing.assert_allclose(b[:, :128], a, rtol=1e-5, atol=1e-6)
    # each stage block is [mean over space, max over space]: the max is never below the mean
    off = 128
    for ch in (32, 32, 64, 64):
        assert (b[:, off + ch : off + 2 * ch] >= b[:, off : off + ch] - 1e-5).all()
        off += 2 * ch
    assert make_encoder("world:autoenc?features=stages").dim == 64 + 2 * (32 + 64 + 64)
    # features=final is the default, so it names the same encoder (and fits the same aligners)
    assert make_encoder("world:pairnet?features=final").spec == "world:pairnet"


def test_probs_features_timm_checkpoint_append_the_heads_softmax(tmp_path):
    """features=probs: the pooled output, then the classifier head's softmax (the model's own logits)."""
    ref, ckpt = _timm_checkpoint(tmp_path / "h.safetensors", seed=2, num_classes=7)
    x = _batch(make_encoder(f"timm:test_resnet?weights={ckpt}"), n=3)
    with torch.no_grad():
        pooled = ref.forward_head(ref.forward_features(torch.from_numpy(x)), pre_logits=True).numpy()
        probs = ref(torch.from_numpy(x)).softmax(1).numpy()
    enc = make_encoder(f"timm:test_resnet?weights={ckpt}&features=probs")
    assert "features=probs&" in enc.spec and enc.dim == ref.num_features + 7
    got = enc.encode_images(x)
    np.testing.assert_allclose(got, np.concatenate([pooled, probs], 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[:, -7:].sum(1), 1.0, rtol=1e-5)
    # with stages: pooled, stages, probs (in that order, whatever order the spec names them)
    both = make_encoder(f"timm:test_resnet?weights={ckpt}&features=probs%2Bstages")
    assert "features=stages+probs&" in both.spec
    staged = make_encoder(f"timm:test_resnet?weights={ckpt}&features=stages").encode_images(x)
    np.testing.assert_allclose(both.encode_images(x), np.concatenate([staged, probs], 1), rtol=1e-4, atol=1e-5)
    # the plain encoder is unchanged by the head in the checkpoint
    np.testing.assert_allclose(make_encoder(f"timm:test_resnet?weights={ckpt}").encode_images(x), pooled,
                               rtol=1e-4, atol=1e-5)


def test_probs_features_need_the_heads_weights(tmp_path):
    _, headless = _timm_checkpoint(tmp_path / "nohead.safetensors", seed=3)  # saved with num_classes=0
    with pytest.raises(EncoderError) as ei:
        make_encoder(f"timm:test_resnet?weights={headless}&features=probs")
    assert "classifier head" in str(ei.value)
    make_encoder(f"timm:test_resnet?weights={headless}&features=stages")  # stages need no head


def test_probs_features_world_pairnet_are_its_sigmoid_pair_probabilities():
    from t2c.indexer.world.models import load_world_model

    enc = make_encoder("world:pairnet?features=stages+probs")
    assert enc.spec == "world:pairnet?features=stages+probs" and enc.dim == 512 + 48
    x = _batch(enc, n=4)
    got = enc.encode_images(x)
    model = load_world_model("pairnet")
    with torch.no_grad():
        want = torch.sigmoid(model.logits(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got[:, -48:], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, :512], make_encoder("world:pairnet?features=stages").encode_images(x),
                               rtol=1e-5, atol=1e-6)
    # spellings of one feature set name one encoder
    for spelling in ("probs,stages", "probs+stages", "stages%2Cprobs", "final+stages+probs"):
        assert parse_spec(f"world:pairnet?features={spelling}").identity == enc.spec


@pytest.mark.parametrize("spec, error, words", [
    ("world:clip?features=stages", EncoderError, "text tower"),
    ("world:clip?features=probs", EncoderError, "text tower"),
    ("torchvision:resnet18?weights=random&features=stages", EncoderError, "not available"),
    ("world:autoenc?features=probs", EncoderError, "no classifier head"),
    ("world:pairnet?features=layers", UnknownChoice, "stages"),
    ("world:pairnet?features=stages+prob", UnknownChoice, "probs"),
])
def test_stage_features_errors_name_the_problem(spec, error, words):
    with pytest.raises(error) as ei:
        make_encoder(spec)
    assert words in str(ei.value) + (getattr(ei.value, "hint", "") or "")


def test_weights_file_is_owned_by_the_source(tmp_path):
    """A spec's weights file: its weights=PATH, the world source's shipped file, or none (random, hub)."""
    from t2c.indexer.encoders import parse_spec, weights_file

    shipped = weights_file(parse_spec("world:clip"))
    assert shipped is not None and shipped.exists() and shipped.parent.name == "weights"
    assert weights_file(parse_spec("world:clip?weights=random")) is None
    assert weights_file(parse_spec("timm:resnet18")) is None
    p = tmp_path / "w.safetensors"
    assert weights_file(parse_spec(f"world:clip?weights={p}")) == p


def test_weights_option_is_read_in_one_place():
    modes = {w: parse_spec(f"timm:x{'' if w is None else '?weights=' + w}") for w in (None, "", "pretrained",
                                                                                    "random", "/w.pt")}
    assert {w: (s.weights_mode, s.weights_path) for w, s in modes.items()} == {
        None: ("default", None), "": ("default", None), "pretrained": ("default", None),
        "random": ("random", None), "/w.pt": ("file", "/w.pt")}


def test_sources_describe_themselves():
    assert E.source_info("open_clip").has_text is True
    assert E.source_info("timm").has_text is False and E.source_info("python").has_text is None
    assert E.source_info("world").shipped_weights("clip").name == "clip.safetensors"
    rows = {r["source"]: r for r in E.list_encoders() if r["spec"].endswith(":NAME")}
    assert rows["open_clip"]["has_text"] is True and rows["timm"]["has_text"] is False
    with pytest.raises(UnknownChoice):
        E.source_info("tfhub")


def test_an_option_the_source_does_not_take_is_an_error():
    with pytest.raises(UnknownChoice) as ei:
        make_encoder("timm:test_resnet?weigths=random")
    assert "weights" in ei.value.hint and "features" in ei.value.hint
    enc = make_encoder("python:tests.tiny_encoders:tiny_cnn?dim=8&image_size=32")  # factory keywords pass
    assert enc.dim == 8


def test_a_registered_source_declares_options_and_text(monkeypatch):
    monkeypatch.setattr(E, "_SOURCES", dict(E._SOURCES))

    @E.register_source("t2ctest", "a test source", has_text=False, options={"width": "feature width"})
    def _t2ctest(spec, kw):
        m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(int(spec.options.get("width", 4))))
        return E.ModuleEncoder(spec.identity, m, image_size=8, **kw)

    enc = make_encoder("t2ctest:any?width=5&weights=random")
    assert (enc.dim, enc.spec, enc.has_text) == (5, "t2ctest:any?weights=random&width=5", False)
    with pytest.raises(UnknownChoice):
        make_encoder("t2ctest:any?height=5")


def test_features_build_a_new_encoder_from_what_the_source_declared():
    enc = make_encoder("world:pairnet?features=stages+probs")
    plain = make_encoder("world:pairnet")
    assert plain.stages and plain.classifier is not None  # declared at construction
    assert enc.dim > plain.dim and enc.spec == "world:pairnet?features=stages+probs"


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_precision_option_is_part_of_the_identity_and_keeps_features_close(precision):
    from t2c.indexer.encoders import make_encoder, parse_spec

    base = "python:tests.tiny_encoders:tiny_cnn?image_size=32"
    assert parse_spec(base + "&precision=fp32").identity == parse_spec(base).identity
    fast = make_encoder(f"{base}&precision={precision}")
    assert fast.spec == parse_spec(f"{base}&precision={precision}").identity != parse_spec(base).identity
    x = np.random.default_rng(0).normal(size=(6, 3, 32, 32)).astype(np.float32)
    a, b = make_encoder(base).encode_images(x), fast.encode_images(x)
    assert b.dtype == np.float32 and b.shape == a.shape and not np.array_equal(a, b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99


def test_unknown_precision_and_encoders_without_a_module_are_refused():
    from t2c.data.errors import EncoderError, UnknownChoice
    from t2c.indexer.encoders import make_encoder

    with pytest.raises(UnknownChoice, match="int4"):
        make_encoder("python:tests.tiny_encoders:tiny_cnn?image_size=32&precision=int4")
    with pytest.raises(EncoderError, match="torch module"):
        make_encoder("python:tests.tiny_encoders:tiny_clip?precision=bf16")
