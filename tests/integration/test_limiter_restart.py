"""Settlement after Redis lost its data: a refund only gives back what its own
reservation added, so counts never go negative and never hide newer admissions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from ratelimit import Demand, LimiterUnavailable, RedisLimiter, WindowLimit
from tests.support import RedisServer, free_port

pytestmark = pytest.mark.redis

T0 = 1_800_000_000_000
TPD = WindowLimit("tokens_per_day", "tokens", 100_000, 86_400_000)
T = TypeVar("T")


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """Its own server: these tests flush and restart it."""
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
async def private_client(private_redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(private_redis.url)
    yield client
    await client.aclose()


async def eventually(call: Callable[[], Awaitable[T]], attempts: int = 100) -> T:
    """The first calls after a restart may meet the connections of the old server."""
    for _ in range(attempts):
        try:
            return await call()
        except LimiterUnavailable:
            await asyncio.sleep(0.05)
    return await call()


async def test_settling_after_redis_lost_its_data_never_goes_negative(
    private_client: aioredis.Redis,
) -> None:
    limiter = RedisLimiter(private_client, prefix="t-flush:", clock=lambda: T0)
    first = await limiter.acquire("u", [TPD], Demand(tokens=40_000), concurrency_limit=2)
    assert first.reservation is not None
    await private_client.flushdb()  # what a restart without persistence leaves
    second = await limiter.acquire("u", [TPD], Demand(tokens=1_500), concurrency_limit=2)
    assert second.reservation is not None
    assert await limiter.settle(first.reservation, tokens=1_454, cost_nano_usd=0)
    usage = await limiter.usage("u", [TPD], concurrency_limit=2)
    assert usage.windows[0].used == 1_500  # the second reservation, untouched
    assert usage.concurrency_in_use == 1  # only the second stream's lease
    assert not await limiter.settle(first.reservation, tokens=0, cost_nano_usd=0)
    assert await limiter.settle(second.reservation, tokens=1_000, cost_nano_usd=0)
    usage = await limiter.usage("u", [TPD], concurrency_limit=2)
    assert usage.windows[0].used == 1_000 and usage.concurrency_in_use == 0


async def test_settling_across_a_real_restart_never_goes_negative() -> None:
    port = free_port()
    server = RedisServer(port)
    client = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        limiter = RedisLimiter(client, prefix="t-restart:", clock=lambda: T0)
        first = await limiter.acquire("u", [TPD], Demand(tokens=40_000), concurrency_limit=2)
        assert first.reservation is not None
        server.stop()
        server = RedisServer(port)  # back on the same address, empty
        second = await eventually(
            lambda: limiter.acquire("u", [TPD], Demand(tokens=1_500), concurrency_limit=2)
        )
        assert second.allowed and second.reservation is not None
        assert await limiter.settle(first.reservation, tokens=1_454, cost_nano_usd=0)
        usage = await limiter.usage("u", [TPD], concurrency_limit=2)
        assert usage.windows[0].used == 1_500
        assert usage.concurrency_in_use == 1
        assert await limiter.settle(second.reservation, tokens=1_000, cost_nano_usd=0)
        assert (await limiter.usage("u", [TPD])).windows[0].used == 1_000
    finally:
        await client.aclose()
        server.stop()
