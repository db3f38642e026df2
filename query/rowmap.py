"""Where each range-search hit sits among a search's candidates: a reusable row -> position map.

The engine settles every concept on every candidate from FAISS range results (hits as row numbers and code
scores, in any order). Finding each hit's candidate position with a binary search costs a sort of every result
and a ``searchsorted`` per concept; at 10M rows and 200k candidates that was a fifth of a query. A map written
at the candidates' rows answers each hit with one gather instead.

The maps are never cleared: a stale entry is caught by checking that the candidate at the position read back
is the row asked for (candidates are unique, so a match is the position). Maps are pooled, one per search
running at the same time, so searches on several threads never share one; at most ``KEEP_MAPS`` are kept
between searches.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np

__all__ = ["RowPositions"]


#: Maps kept for reuse after their search ends (each is 4 bytes a row: 40 MB at 10M rows); searches beyond
#: this many at once get a map of their own that is freed afterwards.
KEEP_MAPS = 4


class RowPositions:
    """A pool of uninitialised ``int32`` maps over ``n`` rows (4 bytes a row each, pages touched on use)."""

    def __init__(self, n: int, keep: int = KEEP_MAPS):
        self.n = int(n)
        self.keep = int(keep)
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextmanager
    def over(self, rows: np.ndarray) -> Iterator[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]:
        """Map ``rows`` (unique row numbers < n) to their positions; yields ``find(hits) -> (pos, found)``.

        ``found[i]`` says whether ``hits[i]`` is one of ``rows``; where it is, ``rows[pos[i]] == hits[i]``.
        Hits outside ``0..n-1`` are not found.
        """
        with self._lock:
            buf = self._free.pop() if self._free else None
        if buf is None:
            buf = np.empty(self.n, np.int32)
        rows = np.asarray(rows, np.int64)
        m = len(rows)
        buf[rows] = np.arange(m, dtype=np.int32)

        def find(hits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            hits = np.asarray(hits, np.int64)
            if not m or not len(hits):
                return np.zeros(len(hits), np.int64), np.zeros(len(hits), bool)
            # out-of-range hits read a clipped slot; like stale slots, the check below rejects them
            pos = np.take(buf, hits, mode="clip")
            np.clip(pos, 0, m - 1, out=pos)
            return pos, np.take(rows, pos) == hits

        try:
            yield find
        finally:
            with self._lock:
                if len(self._free) < self.keep:
                    self._free.append(buf)
