"""Search: a query string (GET) or a JSON query tree (POST), paged, optionally explained."""
from __future__ import annotations

from typing import Any, Union

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

import t2c
from t2c import InvalidInput
from t2c.service.deps import PayloadTooLarge, Settings, get_settings, get_store, require_api_key

router = APIRouter(prefix="/api", tags=["search"], dependencies=[Depends(require_api_key)])


class InvalidParameter(InvalidInput):
    """A parameter is outside the range this server accepts."""

    http_status = 422


class SearchBody(BaseModel):
    """POST /api/search body: a query (JSON tree as in ``t2c.query.ast.to_json``, or a query string) and paging."""

    model_config = ConfigDict(extra="forbid")
    query: Union[dict, str] = Field(..., description='JSON tree, e.g. {"type": "concept", "text": "red"}, or a query string')
    k: int = Field(20, ge=1, description="hits per page")
    offset: int = Field(0, ge=0, description="index of the first hit")
    explain: bool = Field(False, description="add per-constraint scores to each hit")


async def json_body(request: Request, model):
    """The request's JSON body validated by ``model``; malformed JSON or fields give 422 as FastAPI would."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError

    try:
        raw = await request.json()
    except ValueError as e:
        raise RequestValidationError([{"loc": ("body",), "msg": f"invalid JSON ({e})", "type": "json_invalid"}])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def check_paging(settings: Settings, k: int, offset: int) -> None:
    """Enforce the server's page-size and depth limits."""
    if k > settings.max_k:
        raise InvalidParameter(f"k={k} is above the limit of {settings.max_k}", "page through results with offset")
    if offset > settings.max_offset:
        raise InvalidParameter(f"offset={offset} is above the limit of {settings.max_offset}",
                               "narrow the query instead of paging this deep")


def check_text(settings: Settings, q: str) -> None:
    """Refuse a query string that is too long (413) or empty (400) before parsing it."""
    if len(q) > settings.max_query_chars:
        raise PayloadTooLarge(f"query is too long: {len(q)} characters (at most {settings.max_query_chars})",
                              "shorten the query")
    if not q.strip():
        raise InvalidInput("the query is empty", 'type a concept such as red circle, or a filter such as width>=512')


def run_search(store: t2c.Store, settings: Settings, query: str | dict | None, k: int, offset: int,
               explain: bool, like: int | bytes | None = None) -> t2c.SearchResult:
    """Check the request against the server's limits, then search (``like``: an example image id or upload)."""
    check_paging(settings, k, offset)
    if isinstance(query, str):
        check_text(settings, query)
    return store.search(query, like=like, k=k, offset=offset, explain=explain, max_terms=settings.max_terms,
                        max_length=settings.max_query_chars, max_pixels=settings.max_upload_pixels)


@router.get("/search")
def search_get(
    q: str = Query(..., description='query, e.g. red circle AND NOT square AND width>=512'),
    k: int = Query(20, ge=1, description="hits per page"),
    offset: int = Query(0, ge=0, description="index of the first hit"),
    explain: bool = Query(False, description="add per-constraint scores to each hit"),
    settings: Settings = Depends(get_settings),
    store: t2c.Store = Depends(get_store),
) -> dict[str, Any]:
    """Search with a query string; returns the SearchResult as JSON."""
    return run_search(store, settings, q, k, offset, explain).to_dict()


_UPLOAD_FORM = {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary", "description": "example image (JPEG, PNG, WebP, GIF, BMP, TIFF)"},
    "q": {"type": "string", "description": "optional query text, AND-ed with the image"},
    "k": {"type": "integer"}, "offset": {"type": "integer"}, "explain": {"type": "boolean"}}, "required": ["image"]}


@router.post("/search", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": SearchBody.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": _UPLOAD_FORM}}}})
async def search_post(request: Request, settings: Settings = Depends(get_settings),
                      store: t2c.Store = Depends(get_store)) -> dict[str, Any]:
    """Search with a JSON query tree (``t2c.query.ast.to_json`` form) or a query string; or, as a multipart
    form, with an uploaded example image (field ``image``) and optional query text ``q`` (see ``examples``)."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        from t2c.service.routers.examples import search_upload

        return await search_upload(request, settings, store)
    body = await json_body(request, SearchBody)
    res = await run_in_threadpool(run_search, store, settings, body.query, body.k, body.offset, body.explain)
    return res.to_dict()
