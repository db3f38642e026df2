"""The FastAPI app: search, images, audit, health over one store, plus the web page at ``/``.

Every error a client can cause is a 4xx JSON body ``{error, message, hint}``; only true bugs give a
(generic) 500, and those are logged with their traceback.
"""
from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import t2c
from t2c import T2CError
from t2c.service.deps import Settings

log = logging.getLogger("t2c.service")
STATIC = Path(__file__).parent / "static"
_EXTRA_FIELDS = ("position", "expected", "choices", "path", "reason", "limit")


def error_body(error: str, message: str, hint: str | None = None, **extra) -> dict:
    """The JSON body of every error response."""
    body = {"error": error, "message": message, "hint": hint}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


# ------------------------------------------------------------------------------------------ body limit
class BodyLimitMiddleware:
    """Reject request bodies above ``max_bytes`` with 413: by Content-Length, or while streaming (chunked).

    Multipart uploads to ``upload_paths`` (an example image for POST /api/search) may reach ``upload_bytes``.
    """

    def __init__(self, app, max_bytes: int, upload_bytes: int | None = None, upload_paths=("/api/search",)):
        self.app = app
        self.body_bytes = int(max_bytes)
        self.upload_bytes = int(upload_bytes or max_bytes)
        self.upload_paths = tuple(upload_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        upload = scope.get("path") in self.upload_paths and \
            headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")
        limit = self.upload_bytes if upload else self.body_bytes
        cl = headers.get(b"content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                return await self._reject(send, 400, error_body("InvalidInput", "Content-Length is not a number"))
            if n > limit:
                return await self._too_large(send, limit, upload)
        # Buffer the body (it is small by construction) so chunked bodies are counted too.
        chunks, total, more = [], 0, True
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                body = msg.get("body", b"")
                total += len(body)
                if total > limit:
                    return await self._too_large(send, limit, upload)
                chunks.append(body)
                more = msg.get("more_body", False)
            data = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": data, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    async def _too_large(self, send, limit: int, upload: bool = False):
        hint = ("upload a smaller image (or a downscaled copy)" if upload
                else "send a smaller query; large concept lists can be split over several requests")
        return await self._reject(send, 413, error_body(
            "PayloadTooLarge", f"request body is larger than {limit} bytes", hint, limit=limit))

    @staticmethod
    async def _reject(send, status: int, body: dict):
        resp = JSONResponse(body, status_code=status, headers={"Connection": "close"})
        await resp({"type": "http"}, None, send)


# ------------------------------------------------------------------------------------------ handlers
def _t2c_error(request: Request, exc: T2CError) -> JSONResponse:
    extra = {k: getattr(exc, k) for k in _EXTRA_FIELDS if getattr(exc, k, None) is not None}
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
    return JSONResponse(error_body(type(exc).__name__, exc.message, exc.hint, **extra),
                        status_code=int(exc.http_status), headers=headers)


def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("query", "body", "path"))
        problems.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
    return JSONResponse(error_body("InvalidParameter", "; ".join(problems) or "invalid request",
                                   "see /docs for the parameters each endpoint takes", detail=detail),
                        status_code=422)


_HTTP_NAMES = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge", 401: "Unauthorized"}


def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    msg = exc.detail if isinstance(exc.detail, str) else "request failed"
    hint = "see /docs for the endpoints" if exc.status_code in (404, 405) else None
    if exc.status_code == 404 and msg == "Not Found":
        msg = f"no such endpoint: {request.method} {request.url.path}"
    return JSONResponse(error_body(_HTTP_NAMES.get(exc.status_code, "HTTPError"), msg, hint),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _bug(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("InternalError", "internal server error",
                                   "this is a bug in t2c; the server log has the details"), status_code=500)


# ------------------------------------------------------------------------------------------ factory
def _warm_text_encoder(store) -> None:
    """Build the store's CLIP text tower (errors are left for the first query to report)."""
    try:
        store.warm_up()
    except Exception:  # noqa: BLE001 - warm-up only; the query path raises the typed error
        pass


def create_app(store_path, *, api_key: str | None = None, settings: Settings | None = None,
               store: t2c.Store | None = None) -> FastAPI:
    """Build the service app over one store.

    Args:
        store_path: the store directory (opened read-only in the app's lifespan).
        api_key: when set, every endpoint but ``/api/health`` (and the static page) requires it.
        settings: limits and options (defaults: :class:`t2c.service.deps.Settings`); ``api_key`` overrides its key.
        store: an already open :class:`t2c.Store` to serve (the caller closes it); default opens ``store_path``.

    Returns:
        The FastAPI app; the store is opened when the app starts (a bad store fails start-up).

    Example:
        >>> app = create_app("photos.t2c")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
    """
    from t2c.service.routers import audit, examples, health, images, search
    from t2c.service.routers.images import ThumbCache

    settings = settings or Settings(store_path=Path(store_path))
    settings.store_path = Path(store_path)
    if api_key is not None:
        settings.api_key = api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # like:"file" would read files on the server: a server takes example images as uploads only
        s = store or t2c.open(settings.store_path, verify=settings.verify_store,
                              refresh_interval=settings.reload_interval, example_files=False)
        app.state.store = s
        if settings.warm_up:
            # import torch and build the CLIP text tower in the background, so that the first query does not
            # pay for it (seconds on a cold disk); a store without a text tower reports that on its first query
            threading.Thread(target=_warm_text_encoder, args=(s,), name="t2c-warm-up", daemon=True).start()
        app.state.thumbs = ThumbCache(settings.thumb_cache_items)
        try:
            yield
        finally:
            if store is None:
                s.close()

    app = FastAPI(title="text2concept", version="0.1.0", lifespan=lifespan,
                  description="Search and audit an image collection in words. "
                              "Send the API key (when the server has one) as `X-API-Key` or `Authorization: Bearer`.")
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, upload_bytes=settings.max_upload_bytes)
    app.add_exception_handler(T2CError, _t2c_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
    for r in (health, search, examples, images, audit):
        app.include_router(r.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app
