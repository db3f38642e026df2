"""Embed single images the way a store's images were indexed: same safe decoding, encoder and aligner.

Used by query-by-example (``like:"file.jpg"``, an uploaded image): the example lands in the store's own
aligned, normalised vector space, so its cosine similarity with the indexed images means the same thing as
theirs with each other. The encoder (torch) is built on first use.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from t2c.data.images import DEFAULT_MAX_PIXELS, decode_for

__all__ = ["StoreEmbedder"]


class StoreEmbedder:
    """Image files or in-memory image bytes -> aligned unit vectors in a snapshot's space.

    Args:
        snapshot: an open store snapshot (its manifest names the encoder and the aligner).
        max_pixels: decompression-bomb limit (as for indexing). max_bytes: largest accepted file (None: any).
        device: encoder device (default: the encoder's own choice).

    Example:
        >>> emb = StoreEmbedder(open_store("photos.t2c"))  # doctest: +SKIP
        >>> emb.embed_file("cat.jpg").shape  # doctest: +SKIP
        (512,)
    """

    def __init__(self, snapshot, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None,
                 device: str | None = None):
        self.snapshot = snapshot
        self.max_pixels = int(max_pixels)
        self.max_bytes = max_bytes
        self.device = device
        self._model = None
        self._lock = threading.Lock()

    def _parts(self):
        """(encoder, aligner, preprocess config), built once."""
        with self._lock:
            if self._model is None:
                from t2c.indexer.encoders import make_encoder
                from t2c.indexer.pipeline import load_store_aligner

                enc = make_encoder(self.snapshot.encoder, device=self.device, batch_size=1)
                al = load_store_aligner(self.snapshot)
                self._model = (enc, al, dict(enc.preprocess_config()))
            return self._model

    def _embed(self, path, data: bytes | None, max_pixels: int | None = None) -> np.ndarray:
        from t2c.indexer.preprocess import preprocess_image

        enc, al, cfg = self._parts()
        arr, _ = decode_for(path, lambda img: preprocess_image(img, cfg), int(max_pixels or self.max_pixels),
                            max_bytes=self.max_bytes, draft=int(cfg["image_size"]), data=data)
        feats = enc.encode_images(arr[None])
        return np.asarray(al.apply(np.asarray(feats, np.float32), normalize=True), np.float32)[0]

    def embed_file(self, path: str | Path) -> np.ndarray:
        """The unit vector of one image file. Raises ImageDecodeError (with the indexing reasons)."""
        return self._embed(Path(path), None)

    def embed_bytes(self, data: bytes, name: str = "<upload>", max_pixels: int | None = None) -> np.ndarray:
        """The unit vector of an image held in memory (``max_pixels`` overrides the limit for this one).

        Raises ImageDecodeError (with the indexing reasons).
        """
        return self._embed(name, bytes(data), max_pixels)
