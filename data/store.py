"""The collection store: one directory of immutable snapshots, switched atomically.

Layout::

    STORE/
      CURRENT                      name of the live snapshot (replaced atomically)
      snapshots/s-000003/
        manifest.json              format, encoder/CLIP spec, aligner digest and R², counts, index info,
                                   checksums of every file below
        catalog.duckdb             images, errors, runs
        ids.npy                    int64 catalog ids, sorted
        paths.bin, path_offsets.npy  each row's path (UTF-8), row i at bytes [offsets[i], offsets[i+1]): a page's
                                   paths read by row (stores written before them look paths up in the catalog)
        vectors.npy                aligned, L2-normalised float32 vectors, row i ↔ ids[i]
        vectors16.npy              (product-quantised indices only) the same vectors in float16: what top-k
                                   searches re-rank candidates from (half the bytes to read); stores
                                   written before it existed have none and re-rank from vectors.npy
        index.faiss                FAISS index over the same vectors, ids = catalog ids
      features/f-<run>-<seq>.npz   raw encoder features (ids, feats), immutable shards shared by snapshots
      staging/                     the running (or killed) index run's progress, see indexer.pipeline
      .lock                        writers hold an exclusive flock; readers never take it

Readers open the snapshot named by CURRENT read-only and never wait on a writer; a writer builds the next
snapshot in a temporary folder, fsyncs it, renames it into place and then replaces CURRENT.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from t2c.data.errors import DiskFull, InvalidInput, NotFound, StoreError, StoreNotWritable, T2CError

FORMAT_VERSION = 1
KEEP_SNAPSHOTS = 3
QUICK_VERIFY_BYTES = 256 << 20
CATALOG_MEMORY = 512 << 20  # DuckDB's memory limit while a commit writes the catalog (it spills beyond it)
PATHS_BLOB, PATH_OFFSETS = "paths.bin", "path_offsets.npy"  # each row's catalog path, in row (id) order
PATH_CHUNK = 32_768  # rows of (id, path) read from the catalog at a time (paths make a chunk ~10x an id chunk)
COPY_CHUNK = 262_144  # rows of previous vectors copied at a time when committing
SHARED_MODE = 0o644  # files others read (artefacts, shipped weights, generated worlds)

IMAGE_COLUMNS = {
    "id": "BIGINT",
    "path": "VARCHAR",
    "relpath": "VARCHAR",
    "content_hash": "VARCHAR",
    "size": "BIGINT",
    "width": "INTEGER",
    "height": "INTEGER",
    "mtime": "TIMESTAMP",
    "mtime_ns": "BIGINT",
    "status": "VARCHAR",
    "added_at": "TIMESTAMP",
}

# ``images`` has no key indexes (no PRIMARY KEY on id, no UNIQUE on path): DuckDB holds a table's key indexes
# (ART) in memory while it writes to it, ~50 MB per million rows inserted (44-character paths, DuckDB 2.0.1),
# which made the catalog the one part of a large commit whose memory grew with the rows (a fixed 512 MB limit
# failed at 9.2M rows). Ids and paths stay unique by construction instead: planning looks every path up in the catalog (a known
# path keeps its id) and the sources list each path once; new ids start at the manifest's next_id and are never
# reused; a changed row replaces its id (delete + insert); ``_write_ids`` refuses a catalog that holds an id twice.
# Catalogs written with the keys are rebuilt without them by their next commit (``_rebuild_unkeyed``).
def images_ddl(name: str = "images", extra: Iterable[tuple[str, str]] = ()) -> str:
    """``CREATE TABLE`` for the images table (``extra``: user columns as (name, DuckDB type), after the base ones)."""
    more = "".join(f', "{c}" {t}' for c, t in extra)
    return f"""CREATE TABLE IF NOT EXISTS {name} (
        id BIGINT NOT NULL, path VARCHAR NOT NULL, relpath VARCHAR, content_hash VARCHAR,
        size BIGINT, width INTEGER, height INTEGER, mtime TIMESTAMP, mtime_ns BIGINT,
        status VARCHAR DEFAULT 'ok', added_at TIMESTAMP{more})"""


SCHEMA = [
    images_ddl(),
    """CREATE TABLE IF NOT EXISTS errors (
        path VARCHAR PRIMARY KEY, reason VARCHAR NOT NULL, message VARCHAR, size BIGINT, mtime_ns BIGINT,
        "at" TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, command VARCHAR, settings VARCHAR, started_at TIMESTAMP,
        finished_at TIMESTAMP, added BIGINT, updated BIGINT, removed BIGINT, errors BIGINT)""",
]


def utcnow() -> _dt.datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(tzinfo=None)


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it is durable."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: Path, write: Callable[[str], object], mode: int | None = None, *,
                      sync: bool = True) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a uniquely named temporary file beside ``path``, then
    fsync, rename over ``path``, fsync the folder. Two writers never share a temporary file, and a reader
    sees the old file or the new one, never a part.

    ``mode``: permissions (default: private, 0600; :data:`SHARED_MODE` for files others read). ``sync=False``
    skips both fsyncs (many small files a rerun can remake, such as generated images).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None, *, sync: bool = True) -> Path:
    """Write bytes to a file atomically (see :func:`atomic_write_file`)."""
    return atomic_write_file(path, lambda tmp: Path(tmp).write_bytes(data), mode, sync=sync)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL_TEXT = ("no space left on device", "disk quota exceeded")
_READ_ONLY_TEXT = ("read-only file system", "permission denied")
RESUME_NOTE = "rerun the same command afterwards: it resumes from the parts already finished"


def _fault(e: BaseException) -> tuple[str, BaseException] | None:
    """("full" | "read_only", the exception that says so) for an exception raised while writing (OSError,
    DuckDB, FAISS), looking down its chain too (DuckDB's "database invalidated" follows the real cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        code, text = getattr(e, "errno", None), str(e).lower()
        if code in _FULL or any(t in text for t in _FULL_TEXT):
            return "full", e
        if code in _READ_ONLY or any(t in text for t in _READ_ONLY_TEXT):
            return "read_only", e
        e = e.__cause__ or e.__context__
    return None


def _human(n: float) -> str:
    """Bytes for people: 1.5 GB, 320 MB, 12 kB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _under(path, root: Path) -> bool:
    try:
        return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root))
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def store_faults(root: str | os.PathLike, need_bytes: Callable[[], int | None] | None = None):
    """Turn a full disk or an unwritable folder met while writing the store at ``root`` into one clear error.

    A raw ``OSError`` (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) or a DuckDB / FAISS error that says the same
    becomes :class:`DiskFull` (where, how much is free, about how much the run needs) or
    :class:`StoreNotWritable`, each saying that a rerun resumes. Permission errors on files outside the
    store (an image, an aligner file) pass through unchanged. ``need_bytes``: estimate of the space the run
    still needs, called only when the disk is full.
    """
    root = Path(root)
    try:
        yield
    except T2CError:
        raise
    except Exception as top:  # noqa: BLE001 - DuckDB and FAISS raise their own types; others are re-raised
        found = _fault(top)
        if found is None:
            raise
        kind, e = found
        where = getattr(e, "filename", None)
        if kind == "read_only" and where is not None and not _under(where, root):
            raise
        place = str(where) if where and _under(where, root) else str(root)
        if kind == "full":
            try:
                free = _human(shutil.disk_usage(root if root.exists() else root.parent).free)
            except OSError:
                free = "unknown"
            try:
                n = need_bytes() if need_bytes else None
            except Exception:  # noqa: BLE001 - an estimate must not hide the real error
                n = None
            need = f"; this run needs about {_human(n)} more" if n else ""
            raise DiskFull(f"disk full while writing {place!r} ({free} free{need}); the store's live snapshot "
                           "is unchanged", f"free space on that disk, or use another --store; {RESUME_NOTE}") from top
        raise StoreNotWritable(f"cannot write to the store folder {str(root)!r}: {place!r} is read-only "
                               f"({getattr(e, 'strerror', None) or e})",
                               f"make the folder writable, or use another --store; {RESUME_NOTE}") from top


def atomic_save_npz(path: Path, **arrays) -> None:
    """Save arrays as an uncompressed .npz atomically (no pickled objects)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_npz(path: Path) -> dict:
    """Load an .npz written by atomic_save_npz, refusing pickled objects."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def drop_pages(a) -> None:
    """Unmap the resident pages of a memory-mapped array (``np.memmap`` / ``np.load(mmap_mode=...)`` or a view of
    one; anything else is left alone). The data stays in the file and the page cache (dirty pages of a shared
    mapping are written back as usual) and is read back on the next access, so scanning or filling a mapped file
    far larger than RAM does not grow the process's resident memory."""
    import mmap

    b = mmap_of(a)
    if b is not None:
        try:
            b.madvise(mmap.MADV_DONTNEED)
        except (AttributeError, OSError, ValueError):
            pass


def mmap_of(a):
    """The ``mmap.mmap`` behind a numpy memory map (``np.memmap``, ``np.load(mmap_mode=...)`` or a view of one),
    or None for an array in RAM."""
    import mmap

    b = a
    while b is not None and not isinstance(b, mmap.mmap):
        b = getattr(b, "_mmap", None) or getattr(b, "base", None)
    return b


def file_digest(path: Path, quick: bool = False) -> str:
    """blake2b of a file; ``quick`` hashes size plus the first and last MiB only (for very large files)."""
    h = hashlib.blake2b(digest_size=16)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if quick and size > 2 << 20:
            h.update(str(size).encode())
            h.update(fh.read(1 << 20))
            fh.seek(size - (1 << 20))
            h.update(fh.read(1 << 20))
            return "q:" + h.hexdigest()
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
class Snapshot:
    """A read-only view of one committed snapshot: manifest, catalog, vectors and FAISS index."""

    def __init__(self, root: Path, name: str, *, verify: bool = True):
        self.root = Path(root)
        self.name = name
        self.path = self.root / "snapshots" / name
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise StoreError(f"store {str(self.root)!r} snapshot {name!r} has no manifest.json",
                             "the store is damaged; re-run `t2c index` into a new store")
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"manifest of store {str(self.root)!r} is not valid JSON: {e}")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"store format {self.manifest.get('format_version')!r} is not supported "
                             f"(this version reads {FORMAT_VERSION})", "re-index with this version of t2c")
        if verify:
            self.verify()
        self._lock = threading.Lock()
        self._index = None
        self._vectors = None
        self._vectors16 = None
        self._scattered = None
        self._ids = None
        self._path_file = None
        self._con = None

    # -- integrity --
    def _files(self) -> dict:
        return self.manifest.get("files", {})

    def _resolve(self, rel: str) -> Path:
        return (self.path / rel) if not rel.startswith("../") else (self.root / rel[3:])

    def verify(self) -> None:
        """Refuse a snapshot whose files do not match the manifest's checksums."""
        for rel, info in self._files().items():
            p = self._resolve(rel)
            if not p.is_file():
                raise StoreError(f"store file {rel} named by the manifest is missing",
                                 "the store is damaged; re-index into a new store")
            if os.path.getsize(p) != info["size"]:
                raise StoreError(f"store file {rel} has size {os.path.getsize(p)}, manifest says {info['size']}",
                                 "the store was modified outside t2c; re-index into a new store")
            quick = info["digest"].startswith("q:")
            if file_digest(p, quick=quick) != info["digest"]:
                raise StoreError(f"store file {rel} does not match its checksum",
                                 "the store was modified outside t2c; re-index into a new store")

    # -- properties --
    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def count(self) -> int:
        return int(self.manifest["counts"]["images"])

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]

    @property
    def clip(self) -> str:
        return self.manifest["clip"]

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.load(self.path / "ids.npy", mmap_mode="r", allow_pickle=False)
        return self._ids

    @property
    def vectors(self) -> np.ndarray:
        """Aligned, normalised vectors (memory-mapped), row i belongs to ``ids[i]``."""
        if self._vectors is None:
            self._vectors = np.load(self.path / "vectors.npy", mmap_mode="r", allow_pickle=False)
        return self._vectors

    @property
    def vectors16(self) -> np.ndarray | None:
        """The float16 copy of ``vectors`` (memory-mapped) kept beside product-quantised indices, else None
        (other index types, and stores written before the copy existed)."""
        if "vectors16.npy" not in self._files():
            return None
        with self._lock:
            if self._vectors16 is None:
                self._vectors16 = self._random_map("vectors16.npy")
        return self._vectors16

    def _random_map(self, name: str) -> np.ndarray:
        """``name`` memory-mapped for a few scattered rows at a time (``MADV_RANDOM``: no read-ahead)."""
        a = np.load(self.path / name, mmap_mode="r", allow_pickle=False)
        advise_random(a)
        return a

    def read_rows(self, rows: np.ndarray, half: bool = False) -> np.ndarray:
        """``vectors[rows]`` as float32, for a few scattered sorted rows (rescoring candidates).

        Read through a second mapping of ``vectors.npy`` advised ``MADV_RANDOM`` (the first one keeps the
        kernel's read-ahead for whole scans): only the pages the rows sit on are read, all requested at once
        (``prefetch_rows``) so that a disk serves them in parallel. On a 1M x 512 store whose vectors were not
        in the page cache, 400 scattered rows took 1.3 s through the first mapping (128 KiB read-ahead each),
        30 ms through this one, 6 ms with the prefetch (``bench/query_latency.py --cold``). Many rows at once
        (``READ_ROWS_SCATTERED`` or more: a prefiltered subset, a calibration sample) go through the first
        mapping, whose read-ahead serves dense row sets well, and whose prefetch would cost more than it saves
        when the pages are already cached.

        ``half``: read the rows from the float16 copy (``vectors16``, product-quantised stores; advised
        ``MADV_RANDOM`` too): half the bytes, converted to float32."""
        rows = np.asarray(rows, np.int64)
        if half:
            v16 = self.vectors16
            if v16 is None:
                raise StoreError(f"snapshot {self.name} has no float16 copy of its vectors")
            if len(rows) < READ_ROWS_SCATTERED:  # many rows: their pages are mostly cached, advice costs more
                prefetch_rows(v16, rows)
            return np.asarray(v16[rows], np.float32)
        if len(rows) >= READ_ROWS_SCATTERED:
            return np.asarray(self.vectors[rows], np.float32)
        with self._lock:
            if self._scattered is None:
                self._scattered = self._random_map("vectors.npy")
        prefetch_rows(self._scattered, rows)
        return np.asarray(self._scattered[rows], np.float32)

    def drop_vector_pages(self) -> None:
        """Unmap the resident pages of every vector mapping this snapshot opened (``vectors``, ``vectors16``,
        the ``read_rows`` one): the data stays in the files (and the page cache) and is read back on use."""
        for arr in (self._vectors, self._vectors16, self._scattered):
            if arr is not None:
                drop_pages(arr)

    @property
    def refine_vectors(self) -> np.ndarray:
        """What approximate candidates are re-scored from: the float16 copy where there is one, else ``vectors``."""
        v16 = self.vectors16
        return self.vectors if v16 is None else v16

    @property
    def index(self):
        """The FAISS index (loaded on first use)."""
        with self._lock:
            if self._index is None:
                import faiss

                self._index = faiss.read_index(str(self.path / "index.faiss"))
        return self._index

    def paths_of_rows(self, rows) -> list[str] | None:
        """Catalog paths of rows (positions in ``ids``), read from the snapshot's path file; None for snapshots
        written before it existed (look them up in the catalog)."""
        if PATH_OFFSETS not in self._files():
            return None
        with self._lock:
            if self._path_file is None:
                off = np.load(self.path / PATH_OFFSETS, mmap_mode="r", allow_pickle=False)
                blob = np.memmap(self.path / PATHS_BLOB, np.uint8, mode="r") if off[-1] else np.zeros(0, np.uint8)
                self._path_file = (off, blob)
        off, blob = self._path_file
        out = []
        for r in np.asarray(rows, np.int64).tolist():
            out.append(bytes(blob[int(off[r]) : int(off[r + 1])]).decode("utf-8"))
        return out

    def rows_of(self, ids) -> np.ndarray:
        """Row positions of catalog ids in ``vectors``; raise NotFound for unknown ids."""
        ids = np.asarray(ids, np.int64)
        pos = np.searchsorted(self.ids, ids)
        pos = np.minimum(pos, max(len(self.ids) - 1, 0))
        if len(self.ids) == 0 or np.any(self.ids[pos] != ids):
            bad = ids[(len(self.ids) == 0) | (self.ids[pos] != ids)] if len(self.ids) else ids
            raise NotFound(f"image id {int(bad[0])} is not in this store", "ids come from query results")
        return pos

    # -- catalog --
    def catalog(self):
        """A DuckDB cursor on the read-only catalog (one cursor per caller/thread)."""
        import duckdb

        with self._lock:
            if self._con is None:
                self._con = duckdb.connect(str(self.path / "catalog.duckdb"), read_only=True)
            return self._con.cursor()

    def columns(self) -> dict[str, str]:
        """Catalog ``images`` columns and their DuckDB types (user columns included)."""
        cur = self.catalog()
        rows = cur.execute("SELECT column_name, data_type FROM information_schema.columns "
                           "WHERE table_name = 'images' ORDER BY ordinal_position").fetchall()
        return {r[0]: r[1] for r in rows}

    def image_rows(self, ids) -> list[dict]:
        """Catalog rows for ids, in the given order; unknown ids raise NotFound."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        cur = self.catalog()
        df = cur.execute("SELECT * FROM images WHERE id IN (SELECT unnest(?::BIGINT[]))", [ids]).fetchall()
        cols = [d[0] for d in cur.description]
        by_id = {r[0]: dict(zip(cols, r)) for r in df}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise NotFound(f"image id {missing[0]} is not in this store", "ids come from query results")
        return [by_id[i] for i in ids]

    def features(self, batch: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids, raw features) for every live image, latest version of each id, in shard order."""
        live = set(map(int, self.ids))
        shards = self.manifest.get("feature_shards", [])
        latest: dict[int, int] = {}
        for si, rel in enumerate(shards):
            z = load_npz(self.root / rel)
            for i in z["ids"]:
                latest[int(i)] = si
        for si, rel in enumerate(shards):
            z = load_npz(self.root / rel)
            keep = np.array([int(i) in live and latest.get(int(i)) == si for i in z["ids"]], bool)
            if keep.any():
                ids, feats = z["ids"][keep], z["feats"][keep]
                for j in range(0, len(ids), batch):
                    yield ids[j : j + batch], feats[j : j + batch]

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


def current_name(root: Path) -> str | None:
    """Name of the live snapshot, or None for an empty/new store."""
    p = Path(root) / "CURRENT"
    if not p.is_file():
        return None
    return p.read_text().strip() or None


def open_store(path: str | os.PathLike, *, verify: bool = True) -> Snapshot:
    """Open a store's live snapshot read-only.

    Args:
        path: the store directory.
        verify: check every file against the manifest's checksums (refuse on mismatch).

    Returns:
        A :class:`Snapshot`.

    Raises:
        NotFound: no store there. StoreError: the store is damaged or of another format.

    Example:
        >>> snap = open_store("photos.t2c")  # doctest: +SKIP
        >>> snap.count, snap.dim  # doctest: +SKIP
    """
    root = Path(path)
    if not root.is_dir():
        raise NotFound(f"store {str(root)!r} does not exist", "create it with `t2c index DIR --store PATH`")
    name = current_name(root)
    if name is None:
        raise StoreError(f"store {str(root)!r} has no committed snapshot yet",
                         "run `t2c index` to completion (a killed run resumes when rerun)")
    return Snapshot(root, name, verify=verify)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def catalog_has_keys(path: str | os.PathLike) -> bool:
    """Whether a catalog file's ``images`` table has key indexes (a PRIMARY KEY, UNIQUE or an index): catalogs
    written before they were dropped, which the next commit rebuilds without them."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return bool(con.execute(
            "SELECT (SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'images' AND schema_name = 'main' "
            "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')) + (SELECT count(*) FROM duckdb_indexes() "
            "WHERE table_name = 'images' AND schema_name = 'main')").fetchone()[0])
    finally:
        con.close()


@dataclass
class Changes:
    """What one run changes: upserted image rows + their feature shards, removed ids, errors."""

    rows: list[dict]  # image rows (id, path, relpath, content_hash, size, width, height, mtime_ns, user cols)
    feature_shards: list[str]  # shard paths relative to the store root, each holding (ids, feats)
    removed_ids: list[int]
    errors: list[dict]  # path, reason, message, size, mtime_ns
    cleared_error_paths: list[str]  # error rows to drop (file fixed, deleted, or now indexed)
    run: dict  # run_id, command, settings, started_at
    # more rows, streamed: a callable giving batches of rows (inserted batch by batch after ``rows``, each batch
    # also clearing its paths' error rows), so a run of any size never holds all its rows at once
    row_batches: Callable[[], Iterable[list[dict]]] | None = None


class StoreWriter:
    """Exclusive writer of a store: holds the lock, builds and commits snapshots."""

    def __init__(self, path: str | os.PathLike, *, create: bool = True):
        self.root = Path(path)
        if not self.root.exists():
            if not create:
                raise NotFound(f"store {str(self.root)!r} does not exist")
            self.root.mkdir(parents=True)
        elif not self.root.is_dir():
            raise InvalidInput(f"store path {str(self.root)!r} is a file", "give a directory path for the store")
        elif any(self.root.iterdir()) and not (self.root / ".t2c-store").exists():
            raise InvalidInput(f"{str(self.root)!r} is a non-empty folder that is not a t2c store",
                               "give a new or empty folder for --store")
        (self.root / ".t2c-store").touch()
        for sub in ("snapshots", "features", "staging"):
            (self.root / sub).mkdir(exist_ok=True)
        self._lockfh = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(self._lockfh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lockfh.close()
            raise StoreError(f"store {str(self.root)!r} is being written by another process",
                             "wait for the other `t2c index`/`realign` to finish")
        name = current_name(self.root)
        self.current = Snapshot(self.root, name, verify=False) if name else None
        self.phase: str | None = None  # the commit step running now (catalog, ids, vectors, index, checksums)
        self.commit_seconds: dict[str, float] = {}  # seconds per step of the last commit
        self._phase_t = 0.0

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
        if not self._lockfh.closed:
            fcntl.flock(self._lockfh.fileno(), fcntl.LOCK_UN)
            self._lockfh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- catalog lookups for planning --
    def lookup(self, paths: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
        """For one batch of paths: (path → {id, size, mtime_ns} in the catalog, path → {reason, size, mtime_ns}
        of recorded errors); only the paths asked for are read, so planning streams over any number of files."""
        if self.current is None or not paths:
            return {}, {}
        import pyarrow as pa

        from t2c.data.arrow_build import strings

        cur = self.current.catalog()
        cur.register("_ask", pa.table({"path": strings(paths)}))
        try:
            known = {r[0]: {"id": r[1], "size": r[2], "mtime_ns": r[3]} for r in cur.execute(
                "SELECT i.path, i.id, i.size, i.mtime_ns FROM images i JOIN _ask a ON i.path = a.path").fetchall()}
            errs = {r[0]: {"reason": r[1], "size": r[2], "mtime_ns": r[3]} for r in cur.execute(
                "SELECT e.path, e.reason, e.size, e.mtime_ns FROM errors e JOIN _ask a ON e.path = a.path").fetchall()}
        finally:
            cur.unregister("_ask")
        return known, errs

    def gone_under(self, prefix: str, seen, skipped) -> tuple[list[int], list[str]]:
        """Catalogued ids and error paths under ``prefix`` absent from ``seen`` (an Arrow string array of the
        walk's paths); error paths also absent from ``skipped`` (paths the walk skipped)."""
        if self.current is None:
            return [], []
        import pyarrow as pa

        from t2c.data.arrow_build import strings

        cur = self.current.catalog()
        cur.register("_seen", pa.table({"path": seen}))
        cur.register("_skip", pa.table({"path": strings(list(skipped))}))
        try:
            ids = [r[0] for r in cur.execute(
                "SELECT id FROM images WHERE starts_with(path, ?) AND path NOT IN (SELECT path FROM _seen) "
                "ORDER BY id", [prefix]).fetchall()]
            errs = [r[0] for r in cur.execute(
                "SELECT path FROM errors WHERE starts_with(path, ?) AND path NOT IN (SELECT path FROM _seen) "
                "AND path NOT IN (SELECT path FROM _skip) ORDER BY path", [prefix]).fetchall()]
        finally:
            cur.unregister("_seen")
            cur.unregister("_skip")
        return ids, errs

    def next_id(self) -> int:
        """First id never used by this store (ids are never reused)."""
        if self.current is None:
            return 0
        return int(self.current.manifest.get("next_id", 0))

    # -- commit --
    def commit(self, changes: Changes, *, manifest_fields: dict, vectors_for: Callable,
               build_index: Callable, next_id: int | None = None, reproject: bool = False,
               extra_files: list[str] = ()) -> Snapshot:
        """Build the next snapshot from the current one plus ``changes`` and switch CURRENT to it.

        ``vectors_for(ids, feats) -> aligned normalised vectors`` projects raw features;
        ``build_index(vectors, ids) -> (faiss_index, info)`` builds the FAISS index;
        ``extra_files`` (relative to the store root, e.g. the aligner) are checksummed in the manifest.
        """
        import duckdb

        prev = self.current
        self._phase("catalog")
        seq = int(prev.name.split("-")[1]) + 1 if prev else 1
        name = f"s-{seq:06d}"
        tmpdir = Path(tempfile.mkdtemp(dir=self.root / "snapshots", prefix=".tmp-"))
        try:
            cat = tmpdir / "catalog.duckdb"
            rebuild = False
            if prev is not None:
                prev.close()
                rebuild = catalog_has_keys(prev.path / "catalog.duckdb")
                if not rebuild:
                    shutil.copyfile(prev.path / "catalog.duckdb", cat)
            con = duckdb.connect(str(cat))
            try:
                con.execute(f"SET memory_limit='{CATALOG_MEMORY >> 20}MB'")
                spill = str(tmpdir / ".duckdb-tmp").replace("'", "''")
                con.execute(f"SET temp_directory='{spill}'")
                if rebuild:
                    self._rebuild_unkeyed(con, prev.path / "catalog.duckdb")
                for stmt in SCHEMA:
                    con.execute(stmt)
                self._apply_catalog(con, changes)
                con.execute("CHECKPOINT")
                self._phase("ids")
                ids = self._write_ids(con, tmpdir / "ids.npy")
            finally:
                con.close()
                shutil.rmtree(tmpdir / ".duckdb-tmp", ignore_errors=True)
            self._phase("vectors")
            shards = list(prev.manifest.get("feature_shards", [])) if prev else []
            shards += list(changes.feature_shards)
            shards = self._compact_shard_list(shards, ids)
            dim = self._project(shards, ids, vectors_for, manifest_fields, changes.feature_shards, reproject,
                                tmpdir / "vectors.npy")
            self._phase("index")
            index_info = self._write_index(tmpdir, ids, build_index)
            self._phase("checksums")
            files = self._checksums(tmpdir, list(shards) + list(extra_files))
            manifest = {
                "format_version": FORMAT_VERSION,
                "created": utcnow().isoformat(timespec="seconds"),
                "snapshot": name,
                "dim": int(dim),
                "counts": {"images": int(len(ids)), "errors": self._count(cat, "errors")},
                "next_id": int(max(next_id or 0, int(ids[-1]) + 1 if len(ids) else 0,  # ids are sorted
                                   prev.manifest.get("next_id", 0) if prev else 0)),
                "feature_shards": shards,
                "index": index_info,
                "last_run": changes.run.get("run_id"),
                "files": files,
            }
            manifest.update(manifest_fields)
            atomic_write_bytes(tmpdir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
            final = self.root / "snapshots" / name
            os.replace(tmpdir, final)
            fsync_dir(self.root / "snapshots")
            atomic_write_bytes(self.root / "CURRENT", name.encode())
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            self._phase(None)
            raise
        self.current = Snapshot(self.root, name, verify=False)
        self._gc()
        self._phase(None)
        return self.current

    @staticmethod
    def _write_index(tmpdir: Path, ids: np.ndarray, build_index: Callable) -> dict:
        """Build the FAISS index over the new snapshot's vectors, write it (and, for product-quantised codes, the
        float16 copy that top-k searches re-rank from) into ``tmpdir``; returns the index info."""
        import faiss

        # memory-mapped: the aligned vectors of a large store never need to fit in RAM at once
        vectors = np.load(tmpdir / "vectors.npy", mmap_mode="r" if len(ids) else None, allow_pickle=False)
        index, index_info = build_index(vectors, ids)
        if index_info.get("type") == "ivf_pq":
            # quantised codes: top-k searches re-rank deep candidate lists from a float16 copy
            write_float16_copy(vectors, tmpdir / "vectors16.npy")
            index_info = dict(index_info, refine="vectors16.npy")
        del vectors
        faiss.write_index(index, str(tmpdir / "index.faiss"))
        return index_info

    def _checksums(self, tmpdir: Path, shared: list[str]) -> dict:
        """The manifest's ``files``: the snapshot's own files (fsynced first) and the shared ones it names."""
        files = {}
        for f in ("catalog.duckdb", "ids.npy", PATH_OFFSETS, PATHS_BLOB, "vectors.npy", "vectors16.npy", "index.faiss"):
            p = tmpdir / f
            if f == "vectors16.npy" and not p.exists():
                continue
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            files[f] = {"size": os.path.getsize(p), "digest": file_digest(p, os.path.getsize(p) > QUICK_VERIFY_BYTES)}
        for rel in shared:
            p = self.root / rel
            files["../" + rel] = {"size": os.path.getsize(p), "digest": file_digest(p, os.path.getsize(p) > QUICK_VERIFY_BYTES)}
        return files

    def _phase(self, name: str | None) -> None:
        """Mark the commit step now running (``self.phase``) and time the steps (``self.commit_seconds``), so a
        caller (a benchmark, a progress display) can tell catalog, ids, vectors, index and checksums apart."""
        import time

        now = time.perf_counter()
        if self.phase is not None:
            self.commit_seconds[self.phase] = round(now - self._phase_t, 3)
        elif name is not None:
            self.commit_seconds = {}
        self.phase, self._phase_t = name, now

    @staticmethod
    def _write_ids(con, path: Path) -> np.ndarray:
        """Write the catalog's ids, sorted, to ``path`` (.npy) straight from DuckDB one chunk at a time and return
        them memory-mapped: no step of the commit holds every id in RAM. Beside them, each row's path
        (``PATHS_BLOB``, UTF-8, at ``PATH_OFFSETS``), so a result page's paths are read by row, not looked up.
        An id found twice (the catalog has no key index to refuse it) fails the commit before anything is
        published."""
        import pyarrow as pa

        from t2c.data.arrow_build import values

        n = int(con.execute("SELECT count(*) FROM images").fetchall()[0][0])
        if n == 0:
            np.save(path, np.zeros(0, np.int64))
            np.save(path.parent / PATH_OFFSETS, np.zeros(1, np.int64))
            (path.parent / PATHS_BLOB).write_bytes(b"")
            return np.load(path, allow_pickle=False)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(n,))
        offsets = np.lib.format.open_memmap(path.parent / PATH_OFFSETS, mode="w+", dtype=np.int64, shape=(n + 1,))
        offsets[0] = 0
        pos, last, end = 0, None, 0
        con.execute("SET threads=1")  # one sort run at a time: the (id, path) sort spills within the memory limit
        with open(path.parent / PATHS_BLOB, "wb") as blob:
            for rb in con.sql("SELECT id, path FROM images ORDER BY id").to_arrow_reader(PATH_CHUNK):
                a = values(rb.column(0))
                # the paths in row order beside the ids (a page's paths read by position, not looked up in DuckDB)
                strs = rb.column(1).cast(pa.large_string())
                so = np.frombuffer(strs.buffers()[1], np.int64, len(strs) + 1, offset=8 * strs.offset)
                data = strs.buffers()[2]
                blob.write(memoryview(data)[int(so[0]) : int(so[-1])] if data is not None and len(strs) else b"")
                offsets[pos + 1 : pos + 1 + len(a)] = end + (so[1:] - so[0])
                end += int(so[-1] - so[0])
                drop_pages(offsets)
                if len(a):
                    same = np.flatnonzero(a[1:] == a[:-1])
                    if len(same) or a[0] == last:
                        dup = int(a[same[0]]) if len(same) else int(last)
                        raise StoreError(f"the new catalog holds image id {dup} twice; nothing was committed",
                                         "this is a bug in the code that planned the run: please report it")
                    last = a[-1]
                out[pos : pos + len(a)] = a
                pos += len(a)
                drop_pages(out)
        if pos != n:
            raise StoreError(f"catalog gave {pos} ids, expected {n}")
        out.flush()
        offsets.flush()
        del out, offsets
        return np.load(path, mmap_mode="r", allow_pickle=False)

    @staticmethod
    def _count(cat: Path, table: str) -> int:
        import duckdb

        con = duckdb.connect(str(cat), read_only=True)
        try:
            return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        finally:
            con.close()

    def _apply_catalog(self, con, ch: Changes) -> None:
        now = utcnow()
        # ids from the current next_id on were never in the catalog (ids are never reused): rows with such ids are
        # appended without looking anything up, so a batch costs its own size, not the table's
        first_new = self.next_id()
        had_errors = bool(con.execute("SELECT count(*) FROM (SELECT 1 FROM errors LIMIT 1)").fetchall()[0][0])
        # one transaction per batch: the catalog is a private copy inside the new snapshot's temporary folder,
        # published (or thrown away) whole, so batches need not share a transaction, and DuckDB then keeps
        # one batch's undo state in memory instead of the whole run's
        if ch.rows:
            con.execute("BEGIN")
            self._upsert_rows(con, ch.rows, now, first_new)
            con.execute("COMMIT")
        for batch in (ch.row_batches() if ch.row_batches is not None else ()):
            if batch:
                con.execute("BEGIN")
                self._upsert_rows(con, batch, now, first_new)
                if had_errors:  # a file indexed now drops its old error row (errors are only added below)
                    con.execute("DELETE FROM errors WHERE path IN (SELECT unnest(?::VARCHAR[]))",
                                [[r["path"] for r in batch]])
                con.execute("COMMIT")
        con.execute("BEGIN")
        # after the rows (ids are never reused, so the order does not matter): streamed batches add the ids of
        # changed files that failed to read
        if ch.removed_ids:
            con.execute("DELETE FROM images WHERE id IN (SELECT unnest(?::BIGINT[]))", [list(map(int, ch.removed_ids))])
        drop = list(ch.cleared_error_paths) + [e["path"] for e in ch.errors]
        if drop:
            con.execute("DELETE FROM errors WHERE path IN (SELECT unnest(?::VARCHAR[]))", [drop])
        if ch.errors:
            con.executemany("INSERT INTO errors VALUES (?, ?, ?, ?, ?, ?)",
                            [[e["path"], e["reason"], e.get("message"), e.get("size"), e.get("mtime_ns"), now] for e in ch.errors])
        run = ch.run  # read after the batches: a streamed run counts its rows while they are inserted
        con.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [run["run_id"], run.get("command"), json.dumps(run.get("settings", {}), sort_keys=True),
                     run.get("started_at", now), now, run.get("added", 0), run.get("updated", 0),
                     run.get("removed", 0), len(ch.errors)])
        con.execute("COMMIT")

    @staticmethod
    def _rebuild_unkeyed(con, old: Path) -> None:
        """Fill the new snapshot's empty catalog (``con``) from ``old``, a catalog whose ``images`` table still has
        the key indexes (written before they were dropped): the same tables, rows (in their order) and user
        columns, ``images`` without keys. Streamed by DuckDB (the old indexes are never loaded), into a fresh file
        (dropping the keyed table in a copy would leave its blocks, indexes included, as free space in the file)."""
        src = str(old).replace("'", "''")
        con.execute(f"ATTACH '{src}' AS old_catalog (READ_ONLY)")
        try:
            tables = [r[0] for r in con.execute(
                "SELECT table_name FROM duckdb_tables() WHERE database_name = 'old_catalog' AND schema_name = 'main' "
                "ORDER BY table_oid").fetchall()]
            for t in tables:
                cols = con.execute("SELECT column_name, data_type FROM duckdb_columns() WHERE database_name = "
                                   "'old_catalog' AND schema_name = 'main' AND table_name = ? ORDER BY column_index",
                                   [t]).fetchall()
                names = ", ".join(f'"{c}"' for c, _ in cols)
                if t == "images":
                    con.execute(images_ddl("images", [(c, typ) for c, typ in cols if c not in IMAGE_COLUMNS]))
                else:  # errors and runs keep their schema (small tables, keyed by path and run id)
                    ddl = next((d for d in SCHEMA if d.split("(")[0].split()[-1] == t), None)
                    con.execute(ddl or f'CREATE TABLE "{t}" AS SELECT * FROM old_catalog.main."{t}" WITH NO DATA')
                con.execute(f'INSERT INTO "{t}" ({names}) SELECT {names} FROM old_catalog.main."{t}"')
        finally:
            con.execute("DETACH old_catalog")

    @staticmethod
    def _upsert_rows(con, rows: list[dict], now, first_new: int = 0) -> None:
        """Insert or replace one batch of image rows (new user columns are added to the table).

        The rows go to DuckDB as one Arrow table; defaults (status 'ok', mtime from mtime_ns, added_at now) are
        filled in SQL. Rows whose ids are all ``>= first_new`` are appended; otherwise rows that replace a
        catalogued id keep its original added_at.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        from t2c.data.arrow_build import column

        existing = {r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name='images'").fetchall()}
        keys = set().union(*rows)
        extra = sorted(keys - set(IMAGE_COLUMNS) - {"_kind"})
        for col in extra:
            if col not in existing:
                if not col.isidentifier():
                    raise InvalidInput(f"user column name {col!r} is not an identifier")
                sample = next((r[col] for r in rows if r.get(col) is not None), "")
                typ = "BIGINT" if isinstance(sample, (int, np.integer)) and not isinstance(sample, bool) else \
                    "DOUBLE" if isinstance(sample, (float, np.floating)) else "BOOLEAN" if isinstance(sample, bool) else "VARCHAR"
                con.execute(f'ALTER TABLE images ADD COLUMN "{col}" {typ}')
        cols = list(IMAGE_COLUMNS) + extra
        tbl = pa.table({c: column([r.get(c) for r in rows]) for c in cols if c in keys})

        def select(replacing: bool) -> str:
            out = []
            for c in cols:
                own = f'n."{c}"' if c in keys else "NULL"
                if c == "status":
                    own = f"coalesce({own}, 'ok')"
                elif c == "mtime":  # from mtime_ns, rounded to DuckDB's microseconds
                    own = f"coalesce({own}, make_timestamp((n.mtime_ns + 500) // 1000))" if "mtime_ns" in keys else own
                elif c == "added_at":  # a replaced row keeps its original added_at
                    own = f"coalesce({'o.added_at, ' if replacing else ''}{own}, $now)"
                out.append(f'{own} AS "{c}"')
            return ", ".join(out)

        collist = ", ".join(f'"{c}"' for c in cols)
        con.register("_new_rows", tbl)
        try:
            if tbl.num_rows and pc.min(tbl["id"]).as_py() >= first_new:
                con.execute(f"INSERT INTO images ({collist}) SELECT {select(False)} FROM _new_rows n", {"now": now})
                return
            con.execute(f"CREATE OR REPLACE TEMP TABLE _upsert AS SELECT {select(True)} FROM _new_rows n "
                        "LEFT JOIN images o ON o.id = n.id", {"now": now})
            con.execute("DELETE FROM images WHERE id IN (SELECT id FROM _upsert)")
            con.execute(f"INSERT INTO images ({collist}) SELECT {collist} FROM _upsert")
            con.execute("DROP TABLE _upsert")
        finally:
            con.unregister("_new_rows")

    def _compact_shard_list(self, shards: list[str], live: np.ndarray) -> list[str]:
        """Drop shards none of whose rows are still the live version (``live``: sorted ids of the snapshot).

        Shards are read newest first, one at a time; a shard is kept when it holds a live id no newer shard
        holds. Memory: one shard plus one byte per live id.
        """
        claimed = np.zeros(len(live), bool)
        used = set()
        for k in range(len(shards) - 1, -1, -1):
            with np.load(self.root / shards[k], allow_pickle=False) as z:
                got = np.asarray(z["ids"], np.int64)
            if not len(got) or not len(live):
                continue
            pos = np.minimum(np.searchsorted(live, got), len(live) - 1)
            pos = pos[live[pos] == got]
            if (~claimed[pos]).any():
                used.add(k)
            claimed[pos] = True
            drop_pages(live)
        return [rel for k, rel in enumerate(shards) if k in used]

    def _project(self, shards, ids, vectors_for, manifest_fields, new_shards, reproject, out_path: Path) -> int:
        """Write the aligned vectors for ``ids`` (in order) to ``out_path`` (.npy); returns their dimension.

        Previous vectors are reused and new shards projected; when the projection changed (``reproject``,
        e.g. a new aligner) every shard is projected again from raw features; later shards win over earlier
        ones for the same id. The output is written through a memory map, chunk by chunk, so peak memory is
        one shard or chunk, not the whole store.
        """
        dim = int(manifest_fields["dim"])
        if not len(ids):
            np.save(out_path, np.zeros((0, dim), np.float32))
            return dim
        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=(len(ids), dim))
        filled = np.zeros(len(ids), bool)
        prev = self.current
        todo = shards
        if prev is not None and not reproject:
            old_ids = prev.ids
            for s in range(0, len(old_ids), COPY_CHUNK):
                chunk = np.asarray(old_ids[s : s + COPY_CHUNK])
                pos = np.searchsorted(ids, chunk)
                ok = pos < len(ids)
                ok[ok] = ids[pos[ok]] == chunk[ok]
                if ok.any():
                    out[pos[ok]] = prev.vectors[s + np.nonzero(ok)[0]]
                    filled[pos[ok]] = True
                for a in (old_ids, prev.vectors, ids, out):
                    drop_pages(a)
            todo = [s for s in shards if s in set(new_shards)]
        for rel in todo:  # oldest first: later shards overwrite
            z = load_npz(self.root / rel)
            if not len(z["ids"]):
                continue
            pos = np.searchsorted(ids, z["ids"])
            ok = pos < len(ids)
            ok[ok] = ids[pos[ok]] == z["ids"][ok]
            if ok.any():
                out[pos[ok]] = vectors_for(z["ids"][ok], z["feats"][ok])
                filled[pos[ok]] = True
            del z
            drop_pages(ids)
            drop_pages(out)  # written pages go back to the page cache (and disk), not this process's memory
        out.flush()
        del out
        if not filled.all():
            missing = ids[~filled][:5].tolist()
            raise StoreError(f"no features for ids {missing}: the feature shards are incomplete",
                             "re-run `t2c index` (it resumes) or re-index into a new store")
        return dim

    def _gc(self) -> None:
        """Keep the newest KEEP_SNAPSHOTS snapshots; drop unreferenced feature shards and temp folders."""
        snaps = sorted(p for p in (self.root / "snapshots").iterdir() if p.name.startswith("s-"))
        for p in (self.root / "snapshots").iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
        for p in snaps[:-KEEP_SNAPSHOTS]:
            shutil.rmtree(p, ignore_errors=True)
        referenced = set()
        for p in snaps[-KEEP_SNAPSHOTS:]:
            try:
                referenced.update(json.loads((p / "manifest.json").read_text()).get("feature_shards", []))
            except (OSError, json.JSONDecodeError):
                continue
        for p in (self.root / "features").iterdir():
            rel = f"features/{p.name}"
            if rel not in referenced:
                p.unlink(missing_ok=True)


HNSW_EF_PER_PROBE = 2  # an HNSW coarse quantizer searches at least this many candidates per probed list


def quantizer_params(index, nprobe: int):
    """Search parameters for an IVF index's coarse quantizer that find ``nprobe`` lists, or None.

    An HNSW coarse quantizer keeps the efSearch it was built with (16): asked for more lists than that, it
    returns the wrong ones (measured on 4,096 centroids: 36% of the true top 64 lists at efSearch 16, 93% at
    128) or fewer (-1s past ~100), so probing more lists stops paying long before every list is probed.
    Its search depth must follow nprobe: efSearch = max(efSearch, HNSW_EF_PER_PROBE * nprobe).
    """
    import faiss

    q = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    if not isinstance(q, faiss.IndexHNSW):
        return None
    return faiss.SearchParametersHNSW(efSearch=int(max(q.hnsw.efSearch, HNSW_EF_PER_PROBE * int(nprobe))))


def ivf_params(index, nprobe: int):
    """Per-call ``SearchParametersIVF`` probing ``nprobe`` lists (the shared index is never mutated), with the
    coarse quantizer's own parameters where it needs them (see ``quantizer_params``)."""
    import faiss

    p = faiss.SearchParametersIVF(nprobe=int(nprobe))
    qp = quantizer_params(index, nprobe)
    if qp is not None:
        p.quantizer_params = qp
        p.referenced_objects = [qp]  # SWIG holds a raw pointer: keep the object alive with p
    return p


def advise_random(vectors) -> bool:
    """``madvise(MADV_RANDOM)`` on a numpy memory map: re-ranking reads scattered rows, and the kernel's
    read-ahead (128 KiB around each 1-2 KiB row) would fill the page cache with rows nobody asked for.
    Returns whether the advice was given (False for arrays in RAM, or where mmap has no ``madvise``)."""
    import mmap

    mm = mmap_of(vectors)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_RANDOM"):
        return False
    try:
        mm.madvise(mmap.MADV_RANDOM)
    except (OSError, ValueError):
        return False
    return True


READ_ROWS_SCATTERED = 16384  # Snapshot.read_rows: from this many rows on, read through the read-ahead mapping
PREFETCH_GAP_PAGES = 8  # rows whose pages are at most this many pages apart are requested as one range
PREFETCH_MAX_RUNS = 4096  # at most this many requests per call: many rows merge over wider gaps instead


def prefetch_rows(a, rows: np.ndarray) -> bool:
    """Ask the kernel (``MADV_WILLNEED``) to read now the pages that ``rows`` (sorted) of a memory-mapped,
    C-contiguous array (or contiguous view of one) sit on: one request per run of nearby pages, all issued
    before any row is touched, so the reads proceed in parallel instead of one page fault at a time (at most
    ``PREFETCH_MAX_RUNS`` requests: for many rows, nearby ones merge over wider gaps). Returns
    whether the advice was given (False for arrays in RAM, non-contiguous views, and where mmap has no
    ``madvise``)."""
    import mmap

    mm = mmap_of(a)
    if (mm is None or not isinstance(a, np.ndarray) or not a.flags["C_CONTIGUOUS"] or not len(rows)
            or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_WILLNEED")):
        return False
    at = a.ctypes.data - np.frombuffer(mm, np.uint8, count=1).ctypes.data  # a's first byte in the mapping
    row_bytes = int(np.prod(a.shape[1:], dtype=np.int64)) * a.itemsize
    first = at + np.asarray(rows, np.int64) * row_bytes
    page = mmap.PAGESIZE
    lo, hi = first // page, (first + row_bytes - 1) // page  # page span of each row
    gaps = lo[1:] - hi[:-1] - 1
    gap = PREFETCH_GAP_PAGES
    if len(gaps) >= PREFETCH_MAX_RUNS:  # one syscall per run: bound them (dense rows read a little more)
        gap = max(gap, int(np.partition(gaps, len(gaps) - PREFETCH_MAX_RUNS + 1)[len(gaps) - PREFETCH_MAX_RUNS + 1]))
    brk = np.nonzero(gaps > gap)[0] + 1
    lo, hi = lo[np.r_[0, brk]], hi[np.r_[brk - 1, len(hi) - 1]]
    try:
        for a0, b0 in zip(lo.tolist(), hi.tolist()):
            mm.madvise(mmap.MADV_WILLNEED, a0 * page, (b0 - a0 + 1) * page)
    except (OSError, ValueError):
        return False
    return True


def write_float16_copy(vectors: np.ndarray, path: Path, chunk: int = COPY_CHUNK) -> Path:
    """Write ``vectors`` (any float array or memory map) to ``path`` as a float16 ``.npy``, chunk by chunk.

    Not atomic on its own: callers write it inside a snapshot's temporary folder (renamed whole, fsynced
    with the snapshot's other files). Unit vectors lose < 2**-11 of any inner product (relative rounding
    of each component; Cauchy-Schwarz), far below the gaps re-ranking decides on.
    """
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=tuple(vectors.shape))
    try:
        for s in range(0, len(vectors), chunk):
            out[s : s + chunk] = np.asarray(vectors[s : s + chunk], np.float32)
        out.flush()
    finally:
        del out
    return path


def new_feature_shard_name(run_id: str, seq: int) -> str:
    """Relative path for a raw-feature shard of a run."""
    return f"features/f-{run_id}-{seq:05d}.npz"
