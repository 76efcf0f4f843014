"""The response cache's storage: answers by key, each expiring after its TTL.

One interface, two implementations: memory (the embedded default, one process) and
Redis (shared by every process). A store holds opaque keys (the caller computes them,
see `key`) and `CacheEntry` values; it never decides what is cached.
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass
from typing import Any


class CacheStoreError(Exception):
    """The cache's storage failed. Callers treat a failed lookup as a miss and a failed
    write as nothing stored: the cache never fails a request."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One finished answer, as its stream ended `done`."""

    text: str
    input_tokens: int
    output_tokens: int
    stop_reason: str | None
    model: str
    stored_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CacheEntry:
        """Raises ValueError for anything but an entry this version wrote (or a newer
        one: fields it does not know are ignored)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            stop = data.get("stop_reason")
            return cls(
                text=_str(data["text"]),
                input_tokens=int(data["input_tokens"]),
                output_tokens=int(data["output_tokens"]),
                stop_reason=None if stop is None else _str(stop),
                model=_str(data["model"]),
                stored_at=float(data.get("stored_at") or 0.0),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"unreadable cache entry: {exc}") from exc


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


class ResponseStore(abc.ABC):
    @abc.abstractmethod
    async def get(self, key: str) -> CacheEntry | None:
        """The entry stored under `key`, unless it expired; raises `CacheStoreError`."""

    @abc.abstractmethod
    async def put(self, key: str, entry: CacheEntry, ttl_s: float) -> None:
        """Store (or replace) the entry under `key` for `ttl_s` seconds; raises
        `CacheStoreError`."""

    async def aclose(self) -> None:
        return None
