"""Duplicate audit and query-by-example benchmark (prints JSON).

Three parts:
  * ``planted``: a generated world collection (``--n`` images per collection seed) with copies of
    ``--per-kind`` random images planted for each kind (re-encoded JPEG q70-95, resized x0.5-2, cropped by
    5-20% of each side, mirrored, colour-shifted by gain 0.92-1.08 and offset +-8), indexed with each encoder
    (non-CLIP ones aligned into world:clip by ``--fit-aligner`` images of the collection, no labels), then
    ``t2c.query.duplicates.find_duplicates``. Per kind: recall (the copy lands in its original's group) and
    precision (of the pairs a copy's group puts it in, the share that are its original); and
    ``distinct_pairs``: pairs of different generated scenes put in one group (the target is 0). The same
    for ``verify=False`` (``planted_vectors_only``: the strict vector threshold alone, no pixel check).
  * ``synthetic``: ``--vectors`` random unit vectors (clustered, like embeddings) with ``--planted`` copies
    plus noise (cosine ~0.97-0.995); the vector stage alone (calibrated range search, no pixels): seconds,
    peak memory (ru_maxrss), recall and precision of the planted pairs.
  * ``by_example``: for ``--examples`` images per collection, P@10 of ``like:ID`` (the example itself left
    out) where a hit is relevant when it holds every colour-shape pair of the example, beside the same
    query in words (the AND of the example's "colour shape" concepts), and the label-chosen ceiling (1.0 when
    at least 10 relevant images exist).

Seeds: collection seeds ``--seeds`` (default 11 12: not used to tune anything; the pixel-check constants
(view grid, ``MATCH_CORRELATION``) were chosen on collection seed 3), plant/example seed 0.

Usage:
    .venv/bin/python bench/duplicates.py                                  # defaults below
    .venv/bin/python bench/duplicates.py --n 400 --per-kind 10 --vectors 100000 --encoders world:clip  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _plant import KINDS, plant  # noqa: E402


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def planted_scores(snap, pairs: list[dict], verify: bool = True) -> dict:
    """Per-kind recall/precision of find_duplicates and the count of distinct scenes grouped together."""
    from t2c.query.duplicates import find_duplicates

    rep = find_duplicates(snap, verify=verify)
    pid = {p: i for i, p in snap.catalog().execute("SELECT id, path FROM images").fetchall()}
    group_of = {}
    for g, grp in enumerate(rep.groups):
        for i in grp["ids"]:
            group_of[i] = g
    copy_of = {pid[str(Path(p["copy"]).resolve())]: (pid[str(Path(p["original"]).resolve())], p["kind"]) for p in pairs}
    out = {}
    for kind in KINDS:
        hits = tp = fp = 0
        for c, (o, k) in copy_of.items():
            if k != kind:
                continue
            g = group_of.get(c)
            members = [] if g is None else [m for m in rep.groups[g]["ids"] if m != c]
            hits += int(o in members)
            tp += int(o in members)
            fp += sum(1 for m in members if m != o)
        n = sum(1 for _, k in copy_of.values() if k == kind)
        out[kind] = {"recall": round(hits / max(n, 1), 4), "precision": round(tp / max(tp + fp, 1), 4), "n": n}
    copies = set(copy_of)
    distinct = 0
    for grp in rep.groups:
        scenes = [m for m in grp["ids"] if m not in copies]
        distinct += len(scenes) * (len(scenes) - 1) // 2
    return {"kinds": out, "distinct_pairs": int(distinct), "groups": len(rep.groups),
            "candidate_pairs": rep.candidate_pairs, "threshold": round(rep.threshold, 4), "method": rep.method,
            "seconds": round(rep.seconds, 2)}


def by_example(snap, labels, n_examples: int, rng) -> dict:
    """P@10 of like:ID vs the same query in words, relevance = holds every colour-shape pair of the example."""
    from t2c.query.engine import Engine

    eng = Engine(snap)
    paths = dict(snap.catalog().execute("SELECT id, path FROM images").fetchall())
    pairs_of = {}
    for p, objs in zip(labels["path"], labels["objects"]):
        pairs_of[str(Path(p).resolve())] = {(o["color"], o["shape"]) for o in objs}
    ids = [i for i, p in paths.items() if p in pairs_of]
    have = {i: pairs_of[paths[i]] for i in ids}
    picks = rng.choice(len(ids), size=min(n_examples, len(ids)), replace=False)
    p_ex, p_words, ceil = [], [], []
    for j in picks:
        ex = ids[j]
        want = have[ex]
        relevant = [i for i in ids if i != ex and want <= have[i]]
        ceil.append(min(len(relevant), 10) / 10)
        hits = [h.id for h in eng.search(f"like:{ex}", k=11).hits if h.id != ex][:10]
        p_ex.append(sum(want <= have.get(h, set()) for h in hits) / 10)
        words = " AND ".join(f'"{c} {s}"' for c, s in sorted(want))
        hits = [h.id for h in eng.search(words, k=11).hits if h.id != ex][:10]
        p_words.append(sum(want <= have.get(h, set()) for h in hits) / 10)
    return {"p_at_10_example": round(float(np.mean(p_ex)), 4), "p_at_10_words": round(float(np.mean(p_words)), 4),
            "ceiling": round(float(np.mean(ceil)), 4), "examples": len(picks)}


def run_collection(seed: int, args, work: Path) -> dict:
    import pyarrow.parquet as pq

    from t2c.data.store import open_store
    from t2c.data.world.generator import generate
    from t2c.indexer.pipeline import index_folder

    col = work / f"world-{seed}"
    labels_path = generate(col, args.n, seed)
    labels = pq.read_table(labels_path).to_pydict()
    labels["path"] = [str((col / p) if not Path(p).is_absolute() else p) for p in labels["path"]]
    pairs = plant(col, args.per_kind, 0)
    out = {}
    for enc in args.encoders:
        st = work / f"st-{seed}-{enc.replace(':', '-')}"
        kw = {} if enc.startswith("world:clip") else {"fit_aligner": args.fit_aligner, "clip": "world:clip"}
        t0 = time.perf_counter()
        index_folder(col / "images", st, enc, workers=args.workers, **kw)
        snap = open_store(st)
        out[enc] = {"index_seconds": round(time.perf_counter() - t0, 1), "planted": planted_scores(snap, pairs),
                    "planted_vectors_only": planted_scores(snap, pairs, verify=False),
                    "by_example": by_example(snap, labels, args.examples, np.random.default_rng(0))}
    return out


def run_synthetic(n: int, planted: int, d: int, seed: int = 0) -> dict:
    """The vector stage on n synthetic clustered unit vectors with planted near copies."""
    from t2c.query.duplicates import _audit_index, calibrate_duplicates, duplicate_pairs

    rng = np.random.default_rng(seed)
    rss0 = _maxrss_mb()
    centres = rng.standard_normal((1000, d)).astype(np.float32)
    V = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        V[s:s + m] = centres[rng.integers(0, 1000, m)] + 0.9 * rng.standard_normal((m, d)).astype(np.float32)
    src = rng.choice(n - planted, size=planted, replace=False)
    dst = np.arange(n - planted, n)
    V[dst] = V[src] + rng.uniform(0.05, 0.15, (planted, 1)).astype(np.float32) * \
        np.linalg.norm(V[src], axis=1, keepdims=True) / np.sqrt(d) * rng.standard_normal((planted, d)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    t0 = time.perf_counter()
    index, nprobe = _audit_index(V)
    t_index = time.perf_counter() - t0
    thr, method, params = calibrate_duplicates(index, V, nprobe=nprobe, candidates=False)
    P, S = duplicate_pairs(V, thr, index=index, nprobe=nprobe)
    secs = time.perf_counter() - t0
    truth = set(zip(np.minimum(src, dst).tolist(), np.maximum(src, dst).tolist()))
    found = set(map(tuple, P.tolist()))
    tp = len(truth & found)
    sims = np.sum(V[src] * V[dst], 1)
    return {"n": n, "d": d, "planted": planted, "planted_cosine": [round(float(sims.min()), 4), round(float(sims.max()), 4)],
            "threshold": round(thr, 4), "method": method, "pairs": int(len(P)), "recall": round(tp / planted, 4),
            "precision": round(tp / max(len(found), 1), 4), "seconds": round(secs, 1),
            "index_seconds": round(t_index, 1), "peak_rss_mb": round(_maxrss_mb(), 1),
            "rss_before_mb": round(rss0, 1), "vectors_mb": round(V.nbytes / 2**20, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--per-kind", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12])
    ap.add_argument("--encoders", nargs="+", default=["world:clip", "world:pairnet"])
    ap.add_argument("--fit-aligner", type=int, default=800)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--planted", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--skip-synthetic", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="t2c-dups-"))
    out: dict = {"settings": vars(args), "collections": {}}
    try:
        for seed in args.seeds:
            out["collections"][str(seed)] = run_collection(seed, args, work)
        if not args.skip_synthetic and args.vectors:
            out["synthetic"] = run_synthetic(args.vectors, args.planted, args.dim)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
