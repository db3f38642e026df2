"""Health (no auth) and store info."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from t2c.service.deps import Live, get_live, require_api_key

router = APIRouter(prefix="/api", tags=["health"])


@router.get("/health")
def health(request: Request) -> dict:
    """Liveness: always answers, needs no API key."""
    holder = getattr(request.app.state, "holder", None)
    live = getattr(holder, "current", None)
    return {"status": "ok", "snapshot": getattr(live, "name", None)}


@router.get("/info", dependencies=[Depends(require_api_key)])
def info(live: Live = Depends(get_live)) -> dict:
    """A summary of the store's manifest: counts, encoder, CLIP, index, aligner, catalog columns."""
    snap = live.snapshot
    m = snap.manifest
    al = m.get("aligner") or {}
    idx = m.get("index") or {}
    try:
        columns = snap.columns()
    except Exception:  # noqa: BLE001 - a catalog problem must not hide the rest of the summary
        columns = {}
    return {
        "snapshot": live.name,
        "created": m.get("created"),
        "count": snap.count,
        "errors": (m.get("counts") or {}).get("errors"),
        "dim": m.get("dim"),
        "encoder": m.get("encoder"),
        "clip": m.get("clip"),
        "feature_dim": m.get("feature_dim"),
        "index": {k: idx.get(k) for k in ("type", "factory", "nprobe", "recall_at_10") if k in idx},
        "aligner": {"identity": al.get("identity"), "r2_heldout": al.get("r2_heldout"), "digest": al.get("digest")},
        "columns": columns,
    }
