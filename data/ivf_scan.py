"""Range searches restricted to chosen lists of a FAISS IVF index, for plain and fast-scan (4-bit PQ) codes.

The engine scans exactly the lists it chooses (a driver's next, deeper probe; another concept over the
candidates' lists), never the top-``nprobe`` of the index's own quantizer. Plain IVF indices do that with
``range_search_preassigned``. FAISS's fast-scan indices (``IndexIVFPQFastScan``: codes packed in blocks of 32
and scored with SIMD look-ups, ~8x faster than 8-bit PQ codes at the same bytes per vector) have no
preassigned range search: their range search asks the index's coarse quantizer for the lists. So
``ListScanner`` keeps, per thread, a *shell* index that shares the real index's inverted lists and PQ tables
(no copy of the codes) and whose coarse quantizer holds only the chosen lists' centroids (exact inner
products: the same list scores the real quantizer gives, which are the residual codes' biases).

Fast-scan range searches compare 16-bit quantised scores against ``int(a * (radius - b))`` held in a uint16,
which wraps for radii below the lowest code score (every vector would pass, none is returned). A radius is
therefore checked against the bounds of the codes' scores in the scanned lists (coarse score plus the sum of
each sub-quantizer's smallest / largest look-up): below the lower bound every vector passes and all of them
are returned with their scores (a k-NN scan of those lists with k = their size); above the upper bound none can.
"""
from __future__ import annotations

import threading

import numpy as np


class ListScanner:
    """``range_in_lists`` over one IVF index (plain or fast-scan); thread-safe, one shell index per thread."""

    def __init__(self, index, centroids: np.ndarray | None = None):
        import faiss

        self.index = index
        self.ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        self.fast = isinstance(self.ivf, faiss.IndexIVFPQFastScan)  # the fast-scan codes build_index writes
        if centroids is None:
            centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)
        self.centroids = np.ascontiguousarray(centroids, np.float32)
        self._local = threading.local()
        if self.fast:
            pq = self.ivf.pq
            self._pq_cents = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)

    def range_in_lists(self, vec: np.ndarray, radius: float, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, code scores float32) of the vectors in ``lists`` whose score is > ``radius``."""
        lists = np.ascontiguousarray(lists, np.int64)
        if not len(lists):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(np.asarray(vec, np.float32).reshape(1, -1))
        coarse = self.centroids[lists] @ q[0]
        if self.fast:
            return self._fast(q, float(radius), lists, coarse)
        return self._preassigned(q, float(radius), lists, coarse)

    def _preassigned(self, q, radius, lists, coarse):
        import faiss

        iq = np.ascontiguousarray(lists[None])
        dq = np.ascontiguousarray(coarse[None], np.float32)
        res = faiss.RangeSearchResult(1)
        params = faiss.SearchParametersIVF(nprobe=len(lists))  # per call: the shared index is not mutated
        self.ivf.range_search_preassigned_c(1, faiss.swig_ptr(q), radius, faiss.swig_ptr(iq), faiss.swig_ptr(dq),
                                            res, False, params)
        return _result(res)

    def score_bounds(self, q: np.ndarray, coarse: np.ndarray) -> tuple[float, float]:
        """(lowest, highest) score a fast-scan code in lists with these coarse scores can have for query q."""
        pq = self.ivf.pq
        lut = np.einsum("mkd,md->mk", self._pq_cents, q[0].reshape(pq.M, pq.dsub))
        base = (coarse.min(), coarse.max()) if self.ivf.by_residual else (0.0, 0.0)
        return float(base[0] + lut.min(1).sum()), float(base[1] + lut.max(1).sum())

    def _fast(self, q, radius, lists, coarse):
        import faiss

        lo, hi = self.score_bounds(q, coarse)
        if radius >= hi:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        shell, qz = self._shell()
        qz.reset()
        qz.add_with_ids(np.ascontiguousarray(self.centroids[lists]), lists)
        params = faiss.SearchParametersIVF(nprobe=len(lists))
        if radius > lo + 1e-3 * (hi - lo):  # the 16-bit threshold cannot wrap
            res = faiss.RangeSearchResult(1)
            shell.range_search_c(1, faiss.swig_ptr(q), radius, res, params)
            ids, d = _result(res)
        else:  # every vector passes: all of them, with their scores
            total = int(sum(self.ivf.invlists.list_size(int(l)) for l in lists))
            if not total:
                return np.zeros(0, np.int64), np.zeros(0, np.float32)
            d, ids = shell.search(q, total, params=params)
            keep = ids[0] >= 0
            ids, d = ids[0][keep].astype(np.int64), d[0][keep].astype(np.float32)
        keep = d > radius
        return ids[keep], d[keep]

    def _shell(self):
        """This thread's shell index: the real one's lists and PQ, its own (chosen-lists) coarse quantizer."""
        got = getattr(self._local, "shell", None)
        if got is None:
            import faiss

            src = self.ivf
            qz = faiss.IndexIDMap(faiss.IndexFlatIP(src.d))
            shell = faiss.IndexIVFPQFastScan(qz, src.d, src.nlist, src.M, src.nbits, src.metric_type, src.bbs)
            shell.pq = src.pq  # a copy of the (small) PQ tables; the shell's fine quantizer points at it
            shell.by_residual = src.by_residual
            shell.implem, shell.skip, shell.qbs = src.implem, src.skip, src.qbs
            shell.replace_invlists(src.invlists, False)  # shared, not owned: the real index frees them
            shell.ntotal, shell.is_trained = src.ntotal, True
            got = self._local.shell = (shell, qz)  # (the scanner holds the real index, whose lists the shell reads)
        return got


def _result(res) -> tuple[np.ndarray, np.ndarray]:
    """(ids, scores) of a one-query ``RangeSearchResult``."""
    import faiss

    nd = int(faiss.rev_swig_ptr(res.lims, 2)[1])
    if not nd:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = faiss.rev_swig_ptr(res.labels, nd).copy().astype(np.int64)
    return ids, faiss.rev_swig_ptr(res.distances, nd).copy().astype(np.float32)
