"""Each caller's latest decision on this process, remembered for a moment.

A stream is opened by two requests in quick succession: `POST /v1/streams`, which is
admitted by the limiter, then `GET` of its events URL, whose response carries the same
rate-limit headers as any other. Asking the limiter again for that GET costs a Redis
script and a round trip on the production path of every EventSource client, for
headers that EventSource cannot even read. The decision the POST just got says the same
thing (what is left after it), so a report within `max_age_s` of a decision for the same
caller and plan on the same process uses it; a refusal is remembered too, so the next
report never contradicts a 429 just given. Only reports: admission always asks the
limiter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import Decision


class RecentDecisions:
    """`max_entries` callers at most (the oldest are dropped first); `max_age_s` 0: off."""

    __slots__ = ("max_age_s", "max_entries", "_clock", "_decisions")

    def __init__(
        self,
        max_age_s: float = 1.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        self._clock = clock
        self._decisions: dict[tuple[str, str], tuple[float, Decision]] = {}

    def put(self, subject: str, plan: str, decision: Decision) -> None:
        """The latest decision for `subject` under `plan` (a caller's API key and token
        may carry different plans: each has its own state)."""
        if self.max_age_s <= 0:
            return
        decisions = self._decisions
        key = (subject, plan)
        decisions.pop(key, None)  # re-inserted last: the dict stays oldest first
        decisions[key] = (self._clock(), decision)
        while len(decisions) > self.max_entries:
            del decisions[next(iter(decisions))]

    def get(self, subject: str, plan: str) -> Decision | None:
        key = (subject, plan)
        entry = self._decisions.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self.max_age_s:
            del self._decisions[key]
            return None
        return entry[1]

    def __len__(self) -> int:
        return len(self._decisions)
