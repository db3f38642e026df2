"""Zero-shot classification of every image of a store into one of a few text labels.

Each label becomes a concept vector (the store's CLIP text tower, prompt ensemble); an image's label is the
one with the highest cosine score with its aligned vector, and ``confidence`` is the softmax probability at
temperature ``TEMPERATURE`` (CLIP's logit scale of 100).

Predictions never touch the snapshot (snapshots are immutable and may be open in servers). They are written
as a sidecar parquet in the store root, atomically::

    STORE/annotations/classify-<name>.parquet   columns: id BIGINT, label VARCHAR, score FLOAT,
                                                confidence FLOAT; key/value metadata: labels (JSON),
                                                snapshot, clip, created_at

``<name>`` defaults to a short hash of the label list, so re-running the same labels replaces the file.
``read_predictions(store, name)`` reads one back (joinable with the catalog on ``id``).

Python API:
    classify(snapshot, labels, *, truth=None, name=None, write=True) -> dict
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from t2c.data.errors import InvalidInput, NotFound, UnknownChoice

__all__ = ["classify", "predict", "read_predictions", "annotation_path", "confusion"]

TEMPERATURE = 0.01
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


def predict(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label index, top score, softmax confidence) per row of an (n, k) score matrix."""
    scores = np.asarray(scores, np.float32)
    idx = scores.argmax(1)
    top = scores[np.arange(len(scores)), idx]
    z = (scores - top[:, None]) / TEMPERATURE
    conf = 1.0 / np.exp(z).sum(1)
    return idx, top, conf.astype(np.float32)


def confusion(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, per-class recall/precision, the confusion matrix and the most frequent confusions."""
    labels = list(labels)
    pos = {l.lower(): i for i, l in enumerate(labels)}
    k = len(labels)
    truth, pred = list(truth), list(pred)
    M = np.zeros((k, k), np.int64)
    n_known = 0
    for t, p in zip(truth, pred):
        ti = pos.get(str(t).strip().lower()) if t is not None else None
        pi = pos[str(p).lower()]
        if ti is None:
            continue
        n_known += 1
        M[ti, pi] += 1
    correct = int(np.trace(M))
    per_class = {}
    for i, l in enumerate(labels):
        support = int(M[i, :k].sum())
        predicted = int(M[:, i].sum())
        per_class[l] = {"support": support, "recall": (M[i, i] / support) if support else None,
                        "precision": (M[i, i] / predicted) if predicted else None}
    pairs = [(int(M[i, j]), labels[i], labels[j]) for i in range(k) for j in range(k) if i != j and M[i, j]]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return {"accuracy": correct / n_known if n_known else None, "n_scored": n_known,
            "n_truth_unknown": len(truth) - n_known,
            "per_class": {l: {kk: (float(v) if isinstance(v, (float, np.floating)) else v) for kk, v in d.items()}
                          for l, d in per_class.items()},
            "matrix": M.tolist(), "top_confusions": [{"truth": t, "predicted": p, "count": c}
                                                          for c, t, p in pairs[:10]]}


def annotation_path(store_root, name: str) -> Path:
    """Path of a classification sidecar: ``STORE/annotations/classify-<name>.parquet``."""
    if not _NAME_RE.match(name):
        raise InvalidInput(f"annotation name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return Path(store_root) / "annotations" / f"classify-{name}.parquet"


def _write_parquet_atomic(path: Path, table) -> None:
    """Write a parquet file atomically (buffer, then the store's atomic write)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from t2c.data.store import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue().to_pybytes())


def read_predictions(store_root, name: str):
    """Read a classification sidecar back as a pyarrow Table (metadata in ``table.schema.metadata``)."""
    import pyarrow.parquet as pq

    p = annotation_path(store_root, name)
    if not p.is_file():
        raise NotFound(f"no classification named {name!r} in {str(store_root)!r}", "run `t2c classify` first")
    return pq.read_table(p)


def _truth_values(snapshot, column: str) -> list:
    cols = snapshot.columns()
    if column not in cols:
        raise UnknownChoice("catalog column", column, cols)
    cur = snapshot.catalog()
    rows = cur.execute(f'SELECT id, "{column}" FROM images').fetchall()  # column checked against the schema
    by_id = dict(rows)
    return [by_id.get(int(i)) for i in snapshot.ids]


def classify(snapshot, labels, *, truth: str | None = None, name: str | None = None, write: bool = True,
             bank=None, predictions: int | None = 20) -> dict:
    """Zero-shot classify every image of a store into one of ``labels``.

    Args:
        snapshot: an open Snapshot.
        labels: label texts (list) or a string for ``t2c.query.audit.parse_concept_list`` (file or "a,b,c").
        truth: optional catalog column holding the true label (compared case-insensitively).
        name: sidecar name (default: hash of the labels). write: write the sidecar parquet.
        bank: optional ConceptBank. predictions: per-image predictions returned (None: every image).

    Returns:
        dict(labels, n, counts {label: n}, annotations (path, or None with ``annotations_error`` when the store
        is read-only), accuracy and confusion when truth is given, predictions: first rows
        [{id, label, score, confidence}], in catalog order).

    Raises:
        InvalidInput: fewer than two labels or an empty store. UnknownChoice: unknown truth column.

    Example:
        >>> classify(open_store("demo.t2c"), "circle,square,star")["counts"]  # doctest: +SKIP
    """
    from t2c.query.audit import parse_concept_list, score_matrix

    labels = parse_concept_list(labels)
    if len(labels) < 2:
        raise InvalidInput("zero-shot classification needs at least two labels", 'e.g. --labels "cat,dog"')
    if snapshot.count == 0:
        raise InvalidInput("the store holds no images to classify")
    S = score_matrix(snapshot, labels, bank)
    idx, top, conf = predict(S)
    pred = [labels[i] for i in idx]
    ids = np.asarray(snapshot.ids, np.int64)
    counts = {l: int((idx == i).sum()) for i, l in enumerate(labels)}
    name = name or hashlib.blake2b("\x00".join(labels).encode(), digest_size=5).hexdigest()
    out = {"labels": labels, "n": int(len(ids)), "counts": counts, "name": name, "annotations": None}
    if write:
        import pyarrow as pa

        meta = {"labels": json.dumps(labels), "snapshot": snapshot.name, "clip": snapshot.clip,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        table = pa.table({"id": pa.array(ids, pa.int64()), "label": pa.array(pred, pa.string()),
                          "score": pa.array(top, pa.float32()), "confidence": pa.array(conf, pa.float32())}
                         ).replace_schema_metadata(meta)
        path = annotation_path(snapshot.root, name)
        try:
            _write_parquet_atomic(path, table)
            out["annotations"] = str(path)
        except OSError as e:  # a read-only store (e.g. served from a read-only mount): predictions still returned
            out["annotations_error"] = f"cannot write {path}: {e.strerror or e}"
    if truth is not None:
        tv = _truth_values(snapshot, truth)
        out["truth"] = truth
        out.update(confusion(tv, pred, labels))
    out["predictions"] = [{"id": int(ids[i]), "label": pred[i], "score": float(top[i]), "confidence": float(conf[i])}
                          for i in range(len(ids) if predictions is None else min(int(predictions), len(ids)))]
    return out
