"""One contract, two stores: the memory and the Redis job queue must behave alike."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from app.redis_client import redis_clients
from streaming import JobQueue, MemoryJobQueue, RedisJobQueue

pytestmark = pytest.mark.redis


@pytest.fixture(params=["memory", "redis"])
async def queue(request: pytest.FixtureRequest) -> AsyncIterator[JobQueue]:
    if request.param == "memory":
        yield MemoryJobQueue()
        return
    client, tail, _ = redis_clients(request.getfixturevalue("redis_url"), max_connections=20)
    try:
        yield RedisJobQueue(client, blocking=tail, prefix=f"t-{uuid.uuid4().hex[:6]}:")
    finally:
        await client.aclose()
        await tail.aclose()


async def test_claims_only_as_many_as_asked_in_order(queue: JobQueue) -> None:
    for i in range(5):
        await queue.submit(f"s{i}", f"p{i}".encode(), now=time.time())
    assert await queue.depth() == 5
    first = await queue.claim("a", 2, block_s=0.1)
    assert [j.stream_id for j in first] == ["s0", "s1"]
    assert first[0].payload == b"p0" and first[0].enqueued_at > 0
    rest = await queue.claim("b", 10, block_s=0.1)
    assert [j.stream_id for j in rest] == ["s2", "s3", "s4"]
    assert await queue.depth() == 0
    assert await queue.claim("a", 10, block_s=0.05) == []


async def test_a_waiting_claim_wakes_on_submit(queue: JobQueue) -> None:
    await queue.claim("a", 1, block_s=0.01)  # the group exists before anyone submits
    waiting = asyncio.create_task(queue.claim("a", 1, block_s=5))
    await asyncio.sleep(0.1)
    await queue.submit("s", b"p", now=time.time())
    jobs = await asyncio.wait_for(waiting, 5)
    assert [j.stream_id for j in jobs] == ["s"]


async def test_jobs_idle_past_the_lease_are_taken_over_unless_kept(queue: JobQueue) -> None:
    await queue.submit("kept", b"1", now=time.time())
    await queue.submit("dead", b"2", now=time.time())
    jobs = {j.stream_id: j for j in await queue.claim("a", 2, block_s=0.1)}
    assert await queue.reclaim("b", 0.3, 10) == []  # not idle yet
    await asyncio.sleep(0.2)
    await queue.keep("a", [jobs["kept"]])
    await asyncio.sleep(0.2)
    taken = await queue.reclaim("b", 0.3, 10)
    assert [j.stream_id for j in taken] == ["dead"]
    assert await queue.reclaim("c", 0.3, 10) == []  # b holds it now, freshly
    await queue.ack(taken[0])
    await queue.ack(jobs["kept"])
    await asyncio.sleep(0.35)
    assert await queue.reclaim("c", 0.3, 10) == []  # acknowledged jobs are gone


async def test_released_jobs_are_taken_over_at_once(queue: JobQueue) -> None:
    await queue.submit("s", b"p", now=time.time())
    [job] = await queue.claim("a", 1, block_s=0.1)
    await queue.release("a", [job])
    taken = await queue.reclaim("b", 30, 10)
    assert [j.stream_id for j in taken] == ["s"]


async def test_counts_the_consumers_active_lately(queue: JobQueue) -> None:
    await queue.claim("a", 1, block_s=0.01)
    await queue.claim("b", 1, block_s=0.01)
    assert await queue.consumers(5) == 2
    await asyncio.sleep(0.3)
    await queue.keep("a", [])  # a worker beats every tick, busy or not
    assert await queue.consumers(0.2) == 1


async def test_idle_jobs_behind_many_live_ones_are_found(queue: JobQueue) -> None:
    """XAUTOCLAIM looks at ten pending entries per job asked for: the scan goes on from
    its cursor, or a dead worker's jobs behind a busy one's would never be taken over."""
    for i in range(25):
        await queue.submit(f"live{i}", b"x", now=time.time())
    live = await queue.claim("busy", 25, block_s=0.1)
    for i in range(5):
        await queue.submit(f"dead{i}", b"x", now=time.time())
    await queue.claim("dead", 5, block_s=0.1)
    await asyncio.sleep(0.35)
    await queue.keep("busy", live)
    taken = await queue.reclaim("spare", 0.3, 2)
    assert [j.stream_id for j in taken] == ["dead0", "dead1"]


async def test_a_retired_worker_no_longer_counts(queue: JobQueue) -> None:
    await queue.keep("a", [])
    await queue.keep("b", [])
    assert await queue.consumers(5) == 2
    await queue.retire("a")
    await queue.keep("a", [], beat=False)  # draining: keeps its jobs, does not beat
    assert await queue.consumers(5) == 1
