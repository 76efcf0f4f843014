"""Generation jobs: what the HTTP tier hands to whoever generates.

An API process submits a job per stream; workers claim jobs up to their free slots
(so load spreads by pull), keep the ones they run fresh, and acknowledge them when the
stream ends. A job whose worker stopped keeping it fresh (it died, was paused, lost its
network) becomes claimable again after the lease (`reclaim`), so another worker takes
the stream over. A worker that drains `release`s its jobs for immediate takeover.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass

from .._exceptions import StreamingError


class QueueError(StreamingError):
    """The queue's storage failed."""

    code = "queue_unavailable"


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    """The queue's id for the job (not the stream's)."""
    stream_id: str
    payload: bytes
    """Opaque to the queue: everything a worker needs to run the stream."""
    enqueued_at: float
    """Wall-clock time of submission (for the queue-wait metric)."""


class JobQueue(abc.ABC):
    @abc.abstractmethod
    async def submit(self, stream_id: str, payload: bytes, *, now: float) -> None: ...

    @abc.abstractmethod
    async def claim(self, consumer: str, count: int, block_s: float) -> list[Job]:
        """Up to `count` jobs nobody has claimed yet, waiting up to `block_s` for one."""

    @abc.abstractmethod
    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Job]:
        """Up to `count` claimed jobs that their consumer has not kept fresh for `idle_s`
        (or released), now claimed by `consumer`."""

    @abc.abstractmethod
    async def keep(self, consumer: str, jobs: Sequence[Job], *, beat: bool = True) -> None:
        """These jobs are still being worked on by `consumer`: reset their idle time.
        `beat`: `consumer` also counts as a live worker, one that takes jobs over."""

    @abc.abstractmethod
    async def retire(self, consumer: str) -> None:
        """`consumer` takes no more jobs (it drains): it no longer counts as alive."""

    @abc.abstractmethod
    async def release(self, consumer: str, jobs: Sequence[Job]) -> None:
        """Give the jobs up: the next `reclaim` of any consumer takes them."""

    @abc.abstractmethod
    async def ack(self, job: Job) -> None:
        """The job is over: remove it."""

    @abc.abstractmethod
    async def depth(self) -> int:
        """Jobs submitted and not yet claimed."""

    @abc.abstractmethod
    async def consumers(self, active_s: float) -> int:
        """How many consumers (workers) were active within the last `active_s`."""

    async def aclose(self) -> None:
        return None
