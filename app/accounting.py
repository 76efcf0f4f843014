"""What runs when a stream ends: settle its usage, count it, record it, log it.

Every stream reaches `stream_finished` exactly once, however it ended, from the process
that ended it (the manager's finish hook for resumable streams, wherever the last of its
workers ran it; the response's close for the direct route). A stream ended from its log
alone reaches `stream_lost` instead: it is settled from the reservation stored with the
stream, so a crash never leaves a caller charged for the worst case, and a reservation
is settled once however many workers ran the stream (the limiter refunds only once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ratelimit import NANO_USD, Limiter, LimiterUnavailable, Reservation
from streaming import Generation, Outcome, StreamInfo, StreamingError

from .cache import Replay, ResponseCache
from .metrics import Metrics
from .records import RecordStore, content
from .settings import RecordsContent

logger = logging.getLogger("sserelay")
stream_log = logging.getLogger("sserelay.stream")


class StreamAccounting:
    def __init__(
        self,
        *,
        limiter: Limiter,
        metrics: Metrics,
        records: RecordStore,
        records_content: RecordsContent,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics
        self.records = records
        self.records_content = records_content
        self.reservations: dict[str, Reservation] = {}
        """Admissions of the streams running in this process, by stream id, until settled."""
        self.queued: dict[str, Reservation] = {}
        """Admissions of streams this process queued, until a worker holds them: their
        concurrency leases must outlive a wait in the queue."""
        self.still_waiting: Callable[[list[str]], Awaitable[set[str]]] | None = None
        """Which of the queued streams no worker has taken yet (the stream log's)."""
        self.cache: ResponseCache | None = None
        """Where answers that ended `done` are kept, for streams with a `cache_key`."""

    def hold(self, stream_id: str, reservation: Reservation) -> None:
        self.reservations[stream_id] = reservation

    def forget(self, stream_id: str) -> None:
        """The stream left this process unsettled (another one took it over, or it was
        handed over on drain): whoever ends it settles it."""
        self.reservations.pop(stream_id, None)

    async def refund(self, stream_id: str, reservation: Reservation) -> None:
        """An admission whose stream never started: nothing was used."""
        await self._settle(stream_id, reservation, Outcome())

    async def settle(self, stream_id: str, outcome: Outcome) -> None:
        """Bill what the stream actually used against its admission, once."""
        reservation = self.reservations.pop(stream_id, None)
        if reservation is not None:
            await self._settle(stream_id, reservation, outcome)

    async def _settle(self, stream_id: str, reservation: Reservation, outcome: Outcome) -> bool:
        """False if this reservation was settled before (by the process that ran the
        stream, before it died)."""
        try:
            return await self.limiter.settle(
                reservation,
                tokens=outcome.input_tokens + outcome.output_tokens,
                cost_nano_usd=round(outcome.cost_usd * NANO_USD),
            )
        except LimiterUnavailable as exc:
            # The reservation stays counted at its worst case (the safe side) and its
            # lease expires by itself.
            self.metrics.limiter_errors.inc()
            logger.error("stream %s: cannot settle usage: %s", stream_id, exc)
            return True

    def hold_queued(self, stream_id: str, reservation: Reservation) -> None:
        self.queued[stream_id] = reservation

    async def _taken(self) -> None:
        """Stop renewing queued streams a worker has taken (it renews them now), or that
        ended. (Renewing a settled reservation would change nothing: its lease is gone,
        and a renewal never brings one back.)"""
        if not self.queued or self.still_waiting is None:
            return
        try:
            waiting = await self.still_waiting(list(self.queued))
        except StreamingError as exc:
            logger.warning("cannot check queued streams: %s", exc)
            return  # keep renewing them: the safe side
        for stream_id in list(self.queued):
            if stream_id not in waiting:
                del self.queued[stream_id]

    async def keep_leases(self) -> None:
        """Renew the concurrency leases of running and queued streams until cancelled."""
        interval = self.limiter.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            await self._taken()
            try:
                await self.limiter.renew([*self.reservations.values(), *self.queued.values()])
            except LimiterUnavailable as exc:
                self.metrics.limiter_errors.inc()
                logger.warning("cannot renew concurrency leases: %s", exc)

    async def stream_finished(
        self, route: str, info: StreamInfo, generation: Generation | Replay
    ) -> None:
        """Runs exactly once per stream this process ran, however it ended (a cached
        answer played back too: it settles to nothing). An answer that ended `done` is
        kept in the response cache when its stream has a `cache_key`, on every route,
        before its record is written."""
        outcome = generation.outcome
        await self.settle(info.id, outcome)
        if info.cache_key and self.cache is not None:
            await self.cache.keep(info, generation.text(), outcome)
        self.metrics.stream_finished(route, info.plan, info.model, outcome)
        await self._record(route, info, outcome, generation)

    async def stream_lost(self, info: StreamInfo, outcome: Outcome) -> None:
        """Runs once for a stream ended from its log by a process that did not run it
        (its worker died after writing its end, or it was taken over too many times).
        It is settled from the reservation stored with the stream; a worker that died
        after settling (but before recording the end) was counted and recorded
        already: then only the end is written, nothing twice."""
        if info.billing:
            try:
                reservation = Reservation.from_json(info.billing)
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("stream %s: unreadable reservation: %s", info.id, exc)
            else:
                if not await self._settle(info.id, reservation, outcome):
                    return
        self.metrics.stream_finished("streams", info.plan, info.model, outcome, live=False)
        await self._record("streams", info, outcome, None)

    async def _record(
        self,
        route: str,
        info: StreamInfo,
        outcome: Outcome,
        generation: Generation | Replay | None,
    ) -> None:
        record = self.record(route, info, outcome, generation)
        try:
            await self.records.add(record)
        except StreamingError as exc:
            logger.error("stream %s: cannot store its record: %s", info.id, exc)
        stream_log.info(
            "stream %s %s",
            info.id,
            outcome.status,
            extra={k: v for k, v in record.items() if k not in ("input", "output")},
        )

    def record(
        self,
        route: str,
        info: StreamInfo,
        outcome: Outcome,
        generation: Generation | Replay | None,
    ) -> dict[str, Any]:
        mode = self.records_content
        prompt = output = None
        request_id = None
        attempts = None
        if generation is not None:
            attempts = generation.attempts
            request = generation.request
            request_id = request.request_id
            prompt = json.dumps(
                {
                    "system": request.system,
                    "messages": [[m.role, m.content] for m in request.messages],
                }
            )
            output = generation.text()
        fields: Mapping[str, Any] = {
            "id": info.id,
            "request_id": request_id,
            "subject": info.owner,
            "plan": info.plan,
            "model": info.model,
            "provider": info.provider,
            "route": route,
            "created_at": info.created_at,
            "finished_at": time.time(),
            "outcome": outcome.status,
            "stop_reason": outcome.stop_reason,
            "error_code": outcome.error_code,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost_usd": outcome.cost_usd,
            "ttft_ms": outcome.ttft_ms,
            "duration_ms": outcome.duration_ms,
            "retries": outcome.retries,
            "attempts": attempts,
            "cached": isinstance(generation, Replay),
            "input": content(prompt, mode),
            "output": content(output, mode),
        }
        return dict(fields)
