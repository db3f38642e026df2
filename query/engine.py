"""Query execution: FAISS candidates, exact rescoring, DuckDB filters, boolean tree, ranking, explain.

Plan for one query (``Engine.search``):
  1. Parse (string), validate (JSON form) and check every filter column against the catalog.
  2. Pure-filter conjuncts of a top-level AND (``t2c.query.ast.split``) become a parameterised DuckDB WHERE
     prefilter -> the allowed rows. No allowed row: early exit.
  3. Concept vectors come from the store's ConceptBank, thresholds from ``t2c.query.calibrate.thresholds_for``
     (cached per snapshot); a per-term ``@threshold`` in the query wins over calibration.
  4. Candidates: the *necessary* positive concepts (those that must pass for the tree to hold) that are
     selective (estimated prevalence < 25%), up to three, most selective first, each drive a FAISS range
     search at its threshold; the candidates are the union of their results (every answer passes all of
     them, so the union only adds recall on partitioned indices). IVF indices: the number of probed lists
     starts at the estimate from centroid scores (a list's centroid score is the mean of its members'
     scores, so it reveals the fraction of positives in the list; see ``_start_nprobe``), never below the
     manifest's nprobe, and doubles while the result count is short of the calibrated expectation and
     still growing. With no selective necessary positive concept (only-negative or OR-of-concepts
     queries), or at most ``exact_rows`` allowed rows, every allowed row is scored exactly instead
     (vectorised, blockwise). No candidate: early exit.
  5. Exact scores of every concept on the candidates: flat / IVF-Flat indices keep raw vectors, so the range
     results already carry exact scores; for IVF-Flat the candidates' lists are scanned for every other
     concept (``range_search_preassigned``: contiguous and exact, no random gathers from the memmap).
     Anything not settled that way (IVF-PQ) is rescored from the memory-mapped vectors. Filters that sit
     inside the tree are evaluated per candidate in DuckDB; the boolean tree is evaluated over the arrays.
  6. Ranking score (``score`` of a hit), with margin_i = (score_i - threshold_i) / scale_i, scale_i the
     spread of concept i's "absent" scores from calibration:
        weighted mean of margin_i over the positive-polarity concepts (under an even number of NOTs) that
        passed, weights from the query (``2*"sunset"``); when none passed (only-negative queries), the
        weighted mean of -margin_i over the negative-polarity concepts (how clearly they are absent).
     Ties break by ascending id. Pagination: ``hits = ranked[offset : offset + k]``; ``total`` counts all
     matches.
  7. ``explain=True`` adds per hit, per concept leaf: concept, score, threshold, passed, weight, negated,
     margin, method.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.query import ast as qa
from t2c.query.calibrate import Calibration, concept_scores, thresholds_for
from t2c.query.sql import compile_filter, compile_filter_expr

__all__ = ["Engine", "SearchResult", "Hit", "evaluate_tree", "MAX_K"]

MAX_K = 10_000
EXACT_ROWS = 2_000  # score allowed rows exactly (no index) when there are at most this many
MAX_RANGE_GROWTH = 6  # nprobe doublings for IVF range search
MAX_DRIVERS = 3  # necessary positive concepts whose index candidates are united
MAX_RESOLVED = 6  # concepts settled by index range searches before exact rescoring of the rest


@dataclass
class Hit:
    """One matching image."""

    id: int
    path: str
    score: float
    explanation: list[dict] | None = None

    def to_dict(self) -> dict:
        d = {"id": int(self.id), "path": self.path, "score": round(float(self.score), 6)}
        if self.explanation is not None:
            d["explanation"] = self.explanation
        return d


@dataclass
class SearchResult:
    """Answer of one query: the page of hits, the total number of matches, timing and the parsed tree."""

    hits: list[Hit]
    total: int
    took_ms: float
    query: dict
    k: int = 20
    offset: int = 0
    plan: dict = field(default_factory=dict)
    all_ids: np.ndarray | None = field(default=None, repr=False)  # every matching id, unranked (not serialised)

    @property
    def warnings(self) -> list[str]:
        """Notes for the person asking (e.g. a concept this collection's scores cannot calibrate)."""
        return list(self.plan.get("warnings", []))

    def to_dict(self) -> dict:
        return {"query": self.query, "total": int(self.total), "k": self.k, "offset": self.offset,
                "took_ms": round(float(self.took_ms), 3), "plan": self.plan,
                "hits": [h.to_dict() for h in self.hits]}


def _calibration_warnings(leaves, cals) -> list[str]:
    """One note per positive concept whose threshold came from a fallback (one population, or the model's cut)."""
    out = []
    for leaf, positive in leaves:
        c = cals[id(leaf)]
        if positive and c.method == "tail_search" and leaf.threshold is None:
            msg = (f"'{leaf.text}': this collection's scores show no separate 'present' group, so its threshold "
                   f"({c.threshold:.3f}, median + 1 robust sigma) is a guess; set one yourself with "
                   f"'{leaf.text}@0.NN', or use an encoder that separates this concept")
        elif positive and c.method == "prior" and leaf.threshold is None:
            msg = (f"'{leaf.text}': this collection's scores show no separate 'present' group; its threshold "
                   f"({c.threshold:.3f}) is the CLIP model's own cut, not fitted to this collection; set one "
                   f"yourself with '{leaf.text}@0.NN' if the answers look off")
        else:
            continue
        if msg not in out:
            out.append(msg)
    return out


# ------------------------------------------------------------------------------------------ tree logic
def _necessary_positive(node, positive: bool = True) -> dict:
    """Concept leaves (keyed by id) that must pass for ``node`` (with polarity) to hold."""
    if isinstance(node, qa.Concept):
        return {id(node): node} if positive else {}
    if isinstance(node, qa.Filter):
        return {}
    if isinstance(node, qa.Not):
        return _necessary_positive(node.child, not positive)
    kids = [_necessary_positive(c, positive) for c in node.children]
    conjunctive = isinstance(node, qa.And) == positive
    if conjunctive:
        out: dict = {}
        for k in kids:
            out.update(k)
        return out
    # disjunction: a leaf is necessary only if every branch needs the same (equal) concept
    common = {}
    for key, c in kids[0].items():
        if all(any(c == o for o in k.values()) for k in kids[1:]):
            common[key] = c
    return common


def evaluate_tree(node, concept_pass, filter_pass, n: int) -> np.ndarray:
    """Evaluate the tree over n items; ``concept_pass(leaf)`` / ``filter_pass(leaf)`` give bool arrays."""
    if isinstance(node, qa.Concept):
        return concept_pass(node)
    if isinstance(node, qa.Filter):
        return filter_pass(node)
    if isinstance(node, qa.Not):
        return ~evaluate_tree(node.child, concept_pass, filter_pass, n)
    if isinstance(node, qa.And):
        out = np.ones(n, bool)
        for c in node.children:
            out &= evaluate_tree(c, concept_pass, filter_pass, n)
            if not out.any():
                break
        return out
    out = np.zeros(n, bool)
    for c in node.children:
        out |= evaluate_tree(c, concept_pass, filter_pass, n)
    return out


def _leaves(node):
    """Concept leaves with polarity, deduplicated by (text, threshold, weight, polarity)."""
    return qa.concepts_with_polarity(node)


# ------------------------------------------------------------------------------------------------ engine
class Engine:
    """Runs queries against one store snapshot.

    Args:
        snapshot: an open :class:`t2c.data.store.Snapshot`.
        bank: a ConceptBank (default: ``concept_bank_for(snapshot)``, built lazily: torch is imported only
            when a concept vector is not cached).

    Example:
        >>> eng = Engine.for_store("photos.t2c")  # doctest: +SKIP
        >>> res = eng.search('red circle AND NOT square AND width>=32', k=10, explain=True)  # doctest: +SKIP
        >>> [(h.id, h.path, h.score) for h in res.hits]  # doctest: +SKIP
    """

    def __init__(self, snapshot, bank=None, *, exact_rows: int = EXACT_ROWS):
        self.snapshot = snapshot
        self.exact_rows = int(exact_rows)
        self._bank = bank
        self._columns: dict | None = None
        self._ivf = None
        self._row_list = None
        self._ids: np.ndarray | None = None
        self._ids_are_rows = False

    @classmethod
    def for_store(cls, path, *, verify: bool = True, bank=None) -> "Engine":
        """Open a store's live snapshot and make an engine for it."""
        from t2c.data.store import open_store

        return cls(open_store(Path(path), verify=verify), bank=bank)

    @property
    def bank(self):
        if self._bank is None:
            from t2c.query.concepts import concept_bank_for

            self._bank = concept_bank_for(self.snapshot)
        return self._bank

    @property
    def columns(self) -> dict:
        if self._columns is None:
            self._columns = self.snapshot.columns()
        return self._columns

    # -- parsing --
    @staticmethod
    def parse_query(query):
        """A query tree from a string, a JSON dict, or a tree."""
        if isinstance(query, str):
            from t2c.query.parse import parse

            return parse(query)
        if isinstance(query, dict):
            return qa.from_json(query)
        if isinstance(query, (qa.Concept, qa.Filter, qa.And, qa.Or, qa.Not)):
            return query
        raise InvalidInput(f"query must be a string, a JSON object or a query tree, got {type(query).__name__}")

    # -- thresholds --
    def calibrations(self, node) -> dict:
        """Calibration per concept leaf (by leaf identity), overrides applied."""
        leaves = qa.concepts(node)
        cal = thresholds_for(self.snapshot, [c.text for c in leaves], bank=self.bank)
        out = {}
        for c in leaves:
            base = cal[c.text]
            out[id(c)] = base.with_threshold(c.threshold) if c.threshold is not None else base.for_search()
        return out

    # -- filters --
    def _prefilter_rows(self, fnode) -> np.ndarray:
        """Sorted row positions passing a pure-filter tree (parameterised WHERE)."""
        sql, params = compile_filter(fnode, self.columns)
        ids = self.snapshot.catalog().execute(f"SELECT id FROM images WHERE {sql}", params).fetchnumpy()["id"]
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return np.zeros(0, np.int64)
        return self._rows_of_known(np.sort(ids))

    def _rows_of_known(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of the given sorted ids that are in the store (unknown ids dropped)."""
        if self._ids is None:
            self._ids = np.asarray(self.snapshot.ids, np.int64)
            n = len(self._ids)
            self._ids_are_rows = bool(n == 0 or (self._ids[0] == 0 and self._ids[-1] == n - 1))
        if self._ids_are_rows:  # sorted unique ids 0..n-1: the id is the row
            return ids[(ids >= 0) & (ids < len(self._ids))]
        all_ids = self._ids
        pos = np.searchsorted(all_ids, ids)
        pos = np.minimum(pos, max(len(all_ids) - 1, 0))
        ok = np.asarray(all_ids[pos]) == ids if len(all_ids) else np.zeros(len(ids), bool)
        return pos[ok]

    def _tree_filters(self, flist, rows: np.ndarray) -> dict:
        """Evaluate filters that sit inside the tree for the given rows: {leaf id: bool array}."""
        if not flist or not len(rows):
            return {id(f): np.zeros(len(rows), bool) for f in flist}
        exprs, params = [], []
        for i, f in enumerate(flist):
            sql, p = compile_filter_expr(f, self.columns)
            exprs.append(f"{sql} AS f{i}")
            params.extend(p)
        ids = np.asarray(self.snapshot.ids[rows], np.int64)
        cur = self.snapshot.catalog()
        if len(rows) == len(self.snapshot.ids):
            q = f"SELECT id, {', '.join(exprs)} FROM images"
            res = cur.execute(q, params).fetchnumpy()
        else:
            q = f"SELECT id, {', '.join(exprs)} FROM images WHERE id IN (SELECT unnest(?::BIGINT[]))"
            res = cur.execute(q, params + [ids.tolist()]).fetchnumpy()
        rid = np.asarray(res["id"], np.int64)
        order = np.argsort(rid)
        rid = rid[order]
        pos = np.searchsorted(rid, ids)
        pos = np.minimum(pos, max(len(rid) - 1, 0))
        found = (rid[pos] == ids) if len(rid) else np.zeros(len(ids), bool)
        out = {}
        for i, f in enumerate(flist):
            col = np.asarray(res[f"f{i}"], bool)[order]
            out[id(f)] = np.where(found, col[pos] if len(col) else False, False)
        return out

    def _paths(self, ids: np.ndarray) -> list[str]:
        """Catalog paths of a page of ids, in order (one parameterised IN-list query)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        q = f"SELECT id, path FROM images WHERE id IN ({', '.join('?' * len(ids))})"
        got = dict(self.snapshot.catalog().execute(q, ids).fetchall())
        return [got.get(i, "") for i in ids]

    # -- candidates --
    def _ivf_layout(self):
        """(centroids (nlist, d), list sizes (nlist,)) of an IVF index, cached."""
        if self._ivf is None:
            import faiss

            ivf = faiss.extract_index_ivf(self.snapshot.index)
            cents = ivf.quantizer.reconstruct_n(0, ivf.nlist)
            sizes = np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.float64)
            self._ivf = (np.asarray(cents, np.float32), sizes)
        return self._ivf

    def _list_of_rows(self) -> np.ndarray:
        """IVF list of every row (int32), cached."""
        if self._row_list is None:
            import faiss

            ivf = faiss.extract_index_ivf(self.snapshot.index)
            out = np.full(len(self.snapshot.ids), -1, np.int32)
            for l in range(ivf.nlist):
                sz = ivf.invlists.list_size(l)
                if sz:
                    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(l), sz).copy()
                    out[self._rows_of_known(np.sort(ids))] = l
            self._row_list = out
        return self._row_list

    def _range_in_lists(self, vec: np.ndarray, thr: float, lists: np.ndarray):
        """(sorted ids, exact scores) of vectors scoring >= thr - 1e-5 inside the given IVF lists."""
        import faiss

        ivf = faiss.extract_index_ivf(self.snapshot.index)
        if not len(lists):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        q = np.ascontiguousarray(vec[None], np.float32)
        iq = np.ascontiguousarray(lists[None].astype(np.int64))
        dq = np.zeros(iq.shape, np.float32)  # coarse distances are unused by IVF-Flat scanning
        res = faiss.RangeSearchResult(1)
        params = faiss.SearchParametersIVF(nprobe=len(lists))  # per call: the shared index is not mutated
        ivf.range_search_preassigned_c(1, faiss.swig_ptr(q), float(thr) - 1e-5, faiss.swig_ptr(iq),
                                       faiss.swig_ptr(dq), res, False, params)
        nd = int(faiss.rev_swig_ptr(res.lims, 2)[1])
        ids = faiss.rev_swig_ptr(res.labels, nd).copy().astype(np.int64)
        D = faiss.rev_swig_ptr(res.distances, nd).copy().astype(np.float32)
        o = np.argsort(ids)
        return ids[o], D[o]

    def _start_nprobe(self, vec: np.ndarray, cal: Calibration, base: int) -> int:
        """Lists to probe so that ~98% of the concept's estimated positives are covered.

        A list's centroid is the mean of its vectors, so its score is the mean of their scores:
        ``f·m1 + (1-f)·m0`` with m1 the calibrated present mean, f the fraction present, and m0 the absent
        baseline (median centroid score; 3 robust sigmas of it are discounted as noise). Estimated positives
        per list = size·f; lists are probed in order of centroid score (as FAISS does); 25% margin.
        """
        groups = cal.groups()
        if groups is None or groups[2] <= groups[1]:
            return base
        present_mean = groups[2]
        cents, sizes = self._ivf_layout()
        # every centroid's score, in probe order (the centroids are cached; an HNSW coarse quantizer cannot
        # list all of its lists in order, so the scores are computed directly)
        cs = cents @ np.asarray(vec, np.float32)
        order = np.argsort(-cs, kind="stable")
        cs = cs[order]
        # most lists hold no positive: their centroid scores give the baseline and its noise
        med = float(np.median(cs))
        noise = 1.4826 * float(np.median(np.abs(cs - med)))
        f = np.clip((cs - med - 3 * noise) / max(present_mean - med, 1e-6), 0.0, 1.0)
        cum = np.cumsum(sizes[order] * f)
        if cum[-1] <= 0:
            return base
        need = int(np.searchsorted(cum, 0.98 * cum[-1])) + 1
        return int(max(base, min(len(sizes), np.ceil(need * 1.25))))

    def _range_candidates(self, vec: np.ndarray, cal: Calibration, expected: float):
        """(sorted ids, their scores, probed-list mask or None, plan) of a FAISS range search at the threshold."""
        index = self.snapshot.index
        info = dict(self.snapshot.manifest.get("index", {}))
        q = np.ascontiguousarray(vec[None], np.float32)
        radius = float(cal.threshold) - 1e-5  # FAISS IP range keeps score > radius; a hair lower, rescoring decides
        # quantised codes (IVF-PQ) score with an error: widen the radius by it (every candidate is rescored
        # exactly), and count only the ones the codes put above the threshold when judging the probe depth
        margin = float(info.get("score_error") or 0.0)
        if info.get("nprobe"):
            import faiss

            nlist = int(faiss.extract_index_ivf(index).nlist)
            nprobe = min(self._start_nprobe(q[0], cal, int(info["nprobe"])), nlist)
            start, tries, last = nprobe, 0, -1
            while True:
                # per-call parameters: the shared index is never mutated (safe for concurrent searches)
                lims, D, I = index.range_search(q, radius - margin, params=faiss.SearchParametersIVF(nprobe=nprobe))
                found = int(lims[1]) if not margin else int((D[: lims[1]] > radius).sum())
                tries += 1
                # stop at the calibrated expectation, at the full index, or when doubling stops paying off
                if (found >= 0.95 * expected or nprobe >= nlist or tries > MAX_RANGE_GROWTH
                        or (last >= 0 and found >= 0.5 * expected and found - last <= 0.02 * found)):
                    break
                last = found
                nprobe = min(2 * nprobe, nlist)
            plan = {"source": "faiss_range", "nprobe_start": int(start), "nprobe": int(nprobe), "tries": tries}
            if margin:
                plan["radius_margin"] = round(margin, 6)
            # the lists that search probed (the quantizer's top-nprobe, the same call FAISS makes)
            ivf = faiss.extract_index_ivf(index)
            _, probed_lists = ivf.quantizer.search(q, nprobe)
            probed = np.zeros(nlist, bool)
            probed[probed_lists[0][probed_lists[0] >= 0]] = True
        else:
            lims, D, I = index.range_search(q, radius)
            plan = {"source": "faiss_range"}
            probed = None  # exact index: every vector was compared
        ids = np.asarray(I[: lims[1]], np.int64)
        D = np.asarray(D[: lims[1]], np.float32)
        o = np.argsort(ids)  # each vector sits in one list: no duplicates
        plan["candidates"] = int(len(ids))
        return ids[o], D[o], probed, plan

    # -- search --
    def search(self, query, k: int = 20, offset: int = 0, explain: bool = False) -> SearchResult:
        """Answer a query: the ranked page of matching images.

        Args:
            query: the query language string, its JSON form (dict) or a tree.
            k: hits per page (1..MAX_K). offset: hits to skip (pagination).
            explain: attach per-concept score, threshold and pass/fail to every hit.
        Returns:
            A :class:`SearchResult` (``hits``, ``total``, ``took_ms``, ``query``, ``plan``).
        Raises:
            QuerySyntaxError: bad query syntax. UnknownChoice: unknown filter column, or a word the CLIP text
            tower does not know. InvalidInput: bad k/offset, or a filter value that does not fit its column.
        """
        t0 = time.perf_counter()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise InvalidInput(f"offset must be a non-negative integer, got {offset!r}")
        k, offset = int(k), int(offset)
        node = self.parse_query(query)
        for f in qa.filters(node):  # unknown columns / bad values fail before any work
            compile_filter_expr(f, self.columns)
        snap = self.snapshot
        n = len(snap.ids)
        plan: dict = {}

        def finish(rows, scores, ctx=None) -> SearchResult:
            total = len(rows)
            if total:
                ids = np.asarray(snap.ids[rows], np.int64)
                end = offset + k
                if total > 4 * end:  # rank only the head that the page needs
                    head = np.argpartition(-scores, end - 1)[:end]
                    cut = scores[head].min()
                    head = np.nonzero(scores >= cut)[0]  # keep ties at the cut for a stable id order
                    ranked = head[np.lexsort((ids[head], -scores[head]))]
                else:
                    ranked = np.lexsort((ids, -scores))
                all_ids = ids  # every match (row order)
                order = ranked[offset:end]
                page_ids = ids[order]
                meta = self._paths(page_ids)
            else:
                order, page_ids, meta, all_ids = [], [], [], np.zeros(0, np.int64)
            if explain and ctx is not None and len(order):
                T_, tindex_, leaves, cals = ctx
                prow = np.asarray(rows)[order]
                srt = np.argsort(prow)
                ex = np.empty((len(prow), T_.shape[0]), np.float32)
                ex[srt] = concept_scores(snap, T_, rows=prow[srt])  # exact scores of the page's hits
            hits = []
            for j, (i, m) in enumerate(zip(page_ids, meta)):
                expl = None
                if explain and ctx is not None:
                    expl = []
                    for leaf, pos in leaves:
                        c = cals[id(leaf)]
                        s = float(ex[j, tindex_[leaf.text]])
                        expl.append({"concept": leaf.text, "score": round(s, 6),
                                     "threshold": round(float(c.threshold), 6), "passed": bool(s >= c.threshold),
                                     "weight": leaf.weight, "negated": not pos,
                                     "margin": round((s - c.threshold) / c.scale, 4), "method": c.method})
                elif explain:
                    expl = []
                hits.append(Hit(int(i), m, float(scores[order[j]]), expl))
            plan["took_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            return SearchResult(hits, total, (time.perf_counter() - t0) * 1000, qa.to_json(node), k, offset, plan,
                                all_ids)

        empty = np.zeros(0, np.int64)
        if n == 0:
            plan["exit"] = "empty_store"
            return finish(empty, np.zeros(0))
        fpart, rest = qa.split(node)
        allowed = None
        if fpart is not None:
            allowed = self._prefilter_rows(fpart)
            plan["prefilter_rows"] = int(len(allowed))
            if not len(allowed):
                plan["exit"] = "prefilter_empty"
                return finish(empty, np.zeros(0))
        if rest is None:  # filters only: every allowed row matches, ranked by id
            plan["strategy"] = "filters_only"
            return finish(allowed, np.zeros(len(allowed)))

        leaves = _leaves(rest)
        cals = self.calibrations(rest)
        warnings = _calibration_warnings(leaves, cals)
        if warnings:
            plan["warnings"] = warnings
        texts = list(dict.fromkeys(c.text for c, _ in leaves))
        T = self.bank.vectors(texts)
        tindex = {t: i for i, t in enumerate(texts)}

        nec = _necessary_positive(rest)
        n_allowed = n if allowed is None else len(allowed)
        drivers, seen = [], set()
        for c in sorted(nec.values(), key=lambda c: (cals[id(c)].prevalence_at(cals[id(c)].threshold), c.text)):
            key = (c.text, cals[id(c)].threshold)
            expected = cals[id(c)].prevalence_at(cals[id(c)].threshold) * n
            if key not in seen and expected * 4 < n and len(drivers) < MAX_DRIVERS:
                seen.add(key)
                drivers.append((c, expected))
        itype = self.snapshot.manifest.get("index", {}).get("type")
        if drivers and n_allowed > self.exact_rows:
            # every necessary positive concept must pass, so each one's pass set contains the answer; the union
            # of their index candidates recovers answers that one partitioned (IVF) search alone may miss
            plan["strategy"] = "index_candidates"
            plan["drivers"] = []
            resolved = {}  # (text, threshold) -> (sorted ids, scores, probed lists or None)
            found = []
            for c, expected in drivers:
                dc = cals[id(c)]
                ids_c, d_c, probed, cplan = self._range_candidates(T[tindex[c.text]], dc, expected)
                plan["drivers"].append(dict(concept=c.text, threshold=round(dc.threshold, 6),
                                            expected=round(float(expected), 1), **cplan))
                resolved[(c.text, dc.threshold)] = (ids_c, d_c, probed)
                found.append(ids_c)
            plan["driver"] = plan["drivers"][0]
            plan["nprobe"] = max((d.get("nprobe") or 0) for d in plan["drivers"]) or None
            if len(found) == 1:
                cand_ids = found[0]
            else:
                cand_ids = np.sort(np.concatenate(found))
                cand_ids = cand_ids[np.r_[True, cand_ids[1:] != cand_ids[:-1]]] if len(cand_ids) else cand_ids
            plan["candidates"] = int(len(cand_ids))
            if not len(cand_ids) or any(not len(f) and r[2] is None for f, r in zip(found, resolved.values())):
                plan["exit"] = "no_candidates"
                return finish(empty, np.zeros(0))
            rows = self._rows_of_known(cand_ids)
            if allowed is not None:
                rows = rows[np.isin(rows, allowed, assume_unique=True)]
                if not len(rows):
                    plan["exit"] = "no_candidates"
                    return finish(empty, np.zeros(0))
            m = len(rows)
            # Scores the index search already settled exactly (flat / IVF-Flat store raw vectors): a candidate in
            # a concept's range result has its exact score; one in a list that search probed but not in the
            # result is below the threshold. Other selective concepts (e.g. NOT terms) are range-searched too.
            exact_index = itype in ("flat", "ivf_flat")
            lscores = np.full((m, len(leaves)), np.nan, np.float32)
            if exact_index:
                cids = np.asarray(snap.ids[rows], np.int64) if not self._ids_are_rows else rows
                if itype == "ivf_flat":
                    lists = self._list_of_rows()[rows]
                    needed = np.zeros(len(self._ivf_layout()[1]), bool)
                    needed[lists[lists >= 0]] = True
                    # settle every concept on every candidate: scan the candidates' lists (contiguous, exact)
                    # instead of gathering candidate rows from the memory-mapped vectors
                    for leaf, _ in leaves:
                        c = cals[id(leaf)]
                        key = (leaf.text, c.threshold)
                        ids_c, d_c, probed = resolved.get(key, (np.zeros(0, np.int64), np.zeros(0, np.float32),
                                                                np.zeros_like(needed)))
                        todo = np.nonzero(needed & ~probed)[0]
                        if len(todo):
                            more_i, more_d = self._range_in_lists(T[tindex[leaf.text]], c.threshold, todo)
                            ids_c, d_c = np.concatenate([ids_c, more_i]), np.concatenate([d_c, more_d])
                            o = np.argsort(ids_c, kind="stable")
                            ids_c, d_c = ids_c[o], d_c[o]
                            probed = probed | needed
                        resolved[key] = (ids_c, d_c, probed)
                else:
                    lists = None
                    for leaf, _ in leaves:
                        c = cals[id(leaf)]
                        key = (leaf.text, c.threshold)
                        if key not in resolved:
                            ids_c, d_c, probed, _ = self._range_candidates(T[tindex[leaf.text]], c, 0)
                            resolved[key] = (ids_c, d_c, probed)
                for li, (leaf, _) in enumerate(leaves):
                    key = (leaf.text, cals[id(leaf)].threshold)
                    ids_c, d_c, probed = resolved[key]
                    col = lscores[:, li]
                    if probed is None:
                        col[:] = -1.0
                    else:
                        col[probed[lists]] = -1.0  # below threshold (exact value not needed)
                    if len(ids_c):
                        pos = np.minimum(np.searchsorted(ids_c, cids), len(ids_c) - 1)
                        hit = ids_c[pos] == cids
                        col[hit] = d_c[pos[hit]]
            unknown = np.isnan(lscores).any(1)
            plan["rescored"] = int(unknown.sum())
            if unknown.any():
                S = concept_scores(snap, T, rows=rows[unknown])
                for li, (leaf, _) in enumerate(leaves):
                    lscores[unknown, li] = S[:, tindex[leaf.text]]
        else:
            plan["strategy"] = "exact_scan"
            rows = allowed
            S = concept_scores(snap, T, rows=rows)  # (m, k) exact scores
            m = len(S)
            plan["rescored"] = int(m)
            lscores = np.empty((m, len(leaves)), np.float32)
            for li, (leaf, _) in enumerate(leaves):
                lscores[:, li] = S[:, tindex[leaf.text]]
        passed = {id(leaf): lscores[:, li] >= cals[id(leaf)].threshold for li, (leaf, _) in enumerate(leaves)}
        flist = qa.filters(rest)
        if rows is None:
            rows_arr = np.arange(n, dtype=np.int64)
        else:
            rows_arr = rows
        fpass = self._tree_filters(flist, rows_arr) if flist else {}
        match = evaluate_tree(rest, lambda c: passed[id(c)], lambda f: fpass[id(f)], m)
        sel = np.nonzero(match)[0]
        if not len(sel):
            plan["exit"] = "no_match"
            return finish(empty, np.zeros(0))
        # ranking
        num = np.zeros(len(sel))
        den = np.zeros(len(sel))
        nnum = np.zeros(len(sel))
        nden = np.zeros(len(sel))
        for li, (leaf, pos) in enumerate(leaves):
            c = cals[id(leaf)]
            margin = (lscores[sel, li].astype(np.float64) - c.threshold) / c.scale
            ok = passed[id(leaf)][sel]
            if pos:
                num += np.where(ok, leaf.weight * margin, 0.0)
                den += np.where(ok, leaf.weight, 0.0)
            else:
                nnum += np.where(~ok, leaf.weight * -margin, 0.0)
                nden += np.where(~ok, leaf.weight, 0.0)
        score = np.where(den > 0, num / np.maximum(den, 1e-12), np.where(nden > 0, nnum / np.maximum(nden, 1e-12), 0.0))
        return finish(rows_arr[sel], score, (T, tindex, leaves, cals))

    def reference_answer(self, query) -> np.ndarray:
        """Brute-force answer (sorted catalog ids): every concept scored on every row, the tree evaluated
        over all rows with the same thresholds, filters evaluated in DuckDB. For tests and benchmarks."""
        node = self.parse_query(query)
        n = len(self.snapshot.ids)
        leaves = qa.concepts(node)
        cals = self.calibrations(node) if leaves else {}
        texts = list(dict.fromkeys(c.text for c in leaves))
        S = concept_scores(self.snapshot, self.bank.vectors(texts)) if texts else np.zeros((n, 0), np.float32)
        ti = {t: i for i, t in enumerate(texts)}
        flist = qa.filters(node)
        fpass = self._tree_filters(flist, np.arange(n, dtype=np.int64)) if flist else {}
        match = evaluate_tree(node, lambda c: S[:, ti[c.text]] >= cals[id(c)].threshold, lambda f: fpass[id(f)], n)
        return np.asarray(self.snapshot.ids, np.int64)[match]
