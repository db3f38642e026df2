"""The store object of the public API: one open store, following its live snapshot, safe to share between threads.

A store folder holds immutable snapshots named by ``CURRENT``. :class:`Store` opens the live one read-only and
builds a query engine over it (a *view*). At most once per ``refresh_interval`` seconds a call checks ``CURRENT``;
when it names a new snapshot, a new view is built beside the old one and a single reference is swapped. Every
call takes one view at its start and uses only it, so it answers from either the old or the new snapshot,
never a mix; the old view stays alive until the last call holding it returns.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from t2c._results import (AuditResult, ClassifyResult, Description, DriftResult, DuplicatesResult, ImageRecord,
                          SearchResult, StoreInfo)
from t2c.data.errors import Forbidden, InvalidInput, NotAvailable, NotFound, StoreError, T2CError

if TYPE_CHECKING:  # pragma: no cover - type hints only
    import pyarrow

log = logging.getLogger("t2c")


@dataclass(frozen=True)
class _View:
    """One consistent view: a snapshot, the engine built over it, and results kept for it (duplicates)."""

    name: str
    snapshot: Any
    engine: Any
    kept: dict = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock)


def _open_view(path: Path, verify: bool, example_files: bool = True) -> _View:
    from t2c.data.store import open_store
    from t2c.query.engine import Engine
    from t2c.query.examples import ExampleBank

    snap = open_store(path, verify=verify)
    return _View(snap.name, snap, Engine(snap, examples=ExampleBank(snap, allow_files=example_files)))


def _inside(real: str, roots: Sequence[str]) -> bool:
    for r in roots:
        try:
            if os.path.commonpath([real, r]) == r:
                return True
        except ValueError:
            continue
    return False


def checked_file(image_id: int, path: str | None, roots: Sequence[str]) -> str:
    """The real path of a catalogued image, checked to lie inside one of the store's indexed folders."""
    if not path:
        raise NotFound(f"image id {image_id} has no file path")
    real_roots = [os.path.realpath(r) for r in roots]
    real = os.path.realpath(path)
    if not real_roots or not _inside(real, real_roots):
        raise Forbidden(f"image id {image_id} resolves outside the store's indexed folders",
                        "only files under the folders given to `t2c index` are served")
    if not os.path.isfile(real):
        raise NotFound(f"the file of image id {image_id} no longer exists", "re-run `t2c index` to update the store")
    return real


class Store:
    """An open store: search, audits, classification and captions over its live snapshot.

    Made by :func:`t2c.open`. Safe to share between threads for reading; each call answers from one snapshot.
    Close it (or use ``with``) to release the catalog connection.
    """

    path: Path  #: the store folder
    verify: bool  #: whether snapshots are checked against their manifest's checksums when opened
    refresh_interval: float | None  #: seconds between checks for a new snapshot (None: pinned)
    example_files: bool  #: whether queries may name image files as examples

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True, refresh_interval: float | None = 1.0,
                 example_files: bool = True) -> None:
        self.path = Path(path)
        self.verify = bool(verify)
        self.refresh_interval = None if refresh_interval is None else float(refresh_interval)
        self.example_files = bool(example_files)
        self._lock = threading.Lock()
        self._closed = False
        self._view: _View = self._open_view()
        self._checked = time.monotonic()

    # -- lifecycle --
    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the catalog connection; later calls raise StoreError. Closing twice is fine."""
        with self._lock:
            self._closed = True
            self._view.snapshot.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"count={self._view.snapshot.count}"
        return f"t2c.Store({str(self.path)!r}, snapshot={self.snapshot!r}, {state})"

    # -- the live view --
    @property
    def snapshot(self) -> str:
        """Name of the snapshot the last call answered from (it moves on when `t2c index` commits a new one)."""
        return self._view.name

    @property
    def count(self) -> int:
        """Images in the live snapshot."""
        return int(self._current().snapshot.count)

    def refresh(self) -> bool:
        """Re-open the store now if ``CURRENT`` names a newer snapshot; True when it moved on.

        Raises:
            StoreError / NotFound: the new snapshot cannot be opened (the old one keeps answering).
        """
        with self._lock:
            self._check_open()
            self._checked = time.monotonic()
            return self._reload(self._view, strict=True)

    def _open_view(self) -> _View:
        return _open_view(self.path, self.verify, self.example_files)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {str(self.path)!r} is closed", "open it again with t2c.open(...)")

    def _current(self) -> _View:
        """The view for one call, re-opening first when CURRENT changed (checked at most once per interval)."""
        self._check_open()
        view = self._view
        if self.refresh_interval is None or time.monotonic() - self._checked < self.refresh_interval:
            return view
        # only one caller re-opens; the others keep answering from the old snapshot meanwhile
        if not self._lock.acquire(blocking=False):
            return view
        try:
            self._checked = time.monotonic()
            self._reload(view, strict=False)
        finally:
            self._lock.release()
        return self._view

    def _reload(self, view: _View, *, strict: bool) -> bool:
        from t2c.data.store import current_name

        try:
            name = current_name(self.path)
        except OSError as e:  # the folder vanished or is unreadable: keep answering from what we have
            if strict:
                raise StoreError(f"cannot read {str(self.path)!r}: {e}") from None
            log.warning("cannot read CURRENT of %s: %s", self.path, e)
            return False
        if name is None or name == view.name:
            return False
        try:
            new = self._open_view()
        except (T2CError, OSError) as e:
            # e.g. a snapshot removed between reading CURRENT and opening it: retry at the next check
            if strict:
                raise
            log.warning("re-opening store %s at %s failed, still serving %s: %s", self.path, name, view.name, e)
            return False
        self._view = new  # single reference swap; calls holding `view` keep using it
        log.info("store %s: now answering from snapshot %s (%d images)", self.path, new.name, new.snapshot.count)
        return True

    # -- queries --
    def search(self, query: str | dict | None = None, *, like: int | str | os.PathLike[str] | bytes | None = None,
               k: int = 20, offset: int = 0, explain: bool = False, max_terms: int = 32, max_length: int = 2000,
               max_pixels: int | None = None) -> SearchResult:
        """Find the images that satisfy a query, ranked by calibrated score.

        Args:
            query: a query string (``'red circle AND NOT square AND width>=512'``; see the README's
                "Queries") or its JSON tree (``{"type": "concept", "text": "red"}``).
            like: an example image, AND-ed with the query: a catalog id, an image file, or an image's bytes (an
                upload). Same as the leaf ``like:ID`` / ``like:"FILE"`` in the query text.
            k: hits per page (1..10,000). offset: index of the page's first hit.
            explain: add each concept's score, threshold and pass/fail to every hit.
            max_terms / max_length: most concepts + filters, and longest query string, accepted.
            max_pixels: largest example image accepted as bytes (default: the indexing limit).

        Returns:
            A :class:`SearchResult`: iterate it for :class:`Hit` objects; ``.total``, ``.paths``,
            ``.to_pandas()``; ``.text`` is the query as text (an upload appears as ``like:"sha256:..."``).

        Raises:
            QuerySyntaxError: the query does not parse (``.position`` says where). InvalidInput: a bad tree,
            an unknown filter column, bad paging, neither a query nor ``like``. UnknownChoice: a word the text
            tower does not know. NotFound: an unknown example id. ImageDecodeError: an example image that
            cannot be decoded (``.reason``).

        Example:
            >>> with t2c.open("photos.t2c") as store:  # doctest: +SKIP
            ...     for hit in store.search("red circle AND NOT square", k=5):
            ...         print(hit.score, hit.path)
            ...     store.search("NOT red", like="cat.jpg").paths  # images like cat.jpg that are not red
        """
        from t2c.query.ast import Example, conj

        node = None if query is None else _parse(query, max_terms=max_terms, max_length=max_length)
        if node is None and like is None:
            raise InvalidInput("give a query, an example image (like=), or both",
                               'e.g. store.search("red circle") or store.search(like=3)')
        view = self._current()
        if like is not None:
            node = conj([Example(_example_ref(view, like, max_pixels))] + ([node] if node is not None else []))
        raw = view.engine.search(node, k=k, offset=offset, explain=explain)
        return SearchResult(raw, view.name, node)

    def duplicates(self, *, threshold: float | None = None, verify: bool = True) -> DuplicatesResult:
        """Groups of exact and near-duplicate images (computed once per snapshot and kept).

        Args:
            threshold: the candidate cosine threshold (default: calibrated on the collection's nearest
                neighbours). verify: check candidate pairs on the pixels (False: vectors alone, for huge stores).

        Returns:
            A :class:`DuplicatesResult` of :class:`DuplicateGroup` rows (ids, paths, kind, min_similarity).

        Raises:
            InvalidInput: a threshold outside [-1, 1].

        Example:
            >>> for group in store.duplicates():  # doctest: +SKIP
            ...     print(group.kind, group.paths)
        """
        from t2c.query.duplicates import find_duplicates

        view = self._current()
        key = ("duplicates", threshold, bool(verify))
        with view.lock:  # one computation per snapshot and settings; concurrent callers wait for it
            rep = view.kept.get(key)
            if rep is None:
                rep = view.kept[key] = find_duplicates(view.snapshot, threshold=threshold, verify=verify)
        return DuplicatesResult(rep, str(self.path), view.name)

    def audit(self, concepts: Sequence[str] | str, *, top: int = 8, method: str = "mixture") -> AuditResult:
        """How often each concept occurs in the collection, with a 95% confidence interval and example images.

        Args:
            concepts: concept texts (``["red", "teal background"]``), or ``"a,b,c"``, or a file with one per line.
            top: example image ids per concept. method: ``"mixture"`` (default) or ``"count"``.

        Returns:
            An :class:`AuditResult` of :class:`Prevalence` rows; ``.paths`` maps concepts to example paths.

        Raises:
            InvalidInput: no concepts, or an empty store. UnknownChoice: a bad method or an unknown word.

        Example:
            >>> for p in store.audit(["red", "circle"]):  # doctest: +SKIP
            ...     print(f"{p.concept}: {p.prevalence:.1%} [{p.ci_low:.1%}, {p.ci_high:.1%}]")
        """
        from t2c.query.audit import audit
        from t2c.query.report import audit_html

        view = self._current()
        rep = audit(view.snapshot, concepts, top=int(top), method=method, bank=view.engine.bank)
        snap = view.snapshot
        return AuditResult(rep, lambda ids: _paths_of(snap, ids), lambda r: audit_html(r, snap))

    def drift(self, other: "Store | str | os.PathLike[str]", concepts: Sequence[str] | str, *, top: int = 4,
              alpha: float = 0.05, correction: str = "bh") -> DriftResult:
        """Which concepts changed between this store (A) and ``other`` (B), ranked by effect size.

        Args:
            other: another :class:`Store`, or the path of one (both must share the CLIP space).
            concepts: as in :meth:`audit`. top: example ids per concept from each store.
            alpha: significance level after correction. correction: ``"bh"`` (Benjamini-Hochberg) or ``"holm"``.

        Returns:
            A :class:`DriftResult` of :class:`Shift` rows, largest |Cohen's h| first.

        Raises:
            InvalidInput: the stores do not share a CLIP space, or either is empty.

        Example:
            >>> with t2c.open("2024.t2c") as a, t2c.open("2025.t2c") as b:  # doctest: +SKIP
            ...     print([s.concept for s in a.drift(b, ["red", "circle"]) if s.significant])
        """
        from t2c.query.audit import drift
        from t2c.query.report import drift_html

        if correction not in ("bh", "holm"):
            from t2c.data.errors import UnknownChoice

            raise UnknownChoice("correction", correction, ["bh", "holm"])
        va = self._current()
        own = not isinstance(other, Store)
        vb = _open_view(Path(other), self.verify) if own else other._current()  # type: ignore[arg-type]
        try:
            rep = drift(va.snapshot, vb.snapshot, concepts, top=int(top), alpha=float(alpha), correction=correction,
                        bank=va.engine.bank)
            paths = {c["concept"]: (_paths_of(va.snapshot, c["examples_a"]), _paths_of(vb.snapshot, c["examples_b"]))
                     for c in rep.concepts}
        finally:
            if own:
                vb.snapshot.close()
        sa, sb = va.snapshot, vb.snapshot
        return DriftResult(rep, paths, lambda r: drift_html(r, sa, sb))

    def classify(self, labels: Sequence[str] | str, *, truth: str | None = None, name: str | None = None,
                 write: bool = False) -> ClassifyResult:
        """Zero-shot classify every image into one of ``labels``.

        Args:
            labels: two or more label texts, or ``"a,b,c"``, or a file with one per line.
            truth: a catalog column with the true label, for accuracy and confusions.
            name / write: with ``write=True`` the predictions are also saved to
                ``STORE/annotations/classify-NAME.parquet`` (default name: a hash of the labels).

        Returns:
            A :class:`ClassifyResult` of :class:`Prediction` rows (every image, catalog order); ``.counts``,
            ``.accuracy``.

        Raises:
            InvalidInput: fewer than two labels, an empty store. UnknownChoice: an unknown truth column.

        Example:
            >>> res = store.classify(["circle", "square", "triangle"])  # doctest: +SKIP
            >>> res.to_pandas()[["path", "label"]]  # doctest: +SKIP
        """
        from t2c.query.classify import classify

        view = self._current()
        out = classify(view.snapshot, labels, truth=truth, name=name, write=write, bank=view.engine.bank,
                       predictions=None)
        return ClassifyResult(out, _paths_of(view.snapshot, [p["id"] for p in out["predictions"]]), view.name)

    def describe(self, id: int, *, decoder: str | os.PathLike[str] | None = None, max_len: int = 30) -> Description:
        """A caption for one image, decoded from its aligned vector.

        Args:
            id: a catalog image id (from a search hit). decoder: a caption decoder file (default: the shipped
                world decoder for ``world:clip`` stores, else ``$T2C_CAPTION_DECODER``). max_len: most tokens.

        Raises:
            NotFound: unknown id. NotAvailable: no caption decoder for this store's CLIP space.

        Example:
            >>> store.describe(3).caption  # doctest: +SKIP
            'a large red circle on a teal background'
        """
        from t2c.query.describe import describe

        view = self._current()
        iid = _image_id(id)
        view.snapshot.rows_of([iid])  # NotFound for unknown ids, before any work
        try:
            out = describe(view.snapshot, iid, decoder, max_len=max_len)
        except NotFound as e:  # the id exists, so what is missing is a caption decoder for this CLIP space
            raise NotAvailable(f"describe is not available for this store: {e.message}", e.hint) from None
        return Description(int(out["id"]), out.get("path"), out["caption"], out["decoder"], out["kind"], out["clip"])

    def image(self, id: int) -> ImageRecord:
        """One catalogued image: path and catalog row; ``.load()`` decodes it, ``.file()`` checks its path.

        Raises:
            NotFound: unknown id.

        Example:
            >>> store.image(3).metadata["width"]  # doctest: +SKIP
        """
        view = self._current()
        iid = _image_id(id)
        row = view.snapshot.image_rows([iid])[0]
        roots = tuple(view.snapshot.manifest.get("roots") or ())
        return ImageRecord(iid, str(row.get("path") or ""), dict(row), roots)

    def info(self, *, errors: bool = False) -> StoreInfo:
        """A summary of the live snapshot: counts, encoder, CLIP, index, aligner, roots, catalog columns.

        Args:
            errors: also list the files that could not be indexed (``.unreadable``: path, reason, message).

        Example:
            >>> info = store.info()  # doctest: +SKIP
            >>> info.count, info.encoder, info.aligner.get("r2_heldout")  # doctest: +SKIP
        """
        view = self._current()
        snap, m = view.snapshot, view.snapshot.manifest
        try:
            columns = snap.columns()
        except Exception:  # noqa: BLE001 - a catalog problem must not hide the rest of the summary
            columns = {}
        unreadable = None
        if errors:
            rows = snap.catalog().execute("SELECT path, reason, message FROM errors ORDER BY path").fetchall()
            unreadable = [dict(zip(("path", "reason", "message"), r)) for r in rows]
        counts = dict(m.get("counts") or {})
        return StoreInfo(str(self.path), view.name, m.get("created"), int(snap.count), counts.get("errors"),
                         m.get("dim"), m.get("feature_dim"), m.get("encoder", ""), m.get("clip", ""), counts,
                         dict(m.get("index") or {}), dict(m.get("aligner") or {}), list(m.get("roots") or []),
                         columns, unreadable)

    def table(self, columns: Sequence[str] | None = None) -> "pyarrow.Table":
        """The catalog row of every image, in id order, as a ``pyarrow.Table`` (``.to_pandas()`` for a frame).

        Args:
            columns: the catalog columns to return (default: all; ``info().columns`` lists them, user columns
                from ``t2c.index(columns=...)`` included).

        Raises:
            UnknownChoice: a column the catalog does not have.

        Example:
            >>> store.table(["id", "path", "width"]).to_pandas()  # doctest: +SKIP
        """
        from t2c.data.errors import UnknownChoice

        snap = self._current().snapshot
        known = snap.columns()
        names = list(known) if columns is None else [str(c) for c in columns]
        for c in names:
            if c not in known:
                raise UnknownChoice("catalog column", c, known)
        cols = ", ".join('"' + c.replace('"', '""') + '"' for c in names)  # names checked against the schema
        return snap.catalog().sql(f"SELECT {cols} FROM images ORDER BY id").to_arrow_table()

    def warm_up(self) -> None:
        """Load the CLIP text tower now, so that the first query does not pay for it (imports torch)."""
        self._current().engine.bank.encoder


# ------------------------------------------------------------------------------------------------ helpers
def _image_id(id: Any) -> int:
    try:
        return int(id)
    except (TypeError, ValueError):
        raise InvalidInput(f"image id must be an integer, got {id!r}") from None


def _paths_of(snapshot: Any, ids: Sequence[int]) -> list[str]:
    """File paths of catalog ids, in order."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    cur = snapshot.catalog()
    rows = dict(cur.execute("SELECT id, path FROM images WHERE id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall())
    return [str(rows.get(i, "")) for i in ids]


def _example_ref(view: _View, like: Any, max_pixels: int | None) -> int | str:
    """The ``like:`` reference of an example: a catalog id, a file path, or an upload's ``sha256:`` name."""
    if isinstance(like, bool):
        raise InvalidInput("like= must be an image id, an image file or image bytes, not a bool")
    if isinstance(like, int):
        return like
    if isinstance(like, (bytes, bytearray, memoryview)):
        return view.engine.examples.add_upload(bytes(like), "<upload>", max_pixels=max_pixels)
    if isinstance(like, (str, os.PathLike)):
        return str(Path(like).expanduser())
    raise InvalidInput(f"like= must be an image id, an image file or image bytes, got {type(like).__name__}")


def _parse(query: Any, *, max_terms: int, max_length: int) -> Any:
    """A query tree from a string or its JSON form, under the given limits."""
    if isinstance(query, str):
        from t2c.query.parse import parse

        return parse(query, max_length=max_length, max_terms=max_terms)
    if isinstance(query, dict):
        from t2c.query.ast import from_json

        return from_json(query, max_terms=max_terms)
    raise InvalidInput(f"query must be a string or a JSON object (dict), got {type(query).__name__}",
                       'e.g. store.search("red circle AND NOT square")')


def open(store: str | os.PathLike[str], *, verify: bool = True, refresh_interval: float | None = 1.0,
         example_files: bool = True) -> Store:
    """Open a store (built by :func:`t2c.index` or ``t2c index``) for searching and auditing.

    Args:
        store: the store folder.
        verify: check every file against the manifest's checksums first (refuse a damaged store).
        refresh_interval: follow new snapshots that ``t2c index`` commits, checking at most this often
            (seconds); ``None`` keeps answering from the snapshot opened now.
        example_files: whether queries may name image files as examples (``like:"cat.jpg"``); a server that
            takes queries from others passes False (examples then come as ids or uploaded bytes).

    Returns:
        A :class:`Store`; use it as a context manager, or call ``.close()``.

    Raises:
        NotFound: no store at that path. StoreError: the store is damaged, empty or of another format.

    Example:
        >>> import t2c
        >>> with t2c.open("photos.t2c") as store:  # doctest: +SKIP
        ...     res = store.search("red circle AND NOT square", k=10)
        ...     print(res.total, res.paths[:3])
    """
    return Store(store, verify=verify, refresh_interval=refresh_interval, example_files=example_files)
