"""The response cache in Redis: one string per answer, expiring with its TTL.

    {prefix}cache:<sha-256 hex>   the entry as JSON (SET ... PX ttl)

Every process sharing the Redis shares the answers; Redis's own eviction
(`maxmemory-policy`) may drop entries early, which is only a miss.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .base import CacheEntry, CacheStoreError, ResponseStore

logger = logging.getLogger("sserelay.cache")


class RedisResponseStore(ResponseStore):
    def __init__(self, client: aioredis.Redis, *, prefix: str = "sserelay:") -> None:
        self._r = client
        self._prefix = f"{prefix}cache:"

    async def get(self, key: str) -> CacheEntry | None:
        try:
            raw: Any = await self._r.get(self._prefix + key)
        except RedisError as exc:
            raise CacheStoreError(f"cannot read the response cache: {exc}") from exc
        if raw is None:
            return None
        try:
            return CacheEntry.from_json(raw)
        except ValueError as exc:
            logger.warning("response cache entry %s: %s", key[:12], exc)
            return None

    async def put(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        try:
            await self._r.set(self._prefix + key, entry.to_json(), px=max(1, int(ttl_s * 1000)))
        except RedisError as exc:
            raise CacheStoreError(f"cannot write the response cache: {exc}") from exc
