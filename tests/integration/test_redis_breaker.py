"""The Redis circuit breaker against a real redis-server: a hung Redis (SIGSTOP) costs the
first command one timeout and every later one nothing, a Redis that comes back (SIGCONT,
or a restart on the same port) is used again without a new client.

Timing bounds are deliberately loose (a loaded 2-core CI box): they separate "failed
fast" from "waited for a timeout", not milliseconds."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from app.redis_client import (
    Breaker,
    BreakerConnection,
    BreakerConnectionPool,
    BreakerSSLConnection,
    BreakerUnixDomainSocketConnection,
    CircuitOpenError,
    redis_clients,
)
from tests.support import RedisServer

COMMAND_TIMEOUT_S = 1.0
OPEN_S = 1.0
FAST_S = 0.5
"""Bound for anything refused by an open breaker (it should take well under 10 ms)."""
FIRST_FAILURE_S = 3.0
"""Bound for a command meeting a hung Redis: its timeout plus generous slack."""
RECOVERY_S = OPEN_S + 2.0

T = TypeVar("T")
Clients = tuple[aioredis.Redis, aioredis.Redis, Breaker]


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A server of its own: these tests stop, kill and restart it."""
    server = RedisServer()
    try:
        yield server
    finally:
        _stop(server)


@pytest.fixture
async def clients(server: RedisServer) -> AsyncIterator[Clients]:
    client, tail, breaker = redis_clients(
        server.url,
        max_connections=8,
        command_timeout_s=COMMAND_TIMEOUT_S,
        breaker_open_s=OPEN_S,
    )
    try:
        yield client, tail, breaker
    finally:
        await client.aclose()
        await tail.aclose()


def _stop(server: RedisServer) -> None:
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    """Redis hangs: its sockets stay open (the kernel even accepts new connections),
    nothing answers."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def timed(call: Awaitable[T]) -> tuple[T | BaseException, float]:
    """The outcome of `call` (its result or its exception) and how long it took."""
    start = time.monotonic()
    try:
        result: T | BaseException = await call
    except Exception as exc:
        result = exc
    return result, time.monotonic() - start


async def time_to_success(call: Callable[[], Awaitable[Any]], limit_s: float = 10.0) -> float:
    """Retry `call` until it succeeds; seconds it took. Fails the test after `limit_s`."""
    start = time.monotonic()
    while True:
        try:
            await call()
            return time.monotonic() - start
        except (ConnectionError, TimeoutError):
            if time.monotonic() - start > limit_s:
                raise
            await asyncio.sleep(0.02)


async def fail_first_command(client: aioredis.Redis) -> float:
    """Against a hung Redis: the first command waits for its timeout, then fails."""
    outcome, elapsed = await timed(client.get("k"))
    assert isinstance(outcome, TimeoutError), outcome
    assert not isinstance(outcome, CircuitOpenError)
    assert elapsed < FIRST_FAILURE_S
    return elapsed


# --- against a real server ---------------------------------------------------------------


@pytest.mark.redis
async def test_commands_pipelines_and_scripts_go_through(clients: Clients) -> None:
    client, tail, breaker = clients
    assert await client.set("k", "v")
    assert await client.get("k") == b"v"

    async with client.pipeline(transaction=True) as pipe:
        pipe.incr("n").incr("n").get("n")
        assert await pipe.execute() == [1, 2, b"2"]
    async with client.pipeline(transaction=False) as pipe:
        pipe.set("a", 1).get("a")
        assert await pipe.execute() == [True, b"1"]

    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script(keys=["s"], args=[5]) == 5  # NOSCRIPT, then SCRIPT LOAD + EVALSHA
    assert await client.evalsha(script.sha, 1, "s", 2) == 7
    async with client.pipeline(transaction=False) as pipe:
        pipe.evalsha(script.sha, 1, "s", 1)
        pipe.evalsha(script.sha, 1, "s", 1)
        assert await pipe.execute() == [8, 9]

    # An error reply is an answer: it does not open the breaker.
    with pytest.raises(ResponseError):
        await client.execute_command("NO-SUCH-COMMAND")
    with pytest.raises(ResponseError):
        await client.incr("k")

    assert isinstance(await tail.client_id(), int)
    assert breaker.state == "closed"
    assert isinstance(client.connection_pool, BreakerConnectionPool)
    assert client.connection_pool.connection_class is BreakerConnection
    assert tail.connection_pool.connection_class is BreakerConnection


@pytest.mark.redis
async def test_a_full_pool_queues_checkouts_in_order_and_bounds_the_wait(
    server: RedisServer,
) -> None:
    """Two connections, six commands that each hold one for 0.3 s: the four that find
    none free wait and are served as connections come back, in the order they came (a
    checkout arriving meanwhile does not jump the queue); a wait past the pool timeout
    fails as Redis-unavailable."""
    breaker = Breaker()
    pool = BreakerConnectionPool.from_url(
        server.url, max_connections=2, timeout=5.0, socket_timeout=2.0, breaker=breaker
    )
    client = aioredis.Redis.from_pool(pool)
    try:
        order: list[int | str] = []

        async def hold(i: int) -> None:
            await client.blpop([f"nothing-{i}"], timeout=0.3)
            order.append(i)

        async def get_late() -> None:
            await client.get("k")
            order.append("late")

        tasks = [asyncio.create_task(hold(i)) for i in range(6)]
        await asyncio.sleep(0.1)  # two run, four wait
        late = asyncio.create_task(get_late())  # arrives behind the four
        await asyncio.gather(*tasks, late)
        assert [set(order[0:2]), set(order[2:4]), set(order[4:6])] == [{0, 1}, {2, 3}, {4, 5}]
        assert order[6] == "late"
        assert len(pool._available_connections) == 2 and not pool._in_use_connections

        short = BreakerConnectionPool.from_url(
            server.url, max_connections=1, timeout=0.2, socket_timeout=2.0, breaker=breaker
        )
        impatient = aioredis.Redis.from_pool(short)
        try:
            busy = asyncio.create_task(impatient.blpop(["nothing"], timeout=0.6))
            await asyncio.sleep(0.05)
            with pytest.raises(ConnectionError, match="No connection available"):
                await impatient.get("k")
            await busy
            assert await impatient.get("k") is None  # free again, at once
        finally:
            await impatient.aclose()
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_the_tail_may_block_longer_than_the_command_timeout(server: RedisServer) -> None:
    """The blocking XREAD waits longer than any other command may: not a failure."""
    client, tail, breaker = redis_clients(
        server.url, max_connections=2, command_timeout_s=0.5, tail_timeout_s=3.0
    )
    try:
        reply, elapsed = await timed(tail.xread({"idle-stream": "0-0"}, block=1500))
        assert not isinstance(reply, BaseException), reply
        assert not reply
        assert elapsed >= 1.4
        assert breaker.state == "closed"

        waiting = asyncio.create_task(tail.xread({"busy-stream": "0-0"}, block=2000))
        await asyncio.sleep(0.2)
        await client.xadd("busy-stream", {"f": "v"})
        [(key, entries)] = await asyncio.wait_for(waiting, 2)
        assert key == b"busy-stream" and entries[0][1] == {b"f": b"v"}
    finally:
        await client.aclose()
        await tail.aclose()


@pytest.mark.redis
async def test_a_hung_redis_fails_the_first_command_then_everything_at_once(
    server: RedisServer, clients: Clients
) -> None:
    client, tail, breaker = clients
    await client.ping()
    await tail.client_id()
    with stopped(server):
        await fail_first_command(client)
        assert breaker.state == "open"

        start = time.monotonic()
        async with asyncio.timeout(5):  # none hangs
            outcomes = await asyncio.gather(
                *(client.get(f"k{i}") for i in range(20)), return_exceptions=True
            )
        batch_s = time.monotonic() - start
        assert all(isinstance(o, CircuitOpenError) for o in outcomes), outcomes
        assert batch_s < FAST_S
        assert str(outcomes[0]).startswith("redis circuit open")

        # Every path is refused the same way: pipelines, scripts, the tail's connection.
        async with client.pipeline(transaction=False) as pipe:
            pipe.get("a").get("b")
            outcome, elapsed = await timed(pipe.execute())
        assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S
        outcome, elapsed = await timed(client.evalsha("0" * 40, 0))
        assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S
        outcome, elapsed = await timed(tail.client_id())
        assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S
        assert breaker.state == "open"


@pytest.mark.redis
async def test_while_redis_stays_hung_one_probe_at_a_time_pays_the_timeout(
    server: RedisServer, clients: Clients
) -> None:
    client, _, breaker = clients
    await client.ping()
    with stopped(server):
        await fail_first_command(client)
        await asyncio.sleep(OPEN_S + 0.1)  # half-open: the next command is a probe
        assert breaker.retry_after_s == 0
        async with asyncio.timeout(FIRST_FAILURE_S + 2):
            outcomes = await asyncio.gather(*(timed(client.get(f"k{i}")) for i in range(10)))
        probes = [(o, s) for o, s in outcomes if not isinstance(o, CircuitOpenError)]
        refused = [s for o, s in outcomes if isinstance(o, CircuitOpenError)]
        assert len(probes) == 1, outcomes
        assert isinstance(probes[0][0], TimeoutError) and probes[0][1] < FIRST_FAILURE_S
        assert len(refused) == 9 and max(refused) < FAST_S
        assert breaker.state == "open"  # the failed probe reopened it
        assert breaker.retry_after_s > 0


@pytest.mark.redis
async def test_a_hung_redis_that_wakes_up_is_used_again(
    server: RedisServer, clients: Clients
) -> None:
    client, tail, breaker = clients
    changes: list[str] = []
    breaker.on_change = lambda state, error: changes.append(state)
    await client.ping()
    with stopped(server):
        await fail_first_command(client)
        outcome, _ = await timed(client.get("k"))
        assert isinstance(outcome, CircuitOpenError)
    # SIGCONT sent: recovery comes with the first probe, at most `open_s` away.
    recovery_s = await time_to_success(lambda: client.get("k"))
    assert recovery_s < RECOVERY_S
    assert breaker.state == "closed"
    assert changes == ["open", "closed"]
    assert await client.set("k", "back")
    assert await client.get("k") == b"back"
    assert isinstance(await tail.client_id(), int)
    script = client.register_script("return ARGV[1]")
    assert await script(args=["ok"]) == b"ok"


@pytest.mark.redis
async def test_a_timeout_on_the_tail_is_a_failure_too(server: RedisServer) -> None:
    client, tail, breaker = redis_clients(server.url, max_connections=2, tail_timeout_s=1.5)
    try:
        await tail.client_id()
        with stopped(server):
            outcome, elapsed = await timed(tail.xread({"s": "0-0"}, block=500))
            assert isinstance(outcome, TimeoutError), outcome
            assert elapsed < 1.5 + FIRST_FAILURE_S
            assert breaker.state == "open"
            outcome, elapsed = await timed(client.get("k"))  # shared breaker
            assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S
        # The tail never probes (a blocking read would hold the probe slot while Redis
        # is fine): an ordinary command closes the breaker, then the tail reads again.
        refused, _ = await timed(tail.xread({"s": "0-0"}, block=100))
        assert isinstance(refused, CircuitOpenError)
        await time_to_success(lambda: client.get("k"))
        assert breaker.state == "closed"
        await tail.xread({"s": "0-0"}, block=100)
    finally:
        await client.aclose()
        await tail.aclose()


@pytest.mark.redis
async def test_a_restarted_redis_is_used_again_without_a_new_client() -> None:
    server = RedisServer()
    client, tail, breaker = redis_clients(
        server.url, max_connections=8, command_timeout_s=COMMAND_TIMEOUT_S, breaker_open_s=OPEN_S
    )
    try:
        script = client.register_script("return redis.call('INCR', KEYS[1])")
        assert await script(keys=["n"]) == 1
        await tail.client_id()

        server.proc.kill()
        server.proc.wait()
        # A refused connection fails fast by itself. The pooled connection may first
        # report the server's death as "connection closed" (no verdict on Redis: it
        # could have been an idle socket closed by the server); the reconnect that
        # follows is refused and opens the breaker.
        for _ in range(2):
            outcome, elapsed = await timed(client.get("k"))
            assert isinstance(outcome, ConnectionError) and elapsed < FAST_S
            if breaker.state == "open":
                break
        assert breaker.state == "open"
        assert "connecting" in str(breaker.last_error)
        outcome, elapsed = await timed(client.get("k"))
        assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S

        server.stop()  # cleans its directory; the process is already gone
        server = RedisServer(server.port)  # same port, empty: no keys, no scripts
        recovery_s = await time_to_success(lambda: client.ping())
        assert recovery_s < RECOVERY_S
        assert breaker.state == "closed"
        assert await script(keys=["n"]) == 1  # reloaded after NOSCRIPT
        # The tail's connection died with the old server: its first command may meet it
        # (a dropped connection fails at once), the next one reconnects.
        await time_to_success(lambda: tail.client_id(), limit_s=2.0)
        assert breaker.state == "closed"
    finally:
        await client.aclose()
        await tail.aclose()
        _stop(server)


@pytest.mark.redis
async def test_unix_socket_connections_have_the_breaker() -> None:
    path = Path(tempfile.mkdtemp(prefix="sserelay-sock-")) / "redis.sock"
    server = RedisServer(None, "--unixsocket", str(path), "--unixsocketperm", "700")
    client, tail, breaker = redis_clients(f"unix://{path}?db=0", max_connections=2)
    try:
        assert client.connection_pool.connection_class is BreakerUnixDomainSocketConnection
        assert tail.connection_pool.connection_class is BreakerUnixDomainSocketConnection
        assert await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert isinstance(await tail.client_id(), int)
        with stopped(server):
            await fail_first_command(client)
            outcome, elapsed = await timed(client.get("k"))
            assert isinstance(outcome, CircuitOpenError) and elapsed < FAST_S
        await time_to_success(lambda: client.get("k"))
        assert breaker.state == "closed"
    finally:
        await client.aclose()
        await tail.aclose()
        _stop(server)
        path.unlink(missing_ok=True)
        path.parent.rmdir()


async def test_the_connection_class_follows_the_url_scheme() -> None:
    cases = {
        "redis://127.0.0.1:1/0": BreakerConnection,
        "rediss://127.0.0.1:1/0": BreakerSSLConnection,
        "unix:///tmp/nowhere.sock?db=0": BreakerUnixDomainSocketConnection,
    }
    for url, expected in cases.items():
        client, tail, breaker = redis_clients(url, max_connections=2)
        try:
            for c in (client, tail):
                assert c.connection_pool.connection_class is expected
                assert c.connection_pool.connection_kwargs["breaker"] is breaker
        finally:
            await client.aclose()
            await tail.aclose()
    with pytest.raises(ValueError):
        redis_clients("http://127.0.0.1:6379", max_connections=2)


# --- the breaker alone, on a fake clock ---------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_probes_once_and_closes() -> None:
    clock = FakeClock()
    changes: list[tuple[str, BaseException | None]] = []
    breaker = Breaker(
        1.0, probe_timeout_s=3.0, clock=clock, on_change=lambda s, e: changes.append((s, e))
    )
    a, b = object(), object()
    breaker.admit(a)
    breaker.check()
    assert breaker.state == "closed" and breaker.retry_after_s == 0

    error = TimeoutError("Timeout reading from nowhere")
    breaker.record_failure(error)
    assert breaker.state == "open" and changes == [("open", error)]
    assert breaker.retry_after_s == pytest.approx(1.0)
    for refuse in (lambda: breaker.admit(a), breaker.check):
        with pytest.raises(CircuitOpenError, match="redis circuit open .*Timeout reading"):
            refuse()

    clock.now += 1.0  # half-open: the first to ask probes, the others wait for it
    breaker.check()
    breaker.admit(a)
    breaker.admit(a)  # the probe's own further commands (its handshake) go through
    with pytest.raises(CircuitOpenError, match="probe"):
        breaker.admit(b)
    breaker.record_failure(TimeoutError("again"))  # the probe failed: open again
    assert changes == [("open", error)]  # still open: no new transition
    with pytest.raises(CircuitOpenError):
        breaker.admit(a)

    clock.now += 1.0
    breaker.admit(b)
    breaker.record_success()
    assert breaker.state == "closed" and [s for s, _ in changes] == ["open", "closed"]
    breaker.admit(a)


def test_breaker_refusals_do_not_keep_it_open() -> None:
    clock = FakeClock()
    breaker = Breaker(1.0, clock=clock)
    breaker.record_failure(ConnectionError("refused"))
    clock.now += 0.5
    try:
        breaker.admit(object())
    except CircuitOpenError as exc:
        breaker.record_failure(exc)  # what a hook sees when its own refusal propagates
    clock.now += 0.5
    breaker.admit(object())  # due for a probe at the original time


def test_a_lost_probe_stops_holding_the_slot() -> None:
    clock = FakeClock()
    breaker = Breaker(1.0, probe_timeout_s=3.0, clock=clock)
    breaker.record_failure(TimeoutError("hung"))
    clock.now += 1.0
    probe, other = object(), object()
    breaker.admit(probe)
    with pytest.raises(CircuitOpenError):
        breaker.admit(other)
    breaker.release(probe)  # cancelled, no verdict
    breaker.admit(other)  # the next one may probe
    clock.now += 3.0  # and a probe that never reports is replaced after probe_timeout_s
    breaker.admit(probe)
    assert breaker.state == "open"


def test_a_broken_observer_does_not_break_the_breaker() -> None:
    def observer(state: str, error: BaseException | None) -> None:
        raise RuntimeError("observer bug")

    breaker = Breaker(1.0, on_change=observer)
    breaker.record_failure(TimeoutError("hung"))
    assert breaker.state == "open"
    breaker.record_success()
    assert breaker.state == "closed"
