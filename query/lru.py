"""A bounded, thread-safe cache whose entries can belong to the live snapshot of a store.

Query-side caches (calibrations, concept banks, caption decoders) used to keep every entry they ever saw: a
server that swaps snapshots kept each old snapshot's calibrations forever. :class:`LRUCache` holds at most
``max_entries`` (least recently used out first). An entry may name a ``scope`` (a store folder) and a
``generation`` (its snapshot's name, or a file's version): storing an entry of a newer generation forgets
the scope's older entries, and an entry of an older generation than the scope's current one is returned
but not kept (a request still answering from the old snapshot does not bring it back).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable

__all__ = ["LRUCache"]


class LRUCache:
    """At most ``max_entries`` entries, least recently used dropped first; see the module docstring.

    Example:
        >>> c = LRUCache(2)
        >>> c.setdefault("a", 1, scope="store", generation="s-000001")
        1
        >>> c.setdefault("b", 2, scope="store", generation="s-000002")  # "a" belonged to an older snapshot
        2
        >>> c.get("a") is None, len(c)
        (True, 1)
    """

    def __init__(self, max_entries: int):
        self.max_entries = max(1, int(max_entries))
        self._data: OrderedDict = OrderedDict()  # key -> (value, scope)
        self._generation: dict = {}  # scope -> its newest generation
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (marked as recently used), or ``default``."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return default
            self._data.move_to_end(key)
            return hit[0]

    def setdefault(self, key: Hashable, value: Any, *, scope: Hashable = None, generation: Any = None) -> Any:
        """The value already kept under ``key``, else ``value`` (kept unless its generation is outdated)."""
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
                return hit[0]
            if scope is not None and generation is not None:
                current = self._generation.get(scope)
                if current is not None and generation < current:
                    return value  # an older snapshot's entry: answer with it, do not keep it
                if current is not None and generation > current:
                    for k in [k for k, (_, s) in self._data.items() if s == scope]:
                        del self._data[k]
                self._generation[scope] = generation
            self._data[key] = (value, scope)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)
            return value

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._data.clear()
            self._generation.clear()

    def __len__(self) -> int:
        return len(self._data)
