"""Limiter scripts called while others are on the wire go out together, as one pipeline.

Each decision is one `EVALSHA`. Sent one by one, every call pays a pool checkout, a
write, a read and the client's parsing around them: about 70 us of this process's CPU,
so one process tops out near 14,000 decisions/s and, close to that, queues build up in
the event loop (p99 in the hundreds of ms at 10,000/s). Sent together, the calls that
arrive while earlier ones are in flight share those costs: under load, less than half
the CPU per decision, and at 10,000/s the p99 stays in single-digit milliseconds. When
idle, a call goes out at once, alone.

Only for a plain Redis client: a Cluster pipeline cannot carry scripts.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError


@dataclass(slots=True)
class _Call:
    sha: str
    source: str
    args: list[Any]
    future: asyncio.Future[Any]
    droppable: bool


class Pipeliner:
    def __init__(self, client: aioredis.Redis, *, in_flight: int = 2, max_batch: int = 256):
        """At most `in_flight` pipelines on the wire at once (so one slow reply does not
        hold every decision), each of at most `max_batch` calls."""
        self._client = client
        self._capacity = in_flight
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()  # running tasks must be referenced

    async def evalsha(
        self, sha: str, source: str, keys: list[Any], args: list[Any], *, droppable: bool = False
    ) -> Any:
        """`droppable`: if its caller stops waiting before it is sent, it is not sent
        (an acquire nobody will settle); otherwise (a settlement) it always is."""
        loop = asyncio.get_running_loop()
        call = _Call(sha, source, [len(keys), *keys, *args], loop.create_future(), droppable)
        self._queue.append(call)
        if self._in_flight < self._capacity:
            # The batch is sent by a task, not by this caller: a caller cancelled while
            # it waits must not take the other calls of its batch down with it.
            self._in_flight += 1
            task = loop.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await call.future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                batch = [c for c in batch if not (c.droppable and c.future.done())]
                if batch:
                    await self._send(batch)
        finally:
            self._in_flight -= 1

    async def _send(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                replies: list[Any] = [await self._one(batch[0])]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for call in batch:
                        pipe.execute_command("EVALSHA", call.sha, *call.args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(exc)
            return
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):  # a restarted or flushed Redis
                try:
                    await self._client.script_load(call.source)
                    reply = await self._one(call)
                except Exception as exc:
                    reply = exc
            if call.future.done():
                continue  # its caller gave up waiting
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _one(self, call: _Call) -> Any:
        try:
            return await self._client.evalsha(call.sha, *call.args)
        except NoScriptError as exc:
            return exc
