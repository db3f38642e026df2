"""How far to trust an answer: estimated precision and recall from the calibration's mixture fits (no labels).

Per concept, the mixture fit of its scores says which components are "present" (``present_from`` up) and
where the threshold t lies, so with ``Q_k = P(score >= t | component k)``:

* precision = sum_present w_k Q_k / sum_all w_k Q_k (the share of passing images that are truly present);
* recall = sum_present w_k Q_k / sum_present w_k;
* miss = P(present | fails) = sum_present w_k (1 - Q_k) / sum_all w_k (1 - Q_k).

A concept judged with binding ("bound") is judged on its binding margin over the images where both of its
words pass: the rule splits them at zero, each side is summarised by a normal over its close calls, and an
image's chance of being bound is that side's posterior (``bound_rates``). A concept whose text tower does not
bind its words is judged by the words alone; an image where both pass holds it with the share of its word
readings that contain it (``reading_rates``).
Concepts without a fit (one population, or the model's cut) have no estimate.

For the whole answer, each scored image gets, for each concept, P(present) = precision when it passed and
miss when it failed (a bound concept: the image's own margin posterior, or reading share for a concept judged
by its words, times the words' precision); the tree combines them as if concepts were independent (AND:
product, OR: 1 - prod(1 - p), NOT: 1 - p; filters are exact), except colour-shape pairs ANDed under a tower
that does not bind: where all pass, the share of the image's readings that hold them all, times their words'
precision. The estimated precision is the mean over the answer, and the estimated recall the expected true
matches in the answer over the expected true matches among all images.
"""
from __future__ import annotations

from math import erf, sqrt

import numpy as np

from t2c.query import ast as qa

__all__ = ["concept_rates", "answer_estimate", "bound_rates", "bound_posterior", "reading_rates"]


def _q(t: float, m: float, s: float) -> float:
    """P(X >= t) for X ~ N(m, s^2)."""
    return 0.5 * (1.0 - erf((t - m) / (max(s, 1e-12) * sqrt(2.0))))


def _fit(params: dict) -> dict | None:
    """The mixture fit behind a calibration's params (gmm, override of a gmm, otsu's weak fit), or None."""
    if "weights" in params and "means" in params:
        return params
    weak = params.get("weak_fit")
    return dict(weak, present_from=1) if weak else None


def _mixture_rates(fit: dict, t: float) -> dict:
    w, m, s = (np.asarray(fit[k], np.float64) for k in ("weights", "means", "stds"))
    j = int(fit.get("present_from", 1))
    q = np.array([_q(t, mk, sk) for mk, sk in zip(m, s)])
    pas, fail = w * q, w * (1 - q)
    precision = pas[j:].sum() / pas.sum() if pas.sum() > 0 else 1.0
    recall = pas[j:].sum() / w[j:].sum() if w[j:].sum() > 0 else 1.0
    miss = fail[j:].sum() / fail.sum() if fail.sum() > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "miss": float(miss)}


def concept_rates(cal) -> dict | None:
    """{precision, recall, miss} of one concept's calibration at its threshold, or None (no fit)."""
    if cal.method == "bound":
        return cal.params.get("rates")
    fit = _fit(cal.params)
    return None if fit is None else _mixture_rates(fit, float(cal.threshold))


def bound_rates(margin: np.ndarray, words_ok: np.ndarray, present: np.ndarray, word_rates: list) -> dict | None:
    """Rates of a bound concept from its rival margins over sampled images where both words pass.

    The rule splits those margins at zero into a "bound" and an "unbound" group; each group is summarised by
    a normal fitted to the half of it nearest zero (its close calls: the far half, images with one possible
    explanation, says nothing about mistakes and would widen the normal across the cut) with the group's
    share, and an image's chance of being bound is that group's posterior: near zero, where the groups
    overlap, the rule is a coin toss; far from it, a sure call. On the tuning collection (seed 101, world:clip,
    48 pairs) this estimated pair precision 0.931 against a true 0.941; normals over whole groups said 0.803.
    """
    x = np.asarray(margin, np.float64)[words_ok]
    on = np.asarray(present)[words_ok]
    if on.sum() < 2 or (~on).sum() < 2:
        return None
    sides = []
    for grp, sign in ((x[on], 1.0), (x[~on], -1.0)):
        near = np.sort(np.abs(grp))[: max(2, len(grp) // 2)] * sign  # the half of the side nearest the cut
        sides.append([float(near.mean()), max(float(near.std()), 1e-6), len(grp) / len(x)])
    post = bound_posterior(x, sides)
    words_p = float(np.prod([r["precision"] for r in word_rates])) if word_rates and all(word_rates) else 1.0
    total = float(post.sum())
    n_fail = len(present) - int(np.sum(present))
    return {"precision": float(post[on].mean()) * words_p, "recall": float(post[on].sum() / total) if total else 1.0,
            "miss": float(post[~on].sum() / n_fail) if n_fail else 0.0, "words_precision": words_p, "sides": sides}


def bound_posterior(margin: np.ndarray, sides: list) -> np.ndarray:
    """P(bound | margin) from the two sides' normals ``[[mean, std, share] (bound), [...] (not bound)]``
    (``bound_rates``), computed in log space so that margins far from both stay 0 or 1."""
    x = np.asarray(margin, np.float64)
    (m0, s0, _), (m1, s1, _) = sides
    # log(d_not / d_bound) is a parabola in x (a x^2 + b x + c); with unequal stds it turns back in one tail,
    # where the wider normal would win again: the posterior is held at its value at the turning point
    a, b = 0.5 / s0**2 - 0.5 / s1**2, m1 / s1**2 - m0 / s0**2
    if abs(a) > 1e-12:
        x = np.minimum(x, -b / (2 * a)) if a > 0 else np.maximum(x, -b / (2 * a))
    logd = [np.log(w) - np.log(sd) - 0.5 * ((x - m) / sd) ** 2 for m, sd, w in sides]
    return 1.0 / (1.0 + np.exp(np.clip(logd[1] - logd[0], -700, 700)))


def reading_rates(share: np.ndarray, words_ok: np.ndarray, word_rates: list) -> dict | None:
    """Rates of a concept judged by its words alone (a text tower that does not bind): an image where both
    words pass holds the concept with the share of its word readings that contain it (every reading equally
    likely, ``t2c.query.binding.reading_share``)."""
    ok = np.asarray(words_ok, bool)
    if not ok.any() or not word_rates or not all(word_rates):
        return None
    sh = np.asarray(share, np.float64)
    words_p = float(np.prod([r["precision"] for r in word_rates]))
    return {"precision": float(sh[ok].mean()) * words_p, "words_precision": words_p,
            "recall": float(np.prod([r["recall"] for r in word_rates])),
            "miss": float(np.clip(sum(r["miss"] for r in word_rates), 0.0, 1.0))}


class _Prob(qa.Visitor):
    """Per-image probability that a tree truly holds, from per-leaf probabilities and exact filters.
    ``joint(node)``: for an AND node, (leaves it replaces, their joint probability) or None (independent)."""

    def __init__(self, leaf_p, filter_pass, joint=None):
        self.leaf_p, self.filter_pass, self.joint = leaf_p, filter_pass, joint

    def visit_scored(self, node):
        return self.leaf_p(node)

    def visit_filter(self, node):
        return self.filter_pass(node).astype(np.float64)

    def visit_not(self, node):
        return 1.0 - self.visit(node.child)

    def visit_and(self, node):
        out, skip = 1.0, set()
        together = self.joint(node) if self.joint is not None else None
        if together is not None:
            skip, out = {id(c) for c in together[0]}, together[1]
        for c in node.children:
            if id(c) not in skip:
                out = out * self.visit(c)
        return out

    def visit_or(self, node):
        out = 1.0
        for c in node.children:
            out = out * (1.0 - self.visit(c))
        return 1.0 - out


def answer_estimate(node, leaves, cals, passed: dict, filter_pass, match: np.ndarray, unscored: int = 0,
                    readings: dict | None = None, joint=None) -> dict:
    """Estimated precision and recall of an answer and of each concept (None where a concept has no fit).

    Args:
        node: the tree (without prefilter conjuncts). leaves: (leaf, positive) pairs. cals: id(leaf) -> Calibration.
        passed: id(leaf) -> bool array over the scored rows. filter_pass: filter leaf -> bool array over them.
        match: bool array, the answer among the scored rows. unscored: allowed rows never scored (they failed
            an index driver); they count towards the expected true matches through the drivers' miss rate.
        readings: id(leaf) -> per-row chance that a passing row holds a bound concept, before its words'
            precision: for a concept judged by its words alone (a text tower that does not bind) the row's
            reading share, for one judged by the binding rule the posterior of its margin (1 where one reading
            explains the words); instead of the concept's mean.
        joint: ``joint(and_node)`` -> (child leaves, their joint probability per row) or None: concepts ANDed
            that must hold in one reading of the image (``binding.joint_share``), instead of a product.
    Returns:
        ``{"precision", "recall", "concepts": {text: {precision, recall}}}``; None figures where unknown.
    """
    rates = {id(leaf): concept_rates(cals[id(leaf)]) for leaf, _ in leaves}
    concepts = {}
    for leaf, _ in leaves:
        r = rates[id(leaf)]
        concepts[leaf.text] = None if r is None else {"precision": round(r["precision"], 4),
                                                      "recall": round(r["recall"], 4)}
    out = {"precision": None, "recall": None, "concepts": concepts}
    if any(r is None for r in rates.values()) or not len(match):
        return out

    readings = readings or {}

    def leaf_p(leaf):
        r = rates[id(leaf)]
        if id(leaf) in readings:
            return np.where(passed[id(leaf)], readings[id(leaf)] * r.get("words_precision", 1.0), r["miss"])
        return np.where(passed[id(leaf)], r["precision"], r["miss"])

    p = np.broadcast_to(_Prob(leaf_p, filter_pass, joint).visit(node), match.shape)
    in_answer = float(p[match].sum())
    outside = float(p[~match].sum())
    if unscored:
        misses = [rates[id(leaf)]["miss"] for leaf, pos in leaves if pos]
        outside += unscored * (min(misses) if misses else 0.0) * (in_answer / max(match.sum(), 1))
    out["precision"] = round(float(in_answer / match.sum()), 4) if match.any() else None
    out["recall"] = round(float(in_answer / (in_answer + outside)), 4) if in_answer + outside > 0 else None
    return out
