"""text2concept: search and audit image collections in words, with any vision encoder.

The public Python API is :func:`open` plus what this module exports (``t2c.__all__``)::

    import t2c

    t2c.index("photos/", "photos.t2c", encoder="world:pairnet", fit_aligner=1000)
    with t2c.open("photos.t2c") as store:
        res = store.search("red circle AND NOT square", k=20)
        df = res.to_pandas()                      # id, path, score
        audit = store.audit(["red", "teal background"])

Everything else (``t2c.data``, ``t2c.indexer``, ``t2c.query``, ``t2c.service`` and names that start with ``_``)
is the implementation and may change between versions. Importing ``t2c`` is fast and loads neither torch nor
numpy; they are imported when a call needs them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from t2c.data.errors import (AlignerError, DamagedArtefact, DiskFull, EncoderError, Forbidden, ImageDecodeError,
                             InvalidInput, NotAvailable, NotFound, QuerySyntaxError, SourceGone, StoreError,
                             StoreNotWritable, T2CError, UnknownChoice)

if TYPE_CHECKING:  # pragma: no cover - the lazily imported names, for type checkers
    from t2c._indexing import align, encoders, index
    from t2c._results import (AuditResult, ClassifyResult, Description, DriftResult, DuplicateGroup,
                              DuplicatesResult, EncoderInfo, EncoderList, Hit, ImageRecord, Prediction, Prevalence,
                              SearchResult, Shift, StoreInfo)
    from t2c._store import Store, open
    from t2c.indexer.aligner import Aligner
    from t2c.indexer.pipeline import IndexReport

    __version__: str

#: public name -> module that defines it (imported on first use, so ``import t2c`` stays light)
_LAZY = {
    "open": "t2c._store", "Store": "t2c._store",
    "index": "t2c._indexing", "encoders": "t2c._indexing", "align": "t2c._indexing",
    "SearchResult": "t2c._results", "Hit": "t2c._results", "AuditResult": "t2c._results",
    "Prevalence": "t2c._results", "DriftResult": "t2c._results", "Shift": "t2c._results",
    "ClassifyResult": "t2c._results", "Prediction": "t2c._results", "Description": "t2c._results",
    "ImageRecord": "t2c._results", "StoreInfo": "t2c._results", "EncoderInfo": "t2c._results",
    "EncoderList": "t2c._results", "DuplicatesResult": "t2c._results", "DuplicateGroup": "t2c._results",
    "Aligner": "t2c.indexer.aligner", "IndexReport": "t2c.indexer.pipeline",
}

# `open` is public but left out of __all__, so that `from t2c import *` never shadows the builtin open()
__all__ = [
    "__version__", "index", "encoders", "align",
    "Store", "SearchResult", "Hit", "AuditResult", "Prevalence", "DriftResult", "Shift", "ClassifyResult",
    "Prediction", "Description", "ImageRecord", "StoreInfo", "EncoderInfo", "EncoderList", "DuplicatesResult",
    "DuplicateGroup", "Aligner", "IndexReport",
    "T2CError", "InvalidInput", "NotFound", "UnknownChoice", "QuerySyntaxError", "StoreError", "EncoderError",
    "AlignerError", "ImageDecodeError", "Forbidden", "NotAvailable", "DamagedArtefact", "DiskFull",
    "StoreNotWritable", "SourceGone",
]


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("text2concept")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a tree that was never installed
        return "0+unknown"


def __getattr__(name: str) -> Any:
    """Import the public names lazily (PEP 562)."""
    if name == "__version__":
        value: Any = _version()
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 't2c' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_LAZY))
