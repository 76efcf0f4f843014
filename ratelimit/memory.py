"""The limiter in process memory: the embedded default, same semantics as Redis.

Nothing here is lost short of the process itself, which takes its reservations with it;
a reservation's record expires as its Redis key does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .base import SETTLED_TTL_MS, Decision, Demand, Limiter, Reservation, pending_ttl_ms
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
        self._markers: dict[str, tuple[bool, int]] = {}
        """Reservation id -> (settled, expiry ms), as the Redis marker keys."""
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
            self._sweep(now)
            self._markers[reservation_id] = (False, now + pending_ttl_ms(windows))
            reservation = Reservation(reservation_id, subject, windows, tuple(spans), demand, lease)
        return Decision(allowed, now, tuple(states), concurrency_limit, in_use, reservation)

    async def _settle(self, reservation: Reservation, refunds: tuple[int, ...]) -> bool:
        now = self._clock()
        self._sweep(now)
        settled, expiry = self._markers.get(reservation.id, (False, 0))
        known = expiry > now
        if known and settled:
            return False
        self._markers[reservation.id] = (True, now + SETTLED_TTL_MS)
        if reservation.lease:
            self._leases.get(reservation.subject, {}).pop(reservation.id, None)
        if not known:  # forgotten: its buckets may count only later requests now
            return True
        for window, bucket, refund in zip(
            reservation.windows, reservation.buckets, refunds, strict=True
        ):
            counts = self._counts.get((reservation.subject, window.key))
            if refund and counts is not None and bucket in counts:
                if refund > 0:  # give back no more than the bucket holds
                    refund = min(refund, max(counts[bucket], 0))
                counts[bucket] -= refund
        return True

    def _sweep(self, now: int) -> None:
        """Forget expired reservation records, at most once a minute."""
        if now >= self._next_sweep:
            self._next_sweep = now + 60_000
            for key in [k for k, (_, expiry) in self._markers.items() if expiry <= now]:
                del self._markers[key]

    async def _renew(self, reservations: Sequence[Reservation]) -> None:
        now = self._clock()
        for reservation in reservations:
            leases = self._leases.get(reservation.subject, {})
            if reservation.id in leases:
                leases[reservation.id] = now + self.lease_ttl_ms
