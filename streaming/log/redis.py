"""The stream log in Redis Streams: shared by every process, so a stream started on one
can be read and resumed on another.

Keys (all under one hash tag per stream, so they share a Cluster slot):

    {prefix}s:{<id>}:ev   Redis Stream; entry id 0-<event id>, fields n (name), d (JSON)
    {prefix}s:{<id>}:m    hash: the StreamInfo
    {prefix}s:{<id>}:rd   "a reader is attached" (expires after the grace period)
    {prefix}s:{<id>}:ls   "the generating process is alive" (its lease; value: its epoch)
    {prefix}s:{<id>}:cx   "cancel requested"

The meta hash's `epoch` is the fencing token of the stream's current owner: every
append, renewal and finish is a Lua script that checks it in the same atomic step, so a
process taken over (paused past its lease, cut off) cannot write once it wakes up. Each
event entry carries the epoch that wrote it (field e).

Using the event id as the entry id makes "replay after Last-Event-ID" one XREAD. Readers
that wait for new events of a stream generated elsewhere share one blocking XREAD per
process (see `_tailer`), so open streams do not each hold a connection. A reader on the
process that generates the stream (the common case) is woken by the append itself, once
Redis has confirmed it: it waits on no Redis command at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .._exceptions import StreamFenced, StreamLogError
from ..events import Event
from ._appender import Appender
from ._tailer import Tailer
from .base import Control, Liveness, StreamInfo, StreamLog, StreamStatus

_FIELDS = frozenset(StreamInfo.__dataclass_fields__)
_INT_FIELDS = ("max_tokens", "input_tokens")
_FLOAT_FIELDS = ("created_at", "input_usd_per_mtok", "output_usd_per_mtok")


@dataclass(slots=True)
class _Local:
    """A stream this process is writing: the last id Redis confirmed, and the readers
    here waiting for more (each with the id it has; None wakes it to re-read)."""

    last_id: int = 0
    waiters: list[tuple[int, asyncio.Future[list[Event] | None]]] = field(default_factory=list)


class RedisStreamLog(StreamLog):
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        tail: aioredis.Redis,
        prefix: str = "sserelay:",
        ttl_s: float,
        max_duration_s: float,
        max_events: int,
    ) -> None:
        super().__init__(ttl_s=ttl_s, max_duration_s=max_duration_s, max_events=max_events)
        self._r = client
        self._prefix = prefix
        self._live_ms = int((ttl_s + max_duration_s) * 1000)
        self._ttl_ms = int(ttl_s * 1000)
        self._tailer = Tailer(tail, client, _parse)
        self._scripts = _Scripts()
        self._appender = Appender(client, self._queue_append, on_noscript=self._scripts.forget)
        self._local: dict[str, _Local] = {}
        self._append = _script(client, "append.lua")
        self._take = _script(client, "take.lua")
        self._renew = _script(client, "renew.lua")
        self._finish = _script(client, "finish.lua")
        self._release = _script(client, "release.lua")

    def _key(self, stream_id: str, kind: str) -> str:
        return f"{self._prefix}s:{{{stream_id}}}:{kind}"

    async def create(
        self, info: StreamInfo, *, reader_grace_s: float, lease_s: float | None = None
    ) -> None:
        meta = self._key(info.id, "m")
        fields: dict[Any, Any] = {k: str(v) for k, v in info.fields().items()}
        fields["epoch"] = "0" if lease_s is None else "1"
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hset(meta, mapping=fields)
                pipe.pexpire(meta, self._live_ms)
                pipe.set(self._key(info.id, "rd"), 1, px=int(reader_grace_s * 1000))
                if lease_s is not None:
                    pipe.set(self._key(info.id, "ls"), 1, px=int(lease_s * 1000))
                await pipe.execute()
        except RedisError as exc:
            raise StreamLogError(f"cannot create stream: {exc}") from exc
        if lease_s is not None:
            self._local[info.id] = _Local()

    async def take(self, stream_id: str, lease_s: float) -> int:
        keys = [self._key(stream_id, "m"), self._key(stream_id, "ls")]
        try:
            epoch = int(await self._take(keys=keys, args=[int(lease_s * 1000)]))
        except RedisError as exc:
            raise StreamLogError(f"cannot take stream over: {exc}") from exc
        if epoch == 1:
            # Nothing is written yet: readers here can wait on this process's appends.
            # (After a takeover they keep reading from Redis, which has what the
            # previous owners wrote.)
            self._local.setdefault(stream_id, _Local())
        return epoch

    async def waiting(self, stream_ids: Collection[str]) -> set[str]:
        ids = list(stream_ids)
        if not ids:
            return set()
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                for stream_id in ids:
                    pipe.hmget(self._key(stream_id, "m"), "status", "epoch")
                replies = await pipe.execute()
        except RedisError as exc:
            raise StreamLogError(f"cannot read streams: {exc}") from exc
        return {
            stream_id
            for stream_id, (status, epoch) in zip(ids, replies, strict=True)
            if status == b"running" and epoch == b"0"
        }

    async def release(self, stream_id: str, epoch: int) -> None:
        keys = [self._key(stream_id, "ls"), self._key(stream_id, "m")]
        try:
            await self._release(keys=keys, args=[epoch])
        except RedisError as exc:
            raise StreamLogError(f"cannot release stream: {exc}") from exc
        finally:
            self._forget(stream_id)

    async def info(self, stream_id: str) -> StreamInfo | None:
        try:
            raw: Any = await self._r.hgetall(self._key(stream_id, "m"))
        except RedisError as exc:
            raise StreamLogError(f"cannot read stream: {exc}") from exc
        if not raw:
            return None
        fields: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        # Fields a newer version added are dropped: replicas of two versions share a log.
        fields = {k: v for k, v in fields.items() if k in _FIELDS}
        for name in _INT_FIELDS:
            if name in fields:
                fields[name] = int(fields[name])
        for name in _FLOAT_FIELDS:
            if name in fields:
                fields[name] = float(fields[name])
        return StreamInfo(**fields)

    def _queue_append(self, pipe: Any, stream_id: str, events: Sequence[Event], epoch: int) -> None:
        # The first append creates the key: it lives as long as a stream may run, plus
        # the replay TTL; `finish` shortens it. Later appends need not repeat it.
        live = self._live_ms if events and events[0].id == 1 else 0
        args: list[Any] = [epoch, self.max_events, live]
        for event in events:
            args += (event.id, event.name, event.data, event.tokens)
        self._scripts.queue(
            pipe, self._append, [self._key(stream_id, "ev"), self._key(stream_id, "m")], args
        )

    async def append(self, stream_id: str, events: Sequence[Event], *, epoch: int = 1) -> None:
        try:
            # One MULTI/EXEC, shared with other streams' appends made meanwhile.
            await self._appender.append(stream_id, events, epoch)
        except RedisError as exc:
            if _fenced(exc):
                self._forget(stream_id)
                raise StreamFenced(f"stream {stream_id} was taken over") from exc
            raise StreamLogError(f"cannot append to stream: {exc}") from exc
        local = self._local.get(stream_id)
        if local is not None and events:
            local.last_id = max(local.last_id, events[-1].id)
            for after, waiter in local.waiters:
                if waiter.done() or events[-1].id <= after:
                    continue
                # Contiguous with what the reader has: hand it over; else it re-reads.
                contiguous = events[0].id <= after + 1
                waiter.set_result([e for e in events if e.id > after] if contiguous else None)

    async def finish(self, stream_id: str, status: StreamStatus, *, epoch: int = 1) -> None:
        keys = [self._key(stream_id, k) for k in ("m", "ev", "cx", "ls", "rd")]
        try:
            await self._finish(keys=keys, args=[status, self._ttl_ms, epoch])
        except RedisError as exc:
            if _fenced(exc):
                raise StreamFenced(f"stream {stream_id} was taken over") from exc
            raise StreamLogError(f"cannot finish stream: {exc}") from exc
        finally:
            self._forget(stream_id)

    def _forget(self, stream_id: str) -> None:
        """This process no longer writes the stream: its readers here go back to Redis."""
        local = self._local.pop(stream_id, None)
        for _, waiter in local.waiters if local is not None else ():
            if not waiter.done():
                waiter.set_result(None)  # re-read: whatever is there is final

    async def read(
        self, stream_id: str, after: int, *, block_s: float = 0.0, limit: int = 1000
    ) -> list[Event]:
        key = self._key(stream_id, "ev")
        local = self._local.get(stream_id)
        if local is not None and block_s > 0 and local.last_id <= after:
            return await self._wait_local(stream_id, local, after, block_s, limit)
        try:
            reply: Any = await self._r.xread({key: f"0-{after}"}, count=limit)
        except RedisError as exc:
            raise StreamLogError(f"cannot read stream: {exc}") from exc
        if reply:
            return _parse(reply[0][1])
        if block_s <= 0:
            return []
        local = self._local.get(stream_id)
        if local is not None:
            return await self._wait_local(stream_id, local, after, block_s, limit)
        return (await self._tailer.wait(key, after, block_s))[:limit]

    async def _wait_local(
        self, stream_id: str, local: _Local, after: int, block_s: float, limit: int
    ) -> list[Event]:
        if local.last_id > after:  # appended while we looked
            return await self.read(stream_id, after, limit=limit)
        waiter: asyncio.Future[list[Event] | None] = asyncio.get_running_loop().create_future()
        entry = (after, waiter)
        local.waiters.append(entry)
        try:
            async with asyncio.timeout(block_s):
                events = await waiter
        except TimeoutError:
            return []
        finally:
            local.waiters.remove(entry)
        if events is None:
            return await self.read(stream_id, after, limit=limit)
        return events[:limit]

    async def touch_reader(self, stream_id: str, grace_s: float) -> Liveness | None:
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.hget(self._key(stream_id, "m"), "status")
                pipe.exists(self._key(stream_id, "ls"))
                pipe.set(self._key(stream_id, "rd"), 1, px=int(grace_s * 1000))
                status, leased, _ = await pipe.execute()
        except RedisError as exc:
            raise StreamLogError(f"cannot reach the stream log: {exc}") from exc
        if status is None:
            return None
        return Liveness(status.decode(), bool(leased))

    async def request_cancel(self, stream_id: str) -> None:
        try:
            await self._r.set(self._key(stream_id, "cx"), 1, px=self._live_ms)
        except RedisError as exc:
            raise StreamLogError(f"cannot cancel stream: {exc}") from exc

    async def renew(self, streams: Mapping[str, int], lease_s: float) -> dict[str, Control]:
        if not streams:
            return {}
        lease_ms = int(lease_s * 1000)
        try:
            for _ in range(2):  # once more, checked, after a NOSCRIPT (renewing is idempotent)
                async with self._r.pipeline(transaction=False) as pipe:
                    for stream_id, epoch in streams.items():
                        keys = [self._key(stream_id, k) for k in ("ls", "m", "cx", "rd")]
                        self._scripts.queue(pipe, self._renew, keys, [epoch, lease_ms])
                    replies = await pipe.execute(raise_on_error=False)
                if not any(isinstance(r, NoScriptError) for r in replies):
                    break
                self._scripts.forget()
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
        except RedisError as exc:
            raise StreamLogError(f"cannot renew streams: {exc}") from exc
        controls = {}
        for stream_id, (owned, cancel, reader) in zip(streams, replies, strict=True):
            controls[stream_id] = Control(bool(cancel), bool(reader), owned=bool(owned))
            if not owned:
                self._forget(stream_id)
        return controls

    async def ping(self) -> None:
        try:
            await self._r.ping()
        except RedisError as exc:
            raise StreamLogError(f"cannot reach Redis: {exc}") from exc

    async def aclose(self) -> None:
        await self._tailer.aclose()


def _script(client: aioredis.Redis, name: str) -> Any:
    return client.register_script(resources.files(__package__).joinpath(name).read_text())


class _Scripts:
    """The scripts this Redis is known to have.

    redis-py checks every script a pipeline carries before running it (`SCRIPT EXISTS`),
    a round trip of its own on every pipeline: one more per batch of appends, which is
    one more per event on a quiet process. Here a script is checked by the first
    pipeline that carries it, and again only after a `NOSCRIPT` (Redis restarted, or
    its scripts were flushed). A call refused with `NOSCRIPT` did not run, so its
    caller sends it again, checked this time (`forget`)."""

    __slots__ = ("_known",)

    def __init__(self) -> None:
        self._known: set[str] = set()

    def queue(self, pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
        """Queue a script call on a pipeline without awaiting it."""
        if script.sha not in self._known:
            pipe.scripts.add(script)  # checked (and loaded if need be) before it runs
            self._known.add(script.sha)
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    def forget(self) -> None:
        self._known.clear()


def _fenced(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("FENCED")


def _parse(entries: Any) -> list[Event]:
    return [
        Event(
            int(entry_id.split(b"-", 1)[1]),
            fields[b"n"].decode(),
            fields[b"d"],
            int(fields.get(b"t", 0)),
        )
        for entry_id, fields in entries
    ]
