"""Generations that outlive the HTTP request that started them.

A stream runs as a task writing to the stream log, detached from any connection, so
readers can drop and come back. One supervisor loop per process renews the leases of
all its streams in a single store round trip and, from the same reply, cancels those
someone asked to cancel (from any process) and those nobody has read for the grace
period (nobody pays for tokens nobody will read), and stops at once, writing nothing,
those another process took over (their fencing epoch moved on).

A stream whose events cannot be written (the store failed, or this process was paused
past its command timeouts) is stepped back from when a job backs it: nothing is ended or
settled here, the lease and the job are given up (or expire), and whoever takes the job
over next, possibly this very process, continues the answer from what the log holds.
Ending it here instead would write an error no reader can see and settle a partial
usage that the continuation's own settlement could no longer correct.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any, Literal

from ._exceptions import StreamFenced, StreamingError, StreamLogError
from ._tasks import cancel_and_wait
from .events import Event
from .log import LogWriter, StreamInfo, StreamLog, StreamStatus
from .pipeline import Generation, Outcome, Resume
from .providers.base import estimate_tokens
from .targets import Pricing

logger = logging.getLogger("sserelay.streams")

OnFinish = Callable[[StreamInfo, Generation], Awaitable[None]]
OnEnd = Callable[[str], Awaitable[None]]
"""Called once a stream is over here: `finished` (its end written and recorded),
`unrecorded` (its end is in the log, but recording it failed), `handover` (left for
another process on drain), `unwritable` (left for another owner because its events
could not be written) or `fenced` (another process took it over)."""

StopReason = Literal[
    "cancelled", "orphaned", "shutdown", "finishing", "fenced", "handover", "unwritable"
]
_LEFT: tuple[StopReason, ...] = ("fenced", "handover", "unwritable")
"""Stopped here without an end: another owner continues the stream."""

_REASONS: dict[StopReason, tuple[str, bool, StreamStatus]] = {
    "cancelled": ("the stream was cancelled", False, "cancelled"),
    "orphaned": ("nobody was reading the stream", False, "orphaned"),
    "shutdown": ("the server is shutting down; retry", True, "shutdown"),
}
"""The reasons a stream stops here with a last word; the others (`_LEFT`) leave it to
another owner, writing nothing."""


class StreamManager:
    def __init__(
        self,
        log: StreamLog,
        *,
        orphan_grace_s: float = 10.0,
        lease_s: float = 10.0,
        tick_s: float = 1.0,
        on_finish: OnFinish | None = None,
        finish_timeout_s: float = 10.0,
    ) -> None:
        self.log = log
        self.finish_timeout_s = finish_timeout_s
        self.orphan_grace_s = orphan_grace_s
        self.lease_s = lease_s
        self.tick_s = tick_s
        self._on_finish = on_finish
        self._running: dict[str, asyncio.Task[None]] = {}
        self._epochs: dict[str, int] = {}
        self._reasons: dict[str, StopReason] = {}
        self._finishing: set[asyncio.Future[Any]] = set()
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def active(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="stream-supervisor")

    async def aclose(self) -> None:
        """Stop every local generation (each ends with a retryable `error` event)."""
        await self._stop_all("shutdown")

    async def hand_over(self) -> None:
        """Stop every local generation without ending it: what was generated is logged,
        the leases are given up, and another process takes the streams over."""
        await self._stop_all("handover")

    async def _stop_all(self, reason: StopReason) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
        for stream_id in list(self._running):
            self._stop(stream_id, reason)
        await cancel_and_wait(list(self._running.values()))
        if self._finishing:  # their usage settles before the stores close
            # Bounded: a drain must end in time even if the store hangs; what is left
            # unrecorded is ended from the log by whoever takes the job over.
            _, late = await asyncio.wait(list(self._finishing), timeout=self.finish_timeout_s)
            if late:
                logger.error("%d streams still recording their end; leaving them", len(late))

    async def create(self, info: StreamInfo) -> None:
        """Register a stream for whoever will generate it; a reader counts as attached
        for the orphan grace period, giving the client time to connect."""
        await self.log.create(info, reader_grace_s=self.orphan_grace_s)

    async def launch(self, info: StreamInfo, generation: Generation) -> None:
        """Create a stream and generate it here."""
        await self.log.create(info, reader_grace_s=self.orphan_grace_s, lease_s=self.lease_s)
        self.run(info, generation, epoch=1)

    def run(
        self,
        info: StreamInfo,
        generation: Generation,
        *,
        epoch: int,
        on_end: OnEnd | None = None,
    ) -> None:
        """Generate a stream this process owns at `epoch` (see `StreamLog.take`);
        `on_end` runs once it is over here."""
        self._epochs[info.id] = epoch
        task = asyncio.create_task(
            self._run(info, generation, epoch, on_end), name=f"stream-{info.id}"
        )
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

    async def _run(
        self, info: StreamInfo, generation: Generation, epoch: int, on_end: OnEnd | None
    ) -> None:
        writer = LogWriter(self.log, info.id, epoch)
        try:
            # Closed on the way out, whatever the way: that closes the upstream call.
            async with aclosing(generation.events()) as events:
                async for event in events:
                    writer.add(event)
                    if writer.error is not None:
                        if isinstance(writer.error, StreamFenced):
                            raise writer.error
                        raise StreamLogError("cannot append to the stream log")
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            reason = self._reasons.get(info.id, "cancelled")
            if reason == "finishing":
                reason = "cancelled"
            if reason in _REASONS:
                message, retryable, status = _REASONS[reason]
                writer.add(generation.abort(reason, message, retryable=retryable, status=status))
        except StreamFenced:
            self._reasons[info.id] = "fenced"
        except StreamingError:
            if on_end is not None:  # a job backs it: its next owner continues it
                self._reasons[info.id] = "unwritable"
            else:
                generation.abort(
                    "stream_log_unavailable", "the stream could not be stored", retryable=True
                )
        finally:
            # From here on the stream is ending: a late cancel must not interrupt the
            # bookkeeping, or the finish hook would never run and the stream would stay
            # "running" in the log.
            self._reasons.setdefault(info.id, "finishing")
            finish = asyncio.ensure_future(self._finish(info, generation, writer, on_end))
            self._finishing.add(finish)
            finish.add_done_callback(self._finishing.discard)
            await asyncio.shield(finish)

    async def _finish(
        self, info: StreamInfo, generation: Generation, writer: LogWriter, on_end: OnEnd | None
    ) -> None:
        await writer.close()
        reason = self._reasons.get(info.id)
        if isinstance(writer.error, StreamFenced):
            reason = "fenced"  # whatever stopped it, another owner has it now
        elif writer.error is not None and on_end is not None and reason not in _LEFT:
            reason = "unwritable"  # its last events are not in the log: its next owner
            # writes them
        finished = reason not in _LEFT
        recorded = True
        try:
            if finished:
                await self.log.finish(info.id, generation.outcome.status, epoch=writer.epoch)
            elif reason != "fenced":  # given up now, not when the lease runs out
                await self.log.release(info.id, writer.epoch)
        except StreamFenced:
            finished, reason = False, "fenced"
        except StreamingError as exc:
            if finished:
                logger.error("stream %s: cannot record its end: %s", info.id, exc)
                recorded = False
            else:
                logger.warning("stream %s: cannot give its lease up: %s", info.id, exc)
        if not finished:
            logger.log(
                logging.WARNING if reason == "unwritable" else logging.INFO,
                "stream %s: %s",
                info.id,
                {
                    "handover": "handed over",
                    "unwritable": "its events cannot be written: left to its next owner",
                }.get(reason or "", "taken over by another process"),
            )
        self._running.pop(info.id, None)
        self._reasons.pop(info.id, None)
        self._epochs.pop(info.id, None)
        if finished and self._on_finish is not None:
            try:
                await self._on_finish(info, generation)
            except Exception:
                logger.exception("stream %s: finish hook failed", info.id)
        if on_end is not None:
            how: str = reason if not finished and reason is not None else "fenced"
            if finished:
                how = "finished" if recorded else "unrecorded"
            try:
                await on_end(how)
            except Exception:
                logger.exception("stream %s: end hook failed", info.id)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self._running:
                continue
            try:
                controls = await self.log.renew(dict(self._epochs), self.lease_s)
            except StreamingError as exc:
                logger.warning("cannot renew stream leases: %s", exc)
                continue
            for stream_id, control in controls.items():
                if not control.owned:
                    logger.warning("stream %s: another process took it over", stream_id)
                    self._stop(stream_id, "fenced")
                elif control.cancel_requested:
                    self._stop(stream_id, "cancelled")
                elif not control.reader_attached:
                    logger.info(
                        "stream %s: no reader for %.0fs, cancelling upstream",
                        stream_id,
                        self.orphan_grace_s,
                    )
                    self._stop(stream_id, "orphaned")


def resume_point(info: StreamInfo, events: list[Event], now: float) -> Resume:
    """Where a stream stood, judged from its log alone: the answer so far, the output
    tokens its last delta recorded (else as of the last `progress`, plus an estimate for
    the text logged after it), and the prompt's estimate as what earlier attempts used
    of the input."""
    output, chars_after, percent = 0, 0, 0.0
    parts: list[str] = []
    for event in events:
        if event.name == "progress":
            data = event.json()
            output, chars_after = int(data["output_tokens"]), 0
            percent = float(data.get("percent") or 0.0)
        elif event.name == "delta":
            text = event.text
            parts.append(text)
            if event.tokens:  # counted as it was written
                output, chars_after = event.tokens, 0
            else:
                chars_after += len(text)
    if chars_after:
        output += estimate_tokens(chars_after)
    return Resume(
        text="".join(parts),
        last_id=events[-1].id if events else 0,
        output_tokens=output,
        input_tokens=info.input_tokens if parts else 0,
        percent=percent,
        elapsed_s=max(0.0, now - info.created_at),
    )


def logged_outcome(info: StreamInfo, resume: Resume, code: str) -> Outcome:
    """What a stream that ends without continuing used: what its log shows."""
    pricing = Pricing(info.input_usd_per_mtok, info.output_usd_per_mtok)
    return Outcome(
        status="error",
        error_code=code,
        input_tokens=resume.input_tokens,
        output_tokens=resume.output_tokens,
        cost_usd=pricing.cost(resume.input_tokens, resume.output_tokens),
    )


def terminal_outcome(event: Event) -> Outcome:
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
