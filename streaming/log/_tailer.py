"""One blocking XREAD per process, shared by every reader waiting on any stream.

A blocking read holds its connection for as long as it waits, so one XREAD BLOCK per
waiting reader would need one Redis connection per open stream: thousands, for a
process holding thousands of idle EventSources. Instead each waiter registers here with
the id it has read up to, and a single loop reads every waited-on stream in one
`XREAD BLOCK ... STREAMS k1 k2 ... id1 id2 ...` on a dedicated connection, handing each
waiter the entries past its own id.

A waiter on a stream the in-flight XREAD does not cover interrupts it with
`CLIENT UNBLOCK` (once per burst of new waiters, not once each), so joining never waits
for the current block to time out. Because every waiter gives the id it has already
seen, an entry appended between a waiter's own read and its registration is still
delivered: nothing can fall between the two.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .._exceptions import StreamLogError
from ..events import Event

logger = logging.getLogger("sserelay.streamlog")

Parse = Callable[[Any], list[Event]]


class _Waiter:
    __slots__ = ("after", "future")

    def __init__(self, after: int, future: asyncio.Future[list[Event]]) -> None:
        self.after = after
        self.future = future


class Tailer:
    def __init__(
        self,
        tail: aioredis.Redis,
        control: aioredis.Redis,
        parse: Parse,
        *,
        block_s: float = 5.0,
        count: int = 1000,
    ) -> None:
        self._tail = tail  # a single-connection client: CLIENT UNBLOCK needs its id
        self._control = control
        self._parse = parse
        self._block_ms = int(block_s * 1000)
        self._count = count
        self._waiters: dict[str, list[_Waiter]] = {}
        self._covered: dict[str, int] = {}
        """What the in-flight XREAD asks for: stream key -> the id it reads after."""
        self._client_id: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._unblocking: asyncio.Task[None] | None = None
        self._round = 0

    async def wait(self, key: str, after: int, timeout_s: float) -> list[Event]:
        """Entries of `key` with id > `after`, as soon as there are any; [] on timeout."""
        future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(after, future)
        self._waiters.setdefault(key, []).append(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="stream-log-tailer")
        else:
            covered = self._covered.get(key)
            if covered is None or after < covered:
                # The in-flight XREAD does not ask for this stream, or asks only from a
                # later id than this waiter needs.
                self._interrupt()
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return []
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]

    def _interrupt(self) -> None:
        if self._unblocking is None or self._unblocking.done():
            self._unblocking = asyncio.create_task(self._unblock(self._round))

    async def _unblock(self, round_: int) -> None:
        """End the in-flight XREAD so the next one covers the new streams. CLIENT UNBLOCK
        answers 0 when the XREAD has not reached Redis yet: then try again, until the
        loop has moved on to a new round (which includes every waiter registered now)."""
        delay = 0.0005
        while self._round == round_ and self._waiters:
            client_id = self._client_id
            try:
                if client_id is not None and await self._control.client_unblock(client_id):
                    return
            except RedisError as exc:
                logger.warning("cannot interrupt the stream log tailer: %s", exc)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _run(self) -> None:
        failures = 0
        while self._waiters:
            try:
                if self._client_id is None:
                    self._client_id = int(await self._tail.client_id())
                self._round += 1
                self._covered = {key: min(w.after for w in ws) for key, ws in self._waiters.items()}
                streams: dict[Any, Any] = {k: f"0-{a}" for k, a in self._covered.items()}
                reply: Any = await self._tail.xread(
                    streams, count=self._count, block=self._block_ms
                )
                failures = 0
            except RedisError as exc:
                self._client_id = None  # a reconnect gets a new id
                failures += 1
                error = StreamLogError(f"cannot follow streams: {exc}")
                for waiters in self._waiters.values():
                    for waiter in waiters:
                        if not waiter.future.done():
                            waiter.future.set_exception(error)
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
                continue
            for key, entries in reply or ():
                events = self._parse(entries)
                waiters = self._waiters.get(key.decode(), [])
                for waiter in waiters:
                    fresh = [e for e in events if e.id > waiter.after]
                    if fresh and not waiter.future.done():
                        waiter.future.set_result(fresh)
                # Served waiters leave now, so the next XREAD does not ask again.
                waiters[:] = [w for w in waiters if not w.future.done()]
                if not waiters:
                    self._waiters.pop(key.decode(), None)
        self._covered = {}

    async def aclose(self) -> None:
        for task in (self._task, self._unblocking):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._unblocking) if t is not None),
            return_exceptions=True,
        )
        await self._tail.aclose()
