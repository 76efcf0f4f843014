"""The limiter on a 3-node Redis Cluster, unchanged; and with Redis gone and back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from ratelimit import Demand, RedisLimiter, WindowLimit
from testkit.fake_upstream import FakeUpstreamServer
from tests.support import (
    RedisServer,
    ServerThread,
    auth,
    relay_settings,
    until_ok,
    write_config,
)

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def cluster() -> Iterator[list[RedisServer]]:
    """Three cluster-enabled servers from the same binary, joined without redis-cli:
    each takes a third of the slots, then they meet."""
    nodes = [
        RedisServer(None, "--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
        for _ in range(3)
    ]

    async def form() -> None:
        clients = [aioredis.Redis(port=n.port) for n in nodes]
        bounds = [(0, 5460), (5461, 10922), (10923, 16383)]
        for client, (lo, hi) in zip(clients, bounds, strict=True):
            await client.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for node in nodes[1:]:
            await clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        for _ in range(200):
            states = [await c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(b"cluster_state:ok" in s for s in states):
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the cluster did not form")
        for client in clients:
            await client.aclose()

    asyncio.run(form())
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
async def cluster_client(cluster: list[RedisServer]) -> AsyncIterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port)
    await client.initialize()
    yield client
    await client.aclose()


async def test_the_limiter_runs_on_redis_cluster_unchanged(cluster_client: RedisCluster) -> None:
    limiter = RedisLimiter(cluster_client, prefix=f"t-{uuid.uuid4().hex[:6]}:")
    rpm = WindowLimit("requests_per_minute", "requests", 3, 60_000)
    tpm = WindowLimit("tokens_per_minute", "tokens", 1000, 60_000)
    subjects = [f"user-{i}" for i in range(12)]  # spread over all three nodes' slots
    for subject in subjects:
        decisions = [
            await limiter.acquire(subject, [rpm, tpm], Demand(tokens=100), concurrency_limit=5)
            for _ in range(4)
        ]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        reservations = [d.reservation for d in decisions if d.reservation is not None]
        await limiter.renew(reservations)
        for reservation in reservations:
            assert await limiter.settle(reservation, tokens=40, cost_nano_usd=0)
        usage = await limiter.usage(subject, [rpm, tpm], concurrency_limit=5)
        assert [s.used for s in usage.windows] == [3, 120]
        assert usage.concurrency_in_use == 0
    slots = {cluster_client.keyslot(f"x{{{s}}}") for s in subjects}
    owners = {cluster_client.get_node_from_key(f"x{{{s}}}").port for s in subjects}
    assert len(slots) == len(subjects) and len(owners) == 3


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_down_then_back(
    tmp_path: Path, upstream: FakeUpstreamServer, client: httpx.AsyncClient, mode: str
) -> None:
    redis = RedisServer()
    config = write_config(
        tmp_path, upstream.url, extra_plans={"p": {"requests_per_minute": 100}}, name=mode
    )
    server = ServerThread(relay_settings(config, redis_url=redis.url, limiter_fail_mode=mode))
    body = {"model": "sim-fast", "prompt": "resilience", "max_tokens": 3}
    headers = auth(f"user-{uuid.uuid4().hex[:6]}", "p")
    url = server.url + "/v1/chat/stream"
    try:
        assert (await client.post(url, json=body, headers=headers)).status_code == 200
        redis.stop()
        r = await client.post(url, json=body, headers=headers)
        if mode == "closed":
            assert r.status_code == 503 and r.json()["code"] == "limiter_unavailable"
            assert r.headers["retry-after"] == "1"
        else:
            assert r.status_code == 200 and "event: done" in r.text
        ready = await client.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["limiter"] != "ok"
        metrics = (await client.get(server.url + "/metrics")).text
        assert "sserelay_limiter_backend_errors_total 0.0" not in metrics
        redis = RedisServer(redis.port)  # back, on the same address
        r = await until_ok(lambda: client.post(url, json=body, headers=headers), pause_s=0.1)
        assert r.status_code == 200
        # Ready again once the Redis circuit lets a probe through (within its open time).
        ready = await until_ok(lambda: client.get(server.url + "/readyz"), pause_s=0.1)
        assert ready.status_code == 200
    finally:
        server.stop()
        redis.stop()
