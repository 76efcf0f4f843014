from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from app.redis_client import redis_clients
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import RedisServer, ServerThread
from tests.support import relay_settings, write_config


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A private Redis for the run, unless REDIS_URL names one to use instead."""
    given = os.environ.get("REDIS_URL")
    if given:
        yield given
        return
    server = RedisServer()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The shared client as sserelay builds it (multiplexed, behind the breaker)."""
    client, tail, _ = redis_clients(redis_url, max_connections=20)
    try:
        yield client
    finally:
        await client.aclose()
        await tail.aclose()


@pytest.fixture(scope="session")
def upstream() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


@pytest.fixture(autouse=True)
def _clean_upstream(request: pytest.FixtureRequest) -> None:
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").app.clear()


@pytest.fixture(scope="session")
def config_path(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer) -> Path:
    return write_config(tmp_path_factory.mktemp("config"), upstream.url)


@pytest.fixture(scope="session")
def relay(config_path: Path) -> Iterator[ServerThread]:
    """sserelay with in-memory stores."""
    server = ServerThread(relay_settings(config_path))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def relay_redis(config_path: Path, redis_url: str) -> Iterator[ServerThread]:
    """sserelay with its stream log in Redis."""
    server = ServerThread(
        relay_settings(config_path, redis_url=redis_url, redis_prefix="t-thread:")
    )
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def any_relay(request: pytest.FixtureRequest) -> ServerThread:
    server: ServerThread = request.getfixturevalue(
        "relay" if request.param == "memory" else "relay_redis"
    )
    return server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as c:
        yield c
