"""The job queue in process memory: the embedded default. Its API process and its
worker are the same process, so a job is claimed as soon as it is submitted."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from .base import Job, JobQueue


class MemoryJobQueue(JobQueue):
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._waiting: deque[Job] = deque()
        self._claimed: OrderedDict[str, tuple[str, float, Job]] = OrderedDict()
        """Claimed jobs by id: (consumer, last kept, job)."""
        self._seen: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._arrived = asyncio.Event()

    async def submit(self, stream_id: str, payload: bytes, *, now: float) -> None:
        self._waiting.append(Job(str(next(self._ids)), stream_id, payload, now))
        self._arrived.set()

    async def claim(self, consumer: str, count: int, block_s: float) -> list[Job]:
        now = self._clock()
        self._seen[consumer] = now
        if not self._waiting and block_s > 0:
            self._arrived.clear()
            try:
                async with asyncio.timeout(block_s):
                    await self._arrived.wait()
            except TimeoutError:
                return []
        jobs: list[Job] = []
        while self._waiting and len(jobs) < count:
            job = self._waiting.popleft()
            self._claimed[job.id] = (consumer, self._clock(), job)
            jobs.append(job)
        return jobs

    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Job]:
        now = self._clock()
        self._seen[consumer] = now
        jobs: list[Job] = []
        for job_id, (_, kept, job) in list(self._claimed.items()):
            if len(jobs) >= count:
                break
            if now - kept >= idle_s:
                self._claimed[job_id] = (consumer, now, job)
                jobs.append(job)
        return jobs

    async def keep(self, consumer: str, jobs: Sequence[Job], *, beat: bool = True) -> None:
        now = self._clock()
        if beat:
            self._seen[consumer] = now
        for job in jobs:
            if job.id in self._claimed:
                self._claimed[job.id] = (consumer, now, job)

    async def retire(self, consumer: str) -> None:
        self._seen.pop(consumer, None)

    async def release(self, consumer: str, jobs: Sequence[Job]) -> None:
        for job in jobs:
            if job.id in self._claimed:
                self._claimed[job.id] = (consumer, float("-inf"), job)

    async def ack(self, job: Job) -> None:
        self._claimed.pop(job.id, None)

    async def depth(self) -> int:
        return len(self._waiting)

    async def consumers(self, active_s: float) -> int:
        now = self._clock()
        return sum(1 for seen in self._seen.values() if now - seen <= active_s)
