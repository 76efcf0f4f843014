"""The multiplexed shared client (`app/redis_mux.py`) against a real redis-server: one
connection for any number of concurrent callers, each reply to its own caller (also when
callers give up), pipelines and scripts as redis-py returns them, and a dropped
connection that fails only the commands on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    DataError,
    ExecAbortError,
    RedisError,
    ResponseError,
)

from app.redis_client import redis_clients
from app.redis_mux import MultiplexedRedis
from tests.support import RedisServer

pytestmark = pytest.mark.redis

# Busy for about 300 ms inside Redis: a command whose reply comes late.
SLOW = """
local s = redis.call('TIME')
repeat
  local n = redis.call('TIME')
until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 300000
return ARGV[1]
"""


@pytest.fixture
def server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def observer(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, to look at the server from outside."""
    client = aioredis.Redis.from_url(server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def shared(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client, tail, _ = redis_clients(server.url, max_connections=20)
    try:
        yield client
    finally:
        await client.aclose()
        await tail.aclose()


async def connections(observer: aioredis.Redis) -> int:
    return len(await observer.client_list())


async def test_concurrent_callers_share_one_connection(
    shared: aioredis.Redis, observer: aioredis.Redis
) -> None:
    assert isinstance(shared, MultiplexedRedis)
    before = await connections(observer)
    results = await asyncio.gather(*(shared.incr("counter") for _ in range(500)))
    assert sorted(results) == list(range(1, 501))
    # A pool would have opened up to max_connections (20) for 500 concurrent commands.
    assert await connections(observer) == before + 1


async def test_each_reply_reaches_its_own_caller(shared: aioredis.Redis) -> None:
    values = {f"k{i}": (b"v%d-" % i) * (1 + (i * 37) % 3000) for i in range(300)}
    await asyncio.gather(*(shared.set(k, v) for k, v in values.items()))
    keys = list(values)
    got = await asyncio.gather(*(shared.get(k) for k in keys))
    assert dict(zip(keys, got, strict=True)) == values
    assert await shared.hset("h", mapping={"a": 1, "b": "x"}) == 2
    assert await shared.hgetall("h") == {b"a": b"1", b"b": b"x"}  # the reply callback ran


async def test_a_caller_that_gives_up_does_not_shift_the_replies(
    shared: aioredis.Redis,
) -> None:
    await shared.set("k", "mine")
    slow = asyncio.ensure_future(shared.eval(SLOW, 0, "late"))
    after = asyncio.ensure_future(shared.get("k"))
    await asyncio.sleep(0.05)
    slow.cancel()  # its reply is still on the way
    assert await after == b"mine"
    assert await shared.get("k") == b"mine"
    assert await shared.eval(SLOW, 0, "on time") == b"on time"


async def test_pipelines_return_what_redis_py_returns(shared: aioredis.Redis) -> None:
    async with shared.pipeline(transaction=True) as pipe:
        pipe.set("a", 1).incr("a").hset("h2", "f", "v").hgetall("h2")
        assert await pipe.execute() == [True, 2, 1, {b"f": b"v"}]
    async with shared.pipeline(transaction=False) as pipe:
        pipe.get("a").lpush("a", "x").get("missing")
        first, error, missing = await pipe.execute(raise_on_error=False)
        assert (first, missing) == (b"2", None) and isinstance(error, ResponseError)
    async with shared.pipeline(transaction=False) as pipe:
        pipe.get("a").lpush("a", "x")
        with pytest.raises(ResponseError, match="Command # 2"):
            await pipe.execute()
    # In a transaction, an error at run time is in the replies, the rest still ran.
    async with shared.pipeline(transaction=True) as pipe:
        pipe.lpush("a", "x").incr("a")
        error, incremented = await pipe.execute(raise_on_error=False)
        assert isinstance(error, ResponseError) and incremented == 3
    # A command Redis refuses while queueing aborts the whole transaction.
    async with shared.pipeline(transaction=True) as pipe:
        pipe.incr("a").execute_command("SET", "only-a-key")
        with pytest.raises(ResponseError) as refused:
            await pipe.execute()
        assert not isinstance(refused.value, ExecAbortError) or "SET" in str(refused.value)
    assert await shared.get("a") == b"3"
    assert await shared.pipeline().execute() == []


async def test_scripts_survive_a_flushed_script_cache(shared: aioredis.Redis) -> None:
    script = shared.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script(keys=["n"], args=[2]) == 2
    await shared.script_flush()
    assert await script(keys=["n"], args=[3]) == 5  # NOSCRIPT, loaded, run again
    await shared.script_flush()
    async with shared.pipeline(transaction=True) as pipe:
        await script(keys=["n"], args=[4], client=pipe)
        pipe.get("n")
        assert await pipe.execute() == [9, b"9"]


async def test_a_dropped_connection_fails_its_commands_and_the_next_reconnects(
    shared: aioredis.Redis, observer: aioredis.Redis
) -> None:
    await shared.set("k", "v")
    # A command that waits in Redis (never sent on this client in production: here it
    # just keeps a command in flight when the connection goes).
    waiting = asyncio.ensure_future(shared.blpop(["nothing"], timeout=5))
    await asyncio.sleep(0.1)
    (ours,) = [c["id"] for c in await observer.client_list() if c["cmd"] == "blpop"]
    await observer.client_kill_filter(_id=ours)
    with pytest.raises(ConnectionError):
        await waiting
    assert await shared.get("k") == b"v"  # reconnected


async def test_what_redis_py_refuses_is_refused(shared: aioredis.Redis) -> None:
    with pytest.raises(DataError):
        await shared.set("k", True)  # type: ignore[arg-type]
    with pytest.raises(RedisError, match="WATCH"):
        async with shared.pipeline() as pipe:
            await pipe.watch("k")
    with pytest.raises(RedisError, match="WATCH"):
        async with shared.pipeline() as pipe:
            await pipe.execute_command("WATCH", "k")
    assert await shared.set("b", bytearray(b"ytes")) and await shared.get("b") == b"ytes"
    assert await shared.ping() is True  # the connection is still fine


async def test_pushes_from_redis_are_nobodys_reply(shared: aioredis.Redis) -> None:
    """A RESP3 push (here: a client-side-caching invalidation, which Redis sends right
    after the reply to the command that changed a tracked key) must not be taken for
    the next reply."""
    await shared.set("plain", "mine")
    assert await shared.execute_command("CLIENT", "TRACKING", "ON")
    for i in range(5):
        assert await shared.get("watched") in (None, str(i - 1).encode())  # tracked
        changed, plain = await asyncio.gather(shared.set("watched", str(i)), shared.get("plain"))
        assert changed is True and plain == b"mine"
        await shared.get("watched")
        async with shared.pipeline(transaction=False) as pipe:
            pipe.set("watched", str(i)).get("plain")
            assert await pipe.execute() == [True, b"mine"]


async def test_the_url_chooses_database_and_credentials() -> None:
    server = RedisServer(None, "--requirepass", "s3cret")
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/5"
        client, tail, _ = redis_clients(url, max_connections=2)
        plain = aioredis.Redis.from_url(url)
        try:
            await client.set("where", "five")
            assert await plain.get("where") == b"five"
            # A refusal that is not a ResponseError is raised too, not returned.
            with pytest.raises(AuthenticationError):
                await client.execute_command("AUTH", "wrong")
            async with client.pipeline(transaction=False) as pipe:
                pipe.get("where").execute_command("AUTH", "wrong")
                with pytest.raises(AuthenticationError):
                    await pipe.execute()
            async with client.pipeline(transaction=True) as pipe:
                pipe.get("where").execute_command("AUTH", "wrong")
                where, refused = await pipe.execute()  # inside EXEC: as redis-py, a value
                assert where == b"five" and isinstance(refused, AuthenticationError)
            assert await client.get("where") == b"five"  # still authenticated
            assert await plain.execute_command("SELECT", 0) and await plain.get("where") is None
        finally:
            await client.aclose()
            await tail.aclose()
            await plain.aclose()
        wrong_url = f"redis://:nope@127.0.0.1:{server.port}/0"
        wrong, tail, _ = redis_clients(wrong_url, max_connections=2)
        try:
            with pytest.raises(RedisError):
                await wrong.ping()
        finally:
            await wrong.aclose()
            await tail.aclose()
    finally:
        server.stop()


async def test_closing_while_connecting_leaves_no_connection(
    server: RedisServer, observer: aioredis.Redis
) -> None:
    before = await connections(observer)
    client, tail, _ = redis_clients(server.url, max_connections=2)
    ping = asyncio.ensure_future(client.ping())
    await asyncio.sleep(0)  # the connect has begun
    await client.aclose()
    await tail.aclose()
    with pytest.raises(ConnectionError):
        await ping
    await asyncio.sleep(0.1)
    assert await connections(observer) == before


async def test_a_closed_client_refuses_commands(server: RedisServer) -> None:
    client, tail, _ = redis_clients(server.url, max_connections=2)
    await client.ping()
    await client.aclose()
    await tail.aclose()
    with pytest.raises(ConnectionError):
        await client.ping()
