"""One contract, two backends: the memory and the Redis limiter decide identically.

Time is injected (the Redis scripts take a clock override for exactly this), so every
test replays exact instants instead of sleeping."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.redis_client import redis_clients
from ratelimit import Demand, Limiter, MemoryLimiter, RedisLimiter, Reservation, WindowLimit

pytestmark = pytest.mark.redis

T0 = 1_800_000_000_000  # ms; any instant works


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def make(
    kind: str, clock: Clock, client: aioredis.Redis | None, lease_ttl_ms: int = 30_000
) -> Limiter:
    if kind == "memory":
        return MemoryLimiter(clock=clock, lease_ttl_ms=lease_ttl_ms)
    assert client is not None
    return RedisLimiter(
        client, prefix=f"t-{uuid.uuid4().hex[:8]}:", clock=clock, lease_ttl_ms=lease_ttl_ms
    )


@pytest.fixture(params=["memory", "redis"])
async def pair(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis
) -> tuple[Limiter, Clock]:
    clock = Clock()
    return make(request.param, clock, redis_client), clock


RPM = WindowLimit("requests_per_minute", "requests", 3, 60_000)
RPD = WindowLimit("requests_per_day", "requests", 5, 86_400_000)
TPM = WindowLimit("tokens_per_minute", "tokens", 1000, 60_000)


async def test_admits_up_to_the_limit_then_refuses_until_the_window_moves(
    pair: tuple[Limiter, Clock],
) -> None:
    limiter, clock = pair
    for _ in range(3):
        assert (await limiter.acquire("u", [RPM], Demand())).allowed
        clock.now += 1000
    refused = await limiter.acquire("u", [RPM], Demand())
    assert not refused.allowed and refused.violated == ["requests_per_minute"]
    assert refused.reservation is None
    # The first admission (at T0, bucket of 1 s) leaves the counted span 61 s later.
    assert refused.retry_after_ms == T0 + 61_000 - clock.now
    clock.now += refused.retry_after_ms - 1
    assert not (await limiter.acquire("u", [RPM], Demand())).allowed
    clock.now += 1
    assert (await limiter.acquire("u", [RPM], Demand())).allowed


async def test_all_or_nothing(pair: tuple[Limiter, Clock]) -> None:
    limiter, clock = pair
    day = WindowLimit("requests_per_day", "requests", 2, 86_400_000)
    for _ in range(2):
        assert (await limiter.acquire("u", [RPM, day], Demand())).allowed
    refused = await limiter.acquire("u", [RPM, day], Demand())
    assert refused.violated == ["requests_per_day"]
    usage = await limiter.usage("u", [RPM, day])
    assert [s.used for s in usage.windows] == [2, 2]  # the refusal took nothing from RPM


async def test_boundary_burst_never_exceeds_the_limit_in_any_window(
    pair: tuple[Limiter, Clock],
) -> None:
    limiter, clock = pair
    limit = WindowLimit("burst", "requests", 10, 10_000, buckets=10)
    admitted: list[int] = []
    clock.now = T0 + 9_990  # the end of one window...
    for _ in range(10):
        if (await limiter.acquire("u", [limit], Demand())).allowed:
            admitted.append(clock.now)
    clock.now = T0 + 10_010  # ...and the start of the next
    for _ in range(10):
        if (await limiter.acquire("u", [limit], Demand())).allowed:
            admitted.append(clock.now)
    assert len(admitted) == 10


async def test_tokens_are_reserved_then_settled_exactly_once(
    pair: tuple[Limiter, Clock],
) -> None:
    limiter, clock = pair
    decision = await limiter.acquire("u", [TPM], Demand(tokens=600))
    assert decision.allowed and decision.reservation is not None
    assert not (await limiter.acquire("u", [TPM], Demand(tokens=600))).allowed
    assert await limiter.settle(decision.reservation, tokens=150, cost_nano_usd=0)
    assert (await limiter.usage("u", [TPM])).windows[0].used == 150
    # A second settlement (a cancel racing the natural end) changes nothing.
    assert not await limiter.settle(decision.reservation, tokens=0, cost_nano_usd=0)
    assert (await limiter.usage("u", [TPM])).windows[0].used == 150
    assert (await limiter.acquire("u", [TPM], Demand(tokens=600))).allowed


async def test_settling_more_than_reserved_charges_the_difference(
    pair: tuple[Limiter, Clock],
) -> None:
    limiter, _ = pair
    decision = await limiter.acquire("u", [TPM], Demand(tokens=100))
    assert decision.reservation is not None
    await limiter.settle(decision.reservation, tokens=130, cost_nano_usd=0)
    assert (await limiter.usage("u", [TPM])).windows[0].used == 130


async def test_a_refund_never_takes_a_bucket_below_zero(pair: tuple[Limiter, Clock]) -> None:
    """A settlement that would give back more than its bucket holds (a record out of
    step with the counts) empties the bucket and no more; a charge still adds."""
    limiter, _ = pair
    decision = await limiter.acquire("u", [TPM], Demand(tokens=100))
    assert decision.reservation is not None
    inflated = dataclasses.replace(decision.reservation, demand=Demand(tokens=5_000))
    assert await limiter.settle(inflated, tokens=0, cost_nano_usd=0)
    assert (await limiter.usage("u", [TPM])).windows[0].used == 0
    assert (await limiter.acquire("u", [TPM], Demand(tokens=1000))).allowed
    # A charge is never clamped: what was used beyond the reservation is counted.
    small = await limiter.acquire("u", [TPM], Demand(tokens=0))
    assert small.reservation is not None
    assert await limiter.settle(small.reservation, tokens=40, cost_nano_usd=0)
    assert (await limiter.usage("u", [TPM])).windows[0].used == 1040


def test_a_reservation_round_trips_through_json() -> None:
    burst = WindowLimit("burst", "requests", 5, 10_000, buckets=7)
    budget = WindowLimit("daily_budget_usd", "cost_usd", 2_500_000_000, 86_400_000)
    reservation = Reservation(
        "r1", "bob{x}", (burst, TPM, budget), (123, 456, 789), Demand(2, 300, 4_000), True
    )
    text = reservation.to_json()
    assert isinstance(text, str)
    # Every field, as dataclasses would write them (a field added later must be too).
    assert json.loads(text) == json.loads(json.dumps(dataclasses.asdict(reservation)))
    loaded = Reservation.from_json(text)
    assert loaded == reservation
    assert isinstance(loaded.windows, tuple) and isinstance(loaded.buckets, tuple)
    assert loaded.windows[0].buckets == 7 and loaded.windows[2].resource == "cost_usd"
    bare = Reservation("r2", "u", (), (), Demand(), False)
    assert Reservation.from_json(bare.to_json()) == bare
    for bad in ("", "[]", '{"id": "r3"}', '{"id": 1}'):
        with pytest.raises(ValueError):
            Reservation.from_json(bad)


async def test_a_reservation_loaded_elsewhere_settles_exactly_once(
    pair: tuple[Limiter, Clock], redis_url: str
) -> None:
    """Another process (a new limiter on the same Redis; the same memory limiter) can
    settle a reservation it only knows as JSON, and only once, whoever settles first."""
    limiter, clock = pair
    decision = await limiter.acquire("u", [RPM, TPM], Demand(tokens=600), concurrency_limit=1)
    assert decision.reservation is not None
    loaded = Reservation.from_json(decision.reservation.to_json())
    client = aioredis.Redis.from_url(redis_url)
    try:
        other = limiter
        if isinstance(limiter, RedisLimiter):
            other = RedisLimiter(client, prefix=limiter._prefix, clock=clock)
        assert await other.settle(loaded, tokens=150, cost_nano_usd=0)
        assert not await limiter.settle(decision.reservation, tokens=0, cost_nano_usd=0)
        assert not await other.settle(loaded, tokens=0, cost_nano_usd=0)
        usage = await limiter.usage("u", [RPM, TPM], concurrency_limit=1)
        assert [s.used for s in usage.windows] == [1, 150]
        assert usage.concurrency_in_use == 0
    finally:
        await client.aclose()


async def test_redis_a_refund_into_an_evicted_window_never_goes_negative(
    redis_client: aioredis.Redis,
) -> None:
    """The counts were evicted (the reservation's marker survived) and a newer request
    recreated the bucket: the old refund can empty the bucket, never drive it negative."""
    clock = Clock()
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    limiter = RedisLimiter(redis_client, prefix=prefix, clock=clock)
    first = await limiter.acquire("u", [TPM], Demand(tokens=600))
    assert first.reservation is not None
    await redis_client.delete(f"{prefix}rl:{{u}}:w:{TPM.key}")
    assert (await limiter.acquire("u", [TPM], Demand(tokens=200))).allowed
    assert await limiter.settle(first.reservation, tokens=10, cost_nano_usd=0)
    assert 0 <= (await limiter.usage("u", [TPM])).windows[0].used <= 200


async def test_redis_a_settlement_whose_reservation_was_lost_only_releases_its_lease(
    redis_client: aioredis.Redis,
) -> None:
    """No record of the reservation: whatever the counts hold may belong to others, so
    nothing is given back (the window forgets it in time); the lease is still freed."""
    clock = Clock()
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    limiter = RedisLimiter(redis_client, prefix=prefix, clock=clock)
    decision = await limiter.acquire("u", [TPM], Demand(tokens=600), concurrency_limit=1)
    assert decision.reservation is not None
    await redis_client.delete(f"{prefix}rl:{{u}}:s:{decision.reservation.id}")
    assert await limiter.settle(decision.reservation, tokens=100, cost_nano_usd=0)
    usage = await limiter.usage("u", [TPM], concurrency_limit=1)
    assert usage.windows[0].used == 600 and usage.concurrency_in_use == 0
    assert not await limiter.settle(decision.reservation, tokens=100, cost_nano_usd=0)


async def test_a_request_that_can_never_fit(pair: tuple[Limiter, Clock]) -> None:
    limiter, _ = pair
    refused = await limiter.acquire("u", [TPM], Demand(tokens=1001))
    assert not refused.allowed and refused.retry_after_ms is None


async def test_concurrency_leases(pair: tuple[Limiter, Clock]) -> None:
    limiter, clock = pair
    first = await limiter.acquire("u", [], Demand(), concurrency_limit=2)
    second = await limiter.acquire("u", [], Demand(), concurrency_limit=2)
    assert first.allowed and second.allowed
    third = await limiter.acquire("u", [], Demand(), concurrency_limit=2)
    assert not third.allowed and third.violated == ["concurrent_streams"]
    assert first.reservation is not None and second.reservation is not None
    await limiter.settle(first.reservation, tokens=0, cost_nano_usd=0)  # ends: releases
    assert (await limiter.acquire("u", [], Demand(), concurrency_limit=2)).allowed
    # A lease nobody renews (its process died) expires on its own; a renewed one does not.
    clock.now += 20_000
    await limiter.renew([second.reservation])
    clock.now += 20_000
    usage = await limiter.usage("u", [], concurrency_limit=2)
    assert usage.concurrency_in_use == 1


async def test_principals_are_independent(pair: tuple[Limiter, Clock]) -> None:
    limiter, _ = pair
    for _ in range(3):
        await limiter.acquire("alice", [RPM], Demand())
    assert not (await limiter.acquire("alice", [RPM], Demand())).allowed
    assert (await limiter.acquire("bob{x}", [RPM], Demand())).allowed


async def test_redis_keys_expire_and_share_one_slot(redis_client: aioredis.Redis) -> None:
    clock = Clock()
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    limiter = RedisLimiter(redis_client, prefix=prefix, clock=clock)
    decision = await limiter.acquire("carol", [RPM, TPM], Demand(tokens=5), concurrency_limit=1)
    assert decision.reservation is not None
    before = [k.decode() async for k in redis_client.scan_iter(f"{prefix}*")]
    assert len(before) == 4  # two windows, the leases and the reservation's marker
    await limiter.settle(decision.reservation, tokens=5, cost_nano_usd=0)
    after = [k.decode() async for k in redis_client.scan_iter(f"{prefix}*")]
    assert len(after) == 3  # the last lease went with its set; the marker stays, settled
    for key in {*before, *after}:
        assert "{carol}" in key
        assert await redis_client.pttl(key) > 0 or key not in after


async def test_redis_a_reservation_is_remembered_while_a_window_may_count_it(
    redis_client: aioredis.Redis,
) -> None:
    clock = Clock()
    prefix = f"t-{uuid.uuid4().hex[:8]}:"
    limiter = RedisLimiter(redis_client, prefix=prefix, clock=clock)
    month = WindowLimit("tokens_per_month", "tokens", 10**9, 31 * 86_400_000)
    for windows, at_least in (
        ([TPM], 86_400_000),
        ([TPM, month], month.window_ms + 2 * month.bucket_ms),
    ):
        decision = await limiter.acquire("u", windows, Demand(tokens=5))
        assert decision.reservation is not None
        marker = f"{prefix}rl:{{u}}:s:{decision.reservation.id}"
        assert at_least - 5_000 < await redis_client.pttl(marker) <= at_least
        await limiter.settle(decision.reservation, tokens=5, cost_nano_usd=0)
        # Settled, it only has to turn away a second settlement for a while.
        assert 86_400_000 - 5_000 < await redis_client.pttl(marker) <= 86_400_000


WINDOW = WindowLimit("w", "tokens", 20, 1_000, buckets=4)
events = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 12)), min_size=1, max_size=60)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(events=events)
async def test_property_never_over_admits_and_backends_agree(
    redis_client: aioredis.Redis, events: list[tuple[int, int]]
) -> None:
    clock_m, clock_r = Clock(), Clock()
    memory = make("memory", clock_m, None)
    redis = make("redis", clock_r, redis_client)
    admitted: list[tuple[int, int]] = []
    for gap, weight in events:
        clock_m.now += gap
        clock_r.now += gap
        a = await memory.acquire("p", [WINDOW], Demand(tokens=weight))
        b = await redis.acquire("p", [WINDOW], Demand(tokens=weight))
        assert a.allowed == b.allowed
        assert a.windows[0].used == b.windows[0].used
        assert a.retry_after_ms == b.retry_after_ms
        if a.allowed:
            admitted.append((clock_m.now, weight))
    # Exact oracle: every interval of the window's length holds at most the limit. The
    # worst interval ends at an admission, so checking those is enough.
    for t, _ in admitted:
        inside = sum(w for s, w in admitted if t - WINDOW.window_ms < s <= t)
        assert inside <= WINDOW.limit


async def test_a_clock_stepping_back_cannot_over_admit(pair: tuple[Limiter, Clock]) -> None:
    limiter, clock = pair
    clock.now = T0 + 30_000
    for _ in range(3):
        assert (await limiter.acquire("u", [RPM], Demand())).allowed
    clock.now -= 5_000  # a failover to a Redis whose clock is behind
    refused = await limiter.acquire("u", [RPM], Demand())
    assert not refused.allowed and refused.retry_after_ms is not None
    assert refused.retry_after_ms > 0


async def test_windows_with_one_name_never_share_counts(pair: tuple[Limiter, Clock]) -> None:
    limiter, clock = pair
    narrow = WindowLimit("burst", "requests", 2, 10_000)
    wide = WindowLimit("burst", "requests", 100, 600_000)  # e.g. after a plan reload
    for _ in range(2):
        assert (await limiter.acquire("u", [narrow], Demand())).allowed
    assert (await limiter.acquire("u", [wide], Demand())).allowed
    assert not (await limiter.acquire("u", [narrow], Demand())).allowed


def test_plans_refuse_duplicate_limit_names() -> None:
    from pydantic import ValidationError

    from ratelimit import Plan

    with pytest.raises(ValidationError, match="unique"):
        Plan.model_validate(
            {
                "requests_per_minute": 5,
                "limits": [
                    {
                        "name": "requests_per_minute",
                        "resource": "requests",
                        "limit": 1000,
                        "window_s": 10,
                    }
                ],
            }
        )


async def test_concurrent_decisions_share_pipelines_and_stay_strict(redis_url: str) -> None:
    """On a pooled client, calls made while others are in flight go out together; each
    still gets its own answer, and a limit is never over-admitted."""
    client, tail, _ = redis_clients(redis_url, max_connections=20, multiplex=False)
    try:
        limiter = RedisLimiter(client, prefix=f"t-{uuid.uuid4().hex[:8]}:")
        assert limiter._pipeliner is not None
        sent: list[int] = []
        real_send = limiter._pipeliner._send

        async def counting_send(batch: list) -> None:  # type: ignore[type-arg]
            sent.append(len(batch))
            await real_send(batch)

        limiter._pipeliner._send = counting_send  # type: ignore[method-assign]
        await _strict_under_concurrency(limiter)
        assert sum(sent) == 300 and max(sent) > 1 and len(sent) < 300
    finally:
        await client.aclose()
        await tail.aclose()


async def test_concurrent_decisions_on_the_multiplexed_client_stay_strict(
    redis_client: aioredis.Redis,
) -> None:
    """The multiplexed client already shares its wire: no batching layer on top."""
    limiter = RedisLimiter(redis_client, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    assert limiter._pipeliner is None
    await _strict_under_concurrency(limiter)


async def _strict_under_concurrency(limiter: RedisLimiter) -> None:
    limit = WindowLimit("rpm", "requests", 50, 60_000)
    subjects = ["a", "b"]
    decisions = await asyncio.gather(
        *(limiter.acquire(subjects[i % 2], [limit], Demand()) for i in range(300))
    )
    for subject in subjects:
        mine = [d for i, d in enumerate(decisions) if subjects[i % 2] == subject]
        assert sum(d.allowed for d in mine) == 50


async def test_a_flushed_script_cache_is_reloaded_for_single_and_batched_calls(
    redis_client: aioredis.Redis,
) -> None:
    limiter = RedisLimiter(redis_client, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    limit = WindowLimit("rpm", "requests", 1000, 60_000)
    await redis_client.script_flush()
    assert (await limiter.acquire("x", [limit], Demand())).allowed
    await redis_client.script_flush()
    decisions = await asyncio.gather(*(limiter.acquire("x", [limit], Demand()) for _ in range(20)))
    assert all(d.allowed for d in decisions)


async def test_a_caller_giving_up_does_not_fail_its_batch(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    limit = WindowLimit("rpm", "requests", 1000, 60_000)
    calls = [asyncio.create_task(limiter.acquire("x", [limit], Demand())) for _ in range(30)]
    await asyncio.sleep(0)
    calls[0].cancel()
    calls[15].cancel()
    results = await asyncio.gather(*calls, return_exceptions=True)
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert len(answered) >= 28 and all(d.allowed for d in answered)


async def test_an_acquire_given_up_before_it_is_sent_is_not_applied(
    redis_client: aioredis.Redis,
) -> None:
    limiter = RedisLimiter(redis_client, prefix=f"t-{uuid.uuid4().hex[:8]}:")
    limit = WindowLimit("rpm", "requests", 10, 60_000)
    waiting = asyncio.create_task(limiter.acquire("x", [limit], Demand(), concurrency_limit=5))
    await asyncio.sleep(0)  # queued, not yet on the wire
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    usage = await limiter.usage("x", [limit], concurrency_limit=5)
    assert usage.windows[0].used == 0 and usage.concurrency_in_use == 0
