"""Duplicate audit: groups of exact and near-duplicate images, found by FAISS range search, never all pairs.

Method (``find_duplicates``):
  1. **Candidates.** Every image's vector is range-searched in a FAISS index (the store's own, or an IVF index
     built for the audit when the store is large and flat) at a threshold calibrated from the collection:
     the similarity of each image to its nearest other image, over a deterministic sample, is calibrated like
     a concept's scores (``t2c.query.calibrate.calibrate``): the separated top group (the duplicates) gives
     the strict threshold (no group: the robust upper tail). With the pixel check, candidates are taken down
     to the lower of that and the sample's median nearest-neighbour similarity, so that copies whose vectors
     moved (crops, mirrors) still reach the check; without it (``verify=False``) the strict threshold decides.
     Each image keeps its ``MAX_NEIGHBOURS`` closest candidates.
  2. **Verification** (when the image files can be read). An encoder that describes content places two
     *distinct* scenes with the same objects as close as a copy, so each candidate pair is checked on the
     pixels (``PixelVerifier``): a copy is ONE global transform of its original (scale, crop offset, mirror,
     re-encoding noise, per-channel colour affine), while distinct scenes move objects independently. The
     best coarse crop/mirror views (correlation >= ``MATCH_CORRELATION``) seed a registration of one image's
     crop box onto the other at up to ``FINE`` pixels (coordinate descent); the pair is kept when the
     normalised residual is small (``MAX_RESIDUAL``) and the fine detail of the flat regions (texture and
     pixel noise, band-passed) still correlates (``NOISE_CORRELATION``). Identical content hashes are exact
     duplicates without a check.
  3. **Groups.** Connected components of the kept pairs; each group names its kind ("exact" when every
     member has the same content hash, else "near") and its weakest link.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from t2c.data.errors import InvalidInput
from t2c.data.store import ivf_params

__all__ = ["find_duplicates", "duplicate_pairs", "calibrate_duplicates", "DuplicateReport", "PixelVerifier",
           "MATCH_CORRELATION", "MAX_RESIDUAL", "MAX_NEIGHBOURS"]

MAX_NEIGHBOURS = 8  # candidates kept per image (closest first)
NN_SAMPLE = 20_000  # images whose nearest neighbour calibrates the candidate threshold
MATCH_CORRELATION = 0.8  # a coarse crop/mirror view must correlate this well before registration
MAX_RESIDUAL = 0.3  # registered residual (normalised units, pooled 2x2, mean square) a pair may keep
NOISE_CORRELATION = 0.12  # band-passed detail in the flat half of the image must correlate this well
FINE = 64  # registration resolution (pixels), at most the smaller image's side
FLAT_LIMIT = 20_000  # up to this many vectors the range search is exact (flat); beyond, an IVF index
VIEW = 16  # side of the compared views, in pixels
_KEEPS = (1.0, 0.95, 0.9, 0.85, 0.8)
_OFFSETS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class DuplicateReport:
    """Groups of duplicates in a snapshot, with the thresholds used and what was done."""

    groups: list[dict]
    threshold: float
    method: str
    n: int
    candidate_pairs: int
    verified: bool
    seconds: float
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"n": self.n, "threshold": round(float(self.threshold), 6), "method": self.method,
                "candidate_pairs": self.candidate_pairs, "verified": self.verified,
                "match_correlation": MATCH_CORRELATION if self.verified else None,
                "pixel_check": {"max_residual": MAX_RESIDUAL, "noise_correlation": NOISE_CORRELATION,
                                "fine": FINE} if self.verified else None,
                "groups": self.groups, "n_groups": len(self.groups),
                "n_duplicates": int(sum(len(g["ids"]) - 1 for g in self.groups)),
                "seconds": round(self.seconds, 3), "params": self.params}


# ------------------------------------------------------------------------------------- vector stage
def _nn_similarity(index, V: np.ndarray, rows: np.ndarray, nprobe: int | None) -> np.ndarray:
    """Each sampled row's similarity to its nearest *other* vector."""
    q = np.ascontiguousarray(V[rows], np.float32)
    params = ivf_params(index, nprobe) if nprobe else None
    D, I = index.search(q, 2, params=params) if params else index.search(q, 2)
    self_first = I[:, 0] == rows
    return np.where(self_first, D[:, 1], D[:, 0]).astype(np.float64)


def calibrate_duplicates(index, V: np.ndarray, *, nprobe: int | None = None, sample: int = NN_SAMPLE,
                         candidates: bool = True):
    """(threshold, method, params) from the nearest-neighbour similarity distribution of a sample.

    ``candidates=False`` (vectors alone decide): the separated top group's threshold ("nn_gmm"/"nn_otsu"),
    or with none the robust upper tail ("nn_tail"). ``candidates=True`` (a pixel check follows): the lower
    of that and the median nearest-neighbour similarity ("nn_median"), so that copies whose vectors moved
    (crops, mirrors) still reach the check.
    """
    from t2c.query.calibrate import calibrate

    n = len(V)
    rows = np.arange(n) if n <= sample else np.linspace(0, n - 1, sample).round().astype(np.int64)
    nn = _nn_similarity(index, V, rows, nprobe)
    nn = nn[np.isfinite(nn) & (nn > -1e30)]
    med = float(np.median(nn))
    cal = calibrate(nn)
    params = {"nn_median": round(med, 6), "nn_sample": int(len(nn)), "calibration": cal.method,
              "strict_threshold": round(float(cal.threshold), 6)}
    if candidates and med < cal.threshold:
        return med, "nn_median", params
    return float(cal.threshold), "nn_" + ("tail" if cal.method not in ("gmm", "otsu") else cal.method), params


def _audit_index(V: np.ndarray, index=None):
    """(index, nprobe): the given index, or for large collections an IVF index built on the vectors."""
    import faiss

    n, d = V.shape
    if index is not None and (n <= FLAT_LIMIT or faiss.try_extract_index_ivf(index) is not None):
        ivf = faiss.try_extract_index_ivf(index)
        return index, (max(8, ivf.nlist // 128) if ivf is not None else None)
    if n <= FLAT_LIMIT:
        idx = faiss.IndexFlatIP(d)
        idx.add(np.ascontiguousarray(V, np.float32))
        return idx, None
    nlist = int(min(16384, max(64, 4 * np.sqrt(n))))
    quant = faiss.IndexFlatIP(d)
    idx = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
    train = V[np.linspace(0, n - 1, min(n, 40 * nlist)).round().astype(np.int64)]
    idx.train(np.ascontiguousarray(train, np.float32))
    for s in range(0, n, 200_000):
        idx.add(np.ascontiguousarray(V[s:s + 200_000], np.float32))
    return idx, 8


def duplicate_pairs(V: np.ndarray, threshold: float, *, index=None, nprobe: int | None = None,
                    block: int = 16384, max_neighbours: int = MAX_NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """(pairs (m, 2) of row positions i < j, similarities) scoring >= threshold, by FAISS range search.

    Each row keeps its ``max_neighbours`` closest matches; searched in blocks of rows.
    """
    if index is None:
        index, nprobe = _audit_index(V)
    params = ivf_params(index, nprobe) if nprobe else None
    out_p, out_s = [], []
    for s in range(0, len(V), block):
        q = np.ascontiguousarray(V[s:s + block], np.float32)
        lims, D, I = index.range_search(q, float(threshold) - 1e-6, params=params) if params \
            else index.range_search(q, float(threshold) - 1e-6)
        counts = np.diff(np.asarray(lims, np.int64))
        qrow = np.repeat(np.arange(s, s + len(q)), counts)
        keep = I != qrow  # not itself
        qrow, I, D = qrow[keep], I[keep], D[keep]
        order = np.lexsort((-D, qrow))  # per query, closest first
        qrow, I, D = qrow[order], I[order], D[order]
        start = np.r_[0, np.nonzero(np.diff(qrow))[0] + 1] if len(qrow) else np.zeros(0, np.int64)
        rank = np.arange(len(qrow)) - np.repeat(start, np.diff(np.r_[start, len(qrow)]))
        sel = rank < max_neighbours
        a, b = np.minimum(qrow[sel], I[sel]), np.maximum(qrow[sel], I[sel])
        out_p.append(np.stack([a, b], 1))
        out_s.append(D[sel])
    if not out_p:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    P, S = np.concatenate(out_p).astype(np.int64), np.concatenate(out_s).astype(np.float32)
    if not len(P):
        return P, S
    key = P[:, 0] * len(V) + P[:, 1]
    _, first = np.unique(key, return_index=True)
    return P[first], S[first]


# ------------------------------------------------------------------------------------- pixel stage
def _z(x: np.ndarray) -> np.ndarray:
    """HWC pixels with each channel's mean removed and scaled by its spread (floored: flat channels stay quiet)."""
    x = x.astype(np.float32)
    s = x.std((0, 1), keepdims=True)
    return (x - x.mean((0, 1), keepdims=True)) / np.maximum(s, max(0.5 * float(s.max()), 4.0))


def _flat_detail_correlation(Xf: np.ndarray, Yf: np.ndarray) -> float:
    """Correlation of the band-passed detail of two registered views, over the flatter half of Y.

    Away from edges what is left is the image's own fine texture and sensor noise: a copy keeps it (even
    re-encoded, its mid frequencies survive), while another scene's is independent, whatever its objects.
    """
    from scipy.ndimage import uniform_filter

    def band(x):
        return uniform_filter(x, (2, 2, 1)) - uniform_filter(x, (6, 6, 1))

    grad = np.abs(np.gradient(uniform_filter(Yf, (3, 3, 1)), axis=(0, 1))).sum(0).sum(-1)
    grad = np.maximum(grad, uniform_filter(grad, 3))
    flat = grad <= np.percentile(grad, 50)
    a, b = band(Xf)[flat], band(Yf)[flat]
    return float((a * b).sum() / max(np.sqrt((a ** 2).sum() * (b ** 2).sum()), 1e-9))


class PixelVerifier:
    """Pixel check of a candidate pair: is one image ONE global transform of the other?

    A copy is the original under one scale, one offset (a crop), maybe a mirror, re-encoding noise and a
    per-channel colour affine; two distinct scenes move their objects independently. So: (1) coarse
    ``VIEW`` x ``VIEW`` crop/mirror views of each image are correlated with the other whole image and the
    best views (``MATCH_CORRELATION`` gates the pair) seed (2) a registration at up to ``FINE`` pixels: the
    crop box (offset, size) is refined by coordinate descent on the squared difference of the two views,
    each channel normalised (mean, spread); (3) the pair is kept when the residual, pooled 2 x 2, is at most
    ``MAX_RESIDUAL`` and the fine detail of the flat half of the image (its own texture and pixel noise,
    band-passed) correlates at least ``NOISE_CORRELATION``: a copy, even re-encoded, keeps it; another scene
    with the same objects in the same places does not. Images are decoded safely once and cached; an unreadable image fails every check.
    """

    def __init__(self, paths: dict, max_cached: int = 256):
        self.paths = paths
        self.max_cached = max_cached
        self._views: dict = {}

    @staticmethod
    def _norm(x: np.ndarray) -> np.ndarray:
        x = x.reshape(x.shape[0], -1, 3).astype(np.float32)
        x = (x - x.mean(1, keepdims=True)).reshape(x.shape[0], -1)  # per-channel offset removed
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-6)

    def views(self, i: int):
        """{"img", "mir", "views" (V, D), "params" [(flip, x, y, w, h)]} of image id i, or None when unreadable."""
        if i in self._views:
            return self._views[i]
        from PIL import Image, ImageOps

        from t2c.data.errors import ImageDecodeError
        from t2c.data.images import load_image

        try:
            img = load_image(self.paths[i]).convert("RGB")
        except (ImageDecodeError, KeyError):
            out = None
        else:
            w, h = img.size
            crops, params = [], []
            mir = ImageOps.mirror(img)
            for flip, im in ((0, img), (1, mir)):
                for keep in _KEEPS:
                    cw, ch = w * keep, h * keep
                    offs = (0.5,) if keep == 1.0 else _OFFSETS
                    for ox in offs:
                        for oy in offs:
                            x, y = (w - cw) * ox, (h - ch) * oy
                            crops.append(np.asarray(im.resize((VIEW, VIEW), Image.BOX, box=(x, y, x + cw, y + ch))))
                            params.append((flip, x, y, cw, ch))
            out = {"img": img, "mir": mir, "views": self._norm(np.stack(crops)), "params": params}
        if len(self._views) >= self.max_cached:
            self._views.pop(next(iter(self._views)))
        self._views[i] = out
        return out

    @staticmethod
    def _register(X: dict, Y: dict, p: tuple, W: int):
        """(mean squared residual, X's registered view, Y's view): X's crop box refined from p to match Y."""
        from PIL import Image

        flip, x, y, cw, ch = p
        im = X["mir"] if flip else X["img"]
        Xw, Xh = im.size
        ar = ch / cw
        Yf = _z(np.asarray(Y["img"].resize((W, W), Image.BOX)))

        def cost(x, y, cw):
            if x < -0.01 or y < -0.01 or x + cw > Xw + 0.01 or y + cw * ar > Xh + 0.01 or cw < 0.7 * Xw:
                return np.inf, None
            box = (max(x, 0.0), max(y, 0.0), min(x + cw, Xw), min(y + cw * ar, Xh))
            Xf = _z(np.asarray(im.resize((W, W), Image.BOX, box=box)))
            return float(((Xf - Yf) ** 2).mean()), Xf

        best, bx = cost(x, y, cw)
        step = max(Xw / W, 1.0)
        for _ in range(4):  # coordinate descent on offset and size, halving the step
            moved = True
            while moved:
                moved = False
                for dx, dy, ds in ((step, 0, 0), (-step, 0, 0), (0, step, 0), (0, -step, 0), (0, 0, step),
                                   (0, 0, -step), (-step / 2, -step / 2, step), (step / 2, step / 2, -step)):
                    c, f = cost(x + dx, y + dy, cw + ds)
                    if c < best - 1e-9:
                        best, bx, x, y, cw, moved = c, f, x + dx, y + dy, cw + ds, True
            step /= 2
        return best, bx, Yf

    def check(self, a: int, b: int) -> dict:
        """{"correlation", "residual", "noise_correlation", "match"} of images a and b (no match when unreadable)."""
        A, B = self.views(a), self.views(b)
        if A is None or B is None:
            return {"correlation": -1.0, "residual": float("inf"), "noise_correlation": 0.0, "match": False}
        found = []
        for X, Y in ((A, B), (B, A)):  # X holds the wider view, Y the crop / the copy
            c = X["views"] @ Y["views"][0]
            W = int(np.clip(min(Y["img"].size), 16, FINE))
            for j in np.argsort(-c)[:2]:
                if c[j] >= MATCH_CORRELATION:
                    mse, Xf, Yf = self._register(X, Y, X["params"][j], W)
                    if Xf is not None:
                        found.append((mse, Xf, Yf))
        corr = float(max((A["views"] @ B["views"][0]).max(), (B["views"] @ A["views"][0]).max()))
        if not found:
            return {"correlation": corr, "residual": float("inf"), "noise_correlation": 0.0, "match": False}
        _, Xf, Yf = min(found, key=lambda t: t[0])
        d = Xf - Yf
        h, w = d.shape[0] // 2 * 2, d.shape[1] // 2 * 2
        resid = float((d[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)) ** 2).mean())
        noise = _flat_detail_correlation(Xf, Yf)
        match = resid <= MAX_RESIDUAL and noise >= NOISE_CORRELATION
        return {"correlation": corr, "residual": resid, "noise_correlation": noise, "match": bool(match)}

    def same(self, a: int, b: int) -> bool:
        """Whether image b is one global transform of image a (or a of b), within the thresholds."""
        return self.check(a, b)["match"]

    def score(self, a: int, b: int) -> float:
        """Best coarse correlation of a view of either image with the other whole image (-1: unreadable)."""
        return self.check(a, b)["correlation"]


# ------------------------------------------------------------------------------------------- groups
def _groups(n: int, pairs: np.ndarray, sims: np.ndarray) -> list[tuple[np.ndarray, float]]:
    """Connected components (row arrays, weakest kept link) of the kept pairs, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return []
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, label = connected_components(g, directed=False)
    comp_of_pair = label[pairs[:, 0]]
    out = []
    for c in np.unique(comp_of_pair):
        rows = np.nonzero(label == c)[0]
        out.append((rows, float(sims[comp_of_pair == c].min())))
    out.sort(key=lambda g: (-len(g[0]), int(g[0][0])))
    return out


def find_duplicates(snapshot, *, threshold: float | None = None, verify: bool = True) -> DuplicateReport:
    """Groups of exact and near-duplicate images in a snapshot.

    Args:
        snapshot: an open store snapshot.
        threshold: candidate cosine threshold (default: calibrated from the collection, see the module doc).
        verify: check candidate pairs on the pixels (default); False keeps every candidate pair.
    Returns:
        A :class:`DuplicateReport`; ``groups`` are dicts with ``ids``, ``paths``, ``kind`` ("exact" or
        "near") and ``min_similarity``.
    Raises:
        InvalidInput: a threshold outside [-1, 1].

    Example:
        >>> rep = find_duplicates(open_store("photos.t2c"))  # doctest: +SKIP
        >>> [g["ids"] for g in rep.groups][:3]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    V = np.asarray(snapshot.vectors, np.float32)
    ids = np.asarray(snapshot.ids, np.int64)
    n = len(V)
    if threshold is not None and not -1.0 <= float(threshold) <= 1.0:
        raise InvalidInput(f"duplicate threshold must be a cosine in [-1, 1], got {threshold!r}")
    if n < 2:
        return DuplicateReport([], 1.0, "empty", n, 0, False, time.perf_counter() - t0)
    index, nprobe = _audit_index(V, snapshot.index)
    if threshold is None:
        thr, method, params = calibrate_duplicates(index, V, nprobe=nprobe, candidates=verify)
    else:
        thr, method, params = float(threshold), "given", {}
    P, S = duplicate_pairs(V, thr, index=index, nprobe=nprobe)
    rows = snapshot.catalog().execute("SELECT id, path, content_hash FROM images").fetchall()
    paths = {int(i): p for i, p, _ in rows}
    hashes = {int(i): h for i, _, h in rows}
    n_candidates = len(P)
    if verify and len(P):
        pv = PixelVerifier(paths)
        same = np.array([hashes.get(int(ids[a])) == hashes.get(int(ids[b])) for a, b in P], bool)
        ok = np.array([s or pv.same(int(ids[a]), int(ids[b]))
                       for (a, b), s in zip(P, same)], bool)
        P, S = P[ok], S[ok]
    groups = []
    for grows, weakest in _groups(n, P, S):
        gids = [int(i) for i in ids[grows]]
        kind = "exact" if len({hashes.get(i) for i in gids}) == 1 else "near"
        groups.append({"ids": gids, "paths": [paths.get(i, "") for i in gids], "kind": kind,
                       "min_similarity": round(weakest, 6)})
    return DuplicateReport(groups, thr, method, n, int(n_candidates), bool(verify), time.perf_counter() - t0, params)
