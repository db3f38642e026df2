"""Service dependencies: settings, API-key auth, and the open store.

The store is a :class:`t2c.Store` (the public Python API). It follows the store's live snapshot (checking
``CURRENT`` at most once per ``reload_interval`` seconds) and answers each call from one snapshot, so a request,
which makes one store call, sees either the old or the new snapshot, never a mix.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

import t2c
from t2c import InvalidInput, T2CError


@dataclass
class Settings:
    """Run-time settings of the service (limits, thumbnails, auth)."""

    store_path: Path
    api_key: str | None = None
    max_query_chars: int = 2000          # longer query strings get 413
    max_terms: int = 32                  # more concepts + filters get 400
    max_k: int = 200                     # most hits per page
    max_offset: int = 10_000             # deepest page start
    max_body_bytes: int = 256 << 10      # larger request bodies get 413
    max_upload_bytes: int = 16 << 20     # largest image upload (multipart POST /api/search) before 413
    max_upload_pixels: int = 40_000_000  # uploads declaring more pixels are refused (reason "bomb")
    max_concepts: int = 32               # audit concepts / classify labels per request
    max_label_chars: int = 200           # longest audit concept / classify label
    thumb_max_side: int = 256            # default (and largest) thumbnail side
    thumb_cache_items: int = 4096        # thumbnails kept in memory (LRU)
    thumb_max_pixels: int = 89_478_485   # decompression-bomb limit for thumbnail decoding
    thumb_max_bytes: int | None = 256 << 20
    reload_interval: float = 1.0         # seconds between checks of the store's CURRENT
    verify_store: bool = True            # check manifest checksums when (re)opening
    warm_up: bool = True                 # build the CLIP text tower in the background at start-up
    extra: dict = field(default_factory=dict)


class Unauthorized(T2CError):
    """The request lacks a valid API key."""

    http_status = 401


class PayloadTooLarge(InvalidInput):
    """The request (query text or body) is larger than the service accepts."""

    http_status = 413


# ------------------------------------------------------------------------------------------- dependencies
def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_store(request: Request) -> t2c.Store:
    """The open store (each of its calls answers from one snapshot)."""
    return request.app.state.store


def extract_key(request: Request) -> str | None:
    """The API key sent as ``X-API-Key`` or ``Authorization: Bearer KEY``."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


def require_api_key(request: Request) -> None:
    """Reject the request unless auth is off or it carries the configured key (constant-time compare)."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    got = extract_key(request)
    if got is None or not hmac.compare_digest(got.encode("utf-8", "surrogatepass"), expected.encode("utf-8")):
        raise Unauthorized("missing or invalid API key",
                           "send the key as the X-API-Key header or as Authorization: Bearer KEY")
