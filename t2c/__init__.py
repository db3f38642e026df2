"""text2concept: search and audit image collections in words, with any vision encoder.

The subpackages are ``t2c.data`` (the store, image sources, the concept world's generator),
``t2c.indexer`` (encoders, aligners, the batch pipeline), ``t2c.query`` (the query language, calibration,
audits) and ``t2c.service`` (the CLI and the HTTP service).
"""
from __future__ import annotations

from importlib import metadata as _metadata

try:
    __version__: str = _metadata.version("text2concept")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
