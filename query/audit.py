"""Concept audits (how often does each concept occur?) and drift (which concepts changed between two stores?).

Prevalence estimator (``audit``). Counting images above a threshold is biased by the classifier's errors:
false positives in the large "absent" bulk inflate rare concepts, missed positives deflate common ones.
We use the calibration's two-component Gaussian mixture of the concept's cosine scores
(``t2c.query.calibrate.calibrate``): the prevalence is the weight of the "present" (upper) component, i.e. the
mean posterior probability of "present" over all images. When calibration rejects the two-component fit
(one population), the estimate falls back to the count above the robust tail threshold. The confidence
interval is a percentile bootstrap: images are resampled (multinomially, over a 512-bin histogram of the
scores, so a resample costs O(bins)) and the mixture weight is re-estimated by EM warm-started at the fit.
``method="count"`` gives the raw count above the threshold with a Wilson interval (measured in
``bench/audit_drift.py``; the mixture estimate is the default because it was the more accurate).

Drift (``drift``). Both stores must share the CLIP space. Each concept gets one threshold calibrated on the
pooled scores of both collections (a per-collection threshold would absorb the shift), the counts above it
give a two-proportion z-test, p-values are corrected across concepts by Benjamini–Hochberg (``correction=
"holm"`` for Holm), and the effect size is Cohen's h between the two prevalence estimates (the mixture
weights re-estimated per collection with the pooled components held fixed). Concepts are ranked by |h|.

Python API:
    parse_concept_list("red,circle" | path) -> list[str]
    audit(snapshot, concepts, top=8) -> AuditReport      (.to_dict())
    drift(snapshot_a, snapshot_b, concepts, top=4) -> DriftReport  (.to_dict())
    estimate_prevalence(scores) -> dict(prevalence, ci_low, ci_high, count, threshold, method, ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from t2c.data.errors import InvalidInput

__all__ = ["AuditReport", "DriftReport", "audit", "drift", "estimate_prevalence", "parse_concept_list",
           "concept_vectors", "score_matrix", "benjamini_hochberg", "holm", "cohens_h", "wilson"]

N_BINS = 512
N_BOOT = 200
CI_LEVEL = 0.95


# ------------------------------------------------------------------------------------------------ inputs
def parse_concept_list(arg: str | Sequence[str]) -> list[str]:
    """Concepts from a list, a file (one per line, ``#`` comments) or a comma-separated string.

    Raises:
        InvalidInput: no concept given.
    """
    if isinstance(arg, (list, tuple)):
        items = [str(a) for a in arg]
    else:
        text = str(arg)
        p = Path(text).expanduser()
        if "," not in text and p.is_file():
            items = [ln.split("#", 1)[0] for ln in p.read_text(encoding="utf-8").splitlines()]
        elif "\n" in text:
            items = text.splitlines()
        else:
            items = text.split(",")
    out = list(dict.fromkeys(s.strip() for s in items if s and s.strip()))
    if not out:
        raise InvalidInput("no concepts given", 'pass --concepts "red,circle" or a file with one concept per line')
    return out


def concept_vectors(snapshot, concepts: Sequence[str], bank=None) -> np.ndarray:
    """(k, d) unit concept vectors from the store's CLIP text tower (prompt ensemble, cached)."""
    if bank is None:
        from t2c.query.concepts import concept_bank_for

        bank = concept_bank_for(snapshot)
    vecs = np.asarray(bank.vectors(list(concepts)), np.float32)
    if vecs.shape[1] != snapshot.dim:
        raise InvalidInput(f"concept vectors have dimension {vecs.shape[1]}, the store {snapshot.dim}",
                           "the store's CLIP spec must embed its concepts")
    return vecs


def score_matrix(snapshot, concepts: Sequence[str], bank=None) -> np.ndarray:
    """(n, k) cosine scores of every image against each concept."""
    from t2c.query.calibrate import concept_scores

    return concept_scores(snapshot, concept_vectors(snapshot, concepts, bank))


# ------------------------------------------------------------------------------------------------ stats
def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, min(p, c - h)), min(1.0, max(p, c + h))  # rounding must not put p outside its interval


def cohens_h(p1: float, p2: float) -> float:
    """Cohen's h effect size between two proportions (p2 relative to p1)."""
    p1, p2 = min(max(p1, 0.0), 1.0), min(max(p2, 0.0), 1.0)
    return float(2 * math.asin(math.sqrt(p2)) - 2 * math.asin(math.sqrt(p1)))


def benjamini_hochberg(p: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same order as ``p``."""
    p = np.asarray(p, np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, same order as ``p``."""
    p = np.asarray(p, np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Pooled two-proportion z statistic and its two-sided p-value."""
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k2 / n2 - k1 / n1) / se
    return float(z), float(min(1.0, 2 * _norm_sf(abs(z))))


# ------------------------------------------------------------------------------------------------ mixture
def _hist(x: np.ndarray, lo: float, hi: float, bins: int = N_BINS) -> tuple[np.ndarray, np.ndarray]:
    counts, edges = np.histogram(x, bins=bins, range=(lo, hi))
    return counts.astype(np.float64), (edges[:-1] + edges[1:]) / 2


def _em_binned(counts, centers, w, m, s, present_from=1, iters=60, fix_components=False, floor=1e-6):
    """The mixture EM (:func:`t2c.query.calibrate.weighted_em`) on histogram counts: (present weight, weights,
    means, stds). Components ``present_from`` and up form the "present" group."""
    from t2c.query.calibrate import weighted_em

    f = weighted_em(centers, w, m, s, counts, iters=iters, tol=1e-10, fix_components=fix_components, floor=floor,
                    min_weight=1e-12)
    return float(f["weights"][present_from:].sum()), f["weights"], f["means"], f["stds"]


def estimate_prevalence(scores, calibration=None, *, method: str = "mixture", n_boot: int = N_BOOT,
                        level: float = CI_LEVEL, seed: int = 0) -> dict:
    """Prevalence of one concept from its scores over a collection, with a confidence interval.

    Args:
        scores: 1-D cosine scores of every image.
        calibration: a ``t2c.query.calibrate.Calibration`` (default: calibrate the scores).
        method: "mixture" (weight of the present component; bootstrap CI) or "count" (above threshold; Wilson).
        n_boot: bootstrap resamples. level: CI level. seed: bootstrap seed.

    Returns:
        dict(prevalence, ci_low, ci_high, count, threshold, method, n, calibration).
    """
    from t2c.query.calibrate import calibrate

    x = np.asarray(scores, np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        raise InvalidInput("no images to audit")
    if method not in ("mixture", "count"):
        from t2c.data.errors import UnknownChoice

        raise UnknownChoice("prevalence method", method, ["mixture", "count"])
    cal = calibration if calibration is not None else calibrate(x)
    thr = float(cal.threshold)
    count = int((x >= thr).sum())
    out = {"threshold": thr, "count": count, "n": n, "calibration": cal.method}
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    if method == "mixture" and cal.method == "gmm" and "weights" in cal.params:
        p = cal.params
        j = int(p.get("present_from", 1))
        lo, hi = float(x.min()), float(x.max())
        counts, centers = _hist(x, lo, hi)
        w1, w, m, s = _em_binned(counts, centers, p["weights"], p["means"], p["stds"], j, iters=200)
        rng = np.random.default_rng(seed)
        probs = counts / counts.sum()
        boots = np.empty(n_boot)
        for b in range(n_boot):
            cb = rng.multinomial(n, probs).astype(np.float64)
            boots[b] = _em_binned(cb, centers, w, m, s, j, iters=40)[0]
        out.update(prevalence=float(w1), ci_low=float(np.quantile(boots, lo_q)),
                   ci_high=float(np.quantile(boots, hi_q)), method="mixture",
                   components={"means": [float(v) for v in m], "stds": [float(v) for v in s]})
    else:
        lo, hi = wilson(count, n, z=_z_of(level))
        out.update(prevalence=count / n, ci_low=lo, ci_high=hi, method="count")
    out["prevalence"] = min(max(out["prevalence"], 0.0), 1.0)
    return out


def _z_of(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(1 - (1 - level) / 2))


# ------------------------------------------------------------------------------------------------ audit
@dataclass
class AuditReport:
    """Per-concept prevalence of one store."""

    store: str
    n: int
    concepts: list[dict]
    method: str = "mixture"
    clip: str = ""
    encoder: str = ""
    snapshot: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON form: {"concepts": [{concept, prevalence, ci_low, ci_high, count, threshold, examples}], "n"...}."""
        return {"store": self.store, "snapshot": self.snapshot, "encoder": self.encoder, "clip": self.clip,
                "n": self.n, "method": self.method, "concepts": [dict(c) for c in self.concepts], **self.extra}


def _top_ids(snapshot, col: np.ndarray, top: int) -> list[int]:
    if top <= 0 or not len(col):
        return []
    k = min(top, len(col))
    idx = np.argpartition(-col, k - 1)[:k]
    idx = idx[np.lexsort((idx, -col[idx]))]
    return [int(snapshot.ids[i]) for i in idx]


def audit(snapshot, concepts, top: int = 8, *, method: str = "mixture", bank=None, n_boot: int = N_BOOT,
          level: float = CI_LEVEL) -> AuditReport:
    """Estimate how often each concept occurs in a store, with confidence intervals and top examples.

    Args:
        snapshot: an open Snapshot (``t2c.data.store.open_store``).
        concepts: concept texts (list) or a string accepted by :func:`parse_concept_list`.
        top: example image ids per concept (highest scores first).
        method: "mixture" (default, mixture-weight estimate) or "count" (count above the calibrated threshold).
        bank: optional ConceptBank (default: the store's). n_boot/level: bootstrap resamples and CI level.

    Returns:
        An :class:`AuditReport`; ``.to_dict()`` gives ``{"concepts": [{concept, prevalence, ci_low, ci_high,
        count, threshold, examples}], "n": N, ...}``.

    Raises:
        InvalidInput: no concepts, an empty store. UnknownChoice: unknown words for the text tower.

    Example:
        >>> audit(open_store("demo.t2c"), ["red", "circle"]).to_dict()["concepts"][0]["prevalence"]  # doctest: +SKIP
    """
    from t2c.query.calibrate import calibrate, collection_cut, is_compositional, present_score_of

    concepts = parse_concept_list(concepts)
    if snapshot.count == 0:
        raise InvalidInput("the store holds no images to audit", "index some images first")
    if bank is None:
        from t2c.query.concepts import concept_bank_for

        bank = concept_bank_for(snapshot)
    S = score_matrix(snapshot, concepts, bank)
    prior, cut = present_score_of(bank), collection_cut(snapshot, bank)
    rows = []
    for j, c in enumerate(concepts):
        col = S[:, j]
        est = estimate_prevalence(col, calibrate(col, prior, compositional=is_compositional(c), cut=cut),
                                  method=method, n_boot=n_boot, level=level, seed=j)
        rows.append({"concept": c, "prevalence": est["prevalence"], "ci_low": est["ci_low"],
                     "ci_high": est["ci_high"], "count": est["count"], "threshold": est["threshold"],
                     "examples": _top_ids(snapshot, col, top), "method": est["method"],
                     "calibration": est["calibration"], "mean_score": float(col.mean())})
    return AuditReport(str(snapshot.root), int(S.shape[0]), rows, method, snapshot.clip, snapshot.encoder,
                       snapshot.name)


# ------------------------------------------------------------------------------------------------ drift
@dataclass
class DriftReport:
    """Per-concept shift between two stores, ranked by |effect|."""

    store_a: str
    store_b: str
    n_a: int
    n_b: int
    concepts: list[dict]
    alpha: float = 0.05
    correction: str = "bh"
    clip: str = ""

    def to_dict(self) -> dict:
        return {"store_a": self.store_a, "store_b": self.store_b, "n_a": self.n_a, "n_b": self.n_b,
                "alpha": self.alpha, "correction": self.correction, "clip": self.clip,
                "concepts": [dict(c) for c in self.concepts]}


def check_same_space(a, b) -> None:
    """Raise InvalidInput unless two stores share the CLIP space (spec and dimension)."""
    if a.clip != b.clip or a.dim != b.dim:
        raise InvalidInput(f"the stores live in different CLIP spaces ({a.clip!r}, {a.dim}-d vs {b.clip!r}, "
                           f"{b.dim}-d)", "compare stores aligned to the same CLIP model")


def drift_from_scores(sa: np.ndarray, sb: np.ndarray, concepts: Sequence[str], *, alpha: float = 0.05,
                      correction: str = "bh", prior: float | None = None, cut: float | None = None) -> list[dict]:
    """Per-concept drift rows (unranked) from score matrices (n_a, k) and (n_b, k); ``prior``: the CLIP
    model's own present score, ``cut``: the pooled stores' estimated cut (see ``t2c.query.calibrate.calibrate``)."""
    from t2c.query.calibrate import calibrate, is_compositional

    if correction not in ("bh", "holm"):
        from t2c.data.errors import UnknownChoice

        raise UnknownChoice("correction", correction, ["bh", "holm"])
    rows = []
    na, nb = len(sa), len(sb)
    for j, c in enumerate(concepts):
        a, b = np.asarray(sa[:, j], np.float64), np.asarray(sb[:, j], np.float64)
        pooled = np.concatenate([a, b])
        # one threshold for both; a concept whose scores form one population is compared above
        # median + 1 robust sigma (the strict audit tail would count ~0 on both sides and hide any shift)
        cal = calibrate(pooled, prior, compositional=is_compositional(c), cut=cut).for_search()
        thr = float(cal.threshold)
        ka, kb = int((a >= thr).sum()), int((b >= thr).sum())
        z, p = two_proportion_z(ka, na, kb, nb)
        pa, pb = ka / na, kb / nb
        method = "count"
        if cal.method == "gmm" and "weights" in cal.params:
            lo, hi = float(pooled.min()), float(pooled.max())
            ca, centers = _hist(a, lo, hi)
            cb, _ = _hist(b, lo, hi)
            j = int(cal.params.get("present_from", 1))
            _, w, m, s = _em_binned(ca + cb, centers, cal.params["weights"], cal.params["means"],
                                    cal.params["stds"], j, iters=200)
            pa = _em_binned(ca, centers, w, m, s, j, iters=200, fix_components=True)[0]
            pb = _em_binned(cb, centers, w, m, s, j, iters=200, fix_components=True)[0]
            method = "mixture"
        sd = math.sqrt((a.var(ddof=1) * (na - 1) + b.var(ddof=1) * (nb - 1)) / max(na + nb - 2, 1)) if na > 1 and nb > 1 else 0.0
        d = float((b.mean() - a.mean()) / sd) if sd > 0 else 0.0
        rows.append({"concept": c, "prevalence_a": float(pa), "prevalence_b": float(pb), "diff": float(pb - pa),
                     "cohens_h": cohens_h(pa, pb), "score_d": d, "count_a": ka, "count_b": kb,
                     "threshold": thr, "z": z, "p": p, "method": method})
    adj = benjamini_hochberg([r["p"] for r in rows]) if correction == "bh" else holm([r["p"] for r in rows])
    for r, q in zip(rows, adj):
        r["p_adj"] = float(q)
        r["significant"] = bool(q < alpha)
    return rows


def drift(snapshot_a, snapshot_b, concepts, top: int = 4, *, alpha: float = 0.05, correction: str = "bh",
          bank=None) -> DriftReport:
    """Which concepts changed between two stores: prevalence difference, Cohen's h, corrected test, ranked.

    Args:
        snapshot_a: the reference store (Snapshot). snapshot_b: the compared store.
        concepts: concept texts or a string for :func:`parse_concept_list`.
        top: example ids per concept from each store (highest scores).
        alpha: significance level after correction. correction: "bh" (Benjamini–Hochberg) or "holm".

    Returns:
        A :class:`DriftReport`, concepts ranked by |Cohen's h| (largest shift first); each row has
        prevalence_a/b, diff, cohens_h, score_d, p, p_adj, significant, examples_a/b.

    Raises:
        InvalidInput: the stores do not share a CLIP space, or either is empty.
    """
    concepts = parse_concept_list(concepts)
    check_same_space(snapshot_a, snapshot_b)
    if snapshot_a.count == 0 or snapshot_b.count == 0:
        raise InvalidInput("both stores must hold images to compare")
    if bank is None:
        from t2c.query.concepts import concept_bank_for

        bank = concept_bank_for(snapshot_a)
    vecs = concept_vectors(snapshot_a, concepts, bank)
    from t2c.query.calibrate import concept_scores, pooled_cut, present_score_of

    sa, sb = concept_scores(snapshot_a, vecs), concept_scores(snapshot_b, vecs)
    rows = drift_from_scores(sa, sb, concepts, alpha=alpha, correction=correction, prior=present_score_of(bank),
                             cut=pooled_cut([snapshot_a, snapshot_b], bank))
    for j, r in enumerate(rows):
        r["examples_a"] = _top_ids(snapshot_a, sa[:, j], top)
        r["examples_b"] = _top_ids(snapshot_b, sb[:, j], top)
    rows.sort(key=lambda r: (-abs(r["cohens_h"]), r["p"], r["concept"]))
    for i, r in enumerate(rows):
        r["rank"] = i + 1
    return DriftReport(str(snapshot_a.root), str(snapshot_b.root), len(sa), len(sb), rows, alpha, correction,
                       snapshot_a.clip)
