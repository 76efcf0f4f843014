"""The response cache: exact-match answers, per model, in memory or Redis.

- `base`: the entry and the store interface; `memory`, `redis`: the two stores;
- `key`: the key of a request (SHA-256 of a canonical encoding);
- `replay`: a cached answer played back as a stream;
- `responses`: what the app calls (policy per model, lookups, keeping answers).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from .base import CacheEntry, CacheStoreError, ResponseStore
from .key import NOT_IN_KEY, cache_key, request_fields
from .memory import MemoryResponseStore
from .redis import RedisResponseStore
from .replay import Replay, pieces
from .responses import ResponseCache, directives

__all__ = [
    "NOT_IN_KEY",
    "CacheEntry",
    "CacheStoreError",
    "MemoryResponseStore",
    "RedisResponseStore",
    "Replay",
    "ResponseCache",
    "ResponseStore",
    "build_store",
    "cache_key",
    "directives",
    "pieces",
    "request_fields",
]


def build_store(client: aioredis.Redis | None, *, prefix: str) -> ResponseStore:
    """Redis when there is a client (every process shares the answers), else memory."""
    if client is None:
        return MemoryResponseStore()
    return RedisResponseStore(client, prefix=prefix)
