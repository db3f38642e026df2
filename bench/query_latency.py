"""Query latency benchmark: 3-constraint AND/NOT queries over N synthetic vectors in a real store.

Builds a real store (StoreWriter + build_index: the store format and index type production uses) over
N synthetic d-dim vectors with a catalog, then times ``Engine.search`` on 3-constraint AND/NOT queries and,
in the same run, the exact brute-force evaluation of the same queries (every concept scored on every
vector, the same thresholds, the same tree). Prints JSON: p50/p95 latency, recall (and precision) of the
answer set against the exact answer, and the speed-up.

Synthetic vectors: each image belongs to one of ``--topics`` topic directions and holds concepts with
topic-dependent probabilities (each concept common in a few "home" topics, rare elsewhere, as concepts
cluster in real embedding spaces; concepts spread uniformly over the space could not be found faster than
by a full scan by any partitioning index); vector = topic + sum of present concepts + isotropic noise,
L2-normalised. Concept vectors are the concept directions (put into the
engine's ConceptBank, so no text encoder is involved).

``--cold`` drops the store's vector files (``vectors.npy``, ``vectors16.npy``) from the page cache before every
timed query, as for a store whose vectors do not fit in RAM (the case product-quantised indices are for); the
exact answers are then computed after all timed queries.

Usage:
    .venv/bin/python bench/query_latency.py --n 200000            # ~2 minutes on 2 cores
    .venv/bin/python bench/query_latency.py                       # n = 1,000,000 (several minutes)
    .venv/bin/python bench/query_latency.py --store /tmp/st --factory IVF4096,PQ64np --threads 1 --cold
    .venv/bin/python bench/query_latency.py --n 10000000 --store /big/st --factory IVF4096_HNSW32,PQ64np \
        --threads 1 --queries 40       # 10M: ~31 GB on disk, the set drawn block by block (LazySynth)

Above ``--lazy-over-gb`` (4 GB of float32 vectors) the set is never held in RAM: ``LazySynth`` draws each
50,000-row block from its own seed while the store is written (other draws than the in-memory set, the same
distribution), catalog rows are inserted in batches, and the exact answers come from one scoring pass over the
store (``Engine.reference_answer(scores=)``) instead of one pass per query. That pass reads all of ``vectors.npy``
(20 GB at 10M), which would push the float16 copy the engine rescores from out of the page cache, so it runs after
the timed queries, and without ``--cold`` the float16 copy is read once into the page cache before them, as a
service that has been answering queries holds it (where it fits in RAM).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


BLOCK = 50_000  # rows generated at a time


def _params(d: int, n_concepts: int, n_topics: int, rng):
    """Concept directions, topic directions and per-topic concept probabilities."""
    dirs = rng.normal(size=(n_concepts, d)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    topics = rng.normal(size=(n_topics, d)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    tp = np.full((n_topics, n_concepts), 0.0002, np.float64)
    for j in range(n_concepts):
        home = rng.choice(n_topics, int(rng.integers(2, 13)), replace=False)
        tp[home, j] = rng.uniform(0.25, 0.65, len(home))
    return dirs, topics, tp


def _block(m: int, dirs, topics, tp, rng) -> tuple[np.ndarray, np.ndarray]:
    """(m normalised vectors, per-concept presence counts) drawn from ``rng``."""
    d = dirs.shape[1]
    t = rng.integers(0, len(topics), m)
    pres = rng.random((m, len(dirs))) < tp[t]
    amp = rng.uniform(0.8, 1.2, (m, len(dirs))).astype(np.float32)
    v = topics[t] * 1.2 + (pres * amp) @ dirs
    v += rng.normal(scale=0.8 / np.sqrt(d), size=(m, d)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v, pres.sum(0)


def synth_vectors(n: int, d: int, n_concepts: int, n_topics: int, seed: int):
    """(vectors float32 (n, d) normalised, concept directions (C, d), prevalences (C,)).

    Like real embeddings, concepts are topical: concept j is common (25-65%) in a few "home" topics
    (2-12 of ``n_topics``) and rare (0.02%) elsewhere, so its positives concentrate in part of the space.
    """
    rng = np.random.default_rng(seed)
    dirs, topics, tp = _params(d, n_concepts, n_topics, rng)
    out = np.empty((n, d), np.float32)
    count = np.zeros(n_concepts)
    for s in range(0, n, BLOCK):
        out[s : s + BLOCK], c = _block(min(BLOCK, n - s), dirs, topics, tp, rng)
        count += c
    return out, dirs, count / n


class LazySynth:
    """The same kind of set drawn block by block on demand, never held whole (a 10M x 512 set is 20 GB): block
    b comes from its own generator (seed, b), so any rows can be drawn in any order. ``self[rows]`` gives the
    vectors of the given row numbers."""

    def __init__(self, n: int, d: int, n_concepts: int, n_topics: int, seed: int):
        self.shape = (n, d)
        self.seed = seed
        self.dirs, self.topics, self.tp = _params(d, n_concepts, n_topics, np.random.default_rng(seed))

    def block(self, b: int) -> np.ndarray:
        """Rows [b * BLOCK, (b + 1) * BLOCK) (fewer for the last block)."""
        m = min(BLOCK, self.shape[0] - b * BLOCK)
        return _block(m, self.dirs, self.topics, self.tp, np.random.default_rng([self.seed, b]))[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.shape[1]), np.float32)
        blocks = rows // BLOCK
        for b in np.unique(blocks):
            sel = np.flatnonzero(blocks == b)
            out[sel] = self.block(int(b))[rows[sel] - b * BLOCK]
        return out


ROW_BATCH = 200_000  # catalog rows built and inserted per batch (never all at once)
SHARD_ROWS = 1_000_000  # ids per feature shard (one shard's vectors are projected at a time)


def build_store(path: Path, vectors: np.ndarray, *, exact_max: int, seed: int, memory_budget: int | None = None,
                factory: str | None = None) -> float:
    """Write a real store over the vectors (catalog with width/height/path/user column)."""
    from t2c.data.store import Changes, StoreWriter, atomic_save_npz, new_feature_shard_name
    from t2c.indexer.index_build import build_index

    n, d = vectors.shape
    rng = np.random.default_rng(seed)
    widths = rng.integers(64, 4096, n)

    def row_batches():  # streamed: one batch of dicts at a time
        for s in range(0, n, ROW_BATCH):
            yield [{"id": i, "path": f"/photos/{2018 + i % 8}/img{i:07d}.jpg", "relpath": f"img{i:07d}.jpg",
                    "content_hash": f"{i:016x}", "size": 100_000 + i % 5000, "width": int(widths[i]),
                    "height": 768, "mtime_ns": 1_600_000_000_000_000_000 + i * 1_000_000_000,
                    "album": f"a{i % 50}"} for i in range(s, min(n, s + ROW_BATCH))]

    t0 = time.perf_counter()
    with StoreWriter(path) as w:
        shards = []
        for k, s in enumerate(range(0, n, SHARD_ROWS)):
            ids = np.arange(s, min(n, s + SHARD_ROWS), dtype=np.int64)
            rel = new_feature_shard_name("bench", k)
            atomic_save_npz(w.root / rel, ids=ids, feats=ids[:, None])
            shards.append(rel)
        w.commit(Changes([], shards, [], [], [], {"run_id": "bench", "command": "bench/query_latency.py"},
                         row_batches=row_batches),
                 manifest_fields={"dim": d, "feature_dim": 1, "encoder": "synthetic", "clip": "synthetic"},
                 vectors_for=lambda _ids, feats: vectors[feats[:, 0]],
                 build_index=lambda v, i: build_index(v, i, exact_max=exact_max, factory=factory,
                                                      **({"memory_budget": memory_budget} if memory_budget else {})))
    return time.perf_counter() - t0


def warm_file(path: Path, chunk: int = 64 << 20) -> None:
    """Read a file once through the page cache (sequentially, into one reused buffer)."""
    if not path.exists():
        return
    buf = bytearray(chunk)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def evict_vectors(snap) -> None:
    """Drop a snapshot's vector files from this process's mappings and from the page cache (cold reads)."""
    snap.drop_vector_pages()  # mapped pages are not evicted while mapped
    for name in ("vectors.npy", "vectors16.npy"):
        if not (snap.path / name).exists():
            continue
        fd = os.open(snap.path / name, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--concepts", type=int, default=40)
    ap.add_argument("--topics", type=int, default=256)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--exact-max", type=int, default=100_000,
                    help="largest store given an exact (flat) index; production default 200000")
    ap.add_argument("--bytes-per-vector", type=int, default=None,
                    help="index memory budget per vector (64 forces IVF-PQ with 64-byte codes; default: 4 GB budget)")
    ap.add_argument("--factory", default=None, help="FAISS factory string overriding the choice by size and budget")
    ap.add_argument("--store", type=Path, default=None, help="store dir (reused if it exists; default: temporary)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="FAISS threads (set OMP_NUM_THREADS to match for BLAS)")
    ap.add_argument("--rescore-all", action="store_true",
                    help="IVF-PQ: rescore every candidate exactly (Engine(settle_band=None), the engine before "
                         "code-score settling) instead of settling leaves by their code scores")
    ap.add_argument("--cold", action="store_true",
                    help="drop the store's vector files from the page cache before every timed query")
    ap.add_argument("--repeat", action="store_true",
                    help="time every query a second time right after the first (its rows now in the page cache) "
                         "and report that latency apart (latency_repeat_ms)")
    ap.add_argument("--lazy-over-gb", type=float, default=4.0,
                    help="above this many GB of float32 vectors, draw them block by block while the store is "
                         "written (LazySynth: other draws than the in-memory set, same distribution) and compute "
                         "every exact answer from one scoring pass over the store instead of one per query")
    args = ap.parse_args(argv)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    from t2c.data.store import open_store
    from t2c.query.calibrate import thresholds_for
    from t2c.query.concepts import ConceptBank
    from t2c.query.engine import Engine

    tmp = None
    store = args.store
    if store is None:
        tmp = Path(tempfile.mkdtemp(prefix="t2c-bench-"))
        store = tmp / "store"
    t0 = time.perf_counter()
    reuse = (store / "CURRENT").exists()  # a kept store from an earlier run with the same arguments
    large = args.n * args.d * 4 > args.lazy_over_gb * 1e9
    if large:  # drawn block by block while the store is written
        vectors = LazySynth(args.n, args.d, args.concepts, args.topics, args.seed)
        dirs = vectors.dirs
    else:
        vectors, dirs, _ = synth_vectors(1000 if reuse else args.n, args.d, args.concepts, args.topics, args.seed)
    gen_s = time.perf_counter() - t0
    build_s = None
    if not reuse:
        build_s = build_store(store, vectors, exact_max=args.exact_max, seed=args.seed, factory=args.factory,
                              memory_budget=args.bytes_per_vector * args.n if args.bytes_per_vector else None)
    del vectors
    snap = open_store(store, verify=False)
    names = [f"c{j:02d}" for j in range(args.concepts)]
    bank = ConceptBank("synthetic", templates=["{}"])
    for t, v in zip(names, dirs):
        bank.put(t, v)
    eng = Engine(snap, bank, **({"settle_band": None} if args.rescore_all else {}))
    t0 = time.perf_counter()
    cals = thresholds_for(snap, names, bank=bank)
    calib_s = time.perf_counter() - t0
    _ = snap.index  # load the index outside the timed region

    rng = np.random.default_rng(args.seed + 7)
    forms = ["{a} AND {b} AND NOT {c}", "{a} AND NOT {b} AND NOT {c}", "{a} AND NOT ({b} OR {c})",
             "2*{a} AND {b} AND NOT {c}"]
    queries = []
    for qi in range(args.queries):
        a, b, c = rng.choice(names, 3, replace=False)
        queries.append(forms[qi % len(forms)].format(a=a, b=b, c=c))
    all_scores = None
    after = args.cold or large  # exact answers after the timed queries
    warmed_s = None
    if large and not args.cold:
        # the exact pass reads all of vectors.npy, which would evict the float16 copy the engine rescores from:
        # it runs after the timed queries, and the copy is read into the page cache first, as a service that
        # has been answering queries for a while holds it (where it fits in RAM)
        t = time.perf_counter()
        warm_file(snap.path / "vectors16.npy")
        warmed_s = time.perf_counter() - t
    for q in queries[:3]:  # warm caches (page cache, BLAS)
        eng.search(q, k=args.k)
        if not large:
            eng.reference_answer(q)
    lat, exact_lat, recalls, precisions, totals, nprobes, strategies = [], [], [], [], [], [], {}
    rescored = []
    results = []
    lat_repeat = []
    for q in queries:
        if args.cold:
            evict_vectors(snap)
        t = time.perf_counter()
        res = eng.search(q, k=args.k)
        lat.append((time.perf_counter() - t) * 1000)
        if args.repeat:
            t = time.perf_counter()
            eng.search(q, k=args.k)
            lat_repeat.append((time.perf_counter() - t) * 1000)
        results.append(res)
        if not after:  # interleaved, as before; cold or large: after all timed queries (they read every vector)
            t = time.perf_counter()
            exact_ref = eng.reference_answer(q, scores=all_scores)
            exact_lat.append((time.perf_counter() - t) * 1000)
            results[-1] = (res, exact_ref)
    if large:  # one pass over the store scores every concept; each exact answer then reads those columns
        from t2c.query.calibrate import concept_scores

        t = time.perf_counter()
        S = concept_scores(snap, dirs)
        all_scores = {("concept", name): S[:, j] for j, name in enumerate(names)}
        exact_pass_s = time.perf_counter() - t
    for q, item in zip(queries, results):
        if after:
            t = time.perf_counter()
            item = (item, eng.reference_answer(q, scores=all_scores))
            exact_lat.append((time.perf_counter() - t) * 1000)
        res, ref = item
        got = set(res.all_ids.tolist())
        ref = set(ref.tolist())
        recalls.append(len(got & ref) / len(ref) if ref else 1.0)
        precisions.append(len(got & ref) / len(got) if got else 1.0)
        totals.append(len(ref))
        nprobes.append(res.plan.get("nprobe"))
        rescored.append((res.plan.get("rescored") or 0) + (res.plan.get("rescored_page") or 0))
        strategies[res.plan.get("strategy", res.plan.get("exit"))] = strategies.get(
            res.plan.get("strategy", res.plan.get("exit")), 0) + 1
    p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
    e50 = float(np.percentile(exact_lat, 50))
    out = {
        "n": args.n, "d": args.d, "concepts": args.concepts, "queries": len(queries), "k": args.k,
        "index": {k: v for k, v in snap.manifest["index"].items() if k in ("type", "factory", "nlist", "nprobe",
                                                                              "recall_at_10", "build_seconds",
                                                                              "rerank", "refine", "score_error")},
        "latency_ms": {"p50": round(p50, 2), "p95": round(p95, 2), "mean": round(float(np.mean(lat)), 2)},
        **({"latency_repeat_ms": {"p50": round(float(np.percentile(lat_repeat, 50)), 2),
                                  "p95": round(float(np.percentile(lat_repeat, 95)), 2),
                                  "note": "the same query again at once: its rows in the page cache"}}
           if lat_repeat else {}),
        "exact_ms": {"p50": round(e50, 2), "p95": round(float(np.percentile(exact_lat, 95)), 2),
                     **({"note": "every concept scored in one pass over the store, after the timed queries "
                                 f"({exact_pass_s:.0f} s, not counted per query)"} if large else {})},
        "speedup_p50": None if large else round(e50 / p50, 1),
        "recall": {"mean": round(float(np.mean(recalls)), 4), "min": round(float(np.min(recalls)), 4)},
        "precision_mean": round(float(np.mean(precisions)), 4),
        "matches": {"mean": round(float(np.mean(totals)), 1), "max": int(np.max(totals))},
        "nprobe_used": {"median": (float(np.median([x for x in nprobes if x])) if any(nprobes) else None),
                        "max": max([x for x in nprobes if x], default=None)},
        "strategies": strategies,
        "rescored_rows": {"median": float(np.median(rescored)), "max": int(np.max(rescored))},
        "calibration": {"seconds_all_concepts": round(calib_s, 2),
                        "methods": sorted({c.method for c in cals.values()})},
        "targets": {"p50_le_50ms": p50 <= 50, "recall_ge_0.95": float(np.mean(recalls)) >= 0.95,
                    "speedup_ge_10": None if large else e50 / p50 >= 10},
        "setup_seconds": {"generate": round(gen_s, 1), "build_store": None if build_s is None else round(build_s, 1)},
        "settle_band": None if args.rescore_all else list(eng.settle_band),
        "page_cache": "cold (vector files dropped before every timed query)" if args.cold else (
            f"warm (vectors16.npy read into the page cache first, {warmed_s:.0f} s; the exact pass after the timed "
            "queries)" if warmed_s is not None else "warm"),
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "note": "shared 2-core machine; other jobs may have been running"},
        "example_queries": queries[:4],
    }
    print(json.dumps(out, indent=2))
    snap.close()
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
