"""The limiter's interface, its typed results, and the error wrapping both backends share.

One call admits a request against every limit of its plan at once, all or nothing: a
request refused by the daily limit consumes nothing from the minute limit. Tokens and
budget are reserved for the worst case at admission and settled to actual usage exactly
once when the stream ends, whichever way it ends.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from ._exceptions import LimiterUnavailable
from .windows import WindowLimit, WindowState


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request asks for: itself, and its worst-case tokens and cost."""

    requests: int = 1
    tokens: int = 0
    cost_nano_usd: int = 0

    def weight(self, limit: WindowLimit) -> int:
        if limit.resource == "requests":
            return self.requests
        if limit.resource == "tokens":
            return self.tokens
        return self.cost_nano_usd


@dataclass(frozen=True, slots=True)
class Reservation:
    """What an admission took, and where, so settlement can give back the difference."""

    id: str
    subject: str
    windows: tuple[WindowLimit, ...]
    buckets: tuple[int, ...]
    """The bucket each window's weight went into, in `windows` order."""
    demand: Demand
    lease: bool
    """Whether a concurrency lease (named by `id`) was taken."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    now_ms: int
    windows: tuple[WindowState, ...]
    concurrency_limit: int | None = None
    concurrency_in_use: int = 0
    """Leases held before this request."""
    reservation: Reservation | None = None

    @property
    def violated(self) -> list[str]:
        names = [s.limit.name for s in self.windows if s.retry_after_ms != 0]
        if self.concurrency_limit is not None and self.concurrency_in_use >= self.concurrency_limit:
            names.append("concurrent_streams")
        return names if not self.allowed else []

    @property
    def retry_after_ms(self) -> int | None:
        """When every refusing limit would admit this request; None if one never will.
        A full concurrency limit frees up when a stream ends: no time can be promised,
        so it counts as one second (a polite retry interval)."""
        waits: list[int] = []
        for state in self.windows:
            if state.retry_after_ms is None:
                return None
            waits.append(state.retry_after_ms)
        if "concurrent_streams" in self.violated:
            waits.append(1000)
        return max(waits, default=0)


class Limiter(abc.ABC):
    """Backends implement the underscored methods; callers see `LimiterUnavailable` for
    every backend failure, whatever the backend."""

    backend_errors: tuple[type[BaseException], ...] = ()

    def __init__(self, *, lease_ttl_ms: int = 30_000) -> None:
        self.lease_ttl_ms = lease_ttl_ms

    async def acquire(
        self,
        subject: str,
        windows: Sequence[WindowLimit],
        demand: Demand,
        *,
        concurrency_limit: int | None = None,
    ) -> Decision:
        reservation_id = uuid.uuid4().hex
        try:
            return await self._acquire(
                subject, tuple(windows), demand, concurrency_limit, reservation_id, commit=True
            )
        except self.backend_errors as exc:
            raise LimiterUnavailable(f"rate limiter backend failed: {exc}") from exc

    async def usage(
        self, subject: str, windows: Sequence[WindowLimit], *, concurrency_limit: int | None = None
    ) -> Decision:
        """The current state, consuming nothing."""
        try:
            return await self._acquire(
                subject, tuple(windows), Demand(requests=0), concurrency_limit, "", commit=False
            )
        except self.backend_errors as exc:
            raise LimiterUnavailable(f"rate limiter backend failed: {exc}") from exc

    async def settle(self, reservation: Reservation, *, tokens: int, cost_nano_usd: int) -> bool:
        """Give back what was reserved beyond actual usage and release the lease.
        Returns False (and changes nothing) if this reservation was settled before."""
        refunds = tuple(
            _refund(w, reservation.demand, tokens, cost_nano_usd) for w in reservation.windows
        )
        try:
            return await self._settle(reservation, refunds)
        except self.backend_errors as exc:
            raise LimiterUnavailable(f"rate limiter backend failed: {exc}") from exc

    async def renew(self, reservations: Sequence[Reservation]) -> None:
        """Keep the leases of running streams alive."""
        leased = [r for r in reservations if r.lease]
        if not leased:
            return
        try:
            await self._renew(leased)
        except self.backend_errors as exc:
            raise LimiterUnavailable(f"rate limiter backend failed: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._ping()
        except self.backend_errors as exc:
            raise LimiterUnavailable(f"rate limiter backend failed: {exc}") from exc

    @abc.abstractmethod
    async def _acquire(
        self,
        subject: str,
        windows: tuple[WindowLimit, ...],
        demand: Demand,
        concurrency_limit: int | None,
        reservation_id: str,
        *,
        commit: bool,
    ) -> Decision: ...

    @abc.abstractmethod
    async def _settle(self, reservation: Reservation, refunds: tuple[int, ...]) -> bool: ...

    @abc.abstractmethod
    async def _renew(self, reservations: Sequence[Reservation]) -> None: ...

    async def _ping(self) -> None:
        return None


def _refund(limit: WindowLimit, demand: Demand, tokens: int, cost_nano_usd: int) -> int:
    """Reserved minus actual. Negative when a stream used more than reserved (the input
    estimate was low): then settling charges the difference, so no token goes unbilled."""
    if limit.resource == "tokens":
        return demand.tokens - tokens
    if limit.resource == "cost_usd":
        return demand.cost_nano_usd - cost_nano_usd
    return 0
