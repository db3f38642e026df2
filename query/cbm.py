"""Concept bottleneck models: a sparse linear classifier over concept scores, beside a linear probe.

An image is represented by its cosine scores against k named concepts (its aligned vector projected on
concept vectors); a multinomial logistic regression with an L1 penalty maps those k numbers to classes, so
each class is explained by a few named concepts. The baseline is the same classifier on the encoder's raw
features (``snapshot.features()``) with an L2 penalty: the "linear probe".

Solver: full-batch FISTA (accelerated proximal gradient) on standardised inputs, in numpy (no sklearn).
The L1 strength is picked on a validation split of the training rows: the sparsest model whose validation
accuracy is within ``TOLERANCE`` of the best.

Python API:
    fit_softmax(X, y, n_classes, l1=0, l2=0) -> (W, b)
    train_cbm(snapshot, concepts, labels_column, ...) -> (ConceptBottleneck, report dict)
    evaluate_cbm(snapshot, model, labels_column) -> dict
    ConceptBottleneck.save(path) / ConceptBottleneck.load(path)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import InvalidInput, UnknownChoice

__all__ = ["ConceptBottleneck", "fit_softmax", "train_cbm", "evaluate_cbm", "labels_of", "raw_features"]

L1_GRID = (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)
TOLERANCE = 0.005
FORMAT = "t2c-cbm-1"


# ------------------------------------------------------------------------------------------------ solver
def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_softmax(X: np.ndarray, y: np.ndarray, n_classes: int, *, l1: float = 0.0, l2: float = 0.0,
                iters: int = 1500, tol: float = 1e-7) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression, mean cross-entropy + l1·|W|₁ + l2/2·|W|², by FISTA; returns (W, b)."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.int64)
    n, d = X.shape
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), y] = 1.0
    Xb = np.hstack([X, np.ones((n, 1))])
    L = 0.5 * float(np.linalg.eigvalsh(Xb.T @ Xb / n).max()) + l2 + 1e-12
    step = 1.0 / L
    Wb = np.zeros((d + 1, n_classes))
    Z = Wb.copy()
    t = 1.0
    for _ in range(iters):
        P = _softmax(Xb @ Z)
        G = Xb.T @ (P - Y) / n
        G[:d] += l2 * Z[:d]
        new = Z - step * G
        if l1 > 0:
            new[:d] = np.sign(new[:d]) * np.maximum(np.abs(new[:d]) - step * l1, 0.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        Z = new + ((t - 1) / t_new) * (new - Wb)
        delta = float(np.abs(new - Wb).max())
        Wb, t = new, t_new
        if delta < tol:
            break
    return Wb[:d].astype(np.float32), Wb[d].astype(np.float32)


def _standardise(X, mean=None, std=None):
    if mean is None:
        mean = X.mean(0)
        std = X.std(0)
        std = np.where(std > 1e-8, std, 1.0)
    return (X - mean) / std, mean, std


def _split(n: int, test_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = max(1, int(round(n * test_frac)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _select_l1(X, y, C, grid, seed) -> tuple[float, list]:
    tr, va = _split(len(X), 0.25, seed + 1)
    Xt, m, s = _standardise(X[tr])
    Xv = (X[va] - m) / s
    res = []
    for l1 in grid:
        W, b = fit_softmax(Xt, y[tr], C, l1=l1, iters=800)
        acc = float(((Xv @ W + b).argmax(1) == y[va]).mean())
        res.append({"l1": l1, "val_accuracy": acc, "nonzero": int((np.abs(W) > 1e-6).sum())})
    best = max(r["val_accuracy"] for r in res)
    chosen = max((r for r in res if r["val_accuracy"] >= best - TOLERANCE), key=lambda r: r["l1"])
    return chosen["l1"], res


# ------------------------------------------------------------------------------------------------ model
@dataclass
class ConceptBottleneck:
    """A fitted concept bottleneck: standardisation + sparse softmax layer over named concepts."""

    concepts: list[str]
    classes: list[str]
    W: np.ndarray  # (k, C) on standardised scores
    b: np.ndarray  # (C,)
    mean: np.ndarray  # (k,)
    std: np.ndarray  # (k,)
    meta: dict = field(default_factory=dict)

    def logits(self, scores: np.ndarray) -> np.ndarray:
        """Class logits from (n, k) concept scores."""
        return ((np.asarray(scores, np.float32) - self.mean) / self.std) @ self.W + self.b

    def predict(self, scores: np.ndarray) -> list[str]:
        """Class names from (n, k) concept scores."""
        return [self.classes[i] for i in self.logits(scores).argmax(1)]

    def top_concepts(self, k: int = 5) -> dict[str, list[dict]]:
        """Each class's largest positive concept weights (standardised units), non-zero only."""
        out = {}
        for c, cls in enumerate(self.classes):
            w = self.W[:, c]
            order = np.argsort(-w)[:k]
            out[cls] = [{"concept": self.concepts[i], "weight": round(float(w[i]), 4)} for i in order if w[i] > 1e-6]
        return out

    @property
    def sparsity(self) -> float:
        """Fraction of zero weights."""
        return float((np.abs(self.W) <= 1e-6).mean())

    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors (W, b, mean, std) with concepts/classes/provenance metadata, atomically."""
        tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in
                   {"W": self.W, "b": self.b, "mean": self.mean, "std": self.std}.items()}
        md = {"format": FORMAT, "concepts": json.dumps(self.concepts), "classes": json.dumps(self.classes),
              "meta": json.dumps(self.meta, sort_keys=True, default=str)}
        return write_artefact(path, tensors, md)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ConceptBottleneck":
        """Read a model written by :meth:`save` (NotFound; DamagedArtefact for anything else)."""
        md, t = read_artefact(path, "concept bottleneck", fix="train one with `t2c cbm train`", formats=FORMAT,
                              required=("W", "b", "mean", "std"))
        return cls(json.loads(md["concepts"]), json.loads(md["classes"]), t["W"], t["b"], t["mean"], t["std"],
                   json.loads(md.get("meta", "{}")))


# ------------------------------------------------------------------------------------------------ data
def labels_of(snapshot, column: str) -> tuple[np.ndarray, list]:
    """(row positions, label values) of images whose ``column`` is not null, in store row order."""
    cols = snapshot.columns()
    if column not in cols:
        raise UnknownChoice("catalog column", column, cols)
    rows = snapshot.catalog().execute(f'SELECT id, "{column}" FROM images WHERE "{column}" IS NOT NULL').fetchall()
    if not rows:
        raise InvalidInput(f"column {column!r} has no values", "index with labels in a user column")
    ids = np.array([r[0] for r in rows], np.int64)
    pos = snapshot.rows_of(ids)
    order = np.argsort(pos)
    return pos[order], [str(rows[i][1]) for i in order]


def raw_features(snapshot, rows: np.ndarray) -> np.ndarray:
    """Raw encoder features of the given store rows (from the feature shards)."""
    want = {int(snapshot.ids[r]): k for k, r in enumerate(rows)}
    out = None
    for ids, feats in snapshot.features():
        if out is None:
            out = np.zeros((len(rows), feats.shape[1]), np.float32)
        for i, f in zip(ids, feats):
            k = want.get(int(i))
            if k is not None:
                out[k] = f
    if out is None:
        raise InvalidInput("the store keeps no raw features")
    return out


# ------------------------------------------------------------------------------------------------ train/eval
def train_cbm(snapshot, concepts, labels_column: str, *, l1: float | None = None, test_frac: float = 0.3,
              seed: int = 0, probe: bool = True, bank=None) -> tuple[ConceptBottleneck, dict]:
    """Train a sparse concept bottleneck on a labelled store, and a linear probe on raw features beside it.

    Args:
        snapshot: an open Snapshot whose catalog has ``labels_column`` (a user column).
        concepts: concept texts or a string for ``t2c.query.audit.parse_concept_list``.
        labels_column: catalog column with the class of each image (rows with null are skipped).
        l1: L1 strength on standardised scores (None: chosen on a validation split, sparsest within 0.5 pt).
        test_frac: held-out fraction for the reported accuracies. seed: split seed.
        probe: also fit the linear probe on raw features.

    Returns:
        (model, report) with report keys cbm_accuracy, probe_accuracy, gap, l1, sparsity, top_concepts, ...

    Raises:
        InvalidInput: fewer than two classes, or too few rows. UnknownChoice: unknown column.

    Example:
        >>> model, rep = train_cbm(snap, "red,blue,circle,square", "shape")  # doctest: +SKIP
    """
    from t2c.query.audit import parse_concept_list, score_matrix

    concepts = parse_concept_list(concepts)
    rows, labels = labels_of(snapshot, labels_column)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidInput(f"column {labels_column!r} has one class only", "a classifier needs two or more")
    if len(rows) < 10:
        raise InvalidInput(f"only {len(rows)} labelled images; need at least 10")
    cidx = {c: i for i, c in enumerate(classes)}
    y = np.array([cidx[l] for l in labels], np.int64)
    S = score_matrix(snapshot, concepts, bank)[rows]
    tr, te = _split(len(rows), test_frac, seed)
    grid = []
    if l1 is None:
        l1, grid = _select_l1(S[tr], y[tr], len(classes), L1_GRID, seed)
    Xt, m, s = _standardise(S[tr].astype(np.float64))
    W, b = fit_softmax(Xt, y[tr], len(classes), l1=float(l1))
    model = ConceptBottleneck(concepts, classes, W, b, m.astype(np.float32), s.astype(np.float32),
                              {"labels_column": labels_column, "l1": float(l1), "clip": snapshot.clip,
                               "encoder": snapshot.encoder, "store": str(snapshot.root), "seed": seed})
    cbm_acc = float((model.logits(S[te]).argmax(1) == y[te]).mean())
    report = {"n": int(len(rows)), "n_train": int(len(tr)), "n_test": int(len(te)), "classes": classes,
              "concepts": concepts, "l1": float(l1), "l1_search": grid, "cbm_accuracy": cbm_acc,
              "cbm_train_accuracy": float((model.logits(S[tr]).argmax(1) == y[tr]).mean()),
              "sparsity": model.sparsity, "top_concepts": model.top_concepts()}
    if probe:
        F = raw_features(snapshot, rows).astype(np.float64)
        Ft, fm, fs = _standardise(F[tr])
        Wp, bp = fit_softmax(Ft, y[tr], len(classes), l2=1e-3)
        report["probe_accuracy"] = float(((((F[te] - fm) / fs) @ Wp + bp).argmax(1) == y[te]).mean())
        report["gap"] = report["probe_accuracy"] - cbm_acc
    model.meta["cbm_accuracy"] = cbm_acc
    return model, report


def evaluate_cbm(snapshot, model: ConceptBottleneck, labels_column: str | None = None, bank=None) -> dict:
    """Accuracy of a saved concept bottleneck on a labelled store (its label column by default)."""
    from t2c.query.audit import score_matrix

    column = labels_column or model.meta.get("labels_column")
    if not column:
        raise InvalidInput("name the labels column", "--labels-column COL")
    if model.meta.get("clip") and model.meta["clip"] != snapshot.clip:
        raise InvalidInput(f"the model was trained in CLIP space {model.meta['clip']!r}, the store is "
                           f"{snapshot.clip!r}", "evaluate on a store aligned to the same CLIP model")
    rows, labels = labels_of(snapshot, column)
    S = score_matrix(snapshot, model.concepts, bank)[rows]
    pred = model.predict(S)
    known = [i for i, l in enumerate(labels) if l in set(model.classes)]
    acc = float(np.mean([pred[i] == labels[i] for i in known])) if known else None
    from t2c.query.classify import confusion

    conf = confusion([labels[i] for i in known], [pred[i] for i in known], model.classes)
    return {"n": len(rows), "n_known_classes": len(known), "accuracy": acc, "classes": model.classes,
            "top_confusions": conf["top_confusions"], "per_class": conf["per_class"],
            "top_concepts": model.top_concepts()}
