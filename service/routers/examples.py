"""Query by example and duplicates: uploads into POST /api/search, GET /api/images/{id}/similar, GET /api/duplicates.

An uploaded image is decoded with the same safe decoding as indexing (a bad one gets 400 with the indexing
``reason``: ``not_an_image``, ``truncated``, ``bomb``, ...), embedded with the store's encoder and aligner, and
kept in memory under ``sha256:<hex>``: the answer's ``q`` is the query text (``like:"sha256:..." AND ...``)
that pages through the same search with GET /api/search while the server runs.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request
from starlette.concurrency import run_in_threadpool

import t2c
from t2c import InvalidInput
from t2c.service.deps import Settings, get_settings, get_store, require_api_key
from t2c.service.routers.search import check_paging, run_search

router = APIRouter(prefix="/api", tags=["examples"], dependencies=[Depends(require_api_key)])
MAX_ID = 2**63 - 1
_FIELDS = ("image", "q", "k", "offset", "explain")


def _int_field(form, name: str, default: int, lo: int) -> int:
    v = form.get(name)
    if v is None or v == "":
        return default
    try:
        out = int(v)
    except (TypeError, ValueError):
        raise InvalidInput(f"form field {name!r} must be an integer, got {str(v)[:20]!r}") from None
    if out < lo:
        raise InvalidInput(f"form field {name!r} must be >= {lo}, got {out}")
    return out


def _text(q: Any) -> str | None:
    """The optional query text AND-ed with an example (None when absent or blank)."""
    return q if isinstance(q, str) and q.strip() else None


async def search_upload(request: Request, settings: Settings, store: t2c.Store) -> dict[str, Any]:
    """POST /api/search as multipart: ``image`` (file), optional ``q``, ``k``, ``offset``, ``explain``."""
    from starlette.datastructures import UploadFile

    form = await request.form(max_files=1, max_fields=len(_FIELDS))
    extra = sorted(set(form.keys()) - set(_FIELDS))
    if extra:
        raise InvalidInput(f"unknown form field {extra[0]!r}", f"fields: {', '.join(_FIELDS)}")
    image = form.get("image")
    if not isinstance(image, UploadFile):
        raise InvalidInput("the form has no image file (field 'image')", "send the example image as field 'image'")
    k, offset = _int_field(form, "k", 20, 1), _int_field(form, "offset", 0, 0)
    explain = str(form.get("explain", "false")).lower() in ("1", "true", "yes", "on")
    check_paging(settings, k, offset)
    data = await image.read()
    # the query text is parsed before the (costly) embedding, so a bad query fails fast
    res = await run_in_threadpool(run_search, store, settings, _text(form.get("q")), k, offset, explain, data)
    return dict(res.to_dict(), q=res.text)


@router.get("/images/{image_id}/similar")
def similar(
    image_id: int = PathParam(..., ge=0, le=MAX_ID, description="catalog id of the example image"),
    q: str | None = Query(None, description="optional query text AND-ed with the example, e.g. NOT red"),
    k: int = Query(20, ge=1, description="hits per page"),
    offset: int = Query(0, ge=0, description="index of the first hit"),
    explain: bool = Query(False, description="add per-constraint scores to each hit"),
    settings: Settings = Depends(get_settings),
    store: t2c.Store = Depends(get_store),
) -> dict[str, Any]:
    """Images like an indexed one (``like:ID``), ranked by calibrated similarity; the example itself comes first."""
    check_paging(settings, k, offset)
    store.image(image_id)  # 404 for an unknown id
    res = run_search(store, settings, _text(q), k, offset, explain, image_id)
    return dict(res.to_dict(), q=res.text)


@router.get("/duplicates")
def duplicates(store: t2c.Store = Depends(get_store)) -> dict[str, Any]:
    """Groups of exact and near-duplicate images in the live snapshot (computed once per snapshot)."""
    return store.duplicates().to_dict()
