"""The job queue as a Redis Stream consumer group: Redis's own work queue.

    {prefix}jobs      Redis Stream; entry fields s (stream id), p (payload), t (submitted)
                      group `workers`: one consumer per worker process
    {prefix}workers   sorted set: each worker's last beat (ms), for `consumers` (the
                      group's own idle times are not refreshed by a worker that waits
                      with nothing to do, on Redis 7.0)

XADD submits, XREADGROUP claims (only as many as the worker has free slots), XCLAIM with
JUSTID keeps a running job's idle time at zero, XAUTOCLAIM takes over jobs idle past the
lease (their worker stopped), XACK + XDEL end a job. A draining worker releases its jobs
by setting their idle time past any lease (XCLAIM IDLE), so they are taken over at the
next XAUTOCLAIM of another worker instead of after the lease.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from .base import Job, JobQueue, QueueError

logger = logging.getLogger("sserelay.queue")

_GROUP = "workers"
_RELEASED_IDLE_MS = 10 * 365 * 86400 * 1000


class RedisJobQueue(JobQueue):
    def __init__(
        self, client: aioredis.Redis, *, blocking: aioredis.Redis, prefix: str = "sserelay:"
    ) -> None:
        """`blocking`: a client whose connections may wait in XREADGROUP ... BLOCK."""
        self._r = client
        self._blocking = blocking
        self._key = f"{prefix}jobs"
        self._beats = f"{prefix}workers"
        self._ready = False
        self._known: set[str] = set()

    async def _group(self) -> None:
        if self._ready:
            return
        try:
            await self._r.xgroup_create(self._key, _GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    async def submit(self, stream_id: str, payload: bytes, *, now: float) -> None:
        try:
            await self._r.xadd(self._key, {"s": stream_id, "p": payload, "t": repr(now)})
        except RedisError as exc:
            raise QueueError(f"cannot queue the job: {exc}") from exc

    async def claim(self, consumer: str, count: int, block_s: float) -> list[Job]:
        try:
            await self._group()
            if consumer not in self._known:
                await self.keep(consumer, ())  # counted alive from its first claim
                self._known.add(consumer)
            reply: Any = await self._blocking.xreadgroup(
                _GROUP,
                consumer,
                {self._key: ">"},
                count=count,
                block=max(1, int(block_s * 1000)) if block_s > 0 else None,
            )
        except ResponseError as exc:
            if "NOGROUP" in str(exc):  # the key was deleted (FLUSHALL): make it again
                self._ready = False
                self._known.clear()
            raise QueueError(f"cannot claim jobs: {exc}") from exc
        except RedisError as exc:
            raise QueueError(f"cannot claim jobs: {exc}") from exc
        if not reply:
            return []
        try:
            return await self._jobs(reply[0][1])
        except RedisError as exc:
            raise QueueError(f"cannot claim jobs: {exc}") from exc

    async def reclaim(self, consumer: str, idle_s: float, count: int) -> list[Job]:
        """Scans the whole pending list (XAUTOCLAIM looks at ten entries per job asked
        for, then returns a cursor): idle jobs behind many live ones are found too."""
        jobs: list[Job] = []
        cursor: Any = "0-0"
        try:
            await self._group()
            for _ in range(1000):
                reply: Any = await self._r.xautoclaim(
                    self._key,
                    _GROUP,
                    consumer,
                    int(idle_s * 1000),
                    cursor,
                    count=count - len(jobs),
                )
                jobs += await self._jobs(reply[1])
                cursor = reply[0]
                if len(jobs) >= count or cursor in (b"0-0", "0-0"):
                    break
        except RedisError as exc:
            raise QueueError(f"cannot reclaim jobs: {exc}") from exc
        return jobs

    async def _jobs(self, entries: Any) -> list[Job]:
        """The jobs among `entries`; entries deleted meanwhile (None) are skipped, and
        an entry this version cannot read is dropped (logged) rather than claimed
        again and again."""
        jobs = []
        for entry in entries:
            if not entry or not entry[1]:
                continue
            try:
                jobs.append(_job(entry))
            except (KeyError, ValueError, UnicodeDecodeError):
                logger.error("job %s is unreadable; dropped", _text(entry[0]))
                async with self._r.pipeline(transaction=True) as pipe:
                    pipe.xack(self._key, _GROUP, entry[0])
                    pipe.xdel(self._key, entry[0])
                    await pipe.execute()
        return jobs

    async def keep(self, consumer: str, jobs: Sequence[Job], *, beat: bool = True) -> None:
        if not jobs and not beat:
            return
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                if beat:
                    pipe.zadd(self._beats, {consumer: int(time.time() * 1000)})
                if jobs:
                    pipe.xclaim(
                        self._key, _GROUP, consumer, 0, [job.id for job in jobs], justid=True
                    )
                await pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot keep jobs: {exc}") from exc

    async def retire(self, consumer: str) -> None:
        try:
            await self._r.zrem(self._beats, consumer)
        except RedisError as exc:
            raise QueueError(f"cannot leave the queue: {exc}") from exc

    async def release(self, consumer: str, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        try:
            await self._r.xclaim(
                self._key,
                _GROUP,
                consumer,
                0,
                [job.id for job in jobs],
                idle=_RELEASED_IDLE_MS,
                justid=True,
            )
        except RedisError as exc:
            raise QueueError(f"cannot release jobs: {exc}") from exc

    async def ack(self, job: Job) -> None:
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.xack(self._key, _GROUP, job.id)
                pipe.xdel(self._key, job.id)
                await pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot acknowledge the job: {exc}") from exc

    async def depth(self) -> int:
        try:
            await self._group()
            groups: Any = await self._r.xinfo_groups(self._key)
        except RedisError as exc:
            raise QueueError(f"cannot read the queue: {exc}") from exc
        for group in groups:
            if _text(group.get("name")) == _GROUP:
                lag = group.get("lag")
                if lag is not None:
                    return int(lag)
                length = int(await self._r.xlen(self._key))
                return max(0, length - int(group.get("pending", 0)))
        return 0

    async def consumers(self, active_s: float) -> int:
        now = int(time.time() * 1000)
        try:
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.zcount(self._beats, now - int(active_s * 1000), "+inf")
                pipe.zremrangebyscore(self._beats, "-inf", now - 3_600_000)  # gone an hour
                alive, _ = await pipe.execute()
        except RedisError as exc:
            raise QueueError(f"cannot read the queue: {exc}") from exc
        return int(alive)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _job(entry: Any) -> Job:
    entry_id, fields = entry
    return Job(
        id=_text(entry_id),
        stream_id=fields[b"s"].decode(),
        payload=fields[b"p"],
        enqueued_at=float(fields.get(b"t", b"0")),
    )
