"""The limiter in process memory: the embedded default, same semantics as Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .base import Decision, Demand, Limiter, Reservation
from .windows import WindowLimit, evaluate


def _wall_ms() -> int:
    return int(time.time() * 1000)


class MemoryLimiter(Limiter):
    """Each call runs without awaiting, so under asyncio it is atomic as a Lua script is."""

    def __init__(self, *, lease_ttl_ms: int = 30_000, clock: Callable[[], int] = _wall_ms) -> None:
        super().__init__(lease_ttl_ms=lease_ttl_ms)
        self._clock = clock
        self._counts: dict[tuple[str, str], dict[int, int]] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._settled: dict[str, int] = {}
        self._next_sweep = 0

    async def _acquire(
        self,
        subject: str,
        windows: tuple[WindowLimit, ...],
        demand: Demand,
        concurrency_limit: int | None,
        reservation_id: str,
        *,
        commit: bool,
    ) -> Decision:
        now = self._clock()
        in_use = 0
        allowed = True
        if concurrency_limit is not None:
            leases = self._leases.setdefault(subject, {})
            for lease_id in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[lease_id]
            in_use = len(leases)
            allowed = in_use < concurrency_limit or not commit
        states = []
        spans = []
        for window in windows:
            counts = self._counts.setdefault((subject, window.key), {})
            lo, hi = window.span(now)
            for k in [k for k in counts if k < lo]:
                del counts[k]
            ok, state = evaluate(window, counts, now, demand.weight(window))
            allowed = allowed and ok
            states.append(state)
            spans.append(hi)
        reservation = None
        if allowed and commit:
            for window, bucket in zip(windows, spans, strict=True):
                weight = demand.weight(window)
                if weight:
                    counts = self._counts[(subject, window.key)]
                    counts[bucket] = counts.get(bucket, 0) + weight
            lease = concurrency_limit is not None
            if lease:
                self._leases[subject][reservation_id] = now + self.lease_ttl_ms
            reservation = Reservation(reservation_id, subject, windows, tuple(spans), demand, lease)
        return Decision(allowed, now, tuple(states), concurrency_limit, in_use, reservation)

    async def _settle(self, reservation: Reservation, refunds: tuple[int, ...]) -> bool:
        now = self._clock()
        if now >= self._next_sweep:  # forget old settlements, at most once a minute
            self._next_sweep = now + 60_000
            for key in [k for k, expiry in self._settled.items() if expiry <= now]:
                del self._settled[key]
        if reservation.id in self._settled:
            return False
        self._settled[reservation.id] = now + 86_400_000
        if reservation.lease:
            self._leases.get(reservation.subject, {}).pop(reservation.id, None)
        for window, bucket, refund in zip(
            reservation.windows, reservation.buckets, refunds, strict=True
        ):
            counts = self._counts.get((reservation.subject, window.key))
            if refund and counts is not None and bucket in counts:
                counts[bucket] -= refund
        return True

    async def _renew(self, reservations: Sequence[Reservation]) -> None:
        now = self._clock()
        for reservation in reservations:
            leases = self._leases.get(reservation.subject, {})
            if reservation.id in leases:
                leases[reservation.id] = now + self.lease_ttl_ms
