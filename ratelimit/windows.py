"""The sliding-window algorithm, storage aside.

A window of length W is split into `buckets` buckets of b = ceil(W / buckets) ms; each
bucket counts the weight admitted during it. A request of weight w at time t is admitted
iff the buckets that overlap (t - W, t] hold at most L - w.

Strict: take any interval of length W and the last admission in it, at t. Every other
admission in the interval happened in (t - W, t], so it sits in a bucket that was counted
when t was decided; the interval therefore holds at most L. This holds at window
boundaries and across any number of processes, because the decision and the increment
happen in one atomic step per principal.

Conservative, by a bounded amount: the counted buckets can reach back up to W + b, so a
request may be refused while an exact sliding log would admit it, but only because of
weight admitted in the oldest bucket, at most b ms older than the window (b = W / 60
by default: one second of a minute, 24 minutes of a day). Memory per principal is
`buckets + 1` counters per limit, whatever the limit.

The Redis backend runs the same arithmetic in Lua (`acquire.lua`); the tests check that
both backends decide identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

NANO_USD = 1_000_000_000


@dataclass(frozen=True, slots=True)
class WindowLimit:
    name: str
    resource: Literal["requests", "tokens", "cost_usd"]
    limit: int
    window_ms: int
    buckets: int = 60

    @property
    def bucket_ms(self) -> int:
        return -(-self.window_ms // self.buckets)

    @property
    def key(self) -> str:
        """Where its counts live: the geometry is part of it, so two windows never share
        counts, and a reloaded plan that reshapes a window starts that window afresh."""
        return f"{self.name}:{self.window_ms}:{self.bucket_ms}"

    def span(self, now_ms: int) -> tuple[int, int]:
        """First and last bucket index counted at `now_ms`."""
        b = self.bucket_ms
        return (now_ms - self.window_ms) // b, now_ms // b


@dataclass(frozen=True, slots=True)
class WindowState:
    """One limit as seen at one moment: used before this request, and when it frees up."""

    limit: WindowLimit
    used: int
    retry_after_ms: int | None
    """When this request could be admitted, if refused; None if it never could be."""
    reset_ms: int
    """When the oldest counted weight leaves the window (0 if nothing is counted)."""

    @property
    def remaining(self) -> int:
        return max(0, self.limit.limit - self.used)


def evaluate(
    limit: WindowLimit, counts: Mapping[int, int], now_ms: int, weight: int
) -> tuple[bool, WindowState]:
    """Decide one limit from its bucket counts. Buckets later than now count too: after
    the clock steps back (a failover to a replica with a skewed clock), what was admitted
    "in the future" must still hold the limit."""
    lo, _ = limit.span(now_ms)
    counted = sorted(k for k in counts if k >= lo)
    used = sum(counts[k] for k in counted)
    b = limit.bucket_ms
    reset_ms = 0
    for k in counted:
        if counts[k] > 0:
            reset_ms = max(0, (k + 1) * b + limit.window_ms - now_ms)
            break
    allowed = used + weight <= limit.limit
    retry: int | None = 0
    if not allowed:
        retry = None
        if weight <= limit.limit:
            freed = 0
            for k in counted:
                freed += counts[k]
                if used - freed + weight <= limit.limit:
                    retry = max(1, (k + 1) * b + limit.window_ms - now_ms)
                    break
    return allowed, WindowState(limit, used, retry, reset_ms)
