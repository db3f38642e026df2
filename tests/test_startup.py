"""Start-up of `t2c index` (issue 19): what the CLI imports, how open_clip is imported and its models filled from a
checkpoint or the kept random init without drawing one, and the CLI's quick exit. Features never change."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from t2c.indexer import encoders as E

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "T2C_CACHE_DIR": "", **env})


def test_cli_imports_neither_torch_nor_the_heavy_libraries():
    code = ("import sys, t2c.service.cli as c; c._register_all()\n"
            "heavy = {'torch', 'open_clip', 'timm', 'torchvision', 'transformers', 'faiss', 'duckdb', 'fastapi'}\n"
            "print(sorted(heavy & set(sys.modules)))")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_open_clip_imports_without_transformers_and_timm_for_models_that_use_neither():
    """ViT-B-32 needs neither; a later model that does (SigLIP: a timm tower, a Hugging Face tokenizer) gets them."""
    code = ("import sys\nfrom t2c.indexer.encoders import import_open_clip\n"
            "oc = import_open_clip('ViT-B-32')\n"
            "print('transformers' in sys.modules, 'timm' in sys.modules, oc.hf_model.transformers is None,"
            " oc.timm_model.timm is None)\n"
            "import_open_clip('ViT-B-16-SigLIP')\n"
            "print(oc.hf_model.transformers is None, oc.timm_model.timm is None)\n"
            "import_open_clip('coca_ViT-B-32')\n"
            "print(oc.coca_model._has_transformers)")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    first, second, coca = p.stdout.split("\n")[:3]
    assert first.split() == ["False", "False", "True", "True"]
    assert second.split() == ["False", "False"]
    plain = _python("import open_clip; print(open_clip.coca_model._has_transformers)")  # as a plain import has it
    assert coca == plain.stdout.strip()


def test_open_clip_imports_without_huggingface_hub_for_offline_weights_and_gets_it_for_a_download():
    """Random or local weights download nothing: huggingface_hub is left out (0.12 s); a later model whose weights
    come from the hub finds open_clip's download code working, as after a plain import."""
    code = ("import sys\nfrom t2c.indexer.encoders import import_open_clip\n"
            "oc = import_open_clip('ViT-B-32', hub=False)\n"
            "print('huggingface_hub' in sys.modules, oc.pretrained._has_hf_hub, sys.modules.get('huggingface_hub', 1))\n"
            "import_open_clip('ViT-B-32/laion2b_s34b_b79k')\n"
            "print('huggingface_hub' in sys.modules, oc.pretrained._has_hf_hub,"
            " sys.modules['open_clip.push_to_hf_hub']._has_hf_hub, callable(oc.push_to_hf_hub),"
            " oc.pretrained.hf_hub_download.func.__module__.split('.')[0])")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    first, second = p.stdout.strip().split("\n")[:2]
    assert first.split() == ["False", "False", "1"]  # left out, and no longer hidden once open_clip is in
    plain = _python("import sys, open_clip; print(sys.modules['open_clip.push_to_hf_hub']._has_hf_hub)").stdout.strip()
    assert second.split() == ["True", "True", plain, "True", "huggingface_hub"]  # each as a plain import has it


def test_open_clip_imports_torchvision_leaves_only_and_torchvision_still_imports_whole_later():
    """For ViT-B-32 open_clip loads torchvision's transforms and ops.misc, not torchvision's __init__ (nor
    torch._dynamo); a later ``import torchvision`` is the whole library, sharing those same leaf modules."""
    code = ("import sys, torch\nfrom t2c.indexer.encoders import import_open_clip\n"
            "oc = import_open_clip('ViT-B-32')\n"
            "print('torch._dynamo' in sys.modules, 'torchvision' in sys.modules, 'torchvision.ops' in sys.modules,"
            " 'torchvision.transforms' in sys.modules)\n"
            "m = oc.create_model('ViT-B-32')\n"
            "with torch.no_grad(): print(tuple(m.encode_image(torch.zeros(1, 3, 224, 224)).shape))\n"
            "print('torch._dynamo' in sys.modules)\n"
            "import torchvision, torchvision.models\n"
            "print(torchvision.transforms.Resize is oc.transform.Resize,"
            " torchvision.ops.misc.FrozenBatchNorm2d is oc.utils.FrozenBatchNorm2d,"
            " torchvision.transforms.InterpolationMode is oc.transform.InterpolationMode)\n"
            "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]])\n"
            "print(torchvision.ops.nms(boxes, torch.tensor([1., .9]), .5).tolist(), hasattr(torchvision, '__version__'),"
            " type(torchvision.models.resnet18()).__name__, 'torch._dynamo' in sys.modules)")
    p = _python(code)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().split("\n")
    assert lines[0].split() == ["False", "False", "False", "True"]
    assert lines[1] == "(1, 512)" and lines[2] == "False"
    assert lines[3].split() == ["True", "True", "True"]
    assert lines[4] == "[0] True ResNet True"


def test_package_shells_load_leaves_without_the_package_init(tmp_path, monkeypatch):
    from t2c.indexer.import_shells import package_shells

    pkg = tmp_path / "shellpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import shellpkg.sub\nINIT_RAN = True\nfrom shellpkg import leaf\n")
    (pkg / "leaf.py").write_text("from .sub.inner import X\nY = X + 1\n")
    (pkg / "sub" / "__init__.py").write_text("raise RuntimeError('sub/__init__ ran')\n")
    (pkg / "sub" / "inner.py").write_text("X = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith("shellpkg")]:
        monkeypatch.delitem(sys.modules, name)
    with package_shells("shellpkg", ("shellpkg", "shellpkg.sub")):
        from shellpkg.leaf import Y
    assert Y == 42
    assert "shellpkg" not in sys.modules and "shellpkg.sub" not in sys.modules
    leaf, inner = sys.modules["shellpkg.leaf"], sys.modules["shellpkg.sub.inner"]
    (pkg / "sub" / "__init__.py").write_text("SUB_INIT_RAN = True\n")
    import shellpkg  # the real package __init__ now runs, with the loaded leaves attached to it

    assert shellpkg.INIT_RAN and shellpkg.leaf is leaf and shellpkg.sub.SUB_INIT_RAN and shellpkg.sub.inner is inner
    assert not any(type(f).__name__ == "_ReattachLeaves" for f in sys.meta_path)
    with package_shells("shellpkg", ("shellpkg",)):  # nothing to do for an imported or a missing package
        with package_shells("no_such_package_t2c", ("no_such_package_t2c",)):
            assert sys.modules["shellpkg"] is shellpkg and "no_such_package_t2c" not in sys.modules
    for name in [n for n in sys.modules if n.startswith("shellpkg")]:
        del sys.modules[name]


def _tiny_config(tmp_path):
    import open_clip

    (tmp_path / "t2c-tiny-clip.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path)


def _features(enc, n=3):
    x = np.random.default_rng(0).normal(size=(n, 3, enc.image_size, enc.image_size)).astype(np.float32)
    return np.concatenate([enc.encode_images(x), enc.encode_texts(["a dog", "a red circle"])])


def test_random_init_kept_in_the_cache_gives_the_same_weights_and_features(tmp_path, monkeypatch):
    _tiny_config(tmp_path)
    spec = "open_clip:t2c-tiny-clip?weights=random"
    plain = E.make_encoder(spec)  # no cache folder (the tests' default): drawn as always
    monkeypatch.setenv("T2C_CACHE_DIR", str(tmp_path / "cache"))
    drawn = E.make_encoder(spec)  # drawn, then kept
    kept = list((tmp_path / "cache" / "weights").glob("open_clip-t2c-tiny-clip-random-*.safetensors"))
    assert len(kept) == 1
    from_file = E.make_encoder(spec)  # filled from the kept file
    want = plain.module.m.state_dict()
    for enc in (drawn, from_file):
        got = enc.module.m.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert "load_state_dict" not in vars(enc.module.m)
        np.testing.assert_array_equal(_features(enc), _features(plain))
    kept[0].write_bytes(b"not a safetensors file")  # a damaged cache file: drawn again, same weights
    again = E.make_encoder(spec)
    np.testing.assert_array_equal(_features(again), _features(plain))


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-fp16"])
def test_checkpoint_weights_fill_the_model_without_a_random_init(tmp_path, fmt):
    """weights=PATH: the model is the checkpoint's (float32 even from a float16 file), as open_clip loads it."""
    import open_clip
    from safetensors.torch import save_file

    _tiny_config(tmp_path)
    torch.manual_seed(3)
    ref = open_clip.create_model("t2c-tiny-clip", pretrained=None)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if fmt == "pt-fp16":
        sd = {k: v.half() for k, v in sd.items()}
    path = tmp_path / f"ck.{fmt.split('-')[0]}"
    save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
    plain = open_clip.create_model("t2c-tiny-clip", pretrained=str(path)).eval()  # open_clip's own load
    enc = E.make_encoder(f"open_clip:t2c-tiny-clip?weights={path}")
    got, want = enc.module.m.state_dict(), plain.state_dict()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert enc.dim == 32 and "load_state_dict" not in vars(enc.module.m)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.inference_mode():  # as encode_images runs
        np.testing.assert_array_equal(enc.encode_images(x), plain.encode_image(torch.from_numpy(x)).numpy())
    assert all(v.data_ptr() % E.ALIGN == 0 for v in got.values())


def test_checkpoint_that_does_not_fit_is_an_encoder_error(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    _tiny_config(tmp_path)
    sd = open_clip.create_model("t2c-tiny-clip", pretrained=None).state_dict()
    sd.pop("visual.proj")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(E.EncoderError, match="visual.proj"):
        E.make_encoder(f"open_clip:t2c-tiny-clip?weights={tmp_path / 'bad.safetensors'}")


def test_a_checkpoint_spec_has_the_configs_preprocessing_hint():
    """The decode workers start on weights=PATH runs too (the config's size and normalisation)."""
    assert E.preprocess_hint("open_clip:ViT-B-32?weights=/some/ck.safetensors") == \
        E.preprocess_hint("open_clip:ViT-B-32?weights=random")


def test_cli_exits_with_the_commands_status_once_torch_is_loaded(tmp_path):
    """python -m t2c.service.cli ends without the interpreter teardown, keeping the exit code and the output."""
    from tests.test_cli import make_images

    make_images(tmp_path / "imgs", 3)
    env = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "T2C_CACHE_DIR": ""}
    run = [sys.executable, "-m", "t2c.service.cli", "index", str(tmp_path / "imgs"), "--store"]
    bad = subprocess.run(run + [str(tmp_path / "s1"), "-e", "open_clip:ViT-B-32/not-a-tag"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not-a-tag" in bad.stderr
    ok = subprocess.run(run + [str(tmp_path / "s2"), "-e", "world:clip", "--workers", "0", "--json"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["added"] == 3
