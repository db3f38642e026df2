"""The concept world's vocabulary: attribute values, caption grammar, tokenizer and concept parser.

Pure Python + numpy (no torch). Everything that turns words into world attributes lives here, so the
generator, the text tower and the ground-truth helper share one definition.

Attributes:
    colours (8): red orange yellow green blue purple pink white
    shapes (6): circle square triangle diamond cross star
    sizes (2): small large
    backgrounds (4): black gray teal striped (striped is textured)
Caption grammar (canonical): ``a small red circle, a large blue square and a small green star on a teal
background``. Training captions drop attributes and objects at random and add a template prefix
(``a photo of``, ``an image with`` ...), so partial prompts such as ``a red`` are in distribution.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np

from t2c.data.errors import InvalidInput, UnknownChoice

# --- attribute values (order is fixed: it defines class indices in the models) -----------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "orange": (245, 140, 20),
    "yellow": (240, 222, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "purple": (140, 50, 195),
    "pink": (250, 125, 195),
    "white": (242, 242, 242),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: tuple[str, ...] = ("small", "large")
# background name -> (kind, base colour[, second colour])
BACKGROUNDS: dict[str, tuple] = {
    "black": ("plain", (22, 22, 26)),
    "gray": ("plain", (122, 122, 122)),
    "teal": ("plain", (18, 104, 108)),
    "striped": ("stripes", (88, 68, 48), (140, 116, 86)),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "size": SIZES,
    "background": tuple(BACKGROUNDS),
}
COUNTS: tuple[int, ...] = (1, 2, 3)

# --- words ------------------------------------------------------------------------------------------
# Filler words carry no attribute; they appear in training captions, so prompt templates are in distribution.
FILLERS: tuple[str, ...] = (
    "a", "the", "photo", "picture", "image", "of", "with", "and", "on", "in", "background",
    "there", "is", "this", "object", "shape", "showing",
)
# Accepted spellings mapped onto canonical words (plurals, British spelling, near synonyms).
SYNONYMS: dict[str, str] = {
    "an": "a", "grey": "gray", "big": "large", "tiny": "small", "little": "small", "plus": "cross",
    "photograph": "photo", "pic": "picture", "objects": "object", "shapes": "shape", "are": "is",
    "containing": "with", "shows": "showing", "stripes": "striped", "stripy": "striped",
    **{s + "s": s for s in SHAPES},
    "crosses": "cross",
}
WORDS: tuple[str, ...] = tuple(dict.fromkeys([*COLORS, *SHAPES, *SIZES, *BACKGROUNDS, *FILLERS]))
PAD, CLS = "<pad>", "<cls>"
TOKENS: tuple[str, ...] = (PAD, CLS, *WORDS)
TOKEN_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}
MAX_LEN = 40  # tokens including <cls>; longer texts are truncated

# Templates used for concept vectors (benchmarks, demos); the caption sampler draws from the same prefixes.
PROMPT_TEMPLATES: tuple[str, ...] = ("a {}", "a photo of a {}", "a picture of a {}", "an image of a {}")
_PREFIXES: tuple[str, ...] = (
    "", "", "", "a photo of ", "a picture of ", "an image of ", "a photo with ", "a picture with ",
    "an image with ", "there is ", "this is ", "the image showing ", "an image showing ",
)
_NOUNS_WITHOUT_SHAPE: tuple[str, ...] = ("", "object", "shape")

_WORD_RE = re.compile(r"[a-z]+")


def known_words() -> list[str]:
    """Every word the text tower accepts (canonical words and accepted spellings), sorted."""
    return sorted(set(WORDS) | set(SYNONYMS))


def words_of(text: str) -> list[str]:
    """Lower-case, split on non-letters, map synonyms; raise UnknownChoice for a word outside the vocabulary."""
    if not isinstance(text, str):
        raise InvalidInput(f"expected a text string, got {type(text).__name__}")
    out = []
    for w in _WORD_RE.findall(text.lower()):
        w = SYNONYMS.get(w, w)
        if w not in TOKEN_ID:
            raise UnknownChoice("word", w, known_words())
        out.append(w)
    return out


def tokenize(texts: Sequence[str], max_len: int = MAX_LEN) -> np.ndarray:
    """Token ids (N, max_len) int64: ``<cls>`` then the words, padded with 0; longer texts are truncated."""
    ids = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, t in enumerate(texts):
        toks = [TOKEN_ID[CLS]] + [TOKEN_ID[w] for w in words_of(t)]
        toks = toks[:max_len]
        ids[i, : len(toks)] = toks
    return ids


# --- caption grammar ----------------------------------------------------------------------------------
def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def object_phrase(color: str | None, shape: str | None, size: str | None, noun: str = "object") -> str:
    """``a [size] [color] shape`` (``noun`` stands in when shape is None; '' leaves the adjectives bare)."""
    words = ["a"] + [w for w in (size, color) if w] + [shape or noun]
    return " ".join(w for w in words if w)


def canonical_caption(background: str, objects: Iterable[dict]) -> str:
    """The full caption written to labels.parquet: every object's size, colour, shape, and the background."""
    phrases = [object_phrase(o["color"], o["shape"], o["size"]) for o in objects]
    return f"{_join(phrases)} on a {background} background"


def sample_caption(background: str, objects: Sequence[dict], rng: np.random.Generator) -> str:
    """A random true caption for training: attributes/objects dropped at random, random template prefix."""
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    if rng.random() < 0.06:
        return f"{prefix}a {background} background".strip()
    idx = list(rng.permutation(len(objects)))
    if len(idx) > 1 and rng.random() < 0.35:
        idx = idx[: rng.integers(1, len(idx))]
    phrases = []
    for i in idx:
        o = objects[i]
        keep_c, keep_s, keep_z = rng.random() < 0.8, rng.random() < 0.8, rng.random() < 0.5
        if not (keep_c or keep_s or keep_z):
            keep_c, keep_s = (True, False) if rng.random() < 0.5 else (False, True)
        noun = _NOUNS_WITHOUT_SHAPE[rng.integers(len(_NOUNS_WITHOUT_SHAPE))]
        phrases.append(object_phrase(o["color"] if keep_c else None, o["shape"] if keep_s else None,
                                     o["size"] if keep_z else None, noun))
    text = prefix + _join(phrases)
    if rng.random() < 0.5:
        text += f" on a {background} background"
    return text


def binding_negative(objects: Sequence[dict], rng: np.random.Generator) -> str:
    """A false caption that reuses the scene's own words (a hard negative for contrastive training).

    With two objects of different colours and shapes, their colours are swapped ("a red circle and a blue
    square" -> "a blue circle"), which only a model that binds colour to shape can tell apart; otherwise one
    object's colour or shape is replaced by one absent from the scene. Never true of the scene.
    """
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    present = {(o["color"], o["shape"]) for o in objects}
    swaps = [(a["color"], b["shape"]) for a in objects for b in objects
             if (a["color"], b["shape"]) not in present]
    if swaps:
        color, shape = swaps[rng.integers(len(swaps))]
        return prefix + object_phrase(color, shape, None)
    o = objects[rng.integers(len(objects))]
    if rng.random() < 0.5:
        colors = [c for c in COLORS if (c, o["shape"]) not in present]
        return prefix + object_phrase(colors[rng.integers(len(colors))], o["shape"], None)
    shapes = [s for s in SHAPES if (o["color"], s) not in present]
    return prefix + object_phrase(o["color"], shapes[rng.integers(len(shapes))], None)


# --- concepts (ground truth) -------------------------------------------------------------------------
def parse_concept(concept: str) -> dict:
    """Parse a concept string into ``{"objects": [{color, shape, size}...], "background": str | None}``.

    Supported: any mix of one colour, shape and size per object ("red", "circle", "large red square",
    "small object"), several objects joined by "and"/"with"/","-free juxtaposition ("red circle and blue
    square"), and a background ("teal background", "striped", "red circle on a teal background").
    Filler words (a, the, photo of, ...) are ignored. Each object constraint must hold for one object.

    Raises:
        UnknownChoice: a word outside the vocabulary, or a colour used as a background that is not one.
        InvalidInput: the concept names no attribute at all.
    """
    words = words_of(concept)
    objects: list[dict] = []
    cur: dict = {}
    background = None

    def close():
        nonlocal cur
        if cur:
            objects.append(cur)
        cur = {}

    for i, w in enumerate(words):
        nxt = words[i + 1] if i + 1 < len(words) else None
        if w in BACKGROUNDS:
            if background not in (None, w):
                raise InvalidInput(f"concept {concept!r} names two backgrounds", "an image has one background")
            background = w
        elif w in COLORS and nxt == "background":
            raise UnknownChoice("background", w, BACKGROUNDS)
        elif w in COLORS or w in SHAPES or w in SIZES:
            key = "color" if w in COLORS else "shape" if w in SHAPES else "size"
            if key in cur or ("shape" in cur and key != "shape"):
                close()
            cur[key] = w
        elif w in ("and", "with", "a", "the"):  # an article after an object starts the next one
            close()
    close()
    if not objects and background is None:
        raise InvalidInput(
            f"concept {concept!r} names no colour, shape, size or background",
            f"colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)}; "
            f"backgrounds: {', '.join(BACKGROUNDS)}",
        )
    return {"objects": objects, "background": background}
