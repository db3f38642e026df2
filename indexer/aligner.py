"""The aligner: a linear map ``c ≈ W f + b`` from an encoder's features into CLIP image space.

Fitted in closed form by ridge regression with an unpenalised bias, from streamed sufficient statistics
(X̃ᵀX̃ and X̃ᵀY with X̃ = [X, 1]), so it works when the features do not fit in memory. Rows are split
into train and held-out deterministically by key; the ridge strength is chosen on the held-out rows, and the
held-out R² of the saved map is reported. Stored as safetensors with provenance metadata.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from t2c.data.artefacts import read_artefact, write_artefact
from t2c.data.errors import AlignerError, InvalidInput

#: ridge strengths, relative to the mean feature variance (scale-free)
DEFAULT_ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FORMAT = "t2c-aligner/1"


class _Split:
    """Augmented sufficient statistics for one split."""

    def __init__(self, dx: int, dy: int):
        self.n = 0
        self.xx = np.zeros((dx + 1, dx + 1), np.float64)  # X̃ᵀX̃
        self.xy = np.zeros((dx + 1, dy), np.float64)  # X̃ᵀY
        self.yy = np.zeros(dy, np.float64)  # Σ y² per dim
        self.ysum = np.zeros(dy, np.float64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        """Add float32 rows ``x`` and targets ``y``; the bias column of X̃ is handled by sums (no copy)."""
        if not len(x):
            return
        # float32 products per batch (2x faster BLAS; x.T @ x runs as a symmetric rank-k update),
        # accumulated in float64 across batches
        sx = x.sum(0, dtype=np.float64)
        sy = y.sum(0, dtype=np.float64)
        self.n += len(x)
        self.xx[:-1, :-1] += x.T @ x
        self.xx[:-1, -1] += sx
        self.xx[-1, :-1] += sx
        self.xx[-1, -1] += len(x)
        self.xy[:-1] += x.T @ y
        self.xy[-1] += sy
        self.yy += np.einsum("ij,ij->j", y, y, dtype=np.float64)
        self.ysum += sy

    def minus(self, other: "_Split") -> "_Split":
        """The statistics of the rows in ``self`` but not in ``other`` (a subset of them)."""
        out = _Split.__new__(_Split)
        out.n = self.n - other.n
        out.xx, out.xy = self.xx - other.xx, self.xy - other.xy
        out.yy, out.ysum = self.yy - other.yy, self.ysum - other.ysum
        return out

    def sse(self, B: np.ndarray) -> np.ndarray:
        """Per-dimension sum of squared errors of predictions X̃B."""
        return self.yy - 2 * (self.xy * B).sum(0) + (B * (self.xx @ B)).sum(0)

    def sst(self) -> np.ndarray:
        return self.yy - self.ysum**2 / max(self.n, 1)


def _holdout_mask(keys, holdout: float, seed: int) -> np.ndarray:
    """Deterministic train/held-out assignment from row keys (independent of streaming order).

    Integer keys (row numbers, ids) are hashed with a vectorised splitmix64; other keys (paths) with blake2b.
    """
    cut = int(holdout * 2**32)
    if isinstance(keys, range) or (len(keys) and all(isinstance(k, (int, np.integer)) for k in keys)):
        z = np.asarray(keys, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15) % 2**64)
        with np.errstate(over="ignore"):
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return (z >> np.uint64(32)) < np.uint64(cut)
    out = np.empty(len(keys), bool)
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=4).digest()
        out[i] = int.from_bytes(h, "little") < cut
    return out


class RidgeAccumulator:
    """Streams (features, CLIP targets) batches into train/held-out sufficient statistics."""

    def __init__(self, dx: int, dy: int, *, holdout: float = 0.2, seed: int = 0):
        if not 0.0 < holdout < 1.0:
            raise InvalidInput(f"holdout fraction must be in (0, 1), got {holdout}")
        self.dx, self.dy, self.holdout, self.seed = int(dx), int(dy), float(holdout), int(seed)
        self.all = _Split(self.dx, self.dy)  # every row; train = all - held (no copy of the 80%)
        self.held = _Split(self.dx, self.dy)
        self._rows = 0

    @property
    def train(self) -> _Split:
        """Statistics of the training rows."""
        return self.all.minus(self.held)

    def add(self, x: np.ndarray, y: np.ndarray, keys=None) -> None:
        """Add a batch; ``keys`` (e.g. paths or ids) fix each row's split, else the running row number."""
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or x.shape[1] != self.dx or y.shape[1] != self.dy:
            raise InvalidInput(f"aligner batch shapes {x.shape} / {y.shape} do not match ({self.dx}, {self.dy})")
        if keys is None:
            keys = range(self._rows, self._rows + len(x))
        self._rows += len(x)
        m = _holdout_mask(keys if isinstance(keys, range) else list(keys), self.holdout, self.seed)
        x32 = np.ascontiguousarray(x, np.float32)
        y32 = np.ascontiguousarray(y, np.float32)
        self.all.add(x32, y32)
        self.held.add(x32[m], y32[m])

    def fit(self, alphas=DEFAULT_ALPHAS, **meta) -> "Aligner":
        """Solve the ridge problem for each alpha, keep the best on held-out rows, return the Aligner."""
        t, h = self.train, self.held
        if t.n < 2 or h.n < 1:
            raise AlignerError(
                f"too few images to fit an aligner ({t.n} train, {h.n} held out)",
                "give at least a few dozen images (more images than feature dimensions is best)",
            )
        # variance scale of the centred features, so that alpha is unit-free
        mean = t.xx[-1, :-1] / t.n
        var = np.diag(t.xx)[:-1] / t.n - mean**2
        scale = max(float(var.mean()), 1e-12) * t.n
        best = None
        sst = h.sst()
        diag = np.arange(self.dx)  # the bias (last row/column) is never penalised
        for a in alphas:
            A = t.xx.copy()
            A[diag, diag] += a * scale
            B = _solve(A, t.xy)
            sse = h.sse(B)
            total = float(sse.sum())
            if best is None or total < best[0] - 1e-12 * abs(best[0]):
                best = (total, a, B, sse)
        _, alpha, B, sse = best
        with np.errstate(divide="ignore", invalid="ignore"):
            per_dim = np.where(sst > 0, 1.0 - sse / sst, 0.0)
        r2 = 1.0 - float(sse.sum()) / max(float(sst.sum()), 1e-300)
        info = dict(meta)
        info.update(
            dx=self.dx, dy=self.dy, n_train=t.n, n_heldout=h.n, alpha=float(alpha), r2_heldout=r2,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        return Aligner(B[:-1].astype(np.float32), B[-1].astype(np.float32), info, per_dim.astype(np.float32))


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a symmetric PSD system, falling back to least squares when it is singular.

    numpy's LAPACK, not scipy's: scipy bundles a second OpenBLAS whose threads fight numpy's (still spinning
    after the accumulation GEMMs) for the cores, which made each small solve ~20x slower.
    """
    try:
        return np.linalg.solve(a, b)
    except np.linalg.LinAlgError:  # singular (alpha=0 with collinear features): use lstsq
        return np.linalg.lstsq(a, b, rcond=None)[0]


def fit_aligner(x: np.ndarray, y: np.ndarray, *, holdout: float = 0.2, seed: int = 0, keys=None,
                alphas=DEFAULT_ALPHAS, **meta) -> "Aligner":
    """Fit an aligner from in-memory features ``x`` (N, d_E) and CLIP image embeddings ``y`` (N, d_C).

    Args:
        x: encoder features.
        y: CLIP image embeddings of the same images (normalised or not; the map is fitted as given).
        holdout: fraction of rows held out to choose the ridge strength and report R².
        seed: split seed. keys: optional per-row keys that fix the split.
        alphas: relative ridge strengths to try. meta: provenance (encoder, clip, ...).

    Returns:
        An :class:`Aligner` with ``r2_heldout`` and per-dimension held-out R².

    Raises:
        InvalidInput: shapes do not match. AlignerError: too few rows.

    Example:
        >>> al = fit_aligner(feats, clip_feats, encoder="world:pairnet", clip="world:clip")  # doctest: +SKIP
        >>> al.apply(feats).shape  # doctest: +SKIP
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise InvalidInput(f"features {x.shape} and targets {y.shape} must be 2-D with equal rows")
    acc = RidgeAccumulator(x.shape[1], y.shape[1], holdout=holdout, seed=seed)
    step = 65536
    for i in range(0, len(x), step):
        acc.add(x[i : i + step], y[i : i + step], None if keys is None else keys[i : i + step])
    return acc.fit(alphas, **meta)


@dataclass
class Aligner:
    """A fitted linear map from encoder features to CLIP space, with provenance."""

    W: np.ndarray  # (d_E, d_C)
    b: np.ndarray  # (d_C,)
    meta: dict = field(default_factory=dict)
    r2_per_dim: np.ndarray | None = None

    @classmethod
    def identity(cls, dim: int, spec: str) -> "Aligner":
        """The aligner of a CLIP encoder indexed against itself."""
        return cls(np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32),
                   {"encoder": spec, "clip": spec, "dx": dim, "dy": dim, "identity": True, "r2_heldout": 1.0})

    @property
    def r2_heldout(self) -> float:
        return float(self.meta.get("r2_heldout", float("nan")))

    @property
    def is_identity(self) -> bool:
        return bool(self.meta.get("identity"))

    @property
    def digest(self) -> str:
        """Content hash of W and b (goes into store manifests)."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.W, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.b, np.float32).tobytes())
        return h.hexdigest()[:32]

    def apply(self, f: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Map features (N, d_E) into CLIP space; L2-normalised rows by default."""
        f = np.asarray(f, np.float32)
        if f.ndim != 2 or f.shape[1] != self.W.shape[0]:
            raise AlignerError(f"features of shape {f.shape} do not fit an aligner for {self.W.shape[0]}-d input",
                               "use the aligner fitted for this encoder")
        a = f if self.is_identity else f @ self.W + self.b
        a = np.ascontiguousarray(a, np.float32)
        if normalize:
            n = np.linalg.norm(a, axis=1, keepdims=True)
            a /= np.maximum(n, 1e-12)
        return a

    def check_pair(self, encoder: str, clip: str | None = None) -> None:
        """Raise AlignerError when this aligner was fitted for another encoder/CLIP pair."""
        if self.meta.get("encoder") and self.meta["encoder"] != encoder:
            raise AlignerError(f"aligner was fitted for encoder {self.meta['encoder']!r}, not {encoder!r}",
                               "fit one for this encoder with `t2c align` or `--fit-aligner N`")
        if clip and self.meta.get("clip") and self.meta["clip"] != clip:
            raise AlignerError(f"aligner targets CLIP {self.meta['clip']!r}, not {clip!r}")

    def save(self, path: str | os.PathLike) -> Path:
        """Write W, b, per-dim R² and provenance as safetensors, atomically."""
        tensors = {"W": np.ascontiguousarray(self.W, np.float32), "b": np.ascontiguousarray(self.b, np.float32)}
        if self.r2_per_dim is not None:
            tensors["r2_per_dim"] = np.ascontiguousarray(self.r2_per_dim, np.float32)
        return write_artefact(path, tensors, {"format": FORMAT, "meta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Aligner":
        """Read an aligner written by :meth:`save`; raise a clear error for anything else."""
        md, tensors = read_artefact(path, "aligner", fix="fit one with `t2c align ... --out FILE`", formats=FORMAT,
                                    required=("W", "b"))
        meta = json.loads(md.get("meta", "{}"))
        W, b = tensors["W"], tensors["b"]
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise AlignerError(f"aligner {str(path)!r} has inconsistent shapes W{W.shape} b{b.shape}")
        return cls(W, b, meta, tensors.get("r2_per_dim"))
