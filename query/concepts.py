"""Concept vectors: a prompt ensemble embedded by the store's CLIP text tower, cached in memory and on disk.

A concept's vector is the mean of its prompt embeddings — each prompt ("a photo of a {}." filled with the
concept text) is embedded and L2-normalised, the embeddings are averaged, the mean is normalised again.

Templates depend on the text tower: ``open_clip:``/other CLIPs get a standard photo ensemble
(``DEFAULT_TEMPLATES``); ``world:`` CLIPs only know the concept world's vocabulary, so they get templates made
of words the world text tower was trained on (``t2c.data.world.vocab.PROMPT_TEMPLATES``, filtered to known words).

**Centring.** A CLIP trained with a softmax (InfoNCE) loss, as OpenAI's and LAION's were, scores an image
against texts up to a per-image offset: the softmax over texts does not change when every score of one image
moves by the same amount, so nothing in training pins that offset, and cluttered images score lower against
every text than single objects do. For such models (no "own cut", ``present_score`` None) the bank returns
each concept vector minus the mean vector of a fixed reference vocabulary (``reference_words``): the score
becomes the cosine minus the image's mean cosine to those words, which cancels the offset and stays one
inner product, so indices search it unchanged. On world:clip-plain (1,500 images, seed 101) this lifted the
best-threshold F1 of single words from 0.887 to 0.938 and the calibrated one from 0.46 to 0.78. Models with
their own cut (sigmoid-trained, e.g. SigLIP, world:clip), classifier heads and vectors set with ``put`` are
not centred.

The text encoder (torch) is built lazily, only when a vector is not cached. Vectors are cached per
(CLIP model, templates, text) in memory and, when ``cache_dir`` (or ``$T2C_CACHE_DIR``) names a writable
directory, on disk as ``.npy`` files; stores are never written to (they may be read-only). The ``t2c`` CLI
and service default ``$T2C_CACHE_DIR`` to :func:`user_cache_dir`, so a repeated query skips the text tower.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from t2c.data.artefacts import cache_root
from t2c.data.errors import EncoderError, InvalidInput
from t2c.data.store import atomic_write_bytes
from t2c.query.lru import LRUCache

__all__ = ["DEFAULT_TEMPLATES", "WORLD_TEMPLATES", "REFERENCE_WORDS", "reference_words", "templates_for",
           "ConceptBank", "concept_bank_for",
           "clear_banks", "user_cache_dir", "cache_root"]


def user_cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/t2c``, else ``~/.cache/t2c``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "t2c"



#: Standard CLIP prompt ensemble (a subset of the open_clip ImageNet templates that suits open vocabularies).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a cropped photo of a {}.",
)


def _world_templates() -> tuple[str, ...]:
    """Templates whose words the world text tower knows (filtered against data.world.vocab)."""
    from t2c.data.world import vocab

    known = set(vocab.known_words())
    cands = ("{}",) + tuple(vocab.PROMPT_TEMPLATES)
    out = []
    for t in cands:
        words = re.findall(r"[a-z]+", t.replace("{}", " ").lower())
        if all(w in known for w in words) and t not in out:
            out.append(t)
    return tuple(out)


WORLD_TEMPLATES: tuple[str, ...] = _world_templates()


#: Reference vocabulary of open-vocabulary CLIPs for centring (the 80 COCO object categories).
REFERENCE_WORDS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush")


def reference_words(clip_spec: str) -> tuple[str, ...]:
    """The vocabulary whose mean vector centres a softmax-trained CLIP's concepts (see the module docstring)."""
    if str(clip_spec or "").startswith("world:"):
        from t2c.data.world import vocab

        return tuple(vocab.COLORS) + tuple(vocab.SHAPES)
    return REFERENCE_WORDS


def templates_for(clip_spec: str) -> list[str]:
    """Prompt templates suited to a CLIP spec: world-vocabulary ones for ``world:``, else DEFAULT_TEMPLATES."""
    spec = str(clip_spec or "")
    if spec.startswith("world:"):
        return list(WORLD_TEMPLATES)
    return list(DEFAULT_TEMPLATES)


def _check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    tpl = tuple(templates)
    if not tpl:
        raise InvalidInput("at least one prompt template is needed", 'e.g. ["a photo of a {}."]')
    for t in tpl:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise InvalidInput(f"prompt template {t!r} must contain exactly one '{{}}'", 'e.g. "a photo of a {}."')
    return tpl


def _model_identity(clip_spec: str) -> str:
    """What defines the text tower: the spec identity plus size/mtime of a weights file it names or ships."""
    try:
        from t2c.indexer.encoders import parse_spec, weights_file

        spec = parse_spec(clip_spec)
        ident = spec.identity
        path = weights_file(spec)
    except Exception:  # noqa: BLE001 - an unparsable spec fails later, when the encoder is made
        return str(clip_spec)
    for p in [path] if path is not None else []:
        try:
            st = p.stat()
            ident += f"|{p.name}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            pass
    return ident


_UNSET = object()


class ConceptBank:
    """Concept text -> vector in the CLIP space of ``clip_spec`` (prompt ensemble, cached; centred for
    softmax-trained CLIPs, see the module docstring).

    Args:
        clip_spec: the CLIP spec whose text tower embeds concepts (a store's ``snapshot.clip``).
        templates: prompt templates with one ``{}`` each (default ``templates_for(clip_spec)``).
        cache_dir: optional writable directory for an on-disk cache (default ``$T2C_CACHE_DIR`` if set);
            unwritable directories are ignored.
        encoder: an already-built encoder with ``encode_texts`` (tests); default built lazily with make_encoder.

    Example:
        >>> bank = ConceptBank("world:clip")  # doctest: +SKIP
        >>> bank.vector("red circle").shape  # doctest: +SKIP
        (128,)
    """

    def __init__(self, clip_spec: str, templates: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
                 *, encoder=None):
        self.clip_spec = str(clip_spec)
        self.templates = _check_templates(templates if templates is not None else templates_for(self.clip_spec))
        root = Path(cache_dir).expanduser() if cache_dir else cache_root()
        self.cache_dir = root / "concepts" if root else None
        self._encoder = encoder
        self._mem = LRUCache(MAX_VECTORS)  # embedded vectors (recomputable: disk cache or text tower)
        self._given: dict[str, np.ndarray] = {}  # vectors set with put() (kept: nothing could recompute them)
        self._dim: int | None = None
        self._present = _UNSET
        self._centre = _UNSET
        self._centre_lock = threading.RLock()
        self._centring = False
        self._lock = threading.Lock()
        self._encoder_lock = threading.Lock()  # one build, even when a warm-up thread and a query race
        ident = _model_identity(self.clip_spec) + "\x00" + "\x01".join(self.templates)
        self.key = hashlib.blake2b(ident.encode(), digest_size=12).hexdigest()

    # -- encoder --
    @property
    def encoder(self):
        """The text encoder (built on first use; this is where torch gets imported)."""
        if self._encoder is None:
            with self._encoder_lock:
                if self._encoder is None:
                    from t2c.indexer.encoders import make_encoder

                    # texts only: the image tower is never converted for a faster runtime here
                    self._encoder = make_encoder(self.clip_spec, runtime="torch")
        return self._encoder

    # -- cache --
    def _disk_path(self, text: str) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
        return self.cache_dir / self.key / f"{h}.npy"

    def _disk_get(self, text: str) -> np.ndarray | None:
        return self._load(self._disk_path(text))

    def _disk_put(self, text: str, v: np.ndarray) -> None:
        self._save(self._disk_path(text), v)

    @staticmethod
    def _load(p: Path | None) -> np.ndarray | None:
        if p is None or not p.is_file():
            return None
        try:
            v = np.load(p, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return v.astype(np.float32) if v.ndim == 1 else None

    @staticmethod
    def _save(p: Path | None, v: np.ndarray) -> None:
        if p is None:
            return
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, v)
            atomic_write_bytes(p, buf.getvalue(), sync=False)
        except OSError:  # read-only or full disk: the memory cache still works
            pass

    def put(self, text: str, vector) -> None:
        """Set a concept's vector directly (normalised); used for synthetic benchmarks and tests."""
        v = np.asarray(vector, np.float32).reshape(-1)
        n = float(np.linalg.norm(v))
        if not np.isfinite(n) or n == 0:
            raise InvalidInput(f"concept vector for {text!r} must be finite and non-zero")
        with self._lock:
            self._given[text] = v / n
            self._dim = len(v)

    # -- vectors --
    def prompts(self, text: str) -> list[str]:
        """The prompts embedded for one concept."""
        return [t.format(text) for t in self.templates]

    def _embed(self, texts: list[str]) -> np.ndarray:
        prompts = [p for t in texts for p in self.prompts(t)]
        e = np.asarray(self.encoder.encode_texts(prompts), np.float64)
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        e = e.reshape(len(texts), len(self.templates), -1).mean(1)
        e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return e.astype(np.float32)

    def vectors(self, texts: Iterable[str]) -> np.ndarray:
        """(k, d) float32 vectors to score concept texts with: unit vectors, less the centre when the bank centres.

        Raises:
            InvalidInput / UnknownChoice: an empty text, or words the text tower does not know (world:clip).
            EncoderError: the CLIP spec has no text tower.
        """
        texts = [t.strip() if isinstance(t, str) else t for t in texts]
        out = self.unit_vectors(texts)
        embedded = np.array([[t not in self._given] for t in texts], np.float32).reshape(-1, 1)
        centre = self.centre if embedded.any() else None
        if centre is not None:
            out -= centre * embedded
        return out

    def unit_vectors(self, texts: Iterable[str]) -> np.ndarray:
        """(k, d) float32 unit vectors for concept texts (prompt ensemble; cached), never centred.

        Raises:
            InvalidInput / UnknownChoice: an empty text, or words the text tower does not know (world:clip).
            EncoderError: the CLIP spec has no text tower.
        """
        texts = [t.strip() if isinstance(t, str) else t for t in texts]
        for t in texts:
            if not isinstance(t, str) or not t:
                raise InvalidInput(f"concept text must be a non-empty string, got {t!r}")
        found: dict[str, np.ndarray] = {}
        todo = []
        for t in dict.fromkeys(texts):
            v = self._given.get(t)
            if v is None:
                v = self._mem.get(t)
            if v is None:
                v = self._disk_get(t)
                if v is not None:
                    v = self._mem.setdefault(t, v)
            if v is None:
                todo.append(t)
            else:
                found[t] = v
        if todo:
            emb = self._embed(todo)
            for t, v in zip(todo, emb):
                found[t] = self._mem.setdefault(t, v)
                self._disk_put(t, v)
        if found:
            self._dim = len(next(iter(found.values())))
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([found[t] for t in texts]).astype(np.float32)

    def vector(self, text: str) -> np.ndarray:
        """(d,) float32 vector of one concept (a unit vector, less the centre when the bank centres)."""
        return self.vectors([text])[0]

    @property
    def centre(self) -> np.ndarray | None:
        """The mean vector of ``reference_words`` that concept vectors are centred on, or None (not centred:
        the model has its own cut, or no text tower here)."""
        c = self._centre
        if c is not _UNSET:
            return c
        with self._centre_lock:  # re-entrant: embedding the reference words asks for the centre again
            if self._centre is not _UNSET:
                return self._centre
            if self._centring:  # this thread is embedding the reference words: those are not centred
                return None
            val, words = None, self.reference_words()
            if words and self.present_score is None:
                self._centring = True
                try:
                    val = self.unit_vectors(words).astype(np.float64).mean(0).astype(np.float32)
                except (EncoderError, InvalidInput):
                    val = None
                finally:
                    self._centring = False
            self._centre = val
            return val

    def reference_words(self) -> tuple[str, ...]:
        """The reference vocabulary for centring (empty: never centre)."""
        return reference_words(self.clip_spec)

    @property
    def present_score(self) -> float | None:
        """The CLIP model's own "present" cosine score (``Encoder.present_score``, as float32); None when the model
        has none, or when its text tower cannot be built here (vectors supplied with :meth:`put`). Kept in the
        disk cache beside the vectors, so cached concepts calibrate without building the text tower."""
        if self._present is not _UNSET:
            return self._present
        p = self.cache_dir / self.key / "present_score.npy" if self.cache_dir else None
        v = self._load(p)
        if v is not None and v.shape == (1,):
            val = None if np.isnan(v[0]) else float(v[0])
        else:
            try:
                enc = self.encoder
            except (EncoderError, InvalidInput):
                return None
            raw = getattr(enc, "present_score", None)
            val = None if raw is None else float(np.float32(raw))
            self._save(p, np.array([np.nan if val is None else val], np.float32))
        self._present = val
        return val

    @property
    def dim(self) -> int:
        if self._dim is not None:
            return self._dim
        return int(self.encoder.dim)


MAX_BANKS = 16  # concept banks kept (one per store and CLIP model; least recently used out first)
MAX_VECTORS = 100_000  # embedded concept vectors a bank keeps in memory
_BANKS = LRUCache(MAX_BANKS)


def concept_bank_for(snapshot, templates: Sequence[str] | None = None, cache_dir=None) -> ConceptBank:
    """The ConceptBank for a store's CLIP model, memoised per (store, CLIP spec, templates)."""
    tpl = tuple(templates) if templates is not None else tuple(templates_for(snapshot.clip))
    key = (str(Path(snapshot.root).resolve()), snapshot.clip, tpl, str(cache_dir))
    bank = _BANKS.get(key)
    if bank is None:
        from t2c.query.head_concepts import HeadConceptBank, is_head_spec  # a classifier head as vocabulary

        kind = HeadConceptBank if is_head_spec(snapshot.clip) else ConceptBank
        bank = _BANKS.setdefault(key, kind(snapshot.clip, tpl, cache_dir))
    return bank


def clear_banks() -> None:
    """Forget memoised banks (tests)."""
    _BANKS.clear()
