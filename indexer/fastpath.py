"""The fast CPU path: an encoder's image tower run by OpenVINO (fp32, or bfloat16 where the CPU has it).

``make_encoder`` calls :func:`to_openvino` for ``runtime=openvino``, and for ``precision=bf16`` on the CPU when
OpenVINO is installed (the ``fast`` extra: ``pip install "text2concept[fast]"``). The torch module is traced
once, converted, and kept as OpenVINO IR in the cache folder (``$T2C_CACHE_DIR/openvino``), named by a
fingerprint of the module's weights and the library versions, so a later run of the same model skips the
conversion, and for specs whose weights are known without building the model (seeded random init, a weights file,
weights shipped in a package) skips building the torch model as well (:func:`cached_encoder`). Features agree with the torch module's to float rounding (fp32) or to bfloat16 rounding (bf16):
the runtime is a run-time option, the precision is part of the spec's identity.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from t2c.data.errors import EncoderError, InvalidInput
from t2c.indexer.encoders import Encoder

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
FAST_HINT = 'install the fast extra: pip install "text2concept[fast]"'


def cache_dir() -> Path | None:
    """Where converted models are kept: ``$T2C_CACHE_DIR/openvino`` (None when ``$T2C_CACHE_DIR`` is unset or
    empty: every build converts again; the CLI sets it to the per-user cache folder)."""
    from t2c.data.artefacts import cache_root

    root = cache_root()
    return root / "openvino" if root else None


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def to_openvino(enc, precision: str, *, required: bool = False):
    """``enc`` with its image features computed by OpenVINO at ``precision``; None when that cannot be done and
    ``required`` is False (the caller keeps torch), else an EncoderError saying why."""
    from t2c.indexer.encoders import ModuleEncoder

    why = None
    if precision not in OV_PRECISION:
        why = (f"runtime=openvino runs fp32 or bf16, not precision={precision}", f"use runtime=torch for {precision}")
    elif not isinstance(enc, ModuleEncoder):
        why = (f"runtime=openvino needs an encoder built on a torch module, not {enc.spec}", "use runtime=torch")
    elif enc.device != "cpu":
        why = ("runtime=openvino runs on the CPU", "use runtime=torch on a GPU")
    elif not openvino_available():
        why = ("runtime=openvino: OpenVINO is not installed", FAST_HINT)
    elif precision == "bf16" and not _has_bf16():
        why = ("precision=bf16 with OpenVINO needs a CPU with AVX512-BF16 or AMX", "use runtime=torch")
    if why is not None:
        if required:
            raise EncoderError(*why)
        return None
    try:
        compiled = _compile(enc, precision)
    except Exception as e:  # noqa: BLE001 - a tower OpenVINO cannot take stays on torch unless asked for
        if required:
            raise EncoderError(f"runtime=openvino cannot convert {enc.spec}: {type(e).__name__}: {str(e)[:300]}",
                               "use runtime=torch") from None
        return None
    enc._forward_images = _Runner(compiled)
    enc.input_dtype = None
    enc.runtime = f"openvino/{OV_PRECISION[precision]}"
    enc._ir = compiled._t2c_ir
    return enc


def _has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _Runner:
    """Calls a compiled OpenVINO model on a torch batch; returns a torch tensor (one infer request, reused)."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def __call__(self, x):
        import torch

        self.request.infer({0: x.detach().float().contiguous().numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def fingerprint(module, size: int, wrapper: str = "") -> str:
    """Names the converted model: library versions, the input size and every tensor's name, shape, dtype and
    sums (weights that differ anywhere give another name)."""
    import openvino as ov
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([torch.__version__, ov.__version__, int(size), wrapper, type(module).__qualname__]).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not torch.is_tensor(t):
                continue
            f = t.detach().float().flatten() if t.is_floating_point() else t.detach().flatten().double()
            stats = [float(f.sum()), float(f.abs().sum()), float(f[::97].sum())] if f.numel() else []
            h.update(json.dumps([name, list(t.shape), str(t.dtype), stats]).encode())
    return h.hexdigest()


def _compile(enc, precision: str):
    """Trace (or read from the cache) and compile ``enc``'s module for the CPU."""
    import openvino as ov
    import torch

    size = int(enc.image_size)
    module = enc.module.eval()
    from t2c.indexer.encoders import image_tower

    folder = cache_dir()
    path = folder / f"{fingerprint(image_tower(enc), size, type(module).__qualname__)}.xml" if folder else None
    core = ov.Core()
    model = None
    if path is not None and path.is_file() and path.with_suffix(".bin").is_file():
        try:
            model = core.read_model(str(path))
        except Exception:  # noqa: BLE001 - a damaged cache entry is converted again
            model = None
    if model is None:
        import warnings

        example = torch.zeros(2, 3, size, size)
        with torch.no_grad(), warnings.catch_warnings():  # torch.jit's deprecation notes are not the user's concern
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            traced = torch.jit.trace(module, example, check_trace=False)
            model = ov.convert_model(traced, input=[ov.PartialShape([-1, 3, size, size])])
        if path is not None:
            _save(model, path)
    threads = int(torch.get_num_threads())
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                                                 "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    return _Compiled(compiled, path.name if path is not None and path.is_file() else None)


class _Compiled:
    """A compiled model and the name of its IR in the cache (None: not saved)."""

    def __init__(self, compiled, ir: str | None):
        self.compiled, self._t2c_ir = compiled, ir

    def create_infer_request(self):
        return self.compiled.create_infer_request()


def _save(model, path: Path) -> None:
    """Save the IR atomically (temporary names, then rename .bin before .xml: an .xml is only seen whole)."""
    import openvino as ov

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache folder only costs the next run a conversion
        pass


# ---------------------------------------------------------------------------------------------
# a converted model found again without building its torch module (start-up in a fraction of a second)
# ---------------------------------------------------------------------------------------------
_CODE_FILES = ("encoders.py", "fastpath.py", "world/models.py")
_LIBRARIES = ("torch", "torchvision", "timm", "open_clip_torch", "efficientnet-lite-pytorch", "openvino")


def spec_key(spec) -> str | None:
    """Names what a spec's converted model depends on without building it: the spec's identity, its weights
    file (path, size, mtime), the encoder code and the library versions. None where that cannot be told
    without building the model: hub weights, ``python:`` factories (the user's code)."""
    import importlib.metadata as md

    from t2c.indexer.encoders import source_info, weights_file

    if spec.source == "python" or spec.options.get("device", "cpu") != "cpu":
        return None
    if spec.weights_mode == "default" and source_info(spec.source).shipped_weights is None:
        return None
    wf = weights_file(spec) if spec.weights_mode != "random" else None
    if spec.weights_mode != "random" and (wf is None or not wf.is_file()):
        return None
    h = hashlib.blake2b(digest_size=16)
    here = Path(__file__).resolve().parent
    for f in _CODE_FILES:
        h.update((here / f).read_bytes())
    versions = []
    for lib in _LIBRARIES:
        try:
            versions.append(md.version(lib))
        except md.PackageNotFoundError:
            versions.append(None)
    st = wf.stat() if wf is not None else None
    weights = [str(wf.resolve()), st.st_size, st.st_mtime_ns] if st is not None else None
    h.update(json.dumps([spec.identity, spec.options.get("precision", "fp32"), versions, weights]).encode())
    return h.hexdigest()


def remember(spec, enc) -> None:
    """After ``enc`` was converted: note what :func:`cached_encoder` needs to rebuild it from the cache alone."""
    key = spec_key(spec) if cache_dir() is not None else None
    if key is None or enc.vocabulary is not None or getattr(enc, "_ir", None) is None:
        return
    meta = {"ir": enc._ir, "spec": enc.spec, "dim": int(enc.dim), "has_text": bool(enc.has_text),
            "present_score": enc.present_score, "preprocess": enc.preprocess_config()}
    try:
        from t2c.data.store import atomic_write_bytes

        atomic_write_bytes(cache_dir() / f"spec-{key}.json", json.dumps(meta).encode(), sync=False)
    except OSError:
        pass


def cached_encoder(spec, precision: str, kw: dict):
    """An encoder whose image features run from a converted model in the cache, made without building (or even
    importing) torch; its text tower, if any, is the real model's, built on first use. None when the cache has
    nothing for this spec, or the encoder would not run on the CPU."""
    if precision not in OV_PRECISION or cache_dir() is None or not openvino_available():
        return None
    if (kw.get("device") or ("cuda" if _maybe_gpu() else "cpu")) != "cpu":
        return None  # the model decides between cuda and cpu as usual
    key = spec_key(spec)
    meta_path = cache_dir() / f"spec-{key}.json" if key else None
    if meta_path is None or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        xml = cache_dir() / meta["ir"]
        if not (xml.is_file() and xml.with_suffix(".bin").is_file()):
            return None
        import openvino as ov

        if precision == "bf16" and not _has_bf16():
            return None
        config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        if kw.get("threads"):
            config["INFERENCE_NUM_THREADS"] = int(kw["threads"])
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    except Exception:  # noqa: BLE001 - an unreadable cache entry: build the model as usual
        return None
    return CachedEncoder(spec, meta, compiled, f"openvino/{OV_PRECISION[precision]}",
                         batch_size=int(kw.get("batch_size", 64)))


def _maybe_gpu() -> bool:
    """Whether torch might find a CUDA device (told without importing torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


class CachedEncoder(Encoder):
    """An encoder restored from the cache: image features from OpenVINO (no torch), texts from the real model."""

    def __init__(self, spec, meta: dict, compiled, runtime: str, batch_size: int = 64):
        # Encoder.__init__ is not called: it imports torch, which only the text tower needs
        self.device, self.batch_size, self.runtime = "cpu", int(batch_size), runtime
        self._parsed, self._full = spec, None
        self.spec, self.dim, self.has_text = meta["spec"], int(meta["dim"]), bool(meta["has_text"])
        self.present_score = meta.get("present_score")
        cfg = meta["preprocess"]
        self.image_size, self.mean, self.std = int(cfg["image_size"]), tuple(cfg["mean"]), tuple(cfg["std"])
        self.resize_mode, self.crop_pct = cfg.get("resize_mode", "shorter"), cfg.get("crop_pct")
        self._request = compiled.create_infer_request()

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidInput(f"expected an (N, 3, H, W) batch, got shape {batch.shape}")
        out = []
        for i in range(0, len(batch), self.batch_size):
            self._request.infer({0: np.ascontiguousarray(batch[i : i + self.batch_size])})
            out.append(np.array(self._request.get_output_tensor(0).data, dtype=np.float32))
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        if not self.has_text:
            raise EncoderError(f"encoder {self.spec} has no text tower",
                               "use a CLIP-like encoder (open_clip:..., world:clip) for text")
        if self._full is None:  # the text tower is the torch model's own (fp32), built once when asked for
            from t2c.indexer.encoders import make_encoder

            self._full = make_encoder(self._parsed, runtime="torch", batch_size=self.batch_size)
        return self._full.encode_texts(texts)
