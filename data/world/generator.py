"""Procedural concept-world images with exact labels (numpy + PIL + pyarrow only; never torch).

A scene is 1-3 objects (colour, shape, size, position) on a background; rendering adds mild colour
jitter and pixel noise. Everything is deterministic: image ``i`` of a collection generated with seed
``S`` depends only on ``(S, i)`` and the sampling weights, so a smaller collection is a prefix of a
larger one.

Python API:
    sample_scene(rng, weights=None, n_objects=None) -> Scene
    render(scene, size=64) -> PIL.Image
    generate(out_dir, n, seed, size=64, weights=None) -> Path of labels.parquet
    concept_truth(labels, "red circle") -> bool array
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from t2c.data.errors import InvalidInput, NotFound, UnknownChoice
from t2c.data.store import SHARED_MODE, atomic_write_bytes, atomic_write_file
from t2c.data.world import vocab

SMALL_RADIUS = (0.11, 0.14)  # object radius as a fraction of the image side
LARGE_RADIUS = (0.20, 0.24)
NOISE_STD = 4.0  # pixel noise (0-255 scale)
COLOR_JITTER = 14  # per-channel jitter of object colours
SUPERSAMPLE = 2
FORMAT_VERSION = 1

_CATEGORY_ALIASES = {"colour": "color", "color": "color", "shape": "shape", "size": "size",
                     "background": "background", "bg": "background", "count": "count", "objects": "count"}


@dataclass(frozen=True)
class WorldObject:
    """One object: attributes, centre (x, y as fractions of the side) and radius fraction."""

    color: str
    shape: str
    size: str
    x: float
    y: float
    r: float

    def label(self) -> dict:
        """The label struct written to labels.parquet."""
        return {"color": self.color, "shape": self.shape, "size": self.size,
                "x": round(self.x, 4), "y": round(self.y, 4)}


@dataclass(frozen=True)
class Scene:
    """A background, its objects, and the seed of the render-time randomness (jitter, noise, stripes)."""

    background: str
    objects: tuple[WorldObject, ...]
    seed: int = 0

    def object_labels(self) -> list[dict]:
        return [o.label() for o in self.objects]

    @property
    def caption(self) -> str:
        """The canonical caption (every attribute of every object, and the background)."""
        return vocab.canonical_caption(self.background, self.object_labels())


# --- sampling weights ----------------------------------------------------------------------------------
def parse_weights(weights: Mapping[str, float] | Sequence[str] | None) -> dict[str, np.ndarray]:
    """``["color.red=3", "background.teal=0"]`` or ``{"color.red": 3}`` -> per-category probabilities.

    Categories: color (alias colour), shape, size, background, count (number of objects 1-3). Unnamed
    values keep weight 1.

    Raises:
        InvalidInput: malformed entry, negative weight, or a category whose weights are all zero.
        UnknownChoice: unknown category or value.
    """
    choices = {**vocab.ATTRIBUTES, "count": tuple(str(c) for c in vocab.COUNTS)}
    w = {k: np.ones(len(v)) for k, v in choices.items()}
    items: list[tuple[str, float]] = []
    if weights is None:
        pass
    elif isinstance(weights, Mapping):
        items = [(str(k), v) for k, v in weights.items()]
    else:
        for entry in weights:
            if not isinstance(entry, str) or "=" not in entry:
                raise InvalidInput(f"malformed weight {entry!r}", "use CATEGORY.VALUE=WEIGHT, e.g. color.red=3")
            k, _, v = entry.partition("=")
            items.append((k.strip(), v.strip()))
    for key, value in items:
        cat, _, name = key.partition(".")
        if cat.lower() not in _CATEGORY_ALIASES:
            raise UnknownChoice("weight category", cat, sorted(choices))
        cat = _CATEGORY_ALIASES[cat.lower()]
        name = vocab.SYNONYMS.get(name.lower(), name.lower())
        if name not in choices[cat]:
            raise UnknownChoice(cat, name, choices[cat])
        try:
            val = float(value)
        except (TypeError, ValueError):
            raise InvalidInput(f"weight {key}={value!r} is not a number") from None
        if not math.isfinite(val) or val < 0:
            raise InvalidInput(f"weight {key}={value} must be a finite number >= 0")
        w[cat][choices[cat].index(name)] = val
    for cat, arr in w.items():
        if arr.sum() <= 0:
            raise InvalidInput(f"all {cat} weights are zero", f"give at least one {cat} a positive weight")
    return {cat: arr / arr.sum() for cat, arr in w.items()}


def _as_probs(weights) -> dict[str, np.ndarray]:
    if isinstance(weights, dict) and weights and all(isinstance(v, np.ndarray) for v in weights.values()):
        return weights
    return parse_weights(weights)


# --- scenes ---------------------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator, weights=None, n_objects: int | None = None) -> Scene:
    """Draw a random scene (attributes from ``weights``, non-overlapping-ish positions) using ``rng``.

    Args:
        rng: a numpy Generator; the scene depends only on its state.
        weights: None, a list like ``["color.red=3"]``, a mapping, or the output of parse_weights.
        n_objects: force the number of objects (1-3); None samples it from the ``count`` weights.
    """
    p = _as_probs(weights)
    if n_objects is None:
        n = int(vocab.COUNTS[rng.choice(len(vocab.COUNTS), p=p["count"])])
    else:
        n = int(n_objects)
        if n not in vocab.COUNTS:
            raise InvalidInput(f"n_objects must be 1, 2 or 3, got {n_objects}")
    background = vocab.ATTRIBUTES["background"][rng.choice(len(vocab.BACKGROUNDS), p=p["background"])]
    attrs = []
    for _ in range(n):
        color = vocab.ATTRIBUTES["color"][rng.choice(len(vocab.COLORS), p=p["color"])]
        shape = vocab.SHAPES[rng.choice(len(vocab.SHAPES), p=p["shape"])]
        size = vocab.SIZES[rng.choice(len(vocab.SIZES), p=p["size"])]
        lo, hi = SMALL_RADIUS if size == "small" else LARGE_RADIUS
        attrs.append((color, shape, size, float(rng.uniform(lo, hi))))
    centres = _place([a[3] for a in attrs], rng)
    objects = tuple(WorldObject(c, s, z, x, y, r) for (c, s, z, r), (x, y) in zip(attrs, centres))
    return Scene(background, objects, int(rng.integers(2**31 - 1)))


def binding_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same scene (layout, sizes, background, render seed) with colours re-bound to other shapes.

    The twin has the same bag of colours and shapes whenever it can ("a red circle and a blue square" ->
    "a blue circle and a red square"), so only a model that binds colour to shape can tell the two apart;
    a scene whose pairs no permutation changes (one object, one colour, one shape) gets one object recoloured.
    The twin's set of colour-shape pairs always differs from the scene's.
    """
    objs = scene.objects
    pairs = {(o.color, o.shape) for o in objs}
    colors = [o.color for o in objs]
    perms = [p for p in itertools.permutations(range(len(objs)))
             if {(colors[i], o.shape) for i, o in zip(p, objs)} != pairs]
    if perms:
        p = perms[rng.integers(len(perms))]
        new = [dataclasses.replace(o, color=colors[i]) for i, o in zip(p, objs)]
    else:
        k = int(rng.integers(len(objs)))
        others = [c for c in vocab.COLORS if (c, objs[k].shape) not in pairs]  # a new pair, never a duplicate's
        new = list(objs)
        new[k] = dataclasses.replace(objs[k], color=others[rng.integers(len(others))])
    return Scene(scene.background, tuple(new), scene.seed)


def _place(radii: list[float], rng: np.random.Generator, tries: int = 60) -> list[tuple[float, float]]:
    """Centres inside the frame, overlapping at most a little (best of ``tries`` if no clean fit)."""
    out: list[tuple[float, float]] = []
    for r in radii:
        best, best_gap = None, -np.inf
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            gap = min((math.hypot(x - px, y - py) - 0.8 * (r + pr) for (px, py), pr in zip(out, radii)),
                      default=1.0)
            if gap > best_gap:
                best, best_gap = (float(x), float(y)), gap
            if gap >= 0:
                break
        out.append(best)
    return out


def scene_from_labels(background: str, objects: Sequence[Mapping], seed: int = 0) -> Scene:
    """Rebuild a Scene from label dicts (radius set to the middle of its size's range)."""
    objs = []
    for o in objects:
        lo, hi = SMALL_RADIUS if o["size"] == "small" else LARGE_RADIUS
        objs.append(WorldObject(o["color"], o["shape"], o["size"], float(o["x"]), float(o["y"]), (lo + hi) / 2))
    return Scene(background, tuple(objs), seed)


# --- rendering ------------------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = 0.82 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        cy2 = cy + 0.15 * r
        return [(cx + r * math.cos(a), cy2 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "cross":
        a = 0.32 * r
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.45 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(ang), cy + 0.08 * r + rad * math.sin(ang)))
        return pts
    return None  # circle


def _background(name: str, side: int, rng: np.random.Generator) -> np.ndarray:
    spec = vocab.BACKGROUNDS[name]
    jit = rng.integers(-8, 9, size=3)
    if spec[0] == "plain":
        base = np.clip(np.asarray(spec[1]) + jit, 0, 255)
        return np.broadcast_to(base.astype(np.uint8), (side, side, 3)).copy()
    a = np.clip(np.asarray(spec[1]) + jit, 0, 255)
    b = np.clip(np.asarray(spec[2]) + jit, 0, 255)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(0.10, 0.18) * side
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform()
    mask = (phase % 1.0) < 0.5
    return np.where(mask[..., None], a, b).astype(np.uint8)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw a scene as an RGB PIL image of ``size`` x ``size`` pixels (deterministic given the scene)."""
    if int(size) < 8:
        raise InvalidInput(f"image size must be >= 8 pixels, got {size}")
    size = int(size)
    rng = np.random.default_rng(scene.seed)
    side = size * SUPERSAMPLE
    canvas = Image.fromarray(_background(scene.background, side, rng))
    draw = ImageDraw.Draw(canvas)
    for o in scene.objects:
        col = np.clip(np.asarray(vocab.COLORS[o.color]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
        fill = tuple(int(c) for c in col)
        cx, cy, r = o.x * side, o.y * side, o.r * side
        poly = _shape_polygon(o.shape, cx, cy, r)
        if poly is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    img = canvas.resize((size, size), Image.BOX) if SUPERSAMPLE > 1 else canvas
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0.0, NOISE_STD, size=(size, size, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def squash(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize like the encoder registry does ("squash", bicubic) and return an HWC uint8 array."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image ``index`` of a collection with ``seed``."""
    return np.random.default_rng([int(seed), int(index)])


def sample_dataset(n: int, seed: int, *, size: int = 64, image_size: int | None = 32, weights=None,
                   n_objects: int | None = None, start: int = 0) -> tuple[list[Scene], np.ndarray]:
    """Scenes and their rendered pixels, in memory: (scenes, uint8 array (n, S, S, 3)).

    Images are rendered at ``size`` and, when ``image_size`` is given, squashed to it exactly as the
    encoder registry preprocesses files, so training and indexing see the same pixels.
    """
    p = _as_probs(weights)
    out_side = image_size or size
    pixels = np.empty((n, out_side, out_side, 3), dtype=np.uint8)
    scenes = []
    for k in range(n):
        sc = sample_scene(scene_rng(seed, start + k), p, n_objects=n_objects)
        scenes.append(sc)
        pixels[k] = squash(render(sc, size), out_side)
    return scenes, pixels


# --- collections on disk --------------------------------------------------------------------------------
def generate(out_dir: str | os.PathLike, n: int, seed: int, size: int = 64, weights=None, *,
             n_objects: int | None = None, progress: bool = False) -> Path:
    """Write ``n`` images plus ``labels.parquet`` and ``world.json`` into ``out_dir``.

    Args:
        out_dir: target directory (created). Images go to ``images/NNN/NNNNNN.png``.
        n: number of images (>= 1).
        seed: collection seed; image i depends only on (seed, i, weights).
        size: image side in pixels (>= 8).
        weights: sampling weights, e.g. ``["color.red=3", "background.teal=0"]`` (see parse_weights).
        n_objects: force 1, 2 or 3 objects per image (None: sampled).
        progress: show a tqdm progress bar.

    Returns:
        Path of ``labels.parquet``: columns path, background, objects (list<struct{color, shape, size,
        x, y}>), caption, n_objects, width, height.

    Raises:
        InvalidInput: bad n, size or weights.

    Example:
        >>> generate("/tmp/world", n=100, seed=0)  # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if int(n) < 1:
        raise InvalidInput(f"n must be >= 1, got {n}")
    if int(size) < 8:
        raise InvalidInput(f"image size must be >= 8 pixels, got {size}")
    n, size, seed = int(n), int(size), int(seed)
    probs = parse_weights(weights)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"path": [], "background": [], "objects": [], "caption": [], "n_objects": []}
    it: Iterable[int] = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=n, unit="img")
    for i in it:
        sc = sample_scene(scene_rng(seed, i), probs, n_objects=n_objects)
        rel = f"images/{i // 1000:03d}/{i:06d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        img = render(sc, size)
        atomic_write_file(out / rel, lambda p: img.save(p, format="PNG"), mode=SHARED_MODE, sync=False)
        rows["path"].append(rel)
        rows["background"].append(sc.background)
        rows["objects"].append(sc.object_labels())
        rows["caption"].append(sc.caption)
        rows["n_objects"].append(len(sc.objects))
    obj_type = pa.list_(pa.struct([("color", pa.string()), ("shape", pa.string()), ("size", pa.string()),
                                   ("x", pa.float32()), ("y", pa.float32())]))
    table = pa.table({
        "path": pa.array(rows["path"], pa.string()),
        "background": pa.array(rows["background"], pa.string()),
        "objects": pa.array(rows["objects"], obj_type),
        "caption": pa.array(rows["caption"], pa.string()),
        "n_objects": pa.array(rows["n_objects"], pa.int8()),
        "width": pa.array([size] * n, pa.int32()),
        "height": pa.array([size] * n, pa.int32()),
    })
    labels = out / "labels.parquet"
    atomic_write_file(labels, lambda p: pq.write_table(table, p), mode=SHARED_MODE)
    meta = {"format_version": FORMAT_VERSION, "n": n, "seed": seed, "size": size,
            "weights": {k: [round(float(x), 6) for x in v] for k, v in probs.items()},
            "vocabulary": {**{k: list(v) for k, v in vocab.ATTRIBUTES.items()}, "count": list(vocab.COUNTS)}}
    atomic_write_bytes(out / "world.json", json.dumps(meta, indent=1).encode(), mode=SHARED_MODE)
    return labels



# --- ground truth for concept strings --------------------------------------------------------------------
def _label_rows(labels) -> tuple[list[str], list[list[dict]]]:
    """(backgrounds, objects) from a pyarrow Table, pandas DataFrame, parquet path or list of row dicts."""
    if isinstance(labels, (str, os.PathLike)):
        import pyarrow.parquet as pq

        p = Path(labels)
        if p.is_dir():
            p = p / "labels.parquet"
        if not p.exists():
            raise NotFound(f"labels file {str(p)!r} does not exist", "run `t2c world generate DIR` first")
        labels = pq.read_table(p, columns=["background", "objects"])
    if hasattr(labels, "column_names") and hasattr(labels, "column"):  # pyarrow Table
        return labels.column("background").to_pylist(), labels.column("objects").to_pylist()
    if hasattr(labels, "columns") and hasattr(labels, "to_dict"):  # pandas DataFrame
        objs = [list(o) if o is not None else [] for o in labels["objects"]]
        return list(labels["background"]), [[dict(x) for x in o] for o in objs]
    rows = list(labels)
    return [r["background"] for r in rows], [list(r["objects"]) for r in rows]


def concept_truth(labels, concept: str) -> np.ndarray:
    """Ground truth of a concept string for every row of a labels table: bool array (N,).

    ``concept`` is parsed by :func:`t2c.data.world.vocab.parse_concept`: "red", "circle", "red circle",
    "large square", "small object", "teal background", "striped", "red circle and blue square",
    "red circle on a teal background". An object constraint holds when one object has all its
    attributes; several object constraints must each hold; a background constraint must match.

    Raises:
        UnknownChoice / InvalidInput: the concept uses unknown words or names no attribute.
    """
    spec = vocab.parse_concept(concept)
    backgrounds, objects = _label_rows(labels)
    out = np.zeros(len(backgrounds), dtype=bool)
    for i, (bg, objs) in enumerate(zip(backgrounds, objects)):
        if spec["background"] is not None and bg != spec["background"]:
            continue
        out[i] = all(any(all(o.get(k) == v for k, v in want.items()) for o in objs or ()) for want in spec["objects"])
    return out
