"""The limiter's interface, its typed results, and the error wrapping both backends share.

One call admits a request against every limit of its plan at once, all or nothing: a
request refused by the daily limit consumes nothing from the minute limit. Tokens and
budget are reserved for the worst case at admission and settled to actual usage exactly
once when the stream ends, whichever way it ends.
"""

from __future__ import annotations

import abc
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._exceptions import LimiterUnavailable
from .windows import WindowLimit, WindowState

_T = TypeVar("_T")


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

    def to_json(self) -> str:
        """Everything settlement needs, so any process can settle it. Spelled out
        rather than `dataclasses.asdict`, whose recursive deep copy cost about 3 % of a
        stream start; a unit test holds the two equal."""
        demand = self.demand
        return json.dumps(
            {
                "id": self.id,
                "subject": self.subject,
                "windows": [
                    {
                        "name": w.name,
                        "resource": w.resource,
                        "limit": w.limit,
                        "window_ms": w.window_ms,
                        "buckets": w.buckets,
                    }
                    for w in self.windows
                ],
                "buckets": list(self.buckets),
                "demand": {
                    "requests": demand.requests,
                    "tokens": demand.tokens,
                    "cost_nano_usd": demand.cost_nano_usd,
                },
                "lease": self.lease,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Reservation:
        """The inverse of `to_json`; ValueError if `text` is not a serialised reservation."""
        try:
            raw: Any = json.loads(text)
            reservation = cls(
                id=_typed(raw["id"], str),
                subject=_typed(raw["subject"], str),
                windows=tuple(
                    WindowLimit(
                        name=_typed(w["name"], str),
                        resource=w["resource"],
                        limit=_typed(w["limit"], int),
                        window_ms=_typed(w["window_ms"], int),
                        buckets=_typed(w["buckets"], int),
                    )
                    for w in raw["windows"]
                ),
                buckets=tuple(_typed(b, int) for b in raw["buckets"]),
                demand=Demand(
                    requests=_typed(raw["demand"]["requests"], int),
                    tokens=_typed(raw["demand"]["tokens"], int),
                    cost_nano_usd=_typed(raw["demand"]["cost_nano_usd"], int),
                ),
                lease=_typed(raw["lease"], bool),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a serialised reservation: {exc!r}") from exc
        if any(w.resource not in ("requests", "tokens", "cost_usd") for w in reservation.windows):
            raise ValueError("not a serialised reservation: unknown resource")
        if len(reservation.buckets) != len(reservation.windows):
            raise ValueError("not a serialised reservation: one bucket per window")
        return reservation


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
        """Give back what was reserved beyond actual usage (or charge what was used beyond
        it) and release the lease. Returns False (and changes nothing) if this reservation
        was settled before.

        A refund only takes back what its own reservation added: it never takes a bucket
        below zero, and if the backend no longer remembers the reservation (Redis
        restarted empty, or its record expired) it gives back and charges nothing, since
        the counts it would change may belong to later requests; the lease is still
        released. Such a request stays counted at its worst case until its window passes:
        conservative, never over-admitting."""
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


SETTLED_TTL_MS = 86_400_000
"""How long a settled reservation is remembered, to turn away a second settlement. Once
it is forgotten, a late one finds no record and so changes no count either."""


def pending_ttl_ms(windows: Sequence[WindowLimit]) -> int:
    """How long an unsettled reservation is remembered, so its refund is still given: as
    long as any of its windows may count its weight (a bucket is counted for up to window
    + bucket ms, and kept one bucket longer), and at least as long as a settled one."""
    return max([SETTLED_TTL_MS, *(w.window_ms + 2 * w.bucket_ms for w in windows)])


def _typed(value: object, kind: type[_T]) -> _T:
    # bool is an int in Python, never in the JSON written by `to_json`
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def _refund(limit: WindowLimit, demand: Demand, tokens: int, cost_nano_usd: int) -> int:
    """Reserved minus actual. Negative when a stream used more than reserved (the input
    estimate was low): then settling charges the difference, so no token goes unbilled."""
    if limit.resource == "tokens":
        return demand.tokens - tokens
    if limit.resource == "cost_usd":
        return demand.cost_nano_usd - cost_nano_usd
    return 0
