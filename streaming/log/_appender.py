"""Appends of many streams, made while earlier ones are on the wire, share one pipeline.

With hundreds of streams each writing an event every 50 ms, one round trip per append
spends most of the process's CPU in the Redis client (a pool checkout, a write, a read
and their parsing, per append). Appends that arrive while a pipeline is in flight wait
for it and then go out together: under load a few pipelines carry hundreds of appends;
when idle an append goes out at once, alone. Each append still succeeds or fails on its
own: an error on one stream's entries fails that append only (Redis does not roll a
transaction back on an error). The pipeline is one MULTI/EXEC so that a reader
blocked in XREAD on another process sees each batch whole, never half of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from ..events import Event

_Item = tuple[str, Sequence[Event], int, "asyncio.Future[None]"]
"""One append: the stream's id, its events, the writer's epoch, and who waits for it."""

Queue = Callable[[Any, str, Sequence[Event], int], None]
"""Adds one stream's commands (its id, its events, the writer's epoch) to a pipeline."""


class Appender:
    def __init__(
        self,
        client: aioredis.Redis,
        queue: Queue,
        *,
        in_flight: int = 2,
        on_noscript: Callable[[], None] | None = None,
    ) -> None:
        """At most `in_flight` pipelines on the wire at once, so one slow reply does not
        hold every stream. An append refused with `NOSCRIPT` did not run: it is sent once
        more after `on_noscript()` (which has the next pipeline load its scripts)."""
        self._client = client
        self._queue_commands = queue
        self._on_noscript = on_noscript
        self._capacity = in_flight
        self._waiting: list[_Item] = []
        self._sending = 0  # counted in the sender itself: a done-callback would lag a turn
        self._senders: set[asyncio.Task[None]] = set()  # running tasks must be referenced

    async def append(self, stream_id: str, events: Sequence[Event], epoch: int) -> None:
        """Returns once Redis has the events; raises what Redis answered otherwise."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((stream_id, events, epoch, future))
        if self._sending < self._capacity:
            # A task sends, not this caller: cancelling one append must not abort the
            # transaction that carries the others.
            self._sending += 1
            sender = asyncio.create_task(self._send_all())
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        await future

    async def _send_all(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                await self._send(batch)
        finally:
            self._sending -= 1

    async def _send(self, batch: list[_Item], retry: bool = True) -> None:
        spans: list[int] = []
        try:
            async with self._client.pipeline(transaction=True) as pipe:
                for stream_id, events, epoch, _ in batch:
                    before = len(pipe.command_stack)
                    self._queue_commands(pipe, stream_id, events, epoch)
                    spans.append(len(pipe.command_stack) - before)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        again = []
        for item, span in zip(batch, spans, strict=True):
            future = item[3]
            errors = [r for r in replies[start : start + span] if isinstance(r, Exception)]
            start += span
            if future.done():
                continue
            if errors and retry and all(isinstance(e, NoScriptError) for e in errors):
                again.append(item)
            elif errors:
                future.set_exception(errors[0])
            else:
                future.set_result(None)
        if again:
            if self._on_noscript is not None:
                self._on_noscript()
            await self._send(again, retry=False)
