"""FAISS index building: the type is chosen by collection size and a memory budget.

- up to ``exact_max`` vectors that fit the budget: exact inner-product search (``IDMap2,Flat``);
- larger, while raw vectors fit the budget: ``IVF{nlist},Flat`` (exact distances inside probed lists);
- larger than the budget: ``IVF{nlist},PQ{m}`` (product-quantised codes, m bytes a vector).

From ``HNSW_COARSE_MIN`` lists up, the coarse quantizer is an HNSW graph over the centroids
(``IVF{nlist}_HNSW32``, FAISS's recommendation for 10M+ vectors): assigning a vector to its list then costs
a few hundred distance computations instead of ``nlist``, which dominates adding 10M vectors otherwise.

For approximate indices the number of probed lists is raised until recall@10 against exact search on a
sample of queries reaches ``target_recall``; the chosen nprobe and the measured recall go to the manifest.
Product-quantised indices also record ``score_error``: how far a code's inner product can stray from the
exact one (the 99th percentile over sampled pairs), so that range searches widen their radius by it and lose
no true match to quantisation (the engine rescores every candidate exactly).
"""
from __future__ import annotations

import math
import time

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.data.store import drop_pages

EXACT_MAX = 200_000
DEFAULT_BUDGET = 4 << 30  # bytes for the index's vectors/codes
HNSW_COARSE_MIN = 8192  # lists from which the coarse quantizer is an HNSW graph


_LIBC = []


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere). Adding to an IVF index grows
    each of its lists by reallocation, and the old buffers otherwise stay resident as holes in the heap (about a
    third of the index's own size at 10M vectors)."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def choose_index_type(n: int, d: int, *, memory_budget: int = DEFAULT_BUDGET, exact_max: int = EXACT_MAX) -> dict:
    """Pick the index family and its parameters for n vectors of dimension d."""
    raw = n * d * 4
    if n <= exact_max and raw <= memory_budget:
        return {"type": "flat", "factory": "IDMap2,Flat"}
    nlist = int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))
    coarse = f"IVF{nlist}_HNSW32" if nlist >= HNSW_COARSE_MIN else f"IVF{nlist}"
    if raw <= memory_budget:
        return {"type": "ivf_flat", "factory": f"{coarse},Flat", "nlist": nlist}
    m = max(8, min(d // 2, int(memory_budget // max(n, 1))))
    while d % m:
        m -= 1
    # "np": no polysemous training (search never uses it, and it makes training ~5x slower)
    return {"type": "ivf_pq", "factory": f"{coarse},PQ{m}np", "nlist": nlist, "m": m}


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, block: int = 8192) -> np.ndarray:
    """Row positions of the exact top-k by inner product (blocked, numpy; memory: one block's scores, not n's)."""
    k = min(k, len(vectors))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    every = max(1, (32 << 20) // max(1, block * vectors.shape[1] * vectors.itemsize))  # blocks to ~32 MB
    for s in range(0, len(vectors), block):
        sc = queries @ np.asarray(vectors[s : s + block], np.float32).T
        if s // block % every == every - 1:
            drop_pages(vectors)  # a memory-mapped store is scanned, not loaded
        kb = min(k, sc.shape[1])
        top = np.argpartition(-sc, kb - 1, axis=1)[:, :kb]  # this block's own top-k first
        cs = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
        ci = np.concatenate([best_i, top + s], 1)
        sel = np.argpartition(-cs, min(k, cs.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(cs, sel, 1)
        best_i = np.take_along_axis(ci, sel, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def gather_rows(vectors: np.ndarray, rows: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """``vectors[rows]`` (``rows`` sorted) a chunk of rows at a time, dropping the mapped pages after each chunk: a
    sample spread over a memory-mapped file touches every page of it, and would otherwise map it all in."""
    out = np.empty((len(rows), vectors.shape[1]), np.float32)
    for s in range(0, len(rows), chunk):
        out[s : s + chunk] = vectors[rows[s : s + chunk]]
        drop_pages(vectors)
    return out


def build_index(vectors: np.ndarray, ids: np.ndarray, *, memory_budget: int = DEFAULT_BUDGET,
                exact_max: int = EXACT_MAX, target_recall: float = 0.95, seed: int = 0, n_eval: int = 200):
    """Build a FAISS inner-product index over normalised ``vectors`` keyed by ``ids``.

    Args:
        vectors: (n, d) float32, L2-normalised. ids: (n,) int64 catalog ids.
        memory_budget: bytes the index may use for vectors/codes. exact_max: largest exact index.
        target_recall: recall@10 that nprobe is tuned to reach on sampled queries.

    Returns:
        (faiss_index, info) where info holds type, factory, nprobe, recall_at_10, build_seconds.

    Raises:
        InvalidInput: shapes do not match.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise InvalidInput(f"vectors {vectors.shape} and ids {ids.shape} do not match")
    n, d = vectors.shape
    t0 = time.perf_counter()
    choice = choose_index_type(n, d, memory_budget=memory_budget, exact_max=exact_max)
    if choice["type"] == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(vectors, ids)
        info = dict(choice, n=n, d=d, nprobe=None, recall_at_10=1.0)
    else:
        index = faiss.index_factory(d, choice["factory"], faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        ntrain = min(n, max(choice["nlist"] * 40, 10_000))
        train = gather_rows(vectors, np.sort(rng.choice(n, ntrain, replace=False)))
        clustering = None
        if "_HNSW" in choice["factory"]:
            # k-means assignments through an HNSW graph too (rebuilt each iteration): with ~10^4 lists the
            # exact assignment GEMM would dominate the whole build (spherical k-means: L2 order = IP order)
            clustering = faiss.IndexHNSWFlat(d, 32)
            faiss.extract_index_ivf(index).clustering_index = clustering
        index.train(train)
        del train
        if clustering is not None:
            faiss.extract_index_ivf(index).clustering_index = None  # never left pointing at a freed index
        for s in range(0, n, 262144):
            index.add_with_ids(vectors[s : s + 262144], ids[s : s + 262144])
            drop_pages(vectors)  # memory-mapped vectors and ids: only the chunk being added is resident
            drop_pages(ids)
            release_free_heap()
        info = dict(choice, n=n, d=d)
        info.update(tune_nprobe(index, vectors, ids, target_recall=target_recall, seed=seed, n_eval=n_eval))
        if choice["type"] == "ivf_pq":
            info["score_error"] = round(score_error(index, vectors, seed=seed), 6)
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    return index, info


SCORE_ERROR_QUANTILE = 0.99


def score_error(index, vectors: np.ndarray, *, seed: int = 0, n: int = 4096, n_queries: int = 64,
                quantile: float = SCORE_ERROR_QUANTILE) -> float:
    """The ``quantile`` of |q·decode(code(v)) − q·v| over sampled vectors v and queries q (data-like, perturbed).

    That is the error of a quantised index's inner products (IVF-PQ scores q against the decoded vector).
    """
    rng = np.random.default_rng(seed + 2)
    sel = np.sort(rng.choice(len(vectors), min(n, len(vectors)), replace=False))
    v = gather_rows(vectors, sel)
    err = index.sa_decode(index.sa_encode(v)) - v
    q = v[rng.choice(len(v), min(n_queries, len(v)), replace=False)]
    q = q + rng.normal(scale=0.05, size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return float(np.quantile(np.abs(q @ err.T), quantile))


def search_reranked(index, vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, rerank: int):
    """Top-k ids: ``rerank`` candidates from the (quantised) index, re-scored exactly from ``vectors``."""
    _, cand = index.search(q, max(k, rerank))
    out = np.full((len(q), k), -1, np.int64)
    for j, row in enumerate(cand):
        row = row[row >= 0]
        if not len(row):
            continue
        pos = np.searchsorted(ids, row)
        sc = np.asarray(vectors[pos], np.float32) @ q[j]
        top = np.argsort(-sc)[:k]
        out[j, : len(top)] = row[top]
    drop_pages(vectors)
    drop_pages(ids)
    return out


MAX_RERANK = 1600  # deepest exact re-ranking of PQ candidates that tuning tries
PLATEAU = 0.005  # a doubling of nprobe that gains less recall than this is a plateau


def tune_nprobe(index, vectors: np.ndarray, ids: np.ndarray, *, target_recall: float = 0.95, seed: int = 0,
                n_eval: int = 200, k: int = 10, rerank: int | None = None) -> dict:
    """Raise nprobe until recall@k vs exact search on sampled queries reaches the target.

    For product-quantised indices, the top ``rerank`` (default 10·k) approximate candidates are re-scored
    exactly from the stored vectors: PQ codes alone rarely reach high recall on 512-d vectors. When doubling
    nprobe stops paying (a plateau: the codes, not the probed lists, limit recall) the re-ranking depth is
    doubled instead, up to ``MAX_RERANK``. If the target is never reached, the smallest setting within
    ``PLATEAU`` of the best recall seen is kept, rather than probing every list for nothing.
    """
    import faiss

    rng = np.random.default_rng(seed + 1)
    q = gather_rows(vectors, np.sort(rng.choice(len(vectors), min(n_eval, len(vectors)), replace=False)))
    q = q + rng.normal(scale=0.05, size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = ids[exact_topk(vectors, q, k)]
    drop_pages(vectors)
    ivf = faiss.extract_index_ivf(index)
    # extract_index_ivf gives the IndexIVF base class: downcast before asking whether the codes are exact (without
    # it every IVF-Flat index was tuned as if quantised, re-ranking candidates from the vectors for nothing)
    quantised = not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    rerank = (rerank or 10 * k) if quantised else None
    nprobe, prev, tried = 1, None, []
    while True:
        ivf.nprobe = nprobe
        got = search_reranked(index, vectors, ids, q, k, rerank) if rerank else index.search(q, k)[1]
        recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)]))
        tried.append((nprobe, rerank, recall))
        if recall >= target_recall or nprobe >= ivf.nlist:
            break
        if rerank and prev is not None and recall - prev < PLATEAU and rerank < MAX_RERANK:
            rerank, prev = min(MAX_RERANK, rerank * 2), None  # same nprobe, deeper re-ranking
            continue
        prev = recall
        nprobe = min(ivf.nlist, nprobe * 2)
    if recall < target_recall:
        best = max(r for _, _, r in tried)
        nprobe, rerank, recall = next(t for t in tried if t[2] >= best - PLATEAU)
    ivf.nprobe = nprobe
    return {"nprobe": nprobe, "recall_at_10": round(recall, 4), "recall_queries": len(q), "rerank": rerank,
            "target_reached": recall >= target_recall}


def set_search_params(index, info: dict) -> None:
    """Apply the manifest's tuned nprobe to a loaded index."""
    import faiss

    if info.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
