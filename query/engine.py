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
     still growing (each doubling scans only the lists the shallower tries did not). With no selective
     necessary positive concept (only-negative or OR-of-concepts queries), or at most ``exact_rows``
     allowed rows, every allowed row is scored exactly instead (vectorised, blockwise). No candidate:
     early exit.
  5. IVF with several drivers: each driver's search is first extended to every candidate's list, and the
     candidates outside any driver's result are dropped (they fail a necessary positive; the union of two
     drivers' results is mostly such rows). Then every concept is settled on every candidate (positions found
     through ``t2c.query.rowmap``): flat / IVF-Flat indices keep raw vectors, so the range
     results already carry exact scores; for IVF-Flat the candidates' lists are scanned for every other
     concept (range searches restricted to those lists, ``t2c.data.ivf_scan``: contiguous and exact, no random
     gathers from the memmap; the same for IVF-PQ's plain and fast-scan codes).
     IVF-PQ: the same searches and list scans over the codes, at a radius widened by the codes' error, give
     code scores; a concept is settled where its code score lies outside a band around the threshold
     (``SETTLE_BAND`` × the index's measured ``score_error``; wider below, where the codes under-score
     concepts that are rare in a vector's list), and a driver proposes as candidates only the rows its
     codes put over threshold - score_error. Filters that sit inside the tree are evaluated per candidate
     in DuckDB. A three-valued evaluation of the tree finds the candidates whose answer still depends on an
     unsettled concept; only those are rescored exactly, from the memory-mapped vectors (only the pages
     their rows sit on, requested at once: ``Snapshot.read_rows``). The tree is evaluated over the arrays.
     Compositional concepts calibrated with binding ("bound", ``t2c.query.binding``) are judged against
     their rivals on the rows their threshold passes, and an AND node that needs two or more of them holds
     only where one reading of the image's words holds them all (``_joint_check``; ``plan["joint_readings"]``).
  6. Ranking score (``score`` of a hit), with margin_i = (score_i - threshold_i) / scale_i, scale_i the
     spread of concept i's "absent" scores from calibration:
        weighted mean of margin_i over the positive-polarity concepts (under an even number of NOTs) that
        passed, weights from the query (``2*"sunset"``); when none passed (only-negative queries), the
        weighted mean of -margin_i over the negative-polarity concepts (how clearly they are absent).
     Ties break by ascending id. Pagination: ``hits = ranked[offset : offset + k]``; ``total`` counts all
     matches. IVF-PQ: matches ranked on code scores that could reach the page are rescored first (the page,
     then those within score_error / scale of its exact cut), so a page's hits and scores are exact.
  7. ``explain=True`` adds per hit, per concept leaf: concept, score, threshold, passed, weight, negated,
     margin, method.
Example leaves (``like:ID``, ``like:"file"``) are scored leaves like concepts: their vectors come from the
``ExampleBank`` (``t2c.query.examples``) instead of the text tower, and everything above applies to them.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.data.store import quantizer_params
from t2c.query import ast as qa
from t2c.query.calibrate import Calibration, concept_scores, thresholds_for
from t2c.query.lru import LRUCache
from t2c.query.rowmap import RowPositions
from t2c.query.sql import compile_filter, compile_filter_expr

__all__ = ["Engine", "SearchResult", "Hit", "evaluate_tree", "MAX_K"]

MAX_K = 10_000
EXACT_ROWS = 2_000  # score allowed rows exactly (no index) when there are at most this many
MAX_RANGE_GROWTH = 6  # nprobe doublings for IVF range search
MAX_DRIVERS = 3  # necessary positive concepts whose index candidates are united
# IVF-PQ: a code score settles a leaf when it lies more than (below, above) score_errors under / over the threshold.
# Below is wider: 64-byte codes cannot encode a concept that is rare in a vector's IVF list, so they under-score
# such a present concept by up to ~5 score_errors (4.7 seen on 1M x 512 synthetic vectors, bench/query_latency.py),
# and the images that match rare combinations of concepts are exactly those: at 3 the bench's 60 queries lost 1 match
# of 6 in one query that rescoring every candidate finds, at 4 none. Over-scoring has a lighter tail (score_error is
# its 99th percentile): twice it keeps false passes out (tests/test_engine.py).
SETTLE_BAND = (4.0, 2.0)


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

    @property
    def estimate(self) -> dict | None:
        """Estimated precision and recall of the answer and of each concept (``t2c.query.estimate``), or None."""
        return self.plan.get("estimate")

    def to_dict(self) -> dict:
        return {"query": self.query, "total": int(self.total), "k": self.k, "offset": self.offset,
                "estimate": self.estimate,
                "took_ms": round(float(self.took_ms), 3), "plan": self.plan,
                "hits": [h.to_dict() for h in self.hits]}


def _calibration_warnings(leaves, cals) -> list[str]:
    """One note per positive concept whose threshold came from a fallback (one population, or the model's cut)."""
    out = []
    for leaf, positive in leaves:
        c = cals[id(leaf)]
        if positive and c.method == "tail_search" and leaf.threshold is None and leaf.kind == "example":
            msg = (f"'{leaf.text}': the collection's similarities to this example show no separate group of close "
                   f"images, so its threshold ({c.threshold:.3f}, median + 1 robust sigma) keeps the closest "
                   f"{c.prevalence_at(c.threshold):.0%}; narrow it with '{leaf.text}@0.NN'")
        elif positive and c.method == "tail_search" and leaf.threshold is None:
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
class _NecessaryPositive(qa.Visitor):
    """Scored leaves (keyed by id) that must pass for a node, under a polarity, to hold."""

    def visit_scored(self, node, positive: bool) -> dict:
        return {id(node): node} if positive else {}

    def visit_filter(self, node, positive: bool) -> dict:
        return {}

    def visit_not(self, node, positive: bool) -> dict:
        return self.visit(node.child, not positive)

    def visit_bool(self, node, positive: bool) -> dict:
        kids = [self.visit(c, positive) for c in node.children]
        if isinstance(node, qa.And) == positive:  # conjunctive: every child's necessary leaves
            out: dict = {}
            for k in kids:
                out.update(k)
            return out
        # disjunction: a leaf is necessary only if every branch needs the same (equal) leaf
        return {key: c for key, c in kids[0].items() if all(any(c == o for o in k.values()) for k in kids[1:])}


def _necessary_positive(node, positive: bool = True) -> dict:
    """Scored leaves (keyed by id) that must pass for ``node`` (with polarity) to hold."""
    return _NecessaryPositive().visit(node, positive)


class _TreeEvaluator(qa.Visitor):
    """Boolean array over n items of a tree, from per-leaf pass arrays."""

    def __init__(self, concept_pass, filter_pass, n: int, and_check=None):
        self.concept_pass, self.filter_pass, self.n, self.and_check = concept_pass, filter_pass, n, and_check

    def visit_scored(self, node) -> np.ndarray:
        return self.concept_pass(node)

    def visit_filter(self, node) -> np.ndarray:
        return self.filter_pass(node)

    def visit_not(self, node) -> np.ndarray:
        return ~self.visit(node.child)

    def visit_and(self, node) -> np.ndarray:
        out = np.ones(self.n, bool)
        for c in node.children:
            out &= self.visit(c)
            if not out.any():
                return out
        return out if self.and_check is None else self.and_check(node, out)

    def visit_or(self, node) -> np.ndarray:
        out = np.zeros(self.n, bool)
        for c in node.children:
            out |= self.visit(c)
        return out


class _Kleene(qa.Visitor):
    """Three-valued evaluation: (surely holds, possibly holds) bool arrays of a tree, from the same pair per
    leaf. Where the two agree the tree's value is settled whatever the unknown leaves turn out to be."""

    def __init__(self, leaf_state, filter_pass):
        self.leaf_state, self.filter_pass = leaf_state, filter_pass

    def visit_scored(self, node):
        return self.leaf_state(node)

    def visit_filter(self, node):
        f = self.filter_pass(node)
        return f, f

    def visit_not(self, node):
        must, may = self.visit(node.child)
        return ~may, ~must

    def visit_bool(self, node):
        kids = [self.visit(c) for c in node.children]
        join = np.logical_and if isinstance(node, qa.And) else np.logical_or
        return join.reduce([m for m, _ in kids]), join.reduce([m for _, m in kids])


def evaluate_tree(node, concept_pass, filter_pass, n: int, and_check=None) -> np.ndarray:
    """Evaluate the tree over n items; ``concept_pass(leaf)`` (any scored leaf) / ``filter_pass(leaf)`` give
    bool arrays. ``and_check(node, holds)``, when given, may clear items of an AND node that holds (the
    engine's joint reading of compositional concepts)."""
    return _TreeEvaluator(concept_pass, filter_pass, n, and_check).visit(node)


class _BankOf(qa.Visitor):
    """The bank that embeds a scored leaf: the engine's concept bank or its example bank."""

    def __init__(self, engine):
        self.engine = engine

    def visit_concept(self, leaf):
        return self.engine.bank

    def visit_example(self, leaf):
        return self.engine.examples


def _word_thresholds(cals: dict, keys) -> dict:
    """The word thresholds of the bound leaves ``keys`` (id(leaf)), merged (one snapshot: equal where shared)."""
    out: dict = {}
    for key in keys:
        out.update(cals[key].params["word_thresholds"])
    return out


def _leaves(node):
    """Scored leaves with polarity (True: under an even number of NOTs), left to right."""
    return qa.scored_with_polarity(node)


def _page_order(ids: np.ndarray, scores: np.ndarray, offset: int, end: int) -> np.ndarray:
    """Positions of the page ``[offset:end]`` of matches ranked by score (descending), ties by ascending id."""
    total = len(ids)
    if not total:
        return np.zeros(0, np.int64)
    if total > 4 * end:  # rank only the head that the page needs
        head = np.argpartition(-scores, end - 1)[:end]
        cut = scores[head].min()
        head = np.nonzero(scores >= cut)[0]  # keep ties at the cut for a stable id order
        ranked = head[np.lexsort((ids[head], -scores[head]))]
    else:
        ranked = np.lexsort((ids, -scores))
    return ranked[offset:end]


@dataclass
class _Search:
    """State of one search as it moves through the steps of ``Engine.search``."""

    node: object  # the whole query tree
    k: int
    offset: int
    explain: bool
    t0: float  # perf_counter at the start
    plan: dict = field(default_factory=dict)  # what was done (returned with the answer)
    rest: object = None  # the tree without its pure-filter conjuncts
    allowed: np.ndarray | None = None  # rows passing the prefilter (None: no prefilter)
    leaves: list = field(default_factory=list)  # (scored leaf, positive)
    cals: dict = field(default_factory=dict)  # id(leaf) -> Calibration
    T: np.ndarray | None = None  # the leaves' vectors, one row per distinct text
    tindex: dict = field(default_factory=dict)  # leaf key (kind, text) -> row of T
    resolved: dict = field(default_factory=dict)  # (key, threshold) -> (ids, scores, probed lists)
    drivers: list = field(default_factory=list)  # the leaves whose range searches proposed the candidates
    rows: np.ndarray | None = None  # candidate rows
    lscores: np.ndarray | None = None  # (len(rows), len(leaves)) scores; NaN: not known yet
    sure: np.ndarray | None = None  # (len(rows), len(leaves)) bool: the leaf's pass/fail there is certain
    approx: np.ndarray | None = None  # (len(rows), len(leaves)) bool: lscores holds a code's score (IVF-PQ)
    band: float = 0.0  # IVF-PQ: how far under its threshold a code score may hide a pass (0: scores are exact)
    band_above: float = 0.0  # IVF-PQ: how far over its threshold a code score may hide a fail
    passed: dict = field(default_factory=dict)  # id(leaf) -> bool array over rows
    fpass: dict | None = None  # id(filter leaf) -> bool array over rows (filters inside the tree)
    bound: dict = field(default_factory=dict)  # id(bound leaf) -> (2, len(rows)): binding margin, reading share
    half: np.ndarray | None = None  # (len(rows),) bool: lscores were rescored from the float16 copy (IVF-PQ)


# How far a score read from the float16 copy of a vector may lie from the float32 one, per unit of the concept
# vector's norm: each stored component is rounded to float16 (relative error <= 2**-11), so for a unit vector the
# inner product moves by at most 2**-11 * sum|t_i x_i| <= 2**-11 * |t| (Cauchy-Schwarz); plus subnormal rounding
# and float32 accumulation (under 1e-4 at d = 512 together).
F16_SCORE_ERROR = 2.0 ** -11 + 1e-4

# ------------------------------------------------------------------------------------------------ engine
class Engine:
    """Runs queries against one store snapshot.

    Args:
        snapshot: an open :class:`t2c.data.store.Snapshot`.
        bank: a ConceptBank (default: ``concept_bank_for(snapshot)``, built lazily: torch is imported only
            when a concept vector is not cached).
        settle_band: IVF-PQ stores: (below, above): a leaf is settled by its code score when that score lies
            more than ``below`` × the index's measured ``score_error`` under the threshold (failed; range
            searches are widened by as much) or more than ``above`` × ``score_error`` over it (passed); only
            candidates whose answer still depends on an unsettled leaf, and matches that could reach the page,
            are rescored exactly. None: rescore every candidate exactly (range searches widened by
            ``score_error``).

    Example:
        >>> eng = Engine.for_store("photos.t2c")  # doctest: +SKIP
        >>> res = eng.search('red circle AND NOT square AND width>=32', k=10, explain=True)  # doctest: +SKIP
        >>> [(h.id, h.path, h.score) for h in res.hits]  # doctest: +SKIP
    """

    def __init__(self, snapshot, bank=None, *, exact_rows: int = EXACT_ROWS, examples=None, binding: bool = True,
                 settle_band: tuple[float, float] | None = SETTLE_BAND):
        self.snapshot = snapshot
        self.exact_rows = int(exact_rows)
        if settle_band is not None:
            try:
                below, above = (float(x) for x in settle_band)
            except (TypeError, ValueError):
                below = above = float("nan")
            if not (below >= 0 and above >= 0):
                raise InvalidInput(f"settle_band must be None or two numbers >= 0 (below, above), got {settle_band!r}")
            settle_band = (below, above)
        self.settle_band = settle_band
        self.binding = bool(binding)
        self._bank = bank
        self._examples = examples
        self._columns: dict | None = None
        self._ivf = None
        self._row_list = None
        self._lscan = None  # ListScanner over the IVF index, made on first use
        self._nprobe_cache = LRUCache(4096)  # (vector bytes, present mean, base) -> starting probe depth
        self._rowpos: RowPositions | None = None
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
        if isinstance(query, qa.Node):
            return query
        raise InvalidInput(f"query must be a string, a JSON object or a query tree, got {type(query).__name__}")

    # -- thresholds --
    @property
    def examples(self):
        """The ExampleBank for ``like:`` leaves (built on first use)."""
        if self._examples is None:
            from t2c.query.examples import ExampleBank

            self._examples = ExampleBank(self.snapshot)
        return self._examples

    def bank_of(self, leaf):
        """Where a scored leaf's vector comes from: the concept bank (text tower) or the example bank."""
        return _BankOf(self).visit(leaf)

    def _by_bank(self, leaves) -> list:
        """[(kind, bank, [distinct texts])] of scored leaves, grouped by kind (each kind has one bank)."""
        groups: dict = {}
        for c in leaves:
            groups.setdefault(c.kind, (c.kind, self.bank_of(c), {}))[2][c.text] = None
        return [(kind, bank, list(texts)) for kind, bank, texts in groups.values()]

    def leaf_vectors(self, leaves) -> tuple[np.ndarray, dict]:
        """(vectors, {leaf key: row}) of the distinct scored leaves."""
        parts, index = [], {}
        for kind, bank, texts in self._by_bank(leaves):
            parts.append(np.asarray(bank.vectors(texts), np.float32))
            for t in texts:
                index[(kind, t)] = len(index)
        return np.concatenate(parts), index

    def calibrations(self, node) -> dict:
        """Calibration per scored leaf (by leaf identity), overrides applied."""
        leaves = qa.scored(node)
        cal = {kind: thresholds_for(self.snapshot, texts, bank=bank, binding=self.binding and kind == "concept")
               for kind, bank, texts in self._by_bank(leaves)}
        out = {}
        for c in leaves:
            base = cal[c.kind][c.text]
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

    def _load_ids(self) -> None:
        """The store's sorted ids, read once; notes whether they are 0..n-1 (the id is the row)."""
        if self._ids is None:
            self._ids = np.asarray(self.snapshot.ids, np.int64)
            n = len(self._ids)
            self._ids_are_rows = bool(n == 0 or (self._ids[0] == 0 and self._ids[-1] == n - 1))

    def _rows_of_known(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of the given sorted ids that are in the store (unknown ids dropped)."""
        self._load_ids()
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

    def _paths(self, ids: np.ndarray, rows: np.ndarray | None = None) -> list[str]:
        """Catalog paths of a page of ids (at ``rows``), in order: read by row from the snapshot's path file, or
        for snapshots without one, one catalog query (a scan: 5-29 ms for 20 ids of a 10M-row catalog)."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        if rows is not None:
            got = self.snapshot.paths_of_rows(rows)
            if got is not None:
                return got
        # the ids as a joined list, not a literal IN list: the catalog has no key index on id, and for 20 random ids
        # of a 1M-row catalog the IN list took 26-29 ms, the join 3 ms (row groups pruned by id either way)
        q = "SELECT id, path FROM images WHERE id IN (SELECT unnest(?::BIGINT[]))"
        got = dict(self.snapshot.catalog().execute(q, [ids]).fetchall())
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

    def _range_in_lists(self, vec: np.ndarray, radius: float, lists: np.ndarray):
        """(ids, scores) of vectors scoring > radius inside the given IVF lists, list by list (exact scores for
        IVF-Flat, the codes' scores for IVF-PQ; ``t2c.data.ivf_scan``: plain and fast-scan codes alike)."""
        if self._lscan is None:
            from t2c.data.ivf_scan import ListScanner

            self._lscan = ListScanner(self.snapshot.index, self._ivf_layout()[0])
        return self._lscan.range_in_lists(vec, radius, lists)

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
        key = (np.asarray(vec, np.float32).tobytes(), float(present_mean), int(base))
        got = self._nprobe_cache.get(key)
        if got is None:  # a concept's depth depends on its vector and calibration alone: computed once
            got = self._nprobe_cache.setdefault(key, self._estimate_nprobe(vec, present_mean, base))
        return got

    def _estimate_nprobe(self, vec: np.ndarray, present_mean: float, base: int) -> int:
        """``_start_nprobe``'s estimate, from every centroid's score."""
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
        """(ids, their scores, probed-list mask or None, plan) of a FAISS range search at the threshold."""
        index = self.snapshot.index
        info = dict(self.snapshot.manifest.get("index", {}))
        q = np.ascontiguousarray(vec[None], np.float32)
        radius = float(cal.threshold) - 1e-5  # FAISS IP range keeps score > radius; a hair lower, rescoring decides
        if not info.get("nprobe"):
            lims, D, I = index.range_search(q, radius)
            ids = np.asarray(I[: lims[1]], np.int64)
            # exact index: every vector was compared (no probed-list mask)
            return ids, np.asarray(D[: lims[1]], np.float32), None, {"source": "faiss_range",
                                                                        "candidates": int(len(ids))}
        import faiss

        # quantised codes (IVF-PQ) score with an error: widen the radius by it (candidates near the threshold
        # are rescored exactly), and count only the ones the codes put above the threshold when judging the
        # probe depth
        margin = self._band()
        ivf = faiss.extract_index_ivf(index)
        nlist = int(ivf.nlist)
        nprobe = min(self._start_nprobe(q[0], cal, int(info["nprobe"])), nlist)
        start, tries, last, found = nprobe, 0, -1, 0
        probed = np.zeros(nlist, bool)
        got_i, got_d = [], []
        while True:
            # the quantizer's top-nprobe lists (the call FAISS itself makes; per-call parameters, so the shared
            # index is never mutated), of which only those an earlier, shallower try did not scan
            qp = quantizer_params(index, nprobe)
            _, top = ivf.quantizer.search(q, nprobe, **({"params": qp} if qp is not None else {}))
            top = top[0][top[0] >= 0]
            new = top[~probed[top]]
            probed[new] = True
            more_i, more_d = self._range_in_lists(q[0], radius - margin, new)
            got_i.append(more_i)
            got_d.append(more_d)
            found += int(len(more_d)) if not margin else int((more_d > radius).sum())
            tries += 1
            # stop at the calibrated expectation, at the full index, or when doubling stops paying off
            if (found >= 0.95 * expected or nprobe >= nlist or tries > MAX_RANGE_GROWTH
                    or (last >= 0 and found >= 0.5 * expected and found - last <= 0.02 * found)):
                break
            last = found
            nprobe = min(2 * nprobe, nlist)
        ids, D = np.concatenate(got_i), np.concatenate(got_d)  # each vector sits in one list: no duplicates
        plan = {"source": "faiss_range", "nprobe_start": int(start), "nprobe": int(nprobe), "tries": tries,
                "candidates": int(len(ids))}
        if margin:
            plan["radius_margin"] = round(margin, 6)
        return ids, D, probed, plan

    def _settles(self) -> bool:
        """Whether leaves are settled by IVF-PQ code scores: a quantised index with a measured score_error
        (stores built before it was recorded rescore every candidate) and ``settle_band`` not None."""
        info = self.snapshot.manifest.get("index", {})
        return (info.get("type") == "ivf_pq" and self.settle_band is not None
                and float(info.get("score_error") or 0.0) > 0)

    def _band(self, side: int = 0) -> float:
        """How far under (side 0) / over (side 1) its threshold an IVF-PQ code score may hide a pass / a fail
        (``score_error`` × ``settle_band[side]``; 0 for indices that keep raw vectors)."""
        info = self.snapshot.manifest.get("index", {})
        if info.get("type") != "ivf_pq":
            return 0.0
        err = float(info.get("score_error") or 0.0)
        return err * self.settle_band[side] if self._settles() else err

    # -- search --
    def search(self, query, k: int = 20, offset: int = 0, explain: bool = False) -> SearchResult:
        """Answer a query: the ranked page of matching images.

        The steps (see the module docstring) are one method each over a :class:`_Search` state: ``_begin``,
        ``_prefilter``, ``_thresholds``, ``_drivers``, ``_index_candidates`` / ``_exact_scan``,
        ``_settle_from_index``, ``_rescore_unknown``, ``_match``, ``_rank`` and ``_finish``.

        Args:
            query: the query language string, its JSON form (dict) or a tree.
            k: hits per page (1..MAX_K). offset: hits to skip (pagination).
            explain: attach per-concept score, threshold and pass/fail to every hit.
        Returns:
            A :class:`SearchResult` (``hits``, ``total``, ``took_ms``, ``query``, ``plan``).
        Raises:
            QuerySyntaxError: bad query syntax. UnknownChoice: unknown filter column, or a word the CLIP text
            tower does not know. InvalidInput: bad k/offset, or a filter value that does not fit its column.
            NotFound: a ``like:ID`` not in the store. ImageDecodeError: a ``like:"file"`` that cannot be read
            (its ``reason`` as indexing records it).
        """
        st = self._begin(query, k, offset, explain)
        rows, scores = self._answer(st)
        return self._finish(st, rows, scores)

    def _begin(self, query, k, offset, explain: bool) -> _Search:
        """Step 1: check the page, parse the query and check every filter column (before any work)."""
        t0 = time.perf_counter()
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be an integer in 1..{MAX_K}, got {k!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise InvalidInput(f"offset must be a non-negative integer, got {offset!r}")
        node = self.parse_query(query)
        for f in qa.filters(node):  # unknown columns / bad values fail before any work
            compile_filter_expr(f, self.columns)
        return _Search(node=node, k=int(k), offset=int(offset), explain=bool(explain), t0=t0)

    def _answer(self, st: _Search) -> tuple[np.ndarray, np.ndarray]:
        """Steps 2-6: the matching rows and their ranking scores (empty, with ``plan['exit']``, on an early exit)."""
        empty = (np.zeros(0, np.int64), np.zeros(0))
        n = len(self.snapshot.ids)
        if n == 0:
            st.plan["exit"] = "empty_store"
            return empty
        if not self._prefilter(st):
            st.plan["exit"] = "prefilter_empty"
            return empty
        if st.rest is None:  # filters only: every allowed row matches, ranked by id
            st.plan["strategy"] = "filters_only"
            return st.allowed, np.zeros(len(st.allowed))
        self._thresholds(st)
        drivers = self._drivers(st)
        n_allowed = n if st.allowed is None else len(st.allowed)
        if drivers and n_allowed > self.exact_rows:
            if not self._index_candidates(st, drivers):
                st.plan["exit"] = "no_candidates"
                return empty
            self._settle_from_index(st)
            self._rescore_unknown(st)
        else:
            self._exact_scan(st)
        sel = self._match(st)
        scores = self._rank(st, sel) if len(sel) else np.zeros(0)
        inexact = [m for m in (st.approx, st.half) if m is not None]  # code scores, float16 scores
        if len(sel) and any(m[sel].any() for m in inexact):
            sel, scores = self._exact_page(st, sel, scores)
        st.plan["estimate"] = self._estimate(st, sel)
        if not len(sel):
            st.plan["exit"] = "no_match"
            return empty
        return st.rows[sel], scores

    def _prefilter(self, st: _Search) -> bool:
        """Step 2: split off the pure-filter conjuncts and run them as a WHERE prefilter; False when none passes."""
        fpart, st.rest = qa.split(st.node)
        if fpart is None:
            return True
        st.allowed = self._prefilter_rows(fpart)
        st.plan["prefilter_rows"] = int(len(st.allowed))
        return bool(len(st.allowed))

    def _thresholds(self, st: _Search) -> None:
        """Step 3: the scored leaves with polarity, their calibrations (warnings noted) and their vectors."""
        st.leaves = _leaves(st.rest)
        st.cals = self.calibrations(st.rest)
        warnings = _calibration_warnings(st.leaves, st.cals) + self._weights_warnings
        if warnings:
            st.plan["warnings"] = warnings
        st.T, st.tindex = self.leaf_vectors([c for c, _ in st.leaves])
        if any(self.bank_of(c) is self.bank for c, _ in st.leaves) and getattr(self.bank, "centre", None) is not None:
            st.plan["centred_on"] = len(self.bank.reference_words())  # scores: cosine less the reference mean

    @functools.cached_property
    def _weights_warnings(self) -> list[str]:
        """A warning when the CLIP weights this install ships differ from those the store was indexed with
        (the manifest's ``weights`` digests): its image vectors no longer match the text vectors. Checked once
        per engine (one snapshot)."""
        from t2c.indexer.encoders import shipped_weights_digest

        was = (self.snapshot.manifest.get("weights") or {}).get("clip")
        now = shipped_weights_digest(self.snapshot.clip) if was else None
        if not was or not now or was == now:
            return []
        return [f"this store was indexed with other {self.snapshot.clip} weights (sha {was}) than this install "
                f"ships (sha {now}): its images and the concepts' text vectors no longer match; index it again"]

    def _drivers(self, st: _Search) -> list:
        """Step 4a: selective necessary positive leaves (up to MAX_DRIVERS, most selective first), with the
        number of matches calibration expects for each."""
        n = len(self.snapshot.ids)
        cals = st.cals
        drivers, seen = [], set()
        for c in sorted(_necessary_positive(st.rest).values(),
                        key=lambda c: (cals[id(c)].prevalence_at(cals[id(c)].threshold), c.text)):
            key = (c.key, cals[id(c)].threshold)
            expected = cals[id(c)].prevalence_at(cals[id(c)].threshold) * n
            if key not in seen and expected * 4 < n and len(drivers) < MAX_DRIVERS:
                seen.add(key)
                drivers.append((c, expected))
        return drivers

    def _index_candidates(self, st: _Search, drivers) -> bool:
        """Step 4b: a FAISS range search per driver; the candidates are the union of their results within the
        allowed rows (every answer passes every driver). False when no candidate is left."""
        plan = st.plan
        plan["strategy"] = "index_candidates"
        plan["drivers"] = []
        found = []
        # IVF-PQ: a driver proposes the rows its codes put over threshold - score_error; the rest of its (wider)
        # range result only settles the leaf on rows another driver proposes (see SETTLE_BAND)
        propose = float(self.snapshot.manifest["index"]["score_error"]) if self._settles() else None
        st.drivers = [c for c, _ in drivers]
        for c, expected in drivers:
            dc = st.cals[id(c)]
            ids_c, d_c, probed, cplan = self._range_candidates(st.T[st.tindex[c.key]], dc, expected)
            st.resolved[(c.key, dc.threshold)] = (ids_c, d_c, probed)
            if propose is not None:
                ids_c = ids_c[d_c > float(dc.threshold) - 1e-5 - propose]
                cplan["candidates"] = int(len(ids_c))
            plan["drivers"].append(dict(concept=c.text, threshold=round(dc.threshold, 6),
                                        expected=round(float(expected), 1), **cplan))
            found.append(ids_c)
        plan["driver"] = plan["drivers"][0]
        plan["nprobe"] = max((d.get("nprobe") or 0) for d in plan["drivers"]) or None
        # an exact (non-IVF) driver with no result proves there is no answer
        if any(not len(f) and r[2] is None for f, r in zip(found, st.resolved.values())):
            plan["candidates"] = 0
            return False
        rows = self._union_rows([self._hit_rows(f) for f in found])
        plan["candidates"] = int(len(rows))
        rows = rows[rows >= 0]  # ids the store does not hold
        if st.allowed is not None:
            rows = rows[np.isin(rows, st.allowed, assume_unique=True)]
        if len(st.drivers) > 1 and len(rows) and self._index_is_ivf():
            if self._settles():
                st.band, st.band_above = self._band(0), self._band(1)
            rows = self._drop_driver_fails(st, rows)
            plan["candidates_kept"] = int(len(rows))
        st.rows = np.sort(rows, kind="stable")  # sorted runs (one per IVF list): a merging sort is fastest
        return bool(len(rows))

    def _index_is_ivf(self) -> bool:
        """Whether the store's index is partitioned into lists (IVF-Flat, or IVF-PQ settled by its codes)."""
        return self.snapshot.manifest.get("index", {}).get("type") == "ivf_flat" or self._settles()

    def _union_rows(self, parts: list) -> np.ndarray:
        """The union of row arrays that are each free of duplicates, in no particular order (one gather per
        part through the row -> position map, instead of sorting them all)."""
        out = parts[0]
        for part in parts[1:]:
            with self._positions().over(out[out >= 0]) as find:
                _, seen = find(part)
            out = np.concatenate([out, part[~seen]])
        return out

    def _settle_from_index(self, st: _Search) -> None:
        """Step 5a: what the index searches already settled, leaf by leaf, on every candidate.

        Flat / IVF-Flat store raw vectors: a candidate in a leaf's range result has its exact score; one in a
        list that search probed but not in the result is below the threshold (-1 stands for it). IVF-PQ: the
        same searches and list scans over the codes, at a radius widened by the codes' error (``_band``), give
        code scores; a leaf is settled where its code score lies outside the band ``SETTLE_BAND`` puts around
        the threshold (-1: below the widened radius), and stays unsure (``st.sure`` False) inside it.
        Everything else stays NaN (unsure).
        """
        itype = self.snapshot.manifest.get("index", {}).get("type")
        settle_pq = self._settles()
        if settle_pq:
            st.band, st.band_above = self._band(0), self._band(1)
        shape = (len(st.rows), len(st.leaves))
        st.lscores = np.full(shape, np.nan, np.float32, order="F")  # columns (leaves) contiguous
        st.sure = np.zeros(shape, bool, order="F")
        if itype not in ("flat", "ivf_flat") and not settle_pq:
            return
        if settle_pq:
            st.approx = np.zeros(shape, bool, order="F")
        lists = self._range_flat_leaves(st) if itype == "flat" else self._range_other_leaves(st)
        with self._positions().over(st.rows) as find:
            for li, (leaf, _) in enumerate(st.leaves):
                thr = st.cals[id(leaf)].threshold
                ids_c, d_c, probed = st.resolved[(leaf.key, thr)]
                col = st.lscores[:, li]
                if probed is None:
                    col[:] = -1.0
                else:
                    col[probed[lists]] = -1.0  # below threshold (exact value not needed)
                if len(ids_c):
                    pos, hit = find(self._hit_rows(ids_c))
                    pos = pos[hit]
                    col[pos] = d_c[hit]
                    if settle_pq:
                        st.approx[pos, li] = True
                st.sure[:, li] = ~np.isnan(col)
                if settle_pq:  # a code score decides only when it is clear of the threshold by more than its error
                    st.sure[:, li] &= ~st.approx[:, li] | (col < thr - st.band) | (col > thr + st.band_above)

    def _positions(self) -> RowPositions:
        """The pool of row -> candidate position maps over this store's rows."""
        if self._rowpos is None:
            self._rowpos = RowPositions(len(self.snapshot.ids))
        return self._rowpos

    def _hit_rows(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of index hits given by id, in any order (-1 for an id the store does not hold)."""
        self._load_ids()
        if self._ids_are_rows:
            return ids
        all_ids = self._ids
        if not len(all_ids):
            return np.full(len(ids), -1, np.int64)
        pos = np.minimum(np.searchsorted(all_ids, ids), len(all_ids) - 1)
        return np.where(all_ids[pos] == ids, pos, -1)

    def _range_flat_leaves(self, st: _Search) -> None:
        """Flat index: range-search every leaf the drivers did not (exact: every vector is compared)."""
        for leaf, _ in st.leaves:
            c = st.cals[id(leaf)]
            key = (leaf.key, c.threshold)
            if key not in st.resolved:
                ids_c, d_c, probed, _ = self._range_candidates(st.T[st.tindex[leaf.key]], c, 0)
                st.resolved[key] = (ids_c, d_c, probed)

    def _drop_driver_fails(self, st: _Search, rows: np.ndarray) -> np.ndarray:
        """IVF with several drivers: the candidate rows that every driver may pass.

        Drivers are necessary positives, so a candidate one of them fails cannot match, whatever the other
        leaves say. Each driver proposes the rows of its own lists, so the union of two drivers' results is
        mostly rows the other fails (two drivers of 100k candidates each may share a few hundred answers).
        Once a driver's search is extended to every candidate's list, a candidate outside its (widened) result
        scores under the radius: settling the other leaves, ranking and the tree then run on the survivors."""
        self._scan_lists(st, st.drivers, self._list_of_rows()[rows])
        keep = np.ones(len(rows), bool)
        with self._positions().over(rows) as find:
            for leaf in st.drivers:
                ids_c = st.resolved[(leaf.key, st.cals[id(leaf)].threshold)][0]
                pos, hit = find(self._hit_rows(ids_c))
                inside = np.zeros(len(rows), bool)
                inside[pos[hit]] = True
                keep &= inside
        return rows[keep]

    def _range_other_leaves(self, st: _Search) -> np.ndarray:
        """IVF: settle every leaf on every candidate by scanning the candidates' lists (contiguous: exact
        scores for IVF-Flat, code scores for IVF-PQ at the radius widened by ``st.band``) instead of
        gathering candidate rows from the memory-mapped vectors. Returns each row's list."""
        lists = self._list_of_rows()[st.rows]
        self._scan_lists(st, [leaf for leaf, _ in st.leaves], lists)
        return lists

    def _scan_lists(self, st: _Search, leaves, lists: np.ndarray) -> None:
        """Extend each leaf's range result (``st.resolved``) to every list in ``lists`` that it has not probed."""
        needed = np.zeros(len(self._ivf_layout()[1]), bool)
        needed[lists[lists >= 0]] = True
        for leaf in leaves:
            c = st.cals[id(leaf)]
            key = (leaf.key, c.threshold)
            ids_c, d_c, probed = st.resolved.get(key, (np.zeros(0, np.int64), np.zeros(0, np.float32),
                                                       np.zeros_like(needed)))
            todo = np.nonzero(needed & ~probed)[0]
            if len(todo):
                radius = float(c.threshold) - 1e-5 - st.band
                more_i, more_d = self._range_in_lists(st.T[st.tindex[leaf.key]], radius, todo)
                ids_c, d_c = np.concatenate([ids_c, more_i]), np.concatenate([d_c, more_d])  # no longer sorted
                probed = probed | needed
            st.resolved[key] = (ids_c, d_c, probed)

    def _undetermined(self, st: _Search) -> np.ndarray:
        """Candidates whose answer still depends on an unsure leaf (three-valued evaluation of the tree).

        A sure leaf passes or fails by its score; an unsure one may do either. Filters inside the tree are
        exact (evaluated in DuckDB). A leaf calibrated with binding ("bound") is settled by its score too: its
        rivals are checked afterwards, in ``_match``, on every row its score passes, whatever the source."""
        li_of = {id(leaf): li for li, (leaf, _) in enumerate(st.leaves)}
        self._filters_in_tree(st)

        def leaf_state(leaf):
            li = li_of[id(leaf)]
            sure = st.sure[:, li]
            ok = st.lscores[:, li] >= st.cals[id(leaf)].threshold
            return sure & ok, ~sure | ok

        must, may = _Kleene(leaf_state, lambda f: st.fpass[id(f)]).visit(st.rest)
        return np.broadcast_to(must != may, (len(st.rows),))

    def _rescore(self, st: _Search, mask: np.ndarray, exact: bool = False) -> None:
        """Scores of every leaf on the candidates in ``mask``, read from the memory-mapped vectors.

        Where the store keeps a float16 copy (IVF-PQ), the rows are read from it (half the bytes, and a copy
        that fits the page cache where the float32 vectors may not): a score from it is within
        ``F16_SCORE_ERROR`` × the concept vector's norm of the float32 one, so every leaf's pass or fail is
        the float32 one except within that distance of its threshold, and only those rows are read again in
        float32. The rows left with float16 scores are marked (``st.half``); the page is ranked on float32
        scores (``_exact_page``). ``exact``: read float32 rows only."""
        rows = st.rows[mask]
        v16 = None if exact or not len(rows) else getattr(self.snapshot, "vectors16", None)
        if v16 is None:
            S, half = concept_scores(self.snapshot, st.T, rows=rows), None
        else:
            S = concept_scores(self.snapshot, st.T, rows=rows, half=True)
            err = F16_SCORE_ERROR * np.linalg.norm(st.T, axis=1)
            near = np.zeros(len(rows), bool)
            for leaf, _ in st.leaves:
                j = st.tindex[leaf.key]
                near |= np.abs(S[:, j] - st.cals[id(leaf)].threshold) <= err[j]
            if near.any():
                S[near] = concept_scores(self.snapshot, st.T, rows=rows[near])
            half = ~near
            st.plan["rescored_float32"] = st.plan.get("rescored_float32", 0) + int(near.sum())
        for li, (leaf, _) in enumerate(st.leaves):
            st.lscores[mask, li] = S[:, st.tindex[leaf.key]]
        st.sure[mask] = True
        if st.approx is not None:
            st.approx[mask] = False
        if half is not None and st.half is None:
            st.half = np.zeros(len(st.rows), bool)
        if st.half is not None:
            st.half[mask] = False if half is None else half

    def _rescore_unknown(self, st: _Search) -> None:
        """Step 5b: exact scores, from the memory-mapped vectors, of the candidates whose answer the index left
        undecided (every leaf of such a row: reading the row is the cost, not the inner products)."""
        need = self._undetermined(st)
        st.plan["rescored"] = int(need.sum())
        if need.any():
            self._rescore(st, need)

    def _exact_page(self, st: _Search, sel: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step 6b (IVF-PQ): the page is ranked on exact scores.

        Matches ranked on code scores are rescored in two rounds: the page's rows by the code-score ranking
        (every match, when the page takes them all), then the others whose code-score ranking lies within
        ``score_error / scale`` (how far a code score strays, in the ranking's margin units) of the page's
        exact cut. After each round the rows are matched and ranked again (a rescored row whose code score
        strayed past its band leaves the answer)."""
        end = st.offset + st.k
        scales = [st.cals[id(leaf)].scale for leaf, pos in st.leaves if pos] or [1.0]
        err = float(self.snapshot.manifest.get("index", {}).get("score_error") or 0.0)
        slack16 = F16_SCORE_ERROR * float(np.linalg.norm(st.T, axis=1).max()) / max(min(scales), 1e-6)
        slack = err / max(min(scales), 1e-6) + slack16
        rescored = 0
        for round_ in (0, 1):
            approx = st.approx[sel].any(1) if st.approx is not None else np.zeros(len(sel), bool)
            if round_ == 0 and len(sel) > end:  # the page by code scores
                head = np.zeros(len(sel), bool)
                head[np.argpartition(-scores, end - 1)[:end]] = True
                approx &= head
            elif round_ == 1:  # the rows that could still beat the page's exact cut
                if len(sel) <= end:
                    break
                cut = -np.partition(-scores, end - 1)[end - 1]
                approx &= scores >= cut - slack
            if not approx.any():
                continue
            mask = np.zeros(len(st.rows), bool)
            mask[sel[approx]] = True
            rescored += int(approx.sum())
            self._rescore(st, mask)
            sel, scores = self._rematch(st, sel, scores, approx)
        # rows rescored from the float16 copy that are on the page, or within float16's error of its cut: read in
        # float32, until the page and its cut stand on float32 scores
        while st.half is not None and len(sel):
            half = st.half[sel]
            if len(sel) > end:
                half &= scores >= -np.partition(-scores, end - 1)[end - 1] - slack16
            if not half.any():
                break
            mask = np.zeros(len(st.rows), bool)
            mask[sel[half]] = True
            rescored += int(half.sum())
            self._rescore(st, mask, exact=True)
            sel, scores = self._rematch(st, sel, scores, half)
        st.plan["rescored_page"] = rescored
        return sel, scores

    def _rematch(self, st: _Search, sel: np.ndarray, scores: np.ndarray,
                 changed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The matches and their scores after the matches ``sel[changed]`` were rescored: what ``_match`` and
        ``_rank`` give over every candidate, computed on the rescored rows only (only their scores moved, and
        a row's pass, binding, filters and rank depend on that row alone). A rescored row may leave the answer;
        no other row can join it."""
        at = np.nonzero(changed)[0]
        idx = sel[at]
        sub = self._leaf_passes(st, idx)
        for key, passed in sub.items():
            st.passed[key][idx] = passed
        ok = evaluate_tree(st.rest, lambda c: sub[id(c)], lambda f: st.fpass[id(f)][idx], len(idx),
                           self._joint_check(st.cals, st.rows[idx]))
        scores = scores.copy()
        scores[at[ok]] = self._rank(st, idx[ok])
        keep = np.ones(len(sel), bool)
        keep[at[~ok]] = False
        return sel[keep], scores[keep]

    def _exact_scan(self, st: _Search) -> None:
        """Steps 4-5 without the index: every allowed row (or every row) scored exactly, blockwise."""
        st.plan["strategy"] = "exact_scan"
        S = concept_scores(self.snapshot, st.T, rows=st.allowed)  # (m, k) exact scores
        st.plan["rescored"] = int(len(S))
        st.lscores = np.empty((len(S), len(st.leaves)), np.float32)
        for li, (leaf, _) in enumerate(st.leaves):
            st.lscores[:, li] = S[:, st.tindex[leaf.key]]
        st.rows = np.arange(len(self.snapshot.ids), dtype=np.int64) if st.allowed is None else st.allowed

    def _match(self, st: _Search) -> np.ndarray:
        """Step 5c: thresholds applied, filters inside the tree evaluated in DuckDB, the tree evaluated;
        the positions (into ``st.rows``) that match."""
        st.passed = self._leaf_passes(st)
        self._filters_in_tree(st)
        match = evaluate_tree(st.rest, lambda c: st.passed[id(c)], lambda f: st.fpass[id(f)], len(st.rows),
                              self._joint_check(st.cals, st.rows, st.plan))
        return np.nonzero(match)[0]

    def _leaf_passes(self, st: _Search, at=slice(None)) -> dict:
        """Each scored leaf's pass/fail on the candidates at positions ``at`` (all of them by default): its
        threshold, then, for leaves calibrated with binding, its rivals. {id(leaf): bool array}"""
        passed = {id(leaf): st.lscores[at, li] >= st.cals[id(leaf)].threshold for li, (leaf, _) in enumerate(st.leaves)}
        judged = self._apply_binding(st.leaves, st.cals, passed, st.rows[at])
        pos = np.arange(len(st.rows))[at] if judged else None
        for key, (on, margin, share) in judged.items():  # kept for the estimate: (margin, share) per row
            kept = st.bound.setdefault(key, np.full((2, len(st.rows)), np.nan))
            kept[0, pos[on]], kept[1, pos[on]] = margin, share
        return passed

    def _filters_in_tree(self, st: _Search) -> None:
        """Filters that sit inside the tree, evaluated once per search on the candidates (``st.fpass``)."""
        if st.fpass is None:
            flist = qa.filters(st.rest)
            st.fpass = self._tree_filters(flist, st.rows) if flist else {}

    def _estimate(self, st: _Search, sel: np.ndarray) -> dict:
        """Step 5d: estimated precision and recall of the answer and of each concept (mixture fits, no labels)."""
        from t2c.query.estimate import answer_estimate

        match = np.zeros(len(st.rows), bool)
        match[sel] = True
        n_allowed = len(self.snapshot.ids) if st.allowed is None else len(st.allowed)
        readings, joint = self._readings(st)
        return answer_estimate(st.rest, st.leaves, st.cals, st.passed, lambda f: st.fpass[id(f)], match,
                               n_allowed - len(st.rows), readings, joint)

    def _readings(self, st: _Search) -> tuple[dict, object]:
        """For the estimate: each concept judged by its words alone (a tower that does not bind), its reading
        share on every scored row; and, for an AND node with two or more of them as children, their joint share
        (``binding.joint_share``). ({id(leaf): shares}, joint hook or None)."""
        from t2c.query.binding import joint_share

        judged = {key: lb for key, lb in self._scene_bound([leaf for leaf, _ in st.leaves], st.cals).items()
                  if not st.cals[key].params.get("binds", True)
                  and (st.cals[key].params.get("rates") or {}).get("words_precision") is not None}
        on = np.zeros(len(st.rows), bool)
        for key in judged:
            on |= st.passed[key]
        if not judged or not on.any():
            return self._bound_posteriors(st), None
        at = np.nonzero(on)[0]
        words = list(dict.fromkeys(w for _, b in judged.values() for w in b.scene_words()))
        sc = concept_scores(self.snapshot, self.bank.vectors(words), rows=st.rows[at])
        scores = {w: sc[:, j] for j, w in enumerate(words)}
        thresholds = _word_thresholds(st.cals, judged)

        def full(share):
            out = np.zeros(len(st.rows))
            out[at] = share
            return out

        readings = {key: full(joint_share([b], scores, thresholds)) for key, (_, b) in judged.items()}
        readings.update(self._bound_posteriors(st))

        def together(node):
            kids = [c for c in node.children if id(c) in judged]
            if len({c.text for c in kids}) < 2:
                return None
            both = np.logical_and.reduce([st.passed[id(c)] for c in kids])
            bindings = list({c.text: judged[id(c)][1] for c in kids}.values())
            p_words = float(np.prod([st.cals[id(c)].params["rates"]["words_precision"] for c in
                                     {c.text: c for c in kids}.values()]))
            rates = [st.cals[id(c)].params["rates"] for c in kids]
            indep = np.prod([np.where(st.passed[id(c)], readings[id(c)] * r["words_precision"], r["miss"])
                             for c, r in zip(kids, rates)], 0)
            return kids, np.where(both, full(joint_share(bindings, scores, thresholds)) * p_words, indep)

        return readings, together

    @staticmethod
    def _bound_posteriors(st: _Search) -> dict:
        """For the estimate: each concept the binding rule judged, the chance per scored row that it is bound:
        1 where one reading explains the image's words, else the posterior of its margin
        (``estimate.bound_posterior``); {id(leaf): array over rows} (0 where it did not pass its words)."""
        from t2c.query.estimate import bound_posterior

        out = {}
        for key, (margin, share) in st.bound.items():
            sides = (st.cals[key].params.get("rates") or {}).get("sides")
            if sides is None:
                continue
            known = ~np.isnan(margin)
            p = np.zeros(len(margin))
            p[known] = np.where(share[known] >= 1.0, 1.0, bound_posterior(margin[known], sides))
            out[key] = p
        return out

    def _apply_binding(self, leaves, cals, passed: dict, rows: np.ndarray) -> dict:
        """Compositional leaves calibrated with binding ("bound") must also beat their rivals on ``rows``.
        Returns, for the leaves the binding rule judged (not their words alone), {id(leaf): (positions that
        passed their words, margin, reading share)} there, for the estimate."""
        from t2c.query.binding import present_on

        judged = {}
        for leaf, _ in leaves:
            c = cals[id(leaf)]
            if c.method == "bound" and passed[id(leaf)].any():
                on = np.nonzero(passed[id(leaf)])[0]
                present, margin, share = present_on(self.snapshot, self.bank, leaf.text, c, rows[on])
                passed[id(leaf)][on] = present
                if share is not None:
                    judged[id(leaf)] = (on, margin, share)
        return judged

    def _scene_bound(self, leaves, cals: dict) -> dict:
        """The leaves calibrated with binding ("bound") whose words belong to a closed vocabulary (a scene):
        {id(leaf): (leaf, Binding)}."""
        from t2c.query.binding import binding_of

        out = {}
        for leaf in leaves:
            if cals[id(leaf)].method == "bound":
                b = binding_of(leaf.text, getattr(self.bank, "clip_spec", ""))
                if b is not None and b.scene is not None:
                    out[id(leaf)] = (leaf, b)
        return out

    def _joint_check(self, cals: dict, rows: np.ndarray, plan: dict | None = None):
        """The ``and_check`` of ``evaluate_tree``: an AND node that needs two or more compositional concepts
        ("blue triangle AND red diamond", calibrated "bound") holds only on the rows where one reading of the
        image's words holds them all (``binding.jointly_on``). Each concept alone may be there in some reading
        of an image whose words are blue, red, triangle and diamond; both together only in one of its two.
        ``plan`` (the first evaluation of a search) records, per checked AND, the concepts and the rows
        dropped."""
        from t2c.query.binding import jointly_on

        def check(node, holds: np.ndarray) -> np.ndarray:
            bound = self._scene_bound(list(_necessary_positive(node).values()), cals)
            found = {b.text: b for _, b in bound.values()}  # one binding per distinct concept
            if len(found) < 2:
                return holds
            bindings = list(found.values())
            thresholds = _word_thresholds(cals, bound)
            on = np.nonzero(holds)[0]
            ok = jointly_on(self.snapshot, self.bank, bindings, thresholds, rows[on])
            if plan is not None:
                plan.setdefault("joint_readings", []).append({"concepts": list(found), "dropped": int((~ok).sum())})
            if ok.all():
                return holds
            out = holds.copy()
            out[on[~ok]] = False
            return out

        return check

    @staticmethod
    def _rank(st: _Search, sel: np.ndarray) -> np.ndarray:
        """Step 6: weighted mean margin of the positive leaves that passed (else of the negative ones that
        failed, negated), for the matching positions ``sel``."""
        num, den, nnum, nden = (np.zeros(len(sel)) for _ in range(4))
        for li, (leaf, pos) in enumerate(st.leaves):
            c = st.cals[id(leaf)]
            margin = (st.lscores[sel, li].astype(np.float64) - c.threshold) / c.scale
            ok = st.passed[id(leaf)][sel]
            if pos:
                num += np.where(ok, leaf.weight * margin, 0.0)
                den += np.where(ok, leaf.weight, 0.0)
            else:
                nnum += np.where(~ok, leaf.weight * -margin, 0.0)
                nden += np.where(~ok, leaf.weight, 0.0)
        return np.where(den > 0, num / np.maximum(den, 1e-12),
                        np.where(nden > 0, nnum / np.maximum(nden, 1e-12), 0.0))

    def _finish(self, st: _Search, rows: np.ndarray, scores: np.ndarray) -> SearchResult:
        """Step 7: rank, cut the page, look up its paths and (``explain``) attach per-leaf explanations."""
        total = len(rows)
        all_ids = np.asarray(self.snapshot.ids[rows], np.int64) if total else np.zeros(0, np.int64)
        order = _page_order(all_ids, scores, st.offset, st.offset + st.k)
        page_ids = all_ids[order]
        meta = self._paths(page_ids, np.asarray(rows)[order])
        expl = self._explanations(st, np.asarray(rows)[order]) if st.explain else None
        hits = [Hit(int(i), m, float(scores[order[j]]), None if expl is None else expl[j])
                for j, (i, m) in enumerate(zip(page_ids, meta))]
        st.plan["took_ms"] = round((time.perf_counter() - st.t0) * 1000, 3)
        return SearchResult(hits, total, (time.perf_counter() - st.t0) * 1000, qa.to_json(st.node), st.k,
                            st.offset, st.plan, all_ids)

    def _explanations(self, st: _Search, prow: np.ndarray) -> list[list[dict]]:
        """Per hit (page rows ``prow``), per scored leaf: score, threshold, passed, weight, negated, margin, method,
        and for a compositional concept its binding rule (``rule``: scene, rivals, words, own; else None)."""
        if not st.leaves or not len(prow):  # filters only: nothing was scored
            return [[] for _ in prow]
        srt = np.argsort(prow)
        ex = np.empty((len(prow), st.T.shape[0]), np.float32)
        ex[srt] = concept_scores(self.snapshot, st.T, rows=prow[srt])  # exact scores of the page's hits
        passed = {id(leaf): ex[:, st.tindex[leaf.key]] >= st.cals[id(leaf)].threshold for leaf, _ in st.leaves}
        self._apply_binding(st.leaves, st.cals, passed, prow)
        out = []
        for j in range(len(prow)):
            expl = []
            for leaf, pos in st.leaves:
                c = st.cals[id(leaf)]
                s = float(ex[j, st.tindex[leaf.key]])
                expl.append({"concept": leaf.text, "score": round(s, 6),
                             "threshold": round(float(c.threshold), 6), "passed": bool(passed[id(leaf)][j]),
                             "weight": leaf.weight, "negated": not pos,
                             "margin": round((s - c.threshold) / c.scale, 4), "method": c.method,
                             "rule": (c.params.get("binding") or {}).get("rule")})
            out.append(expl)
        return out

    def reference_answer(self, query, scores: dict | None = None) -> np.ndarray:
        """Brute-force answer (sorted catalog ids): every concept scored on every row, the tree evaluated
        over all rows with the same thresholds, filters evaluated in DuckDB. For tests and benchmarks.

        ``scores``: optional {leaf key (kind, text): its scores over every row}, computed once for many queries
        (a benchmark over a store too large to scan once per query); leaves it lacks are scored here."""
        node = self.parse_query(query)
        n = len(self.snapshot.ids)
        leaves = qa.scored(node)
        cals = self.calibrations(node) if leaves else {}
        T, ti = self.leaf_vectors(leaves) if leaves else (None, {})
        if leaves and scores is not None and all(k in scores for k in ti):
            S = np.stack([np.asarray(scores[k], np.float32) for k in sorted(ti, key=ti.get)], 1)
        else:
            S = concept_scores(self.snapshot, T) if leaves else np.zeros((n, 0), np.float32)
        flist = qa.filters(node)
        fpass = self._tree_filters(flist, np.arange(n, dtype=np.int64)) if flist else {}
        passed = {id(c): S[:, ti[c.key]] >= cals[id(c)].threshold for c in leaves}
        self._apply_binding([(c, True) for c in leaves], cals, passed, np.arange(n, dtype=np.int64))
        match = evaluate_tree(node, lambda c: passed[id(c)], lambda f: fpass[id(f)], n,
                              self._joint_check(cals, np.arange(n, dtype=np.int64)))
        return np.asarray(self.snapshot.ids, np.int64)[match]
