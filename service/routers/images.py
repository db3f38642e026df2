"""Images by id: catalog metadata and JPEG thumbnails (only files inside the store's indexed folders)."""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

from fastapi import APIRouter, Depends, Path as PathParam, Query, Request, Response

import t2c
from t2c import ImageDecodeError, NotFound, T2CError
from t2c.service.deps import Settings, get_settings, get_store, require_api_key

router = APIRouter(prefix="/api/images", tags=["images"], dependencies=[Depends(require_api_key)])
MAX_ID = 2**63 - 1


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


@router.get("/{image_id}")
def image_meta(image_id: int = PathParam(..., ge=0, le=MAX_ID), store: t2c.Store = Depends(get_store)) -> dict:
    """Catalog metadata of one image (path, size, dimensions, times, user columns)."""
    row = store.image(image_id).to_dict()
    row["thumb"] = f"/api/images/{image_id}/thumb"
    return row


@router.get("/{image_id}/thumb", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}})
def image_thumb(request: Request, image_id: int = PathParam(..., ge=0, le=MAX_ID),
                size: int | None = Query(None, ge=16, description="longest side in pixels (capped by the server)"),
                store: t2c.Store = Depends(get_store), settings: Settings = Depends(get_settings)) -> Response:
    """A JPEG thumbnail (longest side ``size``, at most the server's limit), cached in memory."""
    side = min(size or settings.thumb_max_side, settings.thumb_max_side)
    image = store.image(image_id)
    real, row = image.file(), image.metadata  # Forbidden outside the indexed folders, NotFound when gone
    etag = f'"{row.get("content_hash") or row.get("mtime_ns")}-{side}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=3600"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    cache = request.app.state.thumbs
    key = (real, row.get("content_hash"), row.get("mtime_ns"), side)
    data = cache.get(key)
    if data is None:
        try:
            img = image.load(max_side=side, max_pixels=settings.thumb_max_pixels, max_bytes=settings.thumb_max_bytes)
        except ImageDecodeError as e:
            if e.reason == "not_found":
                raise NotFound(f"the file of image id {image_id} no longer exists",
                               "re-run `t2c index` to update the store") from None
            raise Unreadable(f"image id {image_id} cannot be decoded ({e.reason}): {e.message}") from None
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
        data = buf.getvalue()
        cache.put(key, data)
    return Response(content=data, media_type="image/jpeg", headers=headers)
