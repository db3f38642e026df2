"""Query by example and duplicates: uploads into POST /api/search, GET /api/images/{id}/similar, GET /api/duplicates.

An uploaded image is decoded with the same safe decoding as indexing (a bad one gets 400 with the indexing
``reason``: ``not_an_image``, ``truncated``, ``bomb``, ...), embedded with the store's encoder and aligner, and
kept in memory under ``sha256:<hex>``: the answer's ``q`` is the query text (``like:"sha256:..." AND ...``)
that pages through the same search with GET /api/search while the server runs.
"""
from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request

from t2c.data.errors import InvalidInput
from t2c.service.deps import Live, Settings, get_live, get_settings, require_api_key
from t2c.service.routers.search import check_paging, parse_text, run_search

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


def _with_text(settings: Settings, example, q: str | None):
    """The example leaf AND-ed with the parsed query text (when there is one)."""
    from t2c.query.ast import conj

    return conj([example] + ([parse_text(settings, q)] if q and q.strip() else []))


async def search_upload(request: Request, settings: Settings, live: Live) -> dict[str, Any]:
    """POST /api/search as multipart: ``image`` (file), optional ``q``, ``k``, ``offset``, ``explain``."""
    from starlette.datastructures import UploadFile

    from t2c.query.ast import Example
    from t2c.query.parse import format as fmt

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
    q = form.get("q")
    q = q if isinstance(q, str) else None
    node_text = q  # parse before the (costly) embedding, so a bad query fails fast
    if node_text and node_text.strip():
        parse_text(settings, node_text)
    ref = live.engine.examples.add_upload(data, image.filename or "<upload>", max_pixels=settings.max_upload_pixels)
    node = _with_text(settings, Example(ref), q)
    out = run_search(live, node, k, offset, explain)
    out["q"] = fmt(node)
    return out


@router.get("/images/{image_id}/similar")
def similar(
    image_id: int = PathParam(..., ge=0, le=MAX_ID, description="catalog id of the example image"),
    q: str | None = Query(None, description="optional query text AND-ed with the example, e.g. NOT red"),
    k: int = Query(20, ge=1, description="hits per page"),
    offset: int = Query(0, ge=0, description="index of the first hit"),
    explain: bool = Query(False, description="add per-constraint scores to each hit"),
    settings: Settings = Depends(get_settings),
    live: Live = Depends(get_live),
) -> dict[str, Any]:
    """Images like an indexed one (``like:ID``), ranked by calibrated similarity; the example itself comes first."""
    from t2c.query.ast import Example
    from t2c.query.parse import format as fmt

    check_paging(settings, k, offset)
    live.snapshot.rows_of([image_id])  # 404 for an unknown id
    node = _with_text(settings, Example(image_id), q)
    out = run_search(live, node, k, offset, explain)
    out["q"] = fmt(node)
    return out


_DUPS: dict = {}
_DUPS_LOCK = threading.Lock()


@router.get("/duplicates")
def duplicates(live: Live = Depends(get_live)) -> dict[str, Any]:
    """Groups of exact and near-duplicate images in the live snapshot (computed once per snapshot)."""
    from t2c.query.duplicates import find_duplicates

    with _DUPS_LOCK:
        hit = _DUPS.get(id(live.snapshot))
        if hit is None or hit[0] is not live.snapshot:
            _DUPS.clear()  # only the live snapshot's report is kept
            hit = _DUPS[id(live.snapshot)] = (live.snapshot, find_duplicates(live.snapshot).to_dict())
    return dict(hit[1], snapshot=live.name)
