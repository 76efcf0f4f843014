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
from typing import Any, Literal

from ._exceptions import StreamingError, StreamLogError
from ._tasks import cancel_and_wait
from .events import Event, EventEncoder
from .log import LogWriter, StreamInfo, StreamLog, StreamStatus
from .pipeline import Generation, Outcome, Pricing
from .providers.base import estimate_tokens

logger = logging.getLogger("sserelay.streams")

OnFinish = Callable[[StreamInfo, Generation], Awaitable[None]]
OnLost = Callable[[StreamInfo, Outcome], Awaitable[None]]
"""Called once for a stream whose process died, by the process that wrote its end."""

StopReason = Literal["cancelled", "orphaned", "shutdown", "finishing"]

_REASONS: dict[StopReason, tuple[str, bool]] = {
    "cancelled": ("the stream was cancelled", False),
    "orphaned": ("nobody was reading the stream", False),
    "shutdown": ("the server is shutting down; retry", True),
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
        on_lost: OnLost | None = None,
        sweep_s: float | None = None,
    ) -> None:
        """`sweep_s`: how often to look for streams whose process died (default: half
        the lease), so their end is written and their usage settled even when nobody
        reads them."""
        self.log = log
        self.orphan_grace_s = orphan_grace_s
        self.lease_s = lease_s
        self.tick_s = tick_s
        self.sweep_s = sweep_s if sweep_s is not None else lease_s / 2
        self._on_finish = on_finish
        self._on_lost = on_lost
        self._running: dict[str, asyncio.Task[None]] = {}
        self._reasons: dict[str, StopReason] = {}
        self._finishing: set[asyncio.Future[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="stream-supervisor")
        self._sweeper = asyncio.create_task(self._janitor(), name="stream-janitor")

    async def aclose(self) -> None:
        """Stop every local generation (each ends with a retryable `error` event)."""
        for task in (self._supervisor, self._sweeper):
            if task is not None:
                task.cancel()
        for stream_id in list(self._running):
            self._stop(stream_id, "shutdown")
        await cancel_and_wait(list(self._running.values()))
        if self._finishing:  # their usage settles before the stores close
            await asyncio.wait(list(self._finishing))

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

    def _stop(self, stream_id: str, reason: StopReason) -> None:
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
            if reason == "finishing":
                reason = "cancelled"
            message, retryable = _REASONS[reason]
            writer.add(generation.abort(reason, message, retryable=retryable, status=reason))
        except StreamingError:
            generation.abort(
                "stream_log_unavailable", "the stream could not be stored", retryable=True
            )
        finally:
            # From here on the stream is ending: a late cancel must not interrupt the
            # bookkeeping, or the finish hook would never run and the stream would stay
            # "running" in the log.
            self._reasons.setdefault(info.id, "finishing")
            finish = asyncio.ensure_future(self._finish(info, generation, writer))
            self._finishing.add(finish)
            finish.add_done_callback(self._finishing.discard)
            await asyncio.shield(finish)

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

    async def end_lost(self, stream_id: str) -> bool:
        """Write the end of a stream whose generating process died, and bill it for what
        its log shows it used: the deltas logged and the input estimate.

        Exactly one process wins (`claim_end` checks and writes atomically that the
        stream still runs, that nobody holds its lease, and that the end's id is the
        next one); the winner runs the `on_lost` hook. The claim and the hook run in a
        task of their own, so a caller cancelled meanwhile (a reader leaving) cannot
        end a stream without settling it. False if the stream is alive, already ended,
        or someone else ended it first."""
        if stream_id in self._running:
            return False
        task = asyncio.ensure_future(self._end_lost(stream_id))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)
        return await asyncio.shield(task)

    async def _end_lost(self, stream_id: str) -> bool:
        info = await self.log.info(stream_id)
        if info is None or info.status != "running":
            return False
        events: list[Event] = []
        while batch := await self.log.read(stream_id, events[-1].id if events else 0, limit=5000):
            events.extend(batch)
        if events and events[-1].terminal:
            # It ended, but its process died before recording that (or settling it).
            outcome = _terminal_usage(events[-1])
            if not await self.log.claim_end(stream_id, None, outcome.status):
                return False
        else:
            outcome = _logged_usage(info, events)
            end = EventEncoder(events[-1].id if events else 0)(
                "error",
                {
                    "code": "stream_lost",
                    "message": "the stream stopped before it finished",
                    "retryable": True,
                    "usage": {
                        "input_tokens": outcome.input_tokens,
                        "output_tokens": outcome.output_tokens,
                    },
                    "cost_usd": outcome.cost_usd,
                },
            )
            if not await self.log.claim_end(stream_id, end, "lost"):
                return False
        logger.warning("stream %s: its process died; ended it as %s", stream_id, outcome.status)
        if self._on_lost is not None:
            try:
                await self._on_lost(info, outcome)
            except Exception:
                logger.exception("stream %s: lost-stream hook failed", stream_id)
        return True

    async def _janitor(self) -> None:
        """Ends the streams of processes that died, even when nobody reads them. Its own
        task, so a slow sweep never delays the lease renewals of this process's streams."""
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                lost = await self.log.lost()
            except StreamingError as exc:
                logger.warning("cannot look for lost streams: %s", exc)
                continue
            for stream_id in lost:
                try:
                    await self.end_lost(stream_id)
                except Exception:  # one broken stream must not stop the sweep
                    logger.exception("stream %s: cannot end it as lost", stream_id)

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


def _logged_usage(info: StreamInfo, events: list[Event]) -> Outcome:
    """What a stream used, judged from its log alone: output tokens as of the last
    `progress`, plus an estimate for the text logged after it; the input estimate."""
    output, chars_after = 0, 0
    for event in events:
        if event.name == "progress":
            data = event.json()
            output, chars_after = int(data["output_tokens"]), 0
        elif event.name == "delta":
            chars_after += len(event.json()["text"])
    if chars_after:
        output += estimate_tokens(chars_after)
    input_tokens = info.input_tokens if events and output else 0
    pricing = Pricing(info.input_usd_per_mtok, info.output_usd_per_mtok)
    return Outcome(
        status="lost",
        error_code="stream_lost",
        input_tokens=input_tokens,
        output_tokens=output,
        cost_usd=pricing.cost(input_tokens, output),
    )


def _terminal_usage(event: Event) -> Outcome:
    """How a stream ended, from its terminal event (which carries its usage)."""
    data = event.json()
    usage = data.get("usage") or {}
    status: StreamStatus = "done"
    if event.name == "error":
        code = data.get("code")
        status = code if code in ("cancelled", "orphaned", "shutdown") else "error"
    return Outcome(
        status=status,
        stop_reason=data.get("stop_reason"),
        error_code=data.get("code"),
        input_tokens=int(usage.get("input_tokens", 0)),
        output_tokens=int(usage.get("output_tokens", 0)),
        cost_usd=float(data.get("cost_usd", 0.0)),
    )
