"""Image sources: a recursive folder walk and lists of paths in parquet files.

``walk_folder(root)`` returns a ``WalkResult``: the image files found (``FileEntry``, sorted by ``relpath``
so every run sees the same order) and the paths it skipped with a reason, for the pipeline to write to
its ``errors`` table. Files whose extension is not an image extension are ignored silently (only
counted). Skip reasons (``SKIP_REASONS``):

- ``symlink``: a symlink to a directory or an image-named symlink, skipped because ``follow_symlinks=False``
- ``symlink_loop``: (following) a symlinked directory that points at itself or one of its ancestors, or a
  link that cannot be resolved because of a link cycle (ELOOP)
- ``duplicate_dir``: (following) a symlinked directory whose target is walked anyway (it lies inside the
  root, or another link already led there); walking it again would index the same files twice
- ``broken_symlink``: (following) a symlink whose target does not exist
- ``dir_loop``: a directory that is its own ancestor without a symlink (bind mounts)
- ``not_a_regular_file``: an image-named FIFO, socket or device (opening it could block forever)
- ``permission_denied``: a directory that cannot be listed, or an entry that cannot be stat-ed
- ``io_error``: any other OS error while listing a directory or stat-ing an entry
- ``not_found``: (``stat_paths`` only) a listed path that does not exist

With ``follow_symlinks=False`` (the default) only symlinks that matter are reported: links to
directories, and links whose own name has an image extension (whatever they point to, broken or not).
"""
from __future__ import annotations

import errno
import os
import stat as stat_mod
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from t2c.data.errors import InvalidInput, NotFound

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"})
SKIP_REASONS = frozenset(
    {
        "symlink",
        "symlink_loop",
        "duplicate_dir",
        "broken_symlink",
        "dir_loop",
        "not_found",
        "not_a_regular_file",
        "permission_denied",
        "io_error",
    }
)


class FileEntry(NamedTuple):
    """One image file: absolute normalised path (links not resolved), path relative to the root, size, mtime."""

    path: str
    relpath: str
    size: int
    mtime_ns: int


class Skipped(NamedTuple):
    """A path the walk did not descend into or yield, with a reason from ``SKIP_REASONS``."""

    path: str
    reason: str


@dataclass
class WalkResult:
    """What ``walk_folder`` found: ``files`` (sorted by relpath), ``skipped`` (sorted by path), ``n_ignored``."""

    root: str
    files: list[FileEntry] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    n_ignored: int = 0  # regular files without an image extension

    def __iter__(self) -> Iterator[FileEntry]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def normalise_extensions(extensions: Iterable[str] | str) -> frozenset[str]:
    """Lower-case extensions without dots; a single string is one extension."""
    if isinstance(extensions, str):
        extensions = [extensions]
    out = frozenset(e.strip().lower().lstrip(".") for e in extensions if e and e.strip().lstrip("."))
    if not out:
        raise InvalidInput("no file extensions given", f"e.g. {', '.join(sorted(IMAGE_EXTENSIONS))}")
    return out


def has_extension(name: str, extensions: frozenset[str]) -> bool:
    """True if ``name``'s extension (case-insensitive) is in ``extensions``."""
    ext = PurePath(name).suffix  # pathlib semantics: "....png" has suffix ".png", ".png" has none
    return bool(ext) and ext[1:].lower() in extensions


def _os_reason(e: OSError) -> str:
    if isinstance(e, PermissionError):
        return "permission_denied"
    if e.errno == errno.ELOOP:
        return "symlink_loop"
    return "io_error"


def _resolve_root(root) -> tuple[str, os.stat_result]:
    if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
        raise InvalidInput(f"folder must be a path, got {root!r}")
    path = os.path.abspath(os.fspath(root))
    try:
        st = os.stat(path)  # the root itself is always followed: the user named it
    except FileNotFoundError:
        raise NotFound(f"folder {path} does not exist", "check the path") from None
    except PermissionError:
        raise InvalidInput(f"folder {path} cannot be read: permission denied") from None
    except OSError as e:
        raise InvalidInput(f"folder {path} cannot be read: {e.strerror or e}") from None
    if not stat_mod.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{path} is not a folder", "give a directory of images (or a parquet list of paths)")
    try:
        with os.scandir(path):
            pass
    except PermissionError:
        raise InvalidInput(f"folder {path} cannot be read: permission denied") from None
    except OSError as e:
        raise InvalidInput(f"folder {path} cannot be read: {e.strerror or e}") from None
    return path, st


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def _walk_stat(entry: os.DirEntry, path: str, wanted: bool, follow_symlinks: bool,
               result: WalkResult) -> tuple[os.stat_result, bool] | None:
    """(stat, is_link) of a walked entry worth looking at; None when it is skipped, ignored or gone."""
    try:
        is_link = entry.is_symlink()
        if is_link and not follow_symlinks:
            if wanted or entry.is_dir(follow_symlinks=True):
                result.skipped.append(Skipped(path, "symlink"))
            return None
        if not is_link and not wanted and not entry.is_dir(follow_symlinks=False):
            result.n_ignored += 1  # no stat call for the (many) files we do not want
            return None
        try:
            return entry.stat(follow_symlinks=True), is_link
        except FileNotFoundError:
            # a link that points nowhere (a plain entry that vanished meanwhile is simply gone);
            # reported when it could have been an image or a folder
            if is_link and (wanted or not os.path.splitext(entry.name)[1]):
                result.skipped.append(Skipped(path, "broken_symlink"))
            return None
    except OSError as e:
        result.skipped.append(Skipped(path, _os_reason(e)))
        return None


def walk_folder(
    root: str | os.PathLike,
    *,
    follow_symlinks: bool = False,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> WalkResult:
    """Find every image file under ``root``, recursively, in a deterministic order.

    Args:
        root: the folder to walk (itself followed even when it is a symlink).
        follow_symlinks: descend into symlinked directories and include symlinked files. Loop-safe:
            directories are identified by ``(st_dev, st_ino)``; a link back to an ancestor is skipped as
            ``symlink_loop`` and a second way into an already-walked directory as ``duplicate_dir``.
        extensions: file extensions to keep (case-insensitive, with or without the dot).

    Returns:
        A ``WalkResult`` with ``files`` (``FileEntry``, sorted by ``relpath``), ``skipped``
        (``Skipped(path, reason)``, sorted by path) and ``n_ignored``; iterating it yields the files.

    Raises:
        NotFound: ``root`` does not exist.
        InvalidInput: ``root`` is not a directory or cannot be listed, or ``extensions`` is empty.

    Example:
        >>> res = walk_folder("photos")  # doctest: +SKIP
        >>> [f.relpath for f in res][:2], res.skipped[:1]
        (['a.jpg', 'sub/b.png'], [Skipped(path='/abs/photos/link', reason='symlink')])
    """
    exts = normalise_extensions(extensions)
    root_path, root_st = _resolve_root(root)
    root_real = os.path.realpath(root_path)
    result = WalkResult(root=root_path)
    root_key = (root_st.st_dev, root_st.st_ino)
    visited = {root_key}
    # Depth-first; each item carries its ancestors' keys so loops are told apart from mere duplicates.
    stack: list[tuple[str, str, frozenset]] = [(root_path, "", frozenset({root_key}))]
    while stack:
        dirpath, reldir, ancestors = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            result.skipped.append(Skipped(dirpath, _os_reason(e)))
            continue
        subdirs: list[tuple[str, str, frozenset]] = []
        for entry in entries:
            path = os.path.join(dirpath, entry.name)
            rel = os.path.join(reldir, entry.name) if reldir else entry.name
            wanted = has_extension(entry.name, exts)
            found = _walk_stat(entry, path, wanted, follow_symlinks, result)
            if found is None:
                continue
            st, is_link = found
            if stat_mod.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    result.skipped.append(Skipped(path, "symlink_loop" if is_link else "dir_loop"))
                    continue
                if key in visited or (is_link and _inside(os.path.realpath(path), root_real)):
                    result.skipped.append(Skipped(path, "duplicate_dir"))
                    continue
                visited.add(key)
                subdirs.append((path, rel, ancestors | {key}))
            elif wanted:
                if stat_mod.S_ISREG(st.st_mode):
                    result.files.append(FileEntry(path, rel, st.st_size, st.st_mtime_ns))
                else:
                    result.skipped.append(Skipped(path, "not_a_regular_file"))
            else:
                result.n_ignored += 1
        stack.extend(reversed(subdirs))
    result.files.sort(key=lambda f: f.relpath)
    result.skipped.sort()
    return result


def stat_paths(paths: Iterable[str], *, base: str | os.PathLike | None = None) -> WalkResult:
    """Turn a list of paths (e.g. from ``read_path_list``) into a ``WalkResult`` like a folder walk.

    Relative paths are taken against ``base`` (default: the working directory); ``relpath`` is the path
    as given. Symlinks are followed (the list named them explicitly). Missing paths are skipped as
    ``not_found``, non-files as ``not_a_regular_file``; duplicates are kept once. Order: as given.
    """
    base_path = os.path.abspath(os.fspath(base)) if base is not None else os.getcwd()
    result = WalkResult(root=base_path)
    seen: set[str] = set()
    for p in paths:
        path = os.path.normpath(os.path.join(base_path, os.path.expanduser(p)))
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            result.skipped.append(Skipped(path, "not_found"))
            continue
        except OSError as e:
            result.skipped.append(Skipped(path, _os_reason(e)))
            continue
        if not stat_mod.S_ISREG(st.st_mode):
            result.skipped.append(Skipped(path, "not_a_regular_file"))
            continue
        result.files.append(FileEntry(path, p, st.st_size, st.st_mtime_ns))
    return result


def _path_list_file(parquet_path, column: str):
    """The opened parquet file of a path list, its ``column`` checked to be there and to hold strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(parquet_path)
    if not p.exists():
        raise NotFound(f"path list {p} does not exist")
    if not p.is_file():
        raise InvalidInput(f"path list {p} is not a file")
    try:
        pf = pq.ParquetFile(p)
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"{p} is not a readable parquet file: {e}") from None
    names = list(pf.schema_arrow.names)
    if column not in names:
        raise InvalidInput(
            f"column {column!r} not found in {p}",
            f"columns there: {', '.join(names) if names else '(none)'}; choose one with --column",
        )
    typ = pf.schema_arrow.field(column).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
        raise InvalidInput(f"column {column!r} in {p} holds {typ}, not strings", "paths must be strings")
    return pf


def iter_path_list(parquet_path: str | os.PathLike, column: str = "path",
                   batch_rows: int = 65536) -> Iterator[list[str]]:
    """Stream a column of file paths from a parquet file, one batch (list of strings) at a time.

    Raises:
        Same as :func:`read_path_list`; a null or empty path raises when its batch is reached.
    """
    import pyarrow as pa

    pf = _path_list_file(parquet_path, column)
    start = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[column]):
            values = batch.column(0).to_pylist()
            bad = [i for i, v in enumerate(values) if not v]
            if bad:
                raise InvalidInput(f"column {column!r} in {parquet_path} has a null or empty path at row "
                                   f"{start + bad[0]}", "drop those rows")
            start += len(values)
            yield values
    except (pa.ArrowException, OSError) as e:
        raise InvalidInput(f"cannot read column {column!r} from {parquet_path}: {e}") from None


class SeenPaths:
    """Set membership for many paths in bounded memory: 8-byte hashes in sorted, disjoint runs merged as they grow.

    Runs of ``SPILL_ROWS`` hashes or more live in files in ``folder`` (unlinked as soon as they are made, so
    nothing is left behind; memory-mapped, their pages dropped after each use), so the process holds only the
    small runs (under ``2 * SPILL_ROWS`` hashes in all) and one merge chunk, however many paths are listed.
    A 64-bit hash collision would wrongly call a new path a duplicate; among 10M distinct paths the chance
    is about 3e-6 (n^2 / 2^65), among 100M about 3e-4.
    """

    SPILL_ROWS = 1 << 21  # runs this long or longer go to disk (16 MB of hashes)
    CHUNK = 1 << 20  # hashes merged at a time on disk

    def __init__(self, folder: str | os.PathLike | None = None):
        import tempfile

        self.runs: list[np.ndarray] = []
        self.folder = os.fspath(folder) if folder is not None else tempfile.gettempdir()

    @staticmethod
    def _hash(paths: list[str]) -> np.ndarray:
        import hashlib

        return np.frombuffer(b"".join([hashlib.blake2b(p.encode("utf-8", "surrogateescape"), digest_size=8).digest()
                                       for p in paths]), "<u8").astype(np.uint64)

    def add_new(self, paths: list[str]) -> np.ndarray:
        """Add a batch; returns a mask of the paths seen for the first time (within the batch too)."""
        h = self._hash(paths)
        _, first = np.unique(h, return_index=True)
        new = np.zeros(len(h), bool)
        new[first] = True
        for r in self.runs:
            new &= ~self._member(r, h)
        run = np.sort(h[new])
        if len(run):
            while self.runs and len(self.runs[-1]) <= 2 * len(run):
                run = self._merge(self.runs.pop(), run)
            self.runs.append(run)
        return new

    @staticmethod
    def _member(run: np.ndarray, h: np.ndarray, chunk: int = 8192) -> np.ndarray:
        """Which of ``h`` are in the sorted ``run`` (a file-backed run is searched a chunk of keys at a time)."""
        from t2c.data.store import drop_pages

        if not isinstance(run, np.memmap):
            pos = np.minimum(np.searchsorted(run, h), len(run) - 1)
            return run[pos] == h
        order = np.argsort(h)
        found = np.zeros(len(h), bool)
        for s in range(0, len(h), chunk):
            q = h[order[s : s + chunk]]
            pos = np.minimum(np.searchsorted(run, q), len(run) - 1)
            found[order[s : s + chunk]] = run[pos] == q
            drop_pages(run)
        return found

    def _merge(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Merge two sorted disjoint runs: a concatenation sorted in place while small, else a chunked merge into a
        new file (memory: two chunks, whatever the runs' sizes)."""
        import tempfile

        from t2c.data.store import drop_pages

        n = len(a) + len(b)
        if n < self.SPILL_ROWS:
            m = np.concatenate([a, b])
            m.sort()
            return m
        fd, path = tempfile.mkstemp(dir=self.folder, prefix=".seen-paths-", suffix=".u64")
        os.close(fd)
        try:
            out = np.memmap(path, np.uint64, "w+", shape=(n,))
        finally:
            os.unlink(path)  # the mapping keeps the data until the run is dropped
        i = j = o = 0
        while i < len(a) or j < len(b):
            ca, cb = np.asarray(a[i : i + self.CHUNK]), np.asarray(b[j : j + self.CHUNK])
            if len(ca) and len(cb):  # both chunks up to the smaller last value: everything below it is here
                cut = min(ca[-1], cb[-1])
                ca, cb = ca[: np.searchsorted(ca, cut, "right")], cb[: np.searchsorted(cb, cut, "right")]
            m = np.concatenate([ca, cb])
            m.sort()
            out[o : o + len(m)] = m
            i, j, o = i + len(ca), j + len(cb), o + len(m)
            for x in (a, b, out):
                drop_pages(x)
        return out


def iter_stat_paths(batches: Iterable[list[str]], *, base: str | os.PathLike | None = None,
                    spill_dir: str | os.PathLike | None = None) -> Iterator[FileEntry | Skipped]:
    """Streaming :func:`stat_paths`: the same entries, in list order, from batches of paths, in bounded memory
    (``spill_dir``: where the paths seen so far are kept once they are many; default: the temp folder)."""
    base_path = os.path.abspath(os.fspath(base)) if base is not None else os.getcwd()
    seen = SeenPaths(spill_dir)
    for batch in batches:
        norm = [os.path.normpath(os.path.join(base_path, os.path.expanduser(p) if p[:1] == "~" else p))
                for p in batch]
        for p, path, new in zip(batch, norm, seen.add_new(norm)):
            if new:
                yield _stat_entry(p, path)


def _stat_entry(p: str, path: str) -> FileEntry | Skipped:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Skipped(path, "not_found")
    except OSError as e:
        return Skipped(path, _os_reason(e))
    if not stat_mod.S_ISREG(st.st_mode):
        return Skipped(path, "not_a_regular_file")
    return FileEntry(path, p, st.st_size, st.st_mtime_ns)


def read_path_list(parquet_path: str | os.PathLike, column: str = "path") -> list[str]:
    """Read a column of file paths from a parquet file (nulls and empty strings are errors).

    Raises:
        NotFound: the parquet file does not exist.
        InvalidInput: it is not a readable parquet file, ``column`` is missing (the message lists the
            columns there are), the column is not a string column, or it holds null/empty values.
    """
    return [path for batch in iter_path_list(parquet_path, column) for path in batch]
