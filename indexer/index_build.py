"""FAISS index building: the type is chosen by collection size and a memory budget.

- up to ``exact_max`` vectors that fit the budget: exact inner-product search (``IDMap2,Flat``);
- larger, while raw vectors fit the budget: ``IVF{nlist},Flat`` (exact distances inside probed lists);
- larger than the budget: ``IVF{nlist},PQ{2m}x4fsr`` (product-quantised codes, m bytes a vector: 2m
  sub-quantizers of 4 bits each, on the residual from the list's centroid, in FAISS's fast-scan layout, which
  scores codes with SIMD look-ups in registers; at 64 bytes a vector it scanned a list ~8x faster than
  ``PQ64`` 8-bit codes, with a 99th-percentile score error ~1.2x larger, measured on 500k synthetic 512-d
  vectors). Stores built with ``PQ{m}np`` (8-bit codes) keep working.

From ``HNSW_COARSE_MIN`` lists up, the coarse quantizer is an HNSW graph over the centroids
(``IVF{nlist}_HNSW32``, FAISS's recommendation for 10M+ vectors): assigning a vector to its list then costs
a few hundred distance computations instead of ``nlist``, which dominates adding 10M vectors otherwise.
The graph's search is approximate, so the vectors of each added chunk that lie farthest from their list are
assigned again by an exact search (``_AssignmentCheck``): a vector in a far list is out of reach of probing
and its residual code scores it far off.

For approximate indices the number of probed lists is raised until recall@10 against exact search on a
sample of queries reaches ``target_recall``; the chosen nprobe and the measured recall go to the manifest.
Product-quantised indices also record ``score_error``: how far a code's inner product can stray from the
exact one (the 99th percentile over sampled pairs), so that range searches widen their radius by it and lose
no true match to quantisation (the engine rescores every candidate exactly).

Top-k search over a product-quantised index refines: the top ``rerank`` candidates of the codes are re-scored
exactly from a memory-mapped copy of the vectors (a store keeps a float16 one, ``vectors16.npy``, half the
bytes of ``vectors.npy``), read in row order (``refine_topk``). Dense collections need deep lists (thousands
of candidates: 64-byte codes cannot order the near neighbours inside a dense cluster), so tuning deepens the
re-ranking up to ``MAX_RERANK``. ``vectors`` may be float32 or float16, in RAM or memory-mapped: every
function here converts the rows it reads, block by block, and never loads a memory map whole.
"""
from __future__ import annotations

import math
import re
import time

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.data.store import advise_random, drop_pages, ivf_params, quantizer_params  # noqa: F401 - re-exported

EXACT_MAX = 200_000
DEFAULT_BUDGET = 4 << 30  # bytes for the index's vectors/codes
HNSW_COARSE_MIN = 8192  # lists from which the coarse quantizer is an HNSW graph
# HNSW search depth when assigning vectors to lists (k-means and add): at FAISS's default 16, 1.4% of
# clustered synthetic 512-d vectors went to a list of another cluster (4,096 lists), unreachable by probing
# near lists; 32 misplaced 0.1% (~2.8x the assignment time), 64 none
ASSIGN_EF = 32


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
    m = max(8, min(d // 2, int(memory_budget // max(n, 1))))  # bytes a vector
    while m > 1 and d % (2 * m):
        m -= 1
    return {"type": "ivf_pq", "factory": f"{coarse},PQ{2 * m}x4fsr", "nlist": nlist, "m": m}


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


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32)


def build_index(vectors: np.ndarray, ids: np.ndarray, *, memory_budget: int = DEFAULT_BUDGET,
                exact_max: int = EXACT_MAX, target_recall: float = 0.95, seed: int = 0, n_eval: int = 200,
                refine_vectors: np.ndarray | None = None, factory: str | None = None):
    """Build a FAISS inner-product index over normalised ``vectors`` keyed by ``ids``.

    Args:
        vectors: (n, d) float32, L2-normalised. ids: (n,) int64 catalog ids.
        memory_budget: bytes the index may use for vectors/codes. exact_max: largest exact index.
        target_recall: recall@10 that nprobe is tuned to reach on sampled queries.
        refine_vectors: what product-quantised candidates are re-scored from while tuning (default
            ``vectors``; a store passes its float16 copy, the file its searches will read).
        factory: a FAISS factory string overriding the choice by size and budget (benchmarks).

    Returns:
        (faiss_index, info) where info holds type, factory, nprobe, recall_at_10, build_seconds.

    Raises:
        InvalidInput: shapes do not match.
    """
    import faiss

    # float32 or float16, possibly a memory map larger than RAM: rows are converted as they are read
    if vectors.dtype not in (np.float32, np.float16):
        vectors = _f32(vectors)
    ids = np.ascontiguousarray(ids, np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise InvalidInput(f"vectors {vectors.shape} and ids {ids.shape} do not match")
    n, d = vectors.shape
    t0 = time.perf_counter()
    choice = choose_index_type(n, d, memory_budget=memory_budget, exact_max=exact_max)
    if factory:
        choice = _parse_factory(factory)
    if choice["type"] == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(_f32(vectors), ids)
        info = dict(choice, n=n, d=d, nprobe=None, recall_at_10=1.0)
    else:
        # fast-scan codes are written by a plain IVF-PQ index of the same 4-bit codes (which, unlike fast-scan,
        # takes vectors with their lists already assigned: see ``_AssignmentCheck``) and converted once they are all in
        fast = re.search(r"(PQ\d+x4)fs(r?)$", choice["factory"])
        build_factory = choice["factory"][: fast.start()] + fast.group(1) if fast else choice["factory"]
        index = faiss.index_factory(d, build_factory, faiss.METRIC_INNER_PRODUCT)
        if fast and not fast.group(2):
            faiss.extract_index_ivf(index).by_residual = False
        plain = isinstance(faiss.downcast_index(index), faiss.IndexIVF)  # no pre-transform (OPQ) before the lists
        if fast and not plain:
            raise InvalidInput(f"index factory {factory!r}: fast-scan codes need the lists first (no OPQ before them)",
                               "drop the OPQ prefix, or use PQ{m}np codes")
        rng = np.random.default_rng(seed)
        ntrain = min(n, max(choice["nlist"] * 40, 10_000))
        train = gather_rows(vectors, np.sort(rng.choice(n, ntrain, replace=False)))
        clustering = None
        if "_HNSW" in choice["factory"]:
            # k-means assignments through an HNSW graph too (rebuilt each iteration): with ~10^4 lists the
            # exact assignment GEMM would dominate the whole build (spherical k-means: L2 order = IP order)
            clustering = faiss.IndexHNSWFlat(d, 32)
            clustering.hnsw.efSearch = ASSIGN_EF
            faiss.extract_index_ivf(index).clustering_index = clustering
        index.train(train)
        del train
        # fast-scan codes are scored through 8-bit look-up tables, an error decoding does not show: their score
        # error is measured by scanning a fast-scan copy of the trained, still empty index that holds only the sample
        probe = faiss.IndexIVFPQFastScan(faiss.downcast_index(faiss.extract_index_ivf(index))) if fast else None
        hnsw_q = None
        if clustering is not None:
            faiss.extract_index_ivf(index).clustering_index = None  # never left pointing at a freed index
            hnsw_q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
            ef0, hnsw_q.hnsw.efSearch = hnsw_q.hnsw.efSearch, ASSIGN_EF  # each vector into its nearest list
        checker = _AssignmentCheck(index) if hnsw_q is not None and plain else None
        for s in range(0, n, 262144):
            x, i = _f32(vectors[s : s + 262144]), np.ascontiguousarray(ids[s : s + 262144], np.int64)
            if checker is not None:
                checker.add(x, i)
            else:
                index.add_with_ids(x, i)
            del x, i
            drop_pages(vectors)  # memory-mapped vectors and ids: only the chunk being added is resident
            drop_pages(ids)
            release_free_heap()
        if hnsw_q is not None:
            hnsw_q.hnsw.efSearch = ef0  # searches set their own depth (quantizer_params)
        if fast:
            index = _to_fast_scan(index)
            release_free_heap()
        info = dict(choice, n=n, d=d)
        if checker is not None:
            info["reassigned"] = checker.reassigned
        info.update(tune_nprobe(index, vectors, ids, target_recall=target_recall, seed=seed, n_eval=n_eval,
                                refine_vectors=refine_vectors))
        if choice["type"] == "ivf_pq":
            if probe is not None and checker is not None:
                probe.quantizer = checker.flat  # the sample goes to its exact lists, as the index's vectors did
            info["score_error"] = round(score_error(index, vectors, seed=seed, probe=probe), 6)
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    return index, info


SUSPECT_SHARE = 0.02  # _AssignmentCheck: the share of each chunk's vectors whose HNSW list is checked exactly


class _AssignmentCheck:
    """Adds vectors to an IVF index whose coarse quantizer is an HNSW graph, each into its true nearest list.

    HNSW search is approximate: at ``ASSIGN_EF`` it put 0.29% of a 10M synthetic set into far lists (score 0.13
    to their own centroid, 0.83 to the nearest one), where probing near lists never reaches them and their
    residual codes score them up to 0.4 too high (false matches that the settling band cannot catch). The
    vectors of each chunk that lie farthest from their HNSW list (``SUSPECT_SHARE`` of them, more while over half
    of those checked change list) are assigned again by an exact search over the centroids, and the chunk is added
    with its lists given (``add_core``)."""

    def __init__(self, index):
        import faiss

        self.ivf = faiss.extract_index_ivf(index)
        q = self.ivf.quantizer
        self.l2 = q.metric_type == faiss.METRIC_L2
        self.flat = faiss.IndexFlat(q.d, q.metric_type)
        self.flat.add(q.reconstruct_n(0, self.ivf.nlist))
        self.reassigned = 0

    def add(self, x: np.ndarray, ids: np.ndarray) -> None:
        """Add ``x`` (float32, C order) with ``ids`` (int64)."""
        import faiss

        D, A = self.ivf.quantizer.search(x, 1)
        far, lists = (D[:, 0] if self.l2 else -D[:, 0]), np.ascontiguousarray(A[:, 0], np.int64)
        share = SUSPECT_SHARE
        while len(x):
            k = min(len(x), max(1, int(np.ceil(share * len(x)))))
            sus = np.argpartition(far, len(x) - k)[len(x) - k:]
            exact = self.flat.search(x[sus], 1)[1][:, 0]
            changed = exact != lists[sus]
            self.reassigned += int(changed.sum())
            lists[sus] = exact
            far[sus] = -np.inf  # settled
            if k == len(x) or changed.mean() < 0.5:
                break
            share *= 4
        self.ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))


def _to_fast_scan(index):
    """The fast-scan form of a plain IVF-PQ index of 4-bit codes (the codes copied into blocks of 32); it takes over
    the coarse quantizer."""
    import faiss

    src = faiss.downcast_index(faiss.extract_index_ivf(index))
    out = faiss.IndexIVFPQFastScan(src)
    out.own_fields, src.own_fields = True, False
    return out


def _parse_factory(factory: str) -> dict:
    """The ``choose_index_type`` dict of an explicit IVF factory string (``[OPQm,]IVFn[_HNSW32],PQm|Flat``)."""
    m = re.search(r"IVF(\d+)", factory)
    if not m:
        raise InvalidInput(f"index factory {factory!r} is not an IVF index", "use IVF{nlist}[_HNSW32],PQ{m} or ,Flat")
    out = {"factory": factory, "nlist": int(m.group(1))}
    pq = re.search(r",PQ(\d+)(?:x(\d+))?", factory)
    if pq:  # m: bytes a vector (sub-quantizers x bits / 8)
        out.update(type="ivf_pq", m=int(pq.group(1)) * int(pq.group(2) or 8) // 8)
    else:
        out["type"] = "ivf_flat"
    return out


SCORE_ERROR_QUANTILE = 0.99


def score_error(index, vectors: np.ndarray, *, seed: int = 0, n: int = 4096, n_queries: int = 64,
                quantile: float = SCORE_ERROR_QUANTILE, probe=None) -> float:
    """The ``quantile`` of |code score − q·v| over sampled vectors v and queries q (data-like, perturbed).

    8-bit PQ codes score q against the decoded vector, so the error is ``q·(decode(code(v)) − v)``. Fast-scan
    codes add the rounding of their 8-bit look-up tables: pass ``probe``, an empty trained copy of the index,
    and the sample is added to it and scanned (every list), so the scores are the ones its searches return.
    """
    rng = np.random.default_rng(seed + 2)
    sel = np.sort(rng.choice(len(vectors), min(n, len(vectors)), replace=False))
    v = gather_rows(vectors, sel)
    q = v[rng.choice(len(v), min(n_queries, len(v)), replace=False)]
    q = q + rng.normal(scale=0.05, size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    if probe is None:
        err = index.sa_decode(index.sa_encode(v)) - v
        return float(np.quantile(np.abs(q @ err.T), quantile))
    import faiss

    probe.add(v)  # ids 0..len(v)-1
    D, I = probe.search(q, len(v), params=ivf_params(probe, faiss.extract_index_ivf(probe).nlist))
    ok = I >= 0
    exact = np.take_along_axis(q @ v.T, np.where(ok, I, 0), 1)
    return float(np.quantile(np.abs(D - exact)[ok], quantile))


def rows_of_ids(ids: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """Row positions of candidate ids (``ids`` sorted ascending, as a store keeps them)."""
    n = len(ids)
    if n and int(ids[0]) == 0 and int(ids[-1]) == n - 1:
        return np.asarray(cand, np.int64)  # ids are row numbers
    return np.searchsorted(ids, cand)


def _top_of_rows(block: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of the top-k rows of ``block`` (float16 or float32, in RAM) by inner product with q,
    best first. float16 rows are scored by FAISS's float16 scalar-quantizer kernel (F16C/AVX: ~10x numpy's
    float16 -> float32 conversion), with float32 accumulation: the exact inner products of the stored values."""
    import faiss

    m, d = block.shape
    k = min(k, m)
    if block.dtype == np.float16:
        sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(np.ascontiguousarray(block).view(np.uint8).ravel(), sq.codes)
        sq.ntotal = m
        D, I = sq.search(np.ascontiguousarray(q[None], np.float32), k)
        return I[0].astype(np.int64), D[0]
    sc = np.ascontiguousarray(block, np.float32) @ q
    top = np.argpartition(-sc, k - 1)[:k] if k < m else np.arange(m)
    top = top[np.lexsort((top, -sc[top]))]
    return top, sc[top]


def refine_topk(vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, cand: np.ndarray, k: int):
    """Exact top-k among candidate ids: (ids (nq, k), scores (nq, k)), -1 / -inf where fewer than k.

    Each query's candidate rows are read from ``vectors`` (float32 or float16, in RAM or memory-mapped) in
    ascending row order, so a memory map is read front to back (one pass, no seeks back), then scored exactly
    (float16 rows by FAISS's SIMD float16 kernel, float32 rows by BLAS).
    """
    q = np.ascontiguousarray(q, np.float32)
    out = np.full((len(q), k), -1, np.int64)
    scores = np.full((len(q), k), -np.inf, np.float32)
    for j, row in enumerate(np.asarray(cand)):
        row = row[row >= 0]
        if not len(row):
            continue
        pos = np.unique(rows_of_ids(ids, row))  # sorted, and a candidate listed twice is scored once
        top, sc = _top_of_rows(vectors[pos], q[j], k)
        out[j, : len(top)] = ids[pos[top]]
        scores[j, : len(top)] = sc
    return out, scores


def search_reranked(index, vectors: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int, rerank: int,
                    params=None):
    """Top-k ids: ``rerank`` candidates from the (quantised) index, re-scored exactly from ``vectors``
    (float32 or float16, in RAM or memory-mapped; see ``refine_topk``)."""
    q = np.ascontiguousarray(q, np.float32)
    _, cand = index.search(q, max(k, rerank), params=params) if params is not None else index.search(q, max(k, rerank))
    return refine_topk(vectors, ids, q, cand, k)[0]


MAX_RERANK = 16384  # deepest exact re-ranking of PQ candidates that tuning tries (a dense cluster of a
# 10M-vector collection holds ~5,000 vectors that 64-byte codes cannot order; float16 rows cost ~1 µs each)
PLATEAU = 0.005  # a doubling of nprobe that gains less recall than this is a plateau


def _lists_of_ids(ivf, wanted: np.ndarray) -> np.ndarray:
    """The IVF list that holds each of ``wanted`` (ids; -1 for an id in no list), read from the inverted lists."""
    import faiss

    flat = np.asarray(wanted, np.int64).ravel()
    uniq, inv = np.unique(flat, return_inverse=True)
    out = np.full(len(uniq), -1, np.int64)
    for l in range(ivf.nlist):
        sz = ivf.invlists.list_size(l)
        if sz:
            lid = faiss.rev_swig_ptr(ivf.invlists.get_ids(l), sz)
            pos = np.searchsorted(uniq, lid)
            hit = (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == lid)
            out[pos[hit]] = l
    return out[inv].reshape(np.shape(wanted))


def tune_nprobe(index, vectors: np.ndarray, ids: np.ndarray, *, target_recall: float = 0.95, seed: int = 0,
                n_eval: int = 200, k: int = 10, rerank: int | None = None,
                refine_vectors: np.ndarray | None = None) -> dict:
    """Find nprobe (and, for product-quantised indices, the re-ranking depth) that reach recall@k ``target_recall``
    against exact search on sampled queries.

    IVF-Flat: nprobe doubles until the target is reached. Product-quantised codes rarely reach high recall on
    512-d vectors alone, so the top ``rerank`` candidates are re-scored exactly from ``refine_vectors`` (default
    ``vectors``), and the two limits are tuned apart: first nprobe, the fewest lists (doubling) whose union holds
    ``target + (1 - target) / 2`` of the true neighbours (read from the inverted lists: no search needed), then
    the re-ranking depth, doubling from ``rerank`` (default 10·k) up to ``MAX_RERANK``; only if the deepest
    re-ranking still falls short are more lists probed. (Doubling nprobe with a shallow re-ranking confused
    the two limits and probed half of all lists for nothing.) If the target is never reached, the first
    (cheapest) setting within ``PLATEAU`` of the best recall seen is kept. Every setting tried is returned
    (``tried``: [nprobe, rerank, recall]).
    """
    import faiss

    rng = np.random.default_rng(seed + 1)
    q = gather_rows(vectors, np.sort(rng.choice(len(vectors), min(n_eval, len(vectors)), replace=False)))
    q = q + rng.normal(scale=0.05, size=q.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = ids[exact_topk(vectors, q, k)]
    drop_pages(vectors)
    ivf = faiss.extract_index_ivf(index)
    quantised = not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)  # (extract_index_ivf gives the base type)
    ref = vectors if refine_vectors is None else refine_vectors
    tried = []

    def measure(nprobe, rr):
        params = ivf_params(index, nprobe)
        got = search_reranked(index, ref, ids, q, k, rr, params=params) if rr else index.search(q, k, params=params)[1]
        recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)]))
        tried.append((nprobe, rr, recall))
        return recall

    out = {}
    if not quantised:
        nprobe = 1
        while measure(nprobe, None) < target_recall and nprobe < ivf.nlist:
            nprobe = min(ivf.nlist, nprobe * 2)
        rr = None
    else:
        # 1. lists: the fewest (doubling) that hold enough of the true neighbours
        in_list = _lists_of_ids(ivf, truth)
        cover_target = min(1.0, target_recall + (1 - target_recall) / 2)
        nprobe, coverage = 1, []
        while True:
            qp = quantizer_params(index, nprobe)
            _, probed = ivf.quantizer.search(q, nprobe, params=qp) if qp is not None else ivf.quantizer.search(q, nprobe)
            cov = float(np.mean([np.isin(t, p).mean() for t, p in zip(in_list, probed)]))
            coverage.append([nprobe, round(cov, 4)])
            if cov >= cover_target or nprobe >= ivf.nlist:
                break
            nprobe = min(ivf.nlist, nprobe * 2)
        out["coverage"] = coverage
        # 2. re-ranking depth, then (only if the deepest falls short) more lists
        rr = min(rerank or 10 * k, MAX_RERANK)
        while measure(nprobe, rr) < target_recall:
            if rr < MAX_RERANK:
                rr = min(MAX_RERANK, rr * 2)
            elif nprobe < ivf.nlist:
                nprobe = min(ivf.nlist, nprobe * 2)
            else:
                break
    recall = tried[-1][2]
    if recall < target_recall:
        best = max(r for _, _, r in tried)
        nprobe, rr, recall = next(t for t in tried if t[2] >= best - PLATEAU)
    set_search_params(index, {"nprobe": nprobe})
    return {"nprobe": nprobe, "recall_at_10": round(recall, 4), "recall_queries": len(q), "rerank": rr,
            "target_reached": recall >= target_recall,
            "tried": [[a, b, round(c, 4)] for a, b, c in tried], **out}


def set_search_params(index, info: dict) -> None:
    """Apply the manifest's tuned nprobe to a loaded index (and an HNSW coarse quantizer's matching search
    depth, so that plain ``index.search`` calls find the lists they probe; see ``quantizer_params``)."""
    import faiss

    if info.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(info["nprobe"])
        qp = quantizer_params(index, int(info["nprobe"]))
        if qp is not None:
            faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).hnsw.efSearch = int(qp.efSearch)
