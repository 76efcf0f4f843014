"""The stream log: where a generation's events live, so readers can come and go.

A generation appends numbered events; readers replay from any id and then follow. The log
also carries the small amount of coordination that must work across processes: who owns
a stream, whether a reader is attached (for orphan cancellation), whether the generating
process is still alive (so a reader never waits forever on a crashed one), and cancel
requests from any process.

Liveness is kept as expiring flags rather than timestamps, so every process judges it by
one clock: the store's.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .._exceptions import StreamFenced
from ..events import Event

logger = logging.getLogger("sserelay.streamlog")


StreamStatus = Literal[
    "running", "done", "error", "cancelled", "orphaned", "client_gone", "shutdown", "lost"
]
"""How a stream stands: `running` until it ends, then how it ended. `lost`: the process
generating it died and another one wrote its end."""

STREAM_STATUSES: tuple[StreamStatus, ...] = (
    "running",
    "done",
    "error",
    "cancelled",
    "orphaned",
    "client_gone",
    "shutdown",
    "lost",
)


@dataclass(slots=True)
class StreamInfo:
    id: str
    owner: str
    model: str
    provider: str
    plan: str
    max_tokens: int
    created_at: float
    status: StreamStatus = "running"
    input_tokens: int = 0
    """The prompt's estimated tokens: what a stream whose process died is billed for
    its input (the provider's report died with it)."""
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    billing: str = ""
    """Opaque to this package: what the app needs to settle the stream's usage from any
    process (its rate-limit reservation). Never shown to clients."""
    cache_key: str = ""
    """Opaque to this package: where the app keeps the answer once the stream ends
    `done` (its response-cache key); empty: it is not kept. Never shown to clients."""

    def as_dict(self) -> dict[str, str | int | float]:
        """The public view (what `GET /v1/streams/{id}` shows)."""
        return {
            "id": self.id,
            "owner": self.owner,
            "model": self.model,
            "provider": self.provider,
            "plan": self.plan,
            "max_tokens": self.max_tokens,
            "created_at": self.created_at,
            "status": self.status,
        }

    def fields(self) -> dict[str, str | int | float]:
        """Everything, for storage."""
        return {
            **self.as_dict(),
            "input_tokens": self.input_tokens,
            "input_usd_per_mtok": self.input_usd_per_mtok,
            "output_usd_per_mtok": self.output_usd_per_mtok,
            "billing": self.billing,
            "cache_key": self.cache_key,
        }


@dataclass(frozen=True, slots=True)
class Control:
    """What the supervisor of a running stream needs to know, read in one round trip."""

    cancel_requested: bool
    reader_attached: bool
    owned: bool = True
    """False: another process took the stream over (its epoch moved on): stop at once,
    writing nothing."""


@dataclass(frozen=True, slots=True)
class Liveness:
    """What a waiting reader needs to know: `status`, and whether the process generating
    a running stream still renews its lease (None = the stream is gone)."""

    status: StreamStatus
    generating: bool


class StreamLog(abc.ABC):
    """Storage for streams. Every key written expires (`ttl_s` after the stream ends,
    `ttl_s + max_duration_s` while it runs)."""

    def __init__(self, *, ttl_s: float, max_duration_s: float, max_events: int) -> None:
        self.ttl_s = ttl_s
        self.max_duration_s = max_duration_s
        self.max_events = max_events

    @abc.abstractmethod
    async def create(
        self, info: StreamInfo, *, reader_grace_s: float, lease_s: float | None = None
    ) -> None:
        """Register a stream; a reader counts as attached for `reader_grace_s`, giving the
        client time to connect. With `lease_s`, the creator owns the generation at
        once (epoch 1); without, whoever `take`s it first does."""

    @abc.abstractmethod
    async def take(self, stream_id: str, lease_s: float) -> int:
        """Become the one process generating a stream, atomically: only if it is still
        `running` and nobody holds its lease. Returns the new fencing epoch (1 for the
        first owner, one more for each takeover); 0 if the stream ended, -1 if a live
        owner holds it, -2 if there is no such stream (not yet, or no longer). Every
        later write of the caller carries the epoch and is refused once another process
        took the stream over."""

    @abc.abstractmethod
    async def waiting(self, stream_ids: Collection[str]) -> set[str]:
        """Those of `stream_ids` that still wait for their first owner (running, never
        taken): their process of admission keeps their rate-limit leases alive until
        a worker holds them."""

    @abc.abstractmethod
    async def release(self, stream_id: str, epoch: int) -> None:
        """Give the lease up at once (if still the owner), so another process may take
        the stream over now rather than after the lease runs out."""

    @abc.abstractmethod
    async def info(self, stream_id: str) -> StreamInfo | None: ...

    @abc.abstractmethod
    async def append(self, stream_id: str, events: Sequence[Event], *, epoch: int = 1) -> None:
        """Append events whose ids continue the stream's sequence, if `epoch` is still the
        stream's (checked in the same atomic step); else raise `StreamFenced`."""

    @abc.abstractmethod
    async def finish(self, stream_id: str, status: StreamStatus, *, epoch: int = 1) -> None:
        """Record the final status, drop the lease and shorten every key's life to
        `ttl_s`; fenced like `append`."""

    @abc.abstractmethod
    async def read(
        self, stream_id: str, after: int, *, block_s: float = 0.0, limit: int = 1000
    ) -> list[Event]:
        """Events with id > `after`, waiting up to `block_s` for the first one."""

    @abc.abstractmethod
    async def touch_reader(self, stream_id: str, grace_s: float) -> Liveness | None:
        """A reader is attached (for `grace_s` more); returns the stream's liveness."""

    @abc.abstractmethod
    async def request_cancel(self, stream_id: str) -> None: ...

    @abc.abstractmethod
    async def renew(self, streams: Mapping[str, int], lease_s: float) -> dict[str, Control]:
        """Renew the generation lease of the streams this process runs (by id, with the
        epoch it owns them at), unless another process took them over; report their
        control flags. One call for all of a process's streams."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise `StreamLogError` if the store cannot be reached."""

    async def aclose(self) -> None:
        return None


class LogWriter:
    """Appends a generation's events without making the generation wait for the store.

    Events queue up while one append is in flight and go in the next one, so an idle
    stream writes each event at once (no added latency) and a busy one writes in
    batches (fewer round trips). Order is kept; `close` waits for everything.
    """

    def __init__(self, log: StreamLog, stream_id: str, epoch: int = 1) -> None:
        self._log = log
        self._id = stream_id
        self.epoch = epoch
        self._pending: list[Event] = []
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def add(self, event: Event) -> None:
        if self.error is not None:
            return  # after a failed append, a later one would leave a gap in the ids
        self._pending.append(event)
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._log.append(self._id, batch, epoch=self.epoch)
        except Exception as exc:
            self.error = exc
            if not isinstance(exc, StreamFenced):
                logger.error("stream %s: cannot append to the stream log: %s", self._id, exc)
            self._pending.clear()
        finally:
            self._task = None

    async def close(self) -> None:
        while self._task is not None:
            await asyncio.shield(self._task)
