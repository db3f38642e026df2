"""Search: a query string (GET) or a JSON query tree (POST), paged, optionally explained."""
from __future__ import annotations

from typing import Any, Union

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from t2c.data.errors import InvalidInput
from t2c.service.deps import Live, PayloadTooLarge, Settings, get_live, get_settings, require_api_key

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


def parse_text(settings: Settings, q: str):
    """Parse a query string under the server's limits (413 for too long, 400 for syntax/too many terms)."""
    from t2c.query.parse import parse

    if len(q) > settings.max_query_chars:
        raise PayloadTooLarge(f"query is too long: {len(q)} characters (at most {settings.max_query_chars})",
                              "shorten the query")
    if not q.strip():
        raise InvalidInput("the query is empty", 'type a concept such as red circle, or a filter such as width>=512')
    return parse(q, max_length=settings.max_query_chars, max_terms=settings.max_terms)


def parse_tree(settings: Settings, tree: dict):
    """Validate a JSON query tree under the server's term limit."""
    from t2c.query.ast import from_json

    return from_json(tree, max_terms=settings.max_terms)


def run_search(live: Live, node, k: int, offset: int, explain: bool) -> dict:
    """Run the engine and return its result dict (plus the snapshot it answered from)."""
    res = live.engine.search(node, k=k, offset=offset, explain=explain)
    out = res.to_dict()
    out.setdefault("snapshot", live.name)
    return out


@router.get("/search")
def search_get(
    q: str = Query(..., description='query, e.g. red circle AND NOT square AND width>=512'),
    k: int = Query(20, ge=1, description="hits per page"),
    offset: int = Query(0, ge=0, description="index of the first hit"),
    explain: bool = Query(False, description="add per-constraint scores to each hit"),
    settings: Settings = Depends(get_settings),
    live: Live = Depends(get_live),
) -> dict[str, Any]:
    """Search with a query string; returns the engine's SearchResult as JSON."""
    check_paging(settings, k, offset)
    node = parse_text(settings, q)
    return run_search(live, node, k, offset, explain)


_UPLOAD_FORM = {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary", "description": "example image (JPEG, PNG, WebP, GIF, BMP, TIFF)"},
    "q": {"type": "string", "description": "optional query text, AND-ed with the image"},
    "k": {"type": "integer"}, "offset": {"type": "integer"}, "explain": {"type": "boolean"}}, "required": ["image"]}


@router.post("/search", openapi_extra={"requestBody": {"required": True, "content": {
    "application/json": {"schema": SearchBody.model_json_schema(ref_template="#/components/schemas/{model}")},
    "multipart/form-data": {"schema": _UPLOAD_FORM}}}})
async def search_post(request: Request, settings: Settings = Depends(get_settings),
                      live: Live = Depends(get_live)) -> dict[str, Any]:
    """Search with a JSON query tree (``t2c.query.ast.to_json`` form) or a query string; or, as a multipart
    form, with an uploaded example image (field ``image``) and optional query text ``q`` (see ``examples``)."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        from t2c.service.routers.examples import search_upload

        return await search_upload(request, settings, live)
    body = await json_body(request, SearchBody)
    check_paging(settings, body.k, body.offset)
    node = parse_text(settings, body.query) if isinstance(body.query, str) else parse_tree(settings, body.query)
    return run_search(live, node, body.k, body.offset, body.explain)
