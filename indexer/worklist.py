"""A run's work list (the files it will read, in order) kept column-wise in an Arrow file, not as Python objects.

Planning appends items batch by batch (:class:`WorkListWriter`); the run reads them back one part at a time
(:class:`WorkList`), so the driver's memory is bounded by one batch whatever the number of files: 100M files
planned make a file of about (path + relpath + 33) bytes per file on disk, and a few MB in RAM.

The file is unlinked as soon as it is opened for reading (Linux keeps it while the handle is open), so nothing
is left behind when the run ends or is killed.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from t2c.data.arrow_build import column, values

BATCH_ROWS = 65536
SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.large_string()), ("relpath", pa.large_string()),
                    ("size", pa.int64()), ("mtime_ns", pa.int64()), ("changed", pa.bool_())])


class WorkListWriter:
    """Appends work items to an Arrow IPC file in fixed-size record batches (``BATCH_ROWS`` rows each)."""

    def __init__(self, folder: str | os.PathLike | None = None, batch_rows: int | None = None):
        name = f".worklist-{os.getpid()}-{secrets.token_hex(6)}.arrow"
        self.path = os.path.join(os.fspath(folder) if folder is not None else tempfile.gettempdir(), name)
        self.batch_rows = int(batch_rows or BATCH_ROWS)
        self._sink = pa.OSFile(self.path, "wb")
        self._w = pa.ipc.new_file(self._sink, SCHEMA)
        self._buf: dict[str, list] = {k: [] for k in SCHEMA.names}
        self.n = 0

    def add(self, id_: int, path: str, relpath: str, size: int, mtime_ns: int, changed: bool) -> None:
        """Append one item (a new file gets a fresh id, a changed one keeps its catalog id)."""
        b = self._buf
        b["id"].append(id_)
        b["path"].append(path)
        b["relpath"].append(relpath)
        b["size"].append(size)
        b["mtime_ns"].append(mtime_ns)
        b["changed"].append(changed)
        self.n += 1
        if len(b["id"]) >= self.batch_rows:
            self._flush()

    def add_new(self, first_id: int, paths: list[str], relpaths: list[str], sizes: list[int],
                mtimes_ns: list[int]) -> None:
        """Append a batch of new files, numbered ``first_id, first_id + 1, ...`` in order."""
        b = self._buf
        b["id"].extend(range(first_id, first_id + len(paths)))
        b["path"].extend(paths)
        b["relpath"].extend(relpaths)
        b["size"].extend(sizes)
        b["mtime_ns"].extend(mtimes_ns)
        b["changed"].extend([False] * len(paths))
        self.n += len(paths)
        while len(self._buf["id"]) >= self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        """Write the buffered items as record batches of exactly ``batch_rows`` rows (the last one may be short:
        readers find item i in batch ``i // batch_rows``)."""
        b = self._buf
        if b["id"]:
            k = min(len(b["id"]), self.batch_rows)
            self._w.write_batch(pa.record_batch([column(b[c][:k], SCHEMA.field(c).type) for c in SCHEMA.names],
                                                schema=SCHEMA))
            self._buf = {c: b[c][k:] for c in SCHEMA.names}

    def finish(self) -> "WorkList":
        """Close the file and open it for reading."""
        while self._buf["id"]:
            self._flush()
        self._w.close()
        self._sink.close()
        return WorkList(self.path, self.n, self.batch_rows)

    def abort(self) -> None:
        """Drop the file (planning failed)."""
        try:
            self._w.close()
            self._sink.close()
        finally:
            Path(self.path).unlink(missing_ok=True)


class WorkList:
    """The planned items, read back by index, slice or part; items come out as fresh dicts
    (``id, path, relpath, size, mtime_ns, kind``) that live only as long as the caller keeps them."""

    def __init__(self, path: str, n: int, batch_rows: int):
        self._fh = pa.OSFile(path, "rb")
        Path(path).unlink(missing_ok=True)  # the open handle keeps the data; nothing is left on disk
        self._reader = pa.ipc.open_file(self._fh)
        self.n, self.batch_rows = int(n), int(batch_rows)
        self._cached: tuple[int, dict] | None = None

    @classmethod
    def from_items(cls, items, folder=None) -> "WorkList":
        """A work list from dicts (tests, small runs)."""
        w = WorkListWriter(folder)
        for t in items:
            w.add(t["id"], t["path"], t["relpath"], t["size"], t["mtime_ns"], t.get("kind") == "changed")
        return w.finish()

    def __len__(self) -> int:
        return self.n

    def _batch(self, b: int) -> dict:
        if self._cached is None or self._cached[0] != b:
            rb = self._reader.get_batch(b)
            self._cached = (b, {k: rb.column(k).to_pylist() for k in SCHEMA.names})
        return self._cached[1]

    def _item(self, i: int) -> dict:
        b = self._batch(i // self.batch_rows)
        j = i % self.batch_rows
        return {"id": b["id"][j], "path": b["path"][j], "relpath": b["relpath"][j], "size": b["size"][j],
                "mtime_ns": b["mtime_ns"][j], "kind": "changed" if b["changed"][j] else "new"}

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [self._item(i) for i in range(*key.indices(self.n))]
        i = int(key)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(key)
        return self._item(i)

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.n):
            yield self._item(i)

    def paths(self, lo: int, hi: int) -> list[str]:
        """The paths of items ``lo..hi-1``."""
        return [self._item(i)["path"] for i in range(lo, min(hi, self.n))]

    def parts(self, part_size: int) -> list["Part"]:
        """The run's parts: light views of ``part_size`` consecutive items each."""
        return [Part(self, lo, min(lo + part_size, self.n)) for lo in range(0, self.n, part_size)]

    def digest_into(self, h: "hashlib._Hash") -> None:
        """Feed what identifies the work (ids, paths, sizes, mtimes) into a hash, batch by batch."""
        for b in range(self._reader.num_record_batches):
            rb = self._reader.get_batch(b)
            for k in ("id", "size", "mtime_ns"):
                h.update(values(rb.column(k)).tobytes())
            for buf in rb.column("path").buffers()[1:]:
                h.update(memoryview(buf) if buf is not None else b"")

    def close(self) -> None:
        self._fh.close()


class Part:
    """Items ``lo..hi-1`` of a work list: sized and iterable, read from the file when iterated."""

    def __init__(self, work: WorkList, lo: int, hi: int):
        self.work, self.lo, self.hi = work, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def __iter__(self) -> Iterator[dict]:
        for i in range(self.lo, self.hi):
            yield self.work[i]

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.work[self.lo:self.hi][key]
        return list(self)[key]
