"""Images by id: catalog metadata and JPEG thumbnails (only files inside the store's indexed folders)."""
from __future__ import annotations

import datetime as _dt
import io
import os
import threading
from collections import OrderedDict
from typing import Any

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request, Response

from t2c.data.errors import ImageDecodeError, NotFound, T2CError
from t2c.service.deps import Live, Settings, get_live, get_settings, require_api_key

router = APIRouter(prefix="/api/images", tags=["images"], dependencies=[Depends(require_api_key)])
MAX_ID = 2**63 - 1


class Forbidden(T2CError):
    """The catalogued file resolves outside every folder the store indexed."""

    http_status = 403


class Unreadable(T2CError):
    """The catalogued file can no longer be decoded."""

    http_status = 422


class ThumbCache:
    """A thread-safe LRU of encoded thumbnails."""

    def __init__(self, max_items: int):
        self.max_items = max(0, int(max_items))
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return v

    def put(self, key, value) -> None:
        if not self.max_items:
            return
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (_dt.datetime, _dt.date)):
        return v.isoformat()
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        return v.item()
    return v


def _row(live: Live, image_id: int) -> dict:
    rows = live.snapshot.image_rows([image_id])  # NotFound for unknown ids
    return rows[0]


def _inside(real: str, roots: list[str]) -> bool:
    for r in roots:
        try:
            if os.path.commonpath([real, r]) == r:
                return True
        except ValueError:
            continue
    return False


def safe_image_path(live: Live, image_id: int) -> tuple[str, dict]:
    """The real path of a catalogued image, checked to lie inside one of the manifest's roots.

    Raises:
        NotFound: unknown id, or the file is gone. Forbidden: the file resolves outside the indexed folders.
    """
    row = _row(live, image_id)
    path = row.get("path")
    if not path:
        raise NotFound(f"image id {image_id} has no file path")
    roots = [os.path.realpath(r) for r in (live.snapshot.manifest.get("roots") or [])]
    real = os.path.realpath(path)
    if not roots or not _inside(real, roots):
        raise Forbidden(f"image id {image_id} resolves outside the store's indexed folders",
                        "only files under the folders given to `t2c index` are served")
    if not os.path.isfile(real):
        raise NotFound(f"the file of image id {image_id} no longer exists", "re-run `t2c index` to update the store")
    return real, row


@router.get("/{image_id}")
def image_meta(image_id: int = PathParam(..., ge=0, le=MAX_ID), live: Live = Depends(get_live)) -> dict:
    """Catalog metadata of one image (path, size, dimensions, times, user columns)."""
    row = {k: _jsonable(v) for k, v in _row(live, image_id).items()}
    row["thumb"] = f"/api/images/{image_id}/thumb"
    return row


@router.get("/{image_id}/thumb", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}})
def image_thumb(request: Request, image_id: int = PathParam(..., ge=0, le=MAX_ID),
                size: int | None = Query(None, ge=16, description="longest side in pixels (capped by the server)"),
                live: Live = Depends(get_live), settings: Settings = Depends(get_settings)) -> Response:
    """A JPEG thumbnail (longest side ``size``, at most the server's limit), cached in memory."""
    from PIL import Image

    from t2c.data.images import load_image

    side = min(size or settings.thumb_max_side, settings.thumb_max_side)
    real, row = safe_image_path(live, image_id)
    etag = f'"{row.get("content_hash") or row.get("mtime_ns")}-{side}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    cache = request.app.state.thumbs
    key = (real, row.get("content_hash"), row.get("mtime_ns"), side)
    data = cache.get(key)
    if data is None:
        try:
            img = load_image(real, max_pixels=settings.thumb_max_pixels, max_bytes=settings.thumb_max_bytes,
                             draft=side)
        except ImageDecodeError as e:
            if e.reason == "not_found":
                raise NotFound(f"the file of image id {image_id} no longer exists",
                               "re-run `t2c index` to update the store") from None
            raise Unreadable(f"image id {image_id} cannot be decoded ({e.reason}): {e.message}") from None
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
        data = buf.getvalue()
        cache.put(key, data)
    return Response(content=data, media_type="image/jpeg", headers=headers)
