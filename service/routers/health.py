"""Health (no auth) and store info."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

import t2c
from t2c.service.deps import get_store, require_api_key

router = APIRouter(prefix="/api", tags=["health"])
#: the manifest's index and aligner fields the service shows (no file-system paths)
INDEX_FIELDS = ("type", "factory", "nprobe", "recall_at_10")
ALIGNER_FIELDS = ("identity", "r2_heldout", "digest")


@router.get("/health")
def health(request: Request) -> dict:
    """Liveness: always answers, needs no API key."""
    store = getattr(request.app.state, "store", None)
    return {"status": "ok", "snapshot": None if store is None else store.snapshot}


@router.get("/info", dependencies=[Depends(require_api_key)])
def info(store: t2c.Store = Depends(get_store)) -> dict:
    """A summary of the store's manifest: counts, encoder, CLIP, index, aligner, catalog columns."""
    i = store.info()
    return {
        "snapshot": i.snapshot,
        "created": i.created,
        "count": i.count,
        "errors": i.errors,
        "dim": i.dim,
        "encoder": i.encoder,
        "clip": i.clip,
        "feature_dim": i.feature_dim,
        "index": {k: i.index.get(k) for k in INDEX_FIELDS if k in i.index},
        "aligner": {k: i.aligner.get(k) for k in ALIGNER_FIELDS},
        "columns": i.columns,
    }
