"""The response cache in process memory: bounded by entries and by characters held,
least recently used first out."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .base import CacheEntry, ResponseStore


class MemoryResponseStore(ResponseStore):
    def __init__(
        self,
        *,
        max_entries: int = 10_000,
        max_chars: int = 50_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[str, tuple[float, CacheEntry]] = OrderedDict()
        self._max_entries = max_entries
        self._max_chars = max_chars
        self._chars = 0
        self._clock = clock

    async def get(self, key: str) -> CacheEntry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        if len(entry.text) > self._max_chars:
            return
        self._drop(key)
        self._entries[key] = (self._clock() + ttl_s, entry)
        self._chars += len(entry.text)
        now = self._clock()
        for old in [k for k, (expires, _) in self._entries.items() if expires <= now]:
            self._drop(old)
        while len(self._entries) > self._max_entries or self._chars > self._max_chars:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._chars -= len(found[1].text)
