"""The SSE response: pre-encoded frames out, pings while idle, disconnects noticed.

A small pure-ASGI response rather than sse-starlette's (the README says why, measured).
What it must do is small:

- send each frame as soon as it is produced (no buffering: `X-Accel-Buffering: no`);
- send `: ping` when nothing was sent for `ping_s`, so proxies keep a long TTFT open,
  and none once the stream's terminal event went out;
- notice the client going away (`http.disconnect`) and cancel the producer at once,
  which is what cancels the upstream request;
- drop a client that stopped reading: a write that has not drained for `send_timeout_s`
  ends the response (`too_slow`), so a reader that never reads holds at most one
  socket buffer and its stream's bounded buffer, never more, and never for long.

One timer per response does the pinging and watches for stalled writes, so an event
costs two attribute stores for all of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.types import Receive, Scope, Send

from streaming import PING_FRAME, cancel_and_wait

_TERMINAL = (b"done\n", b"error\n")


def _ends_stream(frame: bytes) -> bool:
    """Whether the last event in `frame` is terminal. Data lines hold JSON, which has no
    raw newline, so `\nevent: done\n` can only be an event line."""
    at = frame.rfind(b"\nevent: ")
    start = at + 8 if at >= 0 else (7 if frame.startswith(b"event: ") else -1)
    return start >= 0 and frame.startswith(_TERMINAL, start)


logger = logging.getLogger("sserelay.sse")


class SSEResponse:
    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        ping_s: float,
        retry_ms: int | None = None,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        stop: asyncio.Event | None = None,
        stop_frame: Callable[[], bytes] | None = None,
        open_responses: set[SSEResponse] | None = None,
        send_timeout_s: float | None = None,
        on_stall: Callable[[], None] | None = None,
        stall_tick_s: float = 5.0,
        ends_on_terminal: bool = True,
    ) -> None:
        """`stop` (the server's drain deadline) ends the response early: the producer is
        cancelled and `stop_frame()`, the stream's last word, is sent before closing.
        `open_responses` holds this response while it runs, so a drain can wait until
        every reader has had its last word. While a write is stalled, `on_stall` runs
        every `stall_tick_s` (a reader still connected, only slow, stays attached);
        after `send_timeout_s` the client is dropped. `ends_on_terminal`: a frame whose
        last event is `done` or `error` ends the stream (no pings after it); False where
        one connection carries many streams."""
        if ping_s <= 0:
            raise ValueError("ping_s must be positive")  # a zero interval would spin
        self.frames = frames
        self.ping_s = ping_s
        self.retry_ms = retry_ms
        self.headers = dict(headers or {})
        self.on_close = on_close
        self.stop = stop
        self.stop_frame = stop_frame
        self.open_responses = open_responses
        self.send_timeout_s = send_timeout_s
        self.on_stall = on_stall
        self.stall_tick_s = stall_tick_s
        self.ends_on_terminal = ends_on_terminal
        self.client_gone = False
        self.too_slow = False
        """Dropped because its writes did not drain for `send_timeout_s`."""

    def _watch_s(self) -> float:
        """How often the timer looks: at the ping interval, and often enough to notice a
        stalled write in time."""
        if self.send_timeout_s is None:
            return self.ping_s
        return min(self.ping_s, self.stall_tick_s, self.send_timeout_s)

    def _raw_headers(self) -> list[tuple[bytes, bytes]]:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-store",
            "x-accel-buffering": "no",
            **{k.lower(): v for k, v in self.headers.items()},
        }
        return [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`on_close` runs once the response is over, however it ended, even if the
        frames were never started (a client gone before the first byte)."""
        if self.open_responses is not None:
            self.open_responses.add(self)
        try:
            await self._respond(scope, receive, send)
        finally:
            try:
                if self.on_close is not None:
                    await self.on_close()
            finally:
                if self.open_responses is not None:
                    self.open_responses.discard(self)

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self._raw_headers()})
        if scope["method"] == "HEAD":
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()
        last_sent = loop.time()
        writing_since = 0.0  # when the write in progress began; 0: none
        ended = False  # the terminal event went out: no more pings

        async def write(body: bytes) -> None:
            nonlocal last_sent, writing_since
            async with lock:
                writing_since = loop.time()
                await send({"type": "http.response.body", "body": body, "more_body": True})
                last_sent = loop.time()
                writing_since = 0.0

        async def produce() -> None:
            nonlocal ended
            # `retry:` travels in the first event's block: alone in a block of its own,
            # some clients never surface it.
            prefix = b"retry: %d\n" % self.retry_ms if self.retry_ms else b""
            try:
                async for frame in self.frames:
                    await write(prefix + frame if prefix else frame)
                    prefix = b""
                    if self.ends_on_terminal and _ends_stream(frame):
                        ended = True
            finally:
                aclose = getattr(self.frames, "aclose", None)
                if aclose is not None:
                    await aclose()

        # Pings are a timer, not a task per stream: a task that sleeps costs about a
        # kilobyte for every open stream, and most streams never need a ping.
        ping_timer: asyncio.TimerHandle | None = None
        pinging: asyncio.Task[None] | None = None

        def ping_due() -> None:
            nonlocal ping_timer, pinging
            now = loop.time()
            if writing_since:  # a write has not drained yet
                stalled = now - writing_since
                if self.send_timeout_s is not None and stalled >= self.send_timeout_s:
                    ping_timer = None
                    self.too_slow = True
                    producer.cancel()  # ends the response; the client is dropped
                    return
                if self.on_stall is not None:
                    self.on_stall()
                tick = self.stall_tick_s
                if self.send_timeout_s is not None:
                    tick = min(tick, writing_since + self.send_timeout_s - now)
                ping_timer = loop.call_later(max(tick, 0.01), ping_due)
                return
            if ended:
                ping_timer = None
                return
            due = last_sent + self.ping_s
            if due > now:
                ping_timer = loop.call_later(min(due - now, self._watch_s()), ping_due)
            else:
                ping_timer, pinging = None, loop.create_task(ping())

        async def ping() -> None:
            nonlocal ping_timer
            try:
                await write(PING_FRAME)
            except OSError:
                return  # the client is gone; the watcher or the producer notices
            ping_timer = loop.call_later(self._watch_s(), ping_due)

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer = asyncio.create_task(produce())
        watcher = asyncio.create_task(disconnected())
        ping_timer = loop.call_later(self._watch_s(), ping_due)
        tasks: list[asyncio.Task[Any]] = [producer, watcher]
        if self.stop is not None:
            tasks.append(asyncio.create_task(self.stop.wait()))
        stopped = False
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped = len(tasks) > 2 and tasks[2].done() and not producer.done()
            self.client_gone = (
                self.too_slow or watcher.done() or (not producer.done() and not stopped)
            )
            if ping_timer is not None:
                ping_timer.cancel()
            if pinging is not None:
                tasks.append(pinging)
            # Cancelled until really done: a producer that swallowed one cancellation
            # would keep this response (and a draining server) open.
            await cancel_and_wait(tasks)
        if stopped and not self.client_gone and self.stop_frame is not None:
            try:
                await send(
                    {"type": "http.response.body", "body": self.stop_frame(), "more_body": True}
                )
            except OSError:
                self.client_gone = True
        if self.too_slow:
            # Nothing more can be written to it: returning without the final chunk makes
            # uvicorn close the connection.
            logger.info("dropped a client that read nothing for %.0fs", self.send_timeout_s)
            return
        error = None if producer.cancelled() else producer.exception()
        if isinstance(error, OSError):
            self.client_gone = True  # the socket broke under a write
        elif error is not None:
            logger.error("SSE producer failed", exc_info=error)
        if not self.client_gone:
            try:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                self.client_gone = True
