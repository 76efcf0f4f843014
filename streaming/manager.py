"""Generations that outlive the HTTP request that started them.

A stream runs as a task writing to the stream log, detached from any connection, so
readers can drop and come back. One supervisor loop per process renews the leases of
all its streams in a single store round trip and, from the same reply, cancels those
someone asked to cancel (from any process) and those nobody has read for the grace
period: nobody pays for tokens nobody will read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from ._exceptions import StreamingError, StreamLogError
from .log import LogWriter, StreamInfo, StreamLog
from .pipeline import Generation

logger = logging.getLogger("sserelay.streams")

OnFinish = Callable[[StreamInfo, Generation], Awaitable[None]]

_REASONS = {
    "cancelled": ("the stream was cancelled", False),
    "orphaned": ("nobody was reading the stream", False),
    "shutdown": ("the server is shutting down; retry", True),
    "log_failed": ("the stream could not be stored", True),
}


class StreamManager:
    def __init__(
        self,
        log: StreamLog,
        *,
        orphan_grace_s: float = 10.0,
        lease_s: float = 10.0,
        tick_s: float = 1.0,
        on_finish: OnFinish | None = None,
    ) -> None:
        self.log = log
        self.orphan_grace_s = orphan_grace_s
        self.lease_s = lease_s
        self.tick_s = tick_s
        self._on_finish = on_finish
        self._running: dict[str, asyncio.Task[None]] = {}
        self._reasons: dict[str, str] = {}
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="stream-supervisor")

    async def aclose(self) -> None:
        """Stop every local generation (each ends with a retryable `error` event)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
        for stream_id in list(self._running):
            self._stop(stream_id, "shutdown")
        if self._running:
            await asyncio.wait(list(self._running.values()))

    async def launch(self, info: StreamInfo, generation: Generation) -> None:
        await self.log.create(info, reader_grace_s=self.orphan_grace_s, lease_s=self.lease_s)
        task = asyncio.create_task(self._run(info, generation), name=f"stream-{info.id}")
        self._running[info.id] = task

    async def cancel(self, stream_id: str) -> None:
        """Cancel a stream wherever it runs: at once if here, else via the log."""
        if stream_id in self._running:
            self._stop(stream_id, "cancelled")
        else:
            await self.log.request_cancel(stream_id)

    def _stop(self, stream_id: str, reason: str) -> None:
        task = self._running.get(stream_id)
        if task is not None and stream_id not in self._reasons:
            self._reasons[stream_id] = reason
            task.cancel()

    async def _run(self, info: StreamInfo, generation: Generation) -> None:
        writer = LogWriter(self.log, info.id)
        try:
            async for event in generation.events():
                writer.add(event)
                if writer.error is not None:
                    raise StreamLogError("cannot append to the stream log")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = self._reasons.get(info.id, "cancelled")
            message, retryable = _REASONS[reason]
            writer.add(generation.abort(reason, message, retryable=retryable))
        except StreamingError:
            message, retryable = _REASONS["log_failed"]
            generation.abort("log_failed", message, retryable=retryable, status="error")
        finally:
            # From here on the stream is ending: a late cancel must not interrupt the
            # bookkeeping, or the finish hook would never run and the stream would stay
            # "running" in the log.
            self._reasons.setdefault(info.id, "finishing")
            await asyncio.shield(self._finish(info, generation, writer))

    async def _finish(self, info: StreamInfo, generation: Generation, writer: LogWriter) -> None:
        await writer.close()
        try:
            await self.log.finish(info.id, generation.outcome.status)
        except StreamingError as exc:
            logger.error("stream %s: cannot record its end: %s", info.id, exc)
        self._running.pop(info.id, None)
        self._reasons.pop(info.id, None)
        if self._on_finish is not None:
            try:
                await self._on_finish(info, generation)
            except Exception:
                logger.exception("stream %s: finish hook failed", info.id)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self._running:
                continue
            try:
                controls = await self.log.renew(list(self._running), self.lease_s)
            except StreamingError as exc:
                logger.warning("cannot renew stream leases: %s", exc)
                continue
            for stream_id, control in controls.items():
                if control.cancel_requested:
                    self._stop(stream_id, "cancelled")
                elif not control.reader_attached:
                    logger.info(
                        "stream %s: no reader for %.0fs, cancelling upstream",
                        stream_id,
                        self.orphan_grace_s,
                    )
                    self._stop(stream_id, "orphaned")
