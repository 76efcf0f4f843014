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
        writer = _Writer(self, send)
        try:
            await self._run(writer, receive)
        finally:
            writer.close()

    async def _produce(self, writer: _Writer) -> None:
        # `retry:` travels in the first event's block: alone in a block of its own,
        # some clients never surface it.
        prefix = b"retry: %d\n" % self.retry_ms if self.retry_ms else b""
        try:
            async for frame in self.frames:
                await writer.write(prefix + frame if prefix else frame)
                prefix = b""
                if self.ends_on_terminal and _ends_stream(frame):
                    writer.ended = True
        finally:
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _run(self, writer: _Writer, receive: Receive) -> None:
        send = writer.send

        async def disconnected() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        producer = writer.producer = asyncio.create_task(self._produce(writer))
        watcher = asyncio.create_task(disconnected())
        writer.arm(self._watch_s())
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
            writer.disarm()
            if writer.pinging is not None:
                tasks.append(writer.pinging)
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


class _Writer:
    """One response's writes, and its timer: pings while idle, stalled writes watched.

    State on an object, not in closures: closures that call each other (the timer's
    callback re-arms itself and starts pings, which re-arm it) form a reference cycle
    through their cells, and everything the response's frame held (the connection,
    the generation, the request) was then freed only by the cyclic collector, late and
    in pauses. `close()` breaks the one cycle left (the armed timer holds a bound
    method), so a finished response is freed by reference counting."""

    __slots__ = (
        "response",
        "send",
        "loop",
        "lock",
        "last_sent",
        "writing_since",
        "ended",
        "timer",
        "pinging",
        "producer",
    )

    def __init__(self, response: SSEResponse, send: Send) -> None:
        self.response = response
        self.send = send
        self.loop = asyncio.get_running_loop()
        self.lock = asyncio.Lock()
        self.last_sent = self.loop.time()
        self.writing_since = 0.0  # when the write in progress began; 0: none
        self.ended = False  # the terminal event went out: no more pings
        # Pings are a timer, not a task per stream: a task that sleeps costs about a
        # kilobyte for every open stream, and most streams never need a ping.
        self.timer: asyncio.TimerHandle | None = None
        self.pinging: asyncio.Task[None] | None = None
        self.producer: asyncio.Task[None] | None = None

    async def write(self, body: bytes) -> None:
        async with self.lock:
            self.writing_since = self.loop.time()
            await self.send({"type": "http.response.body", "body": body, "more_body": True})
            self.last_sent = self.loop.time()
            self.writing_since = 0.0

    def arm(self, delay_s: float) -> None:
        self.timer = self.loop.call_later(delay_s, self.due)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def due(self) -> None:
        response, now = self.response, self.loop.time()
        self.timer = None
        if self.writing_since:  # a write has not drained yet
            stalled = now - self.writing_since
            timeout = response.send_timeout_s
            if timeout is not None and stalled >= timeout:
                response.too_slow = True
                if self.producer is not None:
                    self.producer.cancel()  # ends the response; the client is dropped
                return
            if response.on_stall is not None:
                response.on_stall()
            tick = response.stall_tick_s
            if timeout is not None:
                tick = min(tick, self.writing_since + timeout - now)
            self.arm(max(tick, 0.01))
            return
        if self.ended:
            return
        due = self.last_sent + response.ping_s
        if due > now:
            self.arm(min(due - now, response._watch_s()))
        else:
            self.pinging = self.loop.create_task(self.ping())

    async def ping(self) -> None:
        try:
            await self.write(PING_FRAME)
        except OSError:
            return  # the client is gone; the watcher or the producer notices
        self.arm(self.response._watch_s())

    def close(self) -> None:
        """Cancels the timer and lets go of the tasks: nothing refers back to this."""
        self.disarm()
        self.pinging = self.producer = None
