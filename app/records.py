"""Request records: one per finished stream, with the user's feedback attached, so a
product team can see what each request cost and how users judged the answer.

Prompt and output text are omitted by default; `SSERELAY_RECORDS_CONTENT=hash` keeps a
SHA-256 of each (to group identical prompts without storing them), `store` keeps them.

Two stores behind one interface: memory (bounded, one process) and Redis, where each
record is a hash that expires after `ttl_s` and an index Redis Stream (capped with
`MAXLEN ~`) orders them by time for export.
"""

from __future__ import annotations

import abc
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from streaming import StreamLogError

_STORE_SLACK_S = 60.0


def content(text: str | None, mode: str) -> str | None:
    if text is None or mode == "omit":
        return None
    if mode == "hash":
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return text


class RecordStore(abc.ABC):
    @abc.abstractmethod
    async def add(self, record: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    async def get(self, record_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    async def attach_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        """False if there is no such record."""

    @abc.abstractmethod
    def export(self, since: float, until: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Records finished in [since, until), oldest first, feedback included."""


class MemoryRecordStore(RecordStore):
    def __init__(self, *, max_records: int = 10_000) -> None:
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max = max_records

    async def add(self, record: dict[str, Any]) -> None:
        self._records[record["id"]] = record
        while len(self._records) > self._max:
            self._records.popitem(last=False)

    async def get(self, record_id: str) -> dict[str, Any] | None:
        return self._records.get(record_id)

    async def attach_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        record = self._records.get(record_id)
        if record is None:
            return False
        record["feedback"] = feedback
        return True

    async def export(
        self, since: float, until: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        for record in list(self._records.values()):
            if record["finished_at"] >= since and (until is None or record["finished_at"] < until):
                yield record


class RedisRecordStore(RecordStore):
    def __init__(
        self, client: aioredis.Redis, *, prefix: str, max_records: int, ttl_s: float
    ) -> None:
        self._r = client
        self._index = f"{prefix}records"
        self._prefix = prefix
        self._max = max_records
        self._ttl_ms = int(ttl_s * 1000)

    def _key(self, record_id: str) -> str:
        return f"{self._prefix}rec:{{{record_id}}}"

    async def add(self, record: dict[str, Any]) -> None:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hset(self._key(record["id"]), "record", json.dumps(record))
                pipe.pexpire(self._key(record["id"]), self._ttl_ms)
                pipe.xadd(self._index, {"id": record["id"]}, maxlen=self._max, approximate=True)
                pipe.pexpire(self._index, self._ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            raise StreamLogError(f"cannot store the request record: {exc}") from exc

    async def get(self, record_id: str) -> dict[str, Any] | None:
        try:
            raw: Any = await self._r.hgetall(self._key(record_id))
        except RedisError as exc:
            raise StreamLogError(f"cannot read the request record: {exc}") from exc
        return _decode(raw)

    async def attach_feedback(self, record_id: str, feedback: dict[str, Any]) -> bool:
        key = self._key(record_id)
        try:
            if not await self._r.exists(key):
                return False
            await self._r.hset(key, "feedback", json.dumps(feedback))
        except RedisError as exc:
            raise StreamLogError(f"cannot store feedback: {exc}") from exc
        return True

    async def export(
        self, since: float, until: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        # The index orders records by when they were stored, a moment after they
        # finished: read a little past `until`, then filter on `finished_at`, so both
        # stores answer the same window.
        start = f"{int(since * 1000)}-0"
        end = f"{int((until + _STORE_SLACK_S) * 1000)}-0" if until is not None else "+"
        while True:
            entries: Any = await self._r.xrange(self._index, start, end, count=500)
            if not entries:
                return
            async with self._r.pipeline(transaction=False) as pipe:
                for _, fields in entries:
                    pipe.hgetall(self._key(fields[b"id"].decode()))
                hashes: list[Any] = await pipe.execute()
            for raw in hashes:
                record = _decode(raw)
                if record is None:  # expired before its index entry
                    continue
                if since <= record["finished_at"] and (
                    until is None or record["finished_at"] < until
                ):
                    yield record
            last = entries[-1][0].decode()
            start = "(" + last


def _decode(raw: Any) -> dict[str, Any] | None:
    if not raw:
        return None
    record: dict[str, Any] = json.loads(raw[b"record"])
    if b"feedback" in raw:
        record["feedback"] = json.loads(raw[b"feedback"])
    return record


def now() -> float:
    return time.time()
