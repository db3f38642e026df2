"""Typed result objects of the public API: they iterate, convert to Arrow and pandas, and give paths."""
from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, Sequence, TypeVar

from t2c.data.errors import NotAvailable

if TYPE_CHECKING:  # pragma: no cover - type hints only
    import pandas
    import pyarrow

R = TypeVar("R")


def jsonable(v: Any) -> Any:
    """A JSON-friendly copy of a catalog value (dates as ISO text, numpy scalars as Python numbers)."""
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


class Rows(Generic[R]):
    """A sequence of typed rows: ``for r in result``, ``len(result)``, ``result[0]``, Arrow and pandas."""

    _rows: Sequence[R]

    def __iter__(self) -> Iterator[R]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> R:
        return self._rows[i]

    def _records(self) -> list[dict]:
        return [asdict(r) for r in self._rows]  # type: ignore[call-overload]

    def _schema(self) -> "pyarrow.Schema | None":
        return None

    def to_arrow(self) -> "pyarrow.Table":
        """The rows as a ``pyarrow.Table`` (one column per field; same columns when empty)."""
        import pyarrow as pa

        schema = self._schema()
        recs = self._records()
        if not recs and schema is not None:
            return schema.empty_table()
        table = pa.Table.from_pylist(recs)
        if schema is not None:
            table = table.cast(pa.schema([schema.field(n) if n in schema.names else table.schema.field(n)
                                          for n in table.column_names]))
        return table

    def to_pandas(self) -> "pandas.DataFrame":
        """The rows as a ``pandas.DataFrame`` (needs pandas: ``pip install pandas``)."""
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise NotAvailable("to_pandas() needs pandas, which is not installed",
                               "pip install pandas, or use to_arrow()") from None
        return self.to_arrow().to_pandas()


def _schema(**cols: str) -> "pyarrow.Schema":
    import pyarrow as pa

    kinds = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
             "ids": pa.list_(pa.int64())}
    return pa.schema([(n, kinds[k]) for n, k in cols.items()])


# ------------------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class Hit:
    """One matching image: catalog id, file path, ranking score, and (with ``explain=True``) per-concept detail."""

    id: int
    path: str
    score: float
    explanation: tuple[dict, ...] | None = None

    def to_dict(self) -> dict:
        """JSON form: ``{id, path, score[, explanation]}``."""
        d: dict[str, Any] = {"id": self.id, "path": self.path, "score": round(self.score, 6)}
        if self.explanation is not None:
            d["explanation"] = [dict(e) for e in self.explanation]
        return d


class SearchResult(Rows[Hit]):
    """One page of a search: the hits in rank order, the total number of matches, timing and notes.

    Example:
        >>> res = store.search("red circle AND NOT square", k=50)  # doctest: +SKIP
        >>> res.total, res.paths[:3]  # doctest: +SKIP
        >>> res.to_pandas().head()  # doctest: +SKIP
    """

    snapshot: str  #: the snapshot that answered

    def __init__(self, raw: Any, snapshot: str, node: Any) -> None:
        self._raw = raw
        self._node = node
        self._rows = tuple(Hit(int(h.id), str(h.path), float(h.score),
                               None if h.explanation is None else tuple(h.explanation)) for h in raw.hits)
        self.snapshot = snapshot

    @property
    def text(self) -> str:
        """The query as text; searching it again pages through the same answer (uploads: ``like:"sha256:..."``)."""
        from t2c.query.parse import format as to_text

        return to_text(self._node)

    @property
    def hits(self) -> list[Hit]:
        """The hits of this page, best first."""
        return list(self._rows)

    @property
    def total(self) -> int:
        """How many images match in all (every page)."""
        return int(self._raw.total)

    @property
    def took_ms(self) -> float:
        """Time the engine took, in milliseconds."""
        return float(self._raw.took_ms)

    @property
    def k(self) -> int:
        """Page size asked for."""
        return int(self._raw.k)

    @property
    def offset(self) -> int:
        """Index of this page's first hit."""
        return int(self._raw.offset)

    @property
    def query(self) -> dict:
        """The parsed query, as a JSON tree."""
        return dict(self._raw.query)

    @property
    def plan(self) -> dict:
        """How the engine answered (candidates, thresholds)."""
        return dict(self._raw.plan)

    @property
    def warnings(self) -> list[str]:
        """Notes for the person asking."""
        return list(self._raw.warnings)

    @property
    def estimate(self) -> dict | None:
        """Estimated precision and recall of the answer and of each concept, from the calibration fits (no
        labels), when the engine made one."""
        est = self._raw.plan.get("estimate")
        return None if est is None else dict(est)

    @property
    def paths(self) -> list[str]:
        """File paths of the hits, best first."""
        return [h.path for h in self._rows]

    @property
    def ids(self) -> list[int]:
        """Catalog ids of the hits, best first."""
        return [h.id for h in self._rows]

    def _records(self) -> list[dict]:
        return [h.to_dict() for h in self._rows]

    def _schema(self) -> "pyarrow.Schema":
        return _schema(id="int", path="str", score="float")

    def to_dict(self) -> dict:
        """JSON form (as the HTTP service answers): query, total, k, offset, took_ms, plan, hits, snapshot."""
        return {**self._raw.to_dict(), "snapshot": self.snapshot}

    def __repr__(self) -> str:
        return f"SearchResult(total={self.total}, hits={len(self)}, offset={self.offset})"


# ------------------------------------------------------------------------------------------------ audits
@dataclass(frozen=True)
class Prevalence:
    """How often one concept occurs: the estimate with its confidence interval, and example image ids."""

    concept: str
    prevalence: float
    ci_low: float
    ci_high: float
    count: int
    threshold: float | None
    method: str
    examples: tuple[int, ...] = ()


class AuditResult(Rows[Prevalence]):
    """Prevalence of each audited concept, in the order asked.

    Example:
        >>> for p in store.audit(["red", "teal background"]):  # doctest: +SKIP
        ...     print(p.concept, p.prevalence, p.ci_low, p.ci_high)
    """

    def __init__(self, report: Any, paths_of: Callable[[Sequence[int]], list[str]],
                 html: Callable[[Any], str]) -> None:
        self._report = report
        self._paths_of = paths_of
        self._html = html
        self._rows = tuple(Prevalence(c["concept"], float(c["prevalence"]), float(c["ci_low"]), float(c["ci_high"]),
                                      int(c["count"]), None if c.get("threshold") is None else float(c["threshold"]),
                                      str(c.get("method", report.method)), tuple(int(i) for i in c["examples"]))
                           for c in report.concepts)

    @property
    def n(self) -> int:
        """Images audited."""
        return int(self._report.n)

    @property
    def snapshot(self) -> str:
        """Snapshot the audit read."""
        return str(self._report.snapshot)

    @property
    def paths(self) -> dict[str, list[str]]:
        """Example image paths per concept (highest scores first)."""
        return {p.concept: self._paths_of(p.examples) for p in self._rows}

    def _schema(self) -> "pyarrow.Schema":
        return _schema(concept="str", prevalence="float", ci_low="float", ci_high="float", count="int",
                       threshold="float", method="str", examples="ids")

    def to_dict(self) -> dict:
        """JSON form: store, snapshot, encoder, clip, n, method, concepts (with calibration detail)."""
        return self._report.to_dict()

    def write_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (prevalence bars, example thumbnails) to ``path``."""
        return _write_html(path, self._html(self._report))


@dataclass(frozen=True)
class Shift:
    """How one concept's prevalence changed from store A to store B, with its corrected significance."""

    rank: int
    concept: str
    prevalence_a: float
    prevalence_b: float
    diff: float
    cohens_h: float
    p: float
    p_adj: float
    significant: bool
    examples_a: tuple[int, ...] = ()
    examples_b: tuple[int, ...] = ()


class DriftResult(Rows[Shift]):
    """Per-concept shift between two stores, largest |Cohen's h| first.

    Example:
        >>> [s.concept for s in store.drift(other, ["red", "circle"]) if s.significant]  # doctest: +SKIP
    """

    def __init__(self, report: Any, paths: dict[str, tuple[list[str], list[str]]],
                 html: Callable[[Any], str]) -> None:
        self._report = report
        self._paths = paths
        self._html = html
        self._rows = tuple(Shift(int(c["rank"]), c["concept"], float(c["prevalence_a"]), float(c["prevalence_b"]),
                                 float(c["diff"]), float(c["cohens_h"]), float(c["p"]), float(c["p_adj"]),
                                 bool(c["significant"]), tuple(int(i) for i in c.get("examples_a", ())),
                                 tuple(int(i) for i in c.get("examples_b", ()))) for c in report.concepts)

    @property
    def n_a(self) -> int:
        """Images in store A."""
        return int(self._report.n_a)

    @property
    def n_b(self) -> int:
        """Images in store B."""
        return int(self._report.n_b)

    @property
    def paths(self) -> dict[str, tuple[list[str], list[str]]]:
        """Example image paths per concept: (from store A, from store B), highest scores first."""
        return {c: (list(a), list(b)) for c, (a, b) in self._paths.items()}

    def _schema(self) -> "pyarrow.Schema":
        return _schema(rank="int", concept="str", prevalence_a="float", prevalence_b="float", diff="float",
                       cohens_h="float", p="float", p_adj="float", significant="bool", examples_a="ids",
                       examples_b="ids")

    def to_dict(self) -> dict:
        """JSON form: both stores, sizes, alpha, correction and the ranked concepts."""
        return self._report.to_dict()

    def write_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML drift report to ``path``."""
        return _write_html(path, self._html(self._report))


def _write_html(path: str | Path, html: str) -> Path:
    from t2c.query.report import write_html

    write_html(Path(path), html)
    return Path(path)


# ------------------------------------------------------------------------------------------------ duplicates
@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of one another: ``kind`` "exact" (same content) or "near" (resized, re-encoded...)."""

    ids: tuple[int, ...]
    paths: tuple[str, ...]
    kind: str
    min_similarity: float


class DuplicatesResult(Rows[DuplicateGroup]):
    """Groups of exact and near-duplicate images, with the candidate threshold used.

    Example:
        >>> dups = store.duplicates()  # doctest: +SKIP
        >>> [p for group in dups.paths for p in group[1:]]  # every copy but the first of each group  # doctest: +SKIP
    """

    snapshot: str  #: the snapshot that was searched

    def __init__(self, report: Any, store: str, snapshot: str) -> None:
        self._report = report
        self._store = store
        self.snapshot = snapshot
        self._rows = tuple(DuplicateGroup(tuple(int(i) for i in g["ids"]), tuple(str(p) for p in g["paths"]),
                                          str(g["kind"]), float(g["min_similarity"])) for g in report.groups)

    @property
    def threshold(self) -> float:
        """The candidate cosine threshold used."""
        return float(self._report.threshold)

    @property
    def paths(self) -> list[list[str]]:
        """The file paths of each group."""
        return [list(g.paths) for g in self._rows]

    def _schema(self) -> "pyarrow.Schema":
        import pyarrow as pa

        return pa.schema([("ids", pa.list_(pa.int64())), ("paths", pa.list_(pa.string())), ("kind", pa.string()),
                          ("min_similarity", pa.float64())])

    def to_dict(self) -> dict:
        """JSON form: n, threshold, method, candidate_pairs, verified, groups, n_groups, n_duplicates, snapshot."""
        return dict(self._report.to_dict(), store=self._store, snapshot=self.snapshot)

    def write_html(self, path: str | Path) -> Path:
        """Write a self-contained HTML report (each group's thumbnails side by side) to ``path``."""
        from t2c.query.report import duplicates_html

        return _write_html(path, duplicates_html(self.to_dict()))


# ------------------------------------------------------------------------------------------------ classify
@dataclass(frozen=True)
class Prediction:
    """The zero-shot label of one image, with its score and its margin-based confidence."""

    id: int
    path: str
    label: str
    score: float
    confidence: float


class ClassifyResult(Rows[Prediction]):
    """Zero-shot predictions for every image (in catalog order), counts per label, accuracy against a truth column.

    Example:
        >>> res = store.classify(["circle", "square", "triangle"])  # doctest: +SKIP
        >>> res.counts, res.to_pandas().groupby("label").size()  # doctest: +SKIP
    """

    snapshot: str  #: the snapshot that answered

    def __init__(self, out: dict, paths: Sequence[str], snapshot: str) -> None:
        self._out = out
        self.snapshot = snapshot
        self._rows = tuple(Prediction(int(p["id"]), str(path), p["label"], float(p["score"]), float(p["confidence"]))
                           for p, path in zip(out["predictions"], paths))

    @property
    def labels(self) -> list[str]:
        """The labels, in the order given."""
        return list(self._out["labels"])

    @property
    def counts(self) -> dict[str, int]:
        """Images per predicted label."""
        return dict(self._out["counts"])

    @property
    def accuracy(self) -> float | None:
        """Accuracy against ``truth=`` (None without)."""
        return self._out.get("accuracy")

    @property
    def annotations(self) -> str | None:
        """Path of the written predictions sidecar (``write=True``), else None."""
        return self._out.get("annotations")

    @property
    def paths(self) -> list[str]:
        """File paths, aligned with the predictions."""
        return [p.path for p in self._rows]

    def _schema(self) -> "pyarrow.Schema":
        return _schema(id="int", path="str", label="str", score="float", confidence="float")

    def to_dict(self, limit: int | None = 20) -> dict:
        """JSON form with the first ``limit`` predictions (None: all); ``predictions_truncated`` says when cut."""
        out = {k: v for k, v in self._out.items() if k != "predictions"}
        out["snapshot"] = self.snapshot
        preds = [asdict(p) for p in self._rows]
        if limit is not None and len(preds) > limit:
            preds = preds[:limit]
            out["predictions_truncated"] = True
        out["predictions"] = preds
        return out


# ------------------------------------------------------------------------------------------------ single items
@dataclass(frozen=True)
class Description:
    """A caption decoded from one image's aligned vector."""

    id: int
    path: str | None
    caption: str
    decoder: str
    kind: str
    clip: str

    def to_dict(self) -> dict:
        """JSON form of every field."""
        return asdict(self)


@dataclass(frozen=True)
class ImageRecord:
    """One catalogued image: its id, file path and catalog row (size, dimensions, times, user columns).

    Example:
        >>> img = store.image(3)  # doctest: +SKIP
        >>> img.path, img.metadata["width"], img.load().size  # doctest: +SKIP
    """

    id: int
    path: str
    metadata: dict
    roots: tuple[str, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        """The catalog row, JSON-friendly."""
        return {k: jsonable(v) for k, v in self.metadata.items()}

    def file(self) -> str:
        """The file's real path, checked to lie inside one of the folders the store indexed.

        Raises:
            Forbidden: the file resolves outside them (a symlink, ``..``). NotFound: the file is gone.
        """
        from t2c._store import checked_file

        return checked_file(self.id, self.path, self.roots)

    def load(self, *, max_side: int | None = None, max_pixels: int = 89_478_485,
             max_bytes: int | None = 256 << 20) -> Any:
        """The image decoded safely (EXIF orientation, RGB; decompression bombs refused) as a ``PIL.Image``.

        Args:
            max_side: when given, decode at reduced size where the format allows (JPEG draft) and shrink so the
                longest side is at most this.
            max_pixels / max_bytes: refuse larger images and files.

        Raises:
            Forbidden / NotFound: as :meth:`file`. ImageDecodeError: the file cannot be decoded (``.reason``).
        """
        from t2c.data.images import load_image

        img = load_image(self.file(), max_pixels=max_pixels, max_bytes=max_bytes, draft=max_side)
        if max_side:
            from PIL import Image as PILImage

            img.thumbnail((max_side, max_side), PILImage.Resampling.LANCZOS)
        return img


@dataclass(frozen=True)
class StoreInfo:
    """A summary of a store's live snapshot (its manifest and catalog)."""

    path: str
    snapshot: str
    created: str | None
    count: int
    errors: int | None
    dim: int | None
    feature_dim: int | None
    encoder: str
    clip: str
    counts: dict
    index: dict
    aligner: dict
    roots: list
    columns: dict
    unreadable: list | None = None

    def to_dict(self) -> dict:
        """JSON form of every field (``unreadable`` only when asked for)."""
        d = asdict(self)
        if d["unreadable"] is None:
            d.pop("unreadable")
        return d


@dataclass(frozen=True)
class EncoderInfo:
    """One listed encoder: a concrete spec (``world:clip``) or a source (``timm:NAME``)."""

    spec: str
    source: str
    dim: int | None
    has_text: bool | None
    description: str

    def to_dict(self) -> dict:
        """JSON form of every field."""
        return asdict(self)


class EncoderList(Rows[EncoderInfo]):
    """The encoders :func:`t2c.encoders` lists, plus the ``features=`` options (``.options``)."""

    options: dict[str, str]  #: ``features=`` option values and what each adds

    def __init__(self, rows: Sequence[dict], options: dict[str, str]) -> None:
        names = {f.name for f in fields(EncoderInfo)}
        self._rows = tuple(EncoderInfo(**{k: v for k, v in r.items() if k in names}) for r in rows)
        self.options = dict(options)

    @property
    def specs(self) -> list[str]:
        """The listed spec strings."""
        return [e.spec for e in self._rows]

    def _schema(self) -> "pyarrow.Schema":
        return _schema(spec="str", source="str", dim="int", has_text="bool", description="str")
