"""Example-image vectors for ``like:`` leaves: an indexed image's own vector, or an image file embedded the
store's way (safe decoding, the store's encoder and aligner), or an uploaded image kept in memory.

``ExampleBank`` has the two members the engine and ``t2c.query.calibrate.thresholds_for`` ask of a concept
bank: ``vectors(texts)`` (texts are example leaves' query text, ``like:812``) and ``present_score`` (None:
image-to-image similarity has no model-given cut). So an example's threshold is calibrated exactly like a
concept's, on the collection's own similarity distribution to the example (see ``t2c.query.calibrate``).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from t2c.data.errors import InvalidInput, NotFound

__all__ = ["ExampleBank", "UPLOAD_PREFIX"]

UPLOAD_PREFIX = "sha256:"  # ref of an uploaded image: sha256:<hex digest of its bytes>
MAX_KEPT = 256  # example vectors kept per bank (files and uploads), least recently used dropped


class ExampleBank:
    """Vectors of example images for one snapshot.

    Args:
        snapshot: the open snapshot the examples are compared with.
        allow_files: whether ``like:"path"`` may read image files (a server says False: only uploads).
        embedder: a ``t2c.indexer.embed.StoreEmbedder`` (default: one for ``snapshot``, built on first use).
    """

    present_score = None

    def __init__(self, snapshot, *, allow_files: bool = True, embedder=None):
        self.snapshot = snapshot
        self.allow_files = bool(allow_files)
        self._embedder = embedder
        self._kept: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @property
    def embedder(self):
        if self._embedder is None:
            from t2c.indexer.embed import StoreEmbedder

            self._embedder = StoreEmbedder(self.snapshot)
        return self._embedder

    def _keep(self, key, vec: np.ndarray) -> np.ndarray:
        with self._lock:
            self._kept[key] = vec
            self._kept.move_to_end(key)
            while len(self._kept) > MAX_KEPT:
                self._kept.popitem(last=False)
        return vec

    def _get(self, key):
        with self._lock:
            v = self._kept.get(key)
            if v is not None:
                self._kept.move_to_end(key)
            return v

    def add_upload(self, data: bytes, name: str = "<upload>", max_pixels: int | None = None) -> str:
        """Embed an uploaded image; returns its ref (``sha256:<hex>``) for ``like:"sha256:..."``.

        Raises ImageDecodeError (the reasons indexing records) for a bad image.
        """
        ref = UPLOAD_PREFIX + hashlib.sha256(data).hexdigest()
        if self._get(("upload", ref)) is None:
            self._keep(("upload", ref), self.embedder.embed_bytes(data, name, max_pixels=max_pixels))
        return ref

    def vector_of(self, ref: int | str) -> np.ndarray:
        """The unit vector of one example reference (catalog id, uploaded image or image file)."""
        if isinstance(ref, int):
            row = int(self.snapshot.rows_of([ref])[0])
            return np.asarray(self.snapshot.vectors[row], np.float32)
        if ref.startswith(UPLOAD_PREFIX):
            v = self._get(("upload", ref))
            if v is None:
                raise NotFound(f"uploaded image {ref[:19]}... is not known here (uploads are kept in memory "
                               f"for a while)", "upload the image again")
            return v
        if not self.allow_files:
            raise InvalidInput(f"this server does not read image files named in queries ({ref!r})",
                               "upload the image instead, or use like:ID with an indexed image's id")
        path = Path(ref).expanduser()
        try:
            st = os.stat(path)
            key = ("file", str(path.resolve()), st.st_size, st.st_mtime_ns)
        except OSError:
            key = None  # decoding reports the reason (not_found, permission_denied, ...)
        v = self._get(key) if key else None
        if v is None:
            v = self.embedder.embed_file(path)
            if key:
                self._keep(key, v)
        return v

    def vectors(self, texts) -> np.ndarray:
        """(k, d) unit vectors of example leaves given by their query text (``like:812``, ``like:"f.jpg"``)."""
        from t2c.query.ast import Example
        from t2c.query.parse import parse

        out = []
        for t in texts:
            node = parse(t)
            if not isinstance(node, Example):
                raise InvalidInput(f"{t!r} is not an example (like:ID or like:\"file\")")
            out.append(self.vector_of(node.ref))
        d = int(self.snapshot.vectors.shape[1])
        return np.stack(out).astype(np.float32) if out else np.zeros((0, d), np.float32)
