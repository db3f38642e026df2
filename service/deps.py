"""Service dependencies: settings, API-key auth, and the live engine (re-opened when the store moves on).

The store is a folder of immutable snapshots named by ``CURRENT``. :class:`EngineHolder` opens the live
snapshot read-only, checks ``CURRENT`` at most once per ``reload_interval`` seconds, and when it names a new
snapshot builds a new engine beside the old one and swaps a single reference. A request takes one
:class:`Live` (snapshot + engine) at its start and uses only it, so it sees either the old or the new
snapshot, never a mix; the old objects stay alive until the last request holding them finishes.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fastapi import Request

from t2c.data.errors import InvalidInput, T2CError

log = logging.getLogger("t2c.service")


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


class NotAvailable(T2CError):
    """A feature whose module is not part of this build."""

    http_status = 501


@dataclass(frozen=True)
class Live:
    """One consistent view: a snapshot and the engine built over it."""

    name: str
    snapshot: Any
    engine: Any


def default_engine_factory(snapshot):
    """Build the query engine over an open snapshot."""
    from t2c.query.engine import Engine
    from t2c.query.examples import ExampleBank

    # like:"file" would read files on the server: a server takes example images as uploads only
    return Engine(snapshot, examples=ExampleBank(snapshot, allow_files=False))


class EngineHolder:
    """Holds the live (snapshot, engine) pair and swaps it atomically when the store's CURRENT changes."""

    def __init__(self, store_path, *, reload_interval: float = 1.0, verify: bool = True,
                 engine_factory: Callable | None = None, opener: Callable | None = None):
        self.store_path = Path(store_path)
        self.reload_interval = float(reload_interval)
        self.verify = verify
        self.engine_factory = engine_factory or default_engine_factory
        self._opener = opener
        self._live: Live | None = None
        self._checked = 0.0
        self._reload_lock = threading.Lock()
        self.reloads = 0
        self.reload_failures = 0

    def _open(self) -> Live:
        from t2c.data.store import open_store

        snap = (self._opener or open_store)(self.store_path, verify=self.verify)
        return Live(snap.name, snap, self.engine_factory(snap))

    def load(self) -> Live:
        """Open the live snapshot now (at start-up); raises typed errors when the store is unusable."""
        live = self._open()
        self._live = live
        self._checked = time.monotonic()
        return live

    @property
    def current(self) -> Live | None:
        """The Live view now held, without checking the store (None before :meth:`load`)."""
        return self._live

    def get(self) -> Live:
        """The current Live view, re-opening first when CURRENT changed (checked at most once per interval)."""
        live = self._live
        if live is None:
            with self._reload_lock:
                if self._live is None:
                    self.load()
                return self._live
        now = time.monotonic()
        if now - self._checked < self.reload_interval:
            return live
        # Only one request re-opens; the others keep answering from the old snapshot meanwhile.
        if not self._reload_lock.acquire(blocking=False):
            return live
        try:
            self._checked = time.monotonic()
            self._maybe_reload(live)
        finally:
            self._reload_lock.release()
        return self._live

    def _maybe_reload(self, live: Live) -> None:
        from t2c.data.store import current_name

        try:
            name = current_name(self.store_path)
        except OSError as e:  # the store folder vanished or is unreadable: keep serving what we have
            log.warning("cannot read CURRENT of %s: %s", self.store_path, e)
            return
        if name is None or name == live.name:
            return
        try:
            new = self._open()
        except (T2CError, OSError) as e:
            # e.g. a snapshot removed between reading CURRENT and opening it: retry at the next check
            self.reload_failures += 1
            log.warning("re-opening store %s at %s failed, still serving %s: %s", self.store_path, name, live.name, e)
            return
        self._live = new  # single reference swap; requests holding `live` keep using it
        self.reloads += 1
        log.info("store %s: now serving snapshot %s (%d images)", self.store_path, new.name,
                 getattr(new.snapshot, "count", -1))


# ------------------------------------------------------------------------------------------- dependencies
def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_live(request: Request) -> Live:
    """The live snapshot + engine for this request (taken once, used for the whole request)."""
    return request.app.state.holder.get()


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
