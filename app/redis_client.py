"""Redis clients that fail fast when Redis stops answering.

A Redis that is down refuses connections at once, but a Redis that hangs (stopped,
swapping, partitioned away, stuck in a long script) accepts bytes and never replies: every
command then waits for its socket timeout, and every request with it. Two things bound
that wait:

* short timeouts (connect, command, pool checkout), so the first commands to meet a hung
  Redis fail in about a second rather than ten;
* a circuit breaker shared by every connection to one deployment: after one such
  failure, commands fail at once, without touching a socket, for `open_s`. Then one
  command at a time is let through as a probe: a reply closes the breaker, a failure
  reopens it. Recovery needs no restart and no new client.

The breaker is wired into redis-py's own connection classes (`Connection`,
`SSLConnection`, `UnixDomainSocketConnection`), so every path through the client - plain
commands, pipelines, scripts (EVALSHA, SCRIPT LOAD), the connection handshake - goes
through it, and every failure still surfaces as a `redis.exceptions.RedisError`
subclass, which callers already translate into their own errors.

What counts as a failure: a timeout anywhere (connecting, writing, reading), and any
connection error while connecting (refused, reset or closed during the handshake). A
connection dropped in the middle of a command (the server closed an idle socket, Redis
restarted) fails that command quickly by itself and does not open the breaker: the
connection is discarded, and the next attempt to connect says whether Redis is really
gone. The breaker exists to stop commands from *waiting*; fast failures need no help.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal, cast
from urllib.parse import urlparse

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from .redis_mux import MultiplexedRedis

__all__ = [
    "TAIL_BLOCK_S",
    "Breaker",
    "BreakerConnection",
    "BreakerConnectionPool",
    "BreakerSSLConnection",
    "BreakerState",
    "BreakerUnixDomainSocketConnection",
    "CircuitOpenError",
    "guarded_connection_class",
    "redis_clients",
]

logger = logging.getLogger("sserelay.redis")

BreakerState = Literal["closed", "open"]

TAIL_BLOCK_S = 5.0
"""The longest `XREAD BLOCK` the stream log's tailer sends (streaming/log/_tailer.py).
The tail connection's socket timeout must stay above it, or every idle wait would read
as a hung Redis."""


class CircuitOpenError(ConnectionError):
    """Raised instead of talking to a Redis that just failed. A `ConnectionError`, so
    every caller that handles Redis being unreachable handles this the same way."""


class Breaker:
    """The circuit breaker of one Redis deployment, shared by all its connections.

    Closed: commands go through. One connection-level failure (see the module docstring)
    opens it: for `open_s` every command fails at once with `CircuitOpenError`. After
    that, one command at a time goes through as a probe (half-open); the first reply
    from Redis, on any connection, closes the breaker, and a failure reopens it for
    another `open_s`. A single probe, rather than everyone at once, means that while
    Redis stays hung only one command per `open_s` pays the full timeout.

    A probe that neither succeeds nor fails (its caller was cancelled, or it is a
    blocking read that legitimately waits) stops holding the slot after
    `probe_timeout_s`, so a lost probe cannot keep the breaker open.

    Not thread-safe: it belongs to the event loop its connections run on.
    """

    def __init__(
        self,
        open_s: float = 1.0,
        *,
        probe_timeout_s: float = 3.0,
        on_change: Callable[[BreakerState, BaseException | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "redis",
    ) -> None:
        """`on_change(state, error)` runs on every transition (`error` is what opened
        it, None on closing), e.g. to count openings in a metric; an exception it raises
        is logged and otherwise ignored. `clock` must be monotonic; tests may pass a
        fake one."""
        if open_s <= 0 or probe_timeout_s <= 0:
            raise ValueError("open_s and probe_timeout_s must be positive")
        self.open_s = open_s
        self.probe_timeout_s = probe_timeout_s
        self.on_change = on_change
        self.name = name
        self._clock = clock
        self._open_until: float | None = None
        """None while closed; else when the next probe may go."""
        self._probe: object | None = None
        self._probe_until = 0.0
        self.last_error: BaseException | None = None
        """The failure that last opened or reopened the breaker (kept after closing)."""

    @property
    def state(self) -> BreakerState:
        """Open from a failure until a reply closes it, probing included."""
        return "closed" if self._open_until is None else "open"

    @property
    def retry_after_s(self) -> float:
        """How long until a probe may go: 0 when closed or probing, e.g. for a
        `Retry-After` header."""
        if self._open_until is None:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def check(self) -> None:
        """Fail at once while open and not yet due for a probe. Cheap enough for every
        pool checkout: while open it spares callers the wait for a free connection."""
        if self._open_until is not None and self._clock() < self._open_until:
            raise self.open_error()

    def admit(self, connection: object) -> None:
        """Let `connection` talk to Redis, or raise `CircuitOpenError`. When the open
        period is over, the first connection to ask becomes the probe; the probe's own
        further commands (its handshake, then the command it carries) are admitted, the
        other connections are refused until it has answered."""
        if self._open_until is None:
            return
        now = self._clock()
        if now < self._open_until or not getattr(connection, "may_probe", True):
            raise self.open_error()
        if self._probe is None or self._probe is connection or now >= self._probe_until:
            if self._probe is not connection:
                self._probe = connection
                self._probe_until = now + self.probe_timeout_s
            return
        raise CircuitOpenError(
            f"{self.name} circuit open: waiting for a probe to answer "
            f"(last error: {self.last_error})"
        )

    def record_success(self) -> None:
        """Redis answered (an error reply counts: it is an answer). Closes the breaker."""
        if self._open_until is None:
            return
        self._open_until = None
        self._probe = None
        logger.info("%s circuit closed: Redis answers again", self.name)
        self._notify("closed", None)

    def record_failure(self, error: BaseException) -> None:
        """A connection-level failure: open the breaker, or keep it open for another
        `open_s`. The breaker's own refusals are not failures (they would keep it open
        for as long as commands keep coming)."""
        if isinstance(error, CircuitOpenError):
            return
        was_closed = self._open_until is None
        self._open_until = self._clock() + self.open_s
        self._probe = None
        self.last_error = error
        if was_closed:
            logger.warning(
                "%s circuit open: failing fast for %.1fs after: %s", self.name, self.open_s, error
            )
            self._notify("open", error)

    def release(self, connection: object) -> None:
        """`connection`'s command ended with no verdict on Redis (cancelled, or the
        connection was dropped mid-command): if it was the probe, let another one go."""
        if self._probe is connection:
            self._probe = None

    def open_error(self) -> CircuitOpenError:
        """The refusal of an open breaker (not yet due for a probe, or probing)."""
        assert self._open_until is not None
        remaining = max(0.0, self._open_until - self._clock())
        return CircuitOpenError(
            f"{self.name} circuit open for {remaining:.2f}s more (last error: {self.last_error})"
        )

    def _notify(self, state: BreakerState, error: BaseException | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(state, error)
        except Exception:  # a broken observer must not break Redis access
            logger.exception("%s circuit: on_change callback failed", self.name)

    def __repr__(self) -> str:
        return f"<Breaker {self.name} {self.state}>"


class _BreakerHooks(AbstractConnection):
    """Reports every connection-level outcome to the breaker and asks it before any
    bytes go out. Mixed in before a concrete redis-py connection class.

    Hooks, and why these three:

    * `connect_check_health`: every (re)connect goes through it, whether started by the
      pool's checkout (`connect()`) or by a send on a dropped connection. It covers the
      socket connect and the handshake (HELLO/AUTH, CLIENT SETINFO, SELECT): any
      timeout or connection error there is a failure; a finished handshake is a reply.
    * `send_packed_command`: the one path by which commands leave (`send_command` and
      pipelines both end here). Asking the breaker here means a refused command never
      touches the socket. A write timeout is a failure.
    * `read_response`: where a hung Redis shows, as a read timeout (a failure). Any
      reply, error replies included, is a success.
    """

    def __init__(self, *, breaker: Breaker, may_probe: bool = True, **kwargs: Any) -> None:
        """`may_probe=False`: a connection whose commands may legitimately wait (a
        blocking XREAD) never becomes the probe: it would hold the probe slot while
        Redis is fine, refusing everyone else. It waits for the breaker to close."""
        self.breaker = breaker
        self.may_probe = may_probe
        super().__init__(**kwargs)

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected:
            return
        self.breaker.admit(self)
        try:
            await super().connect_check_health(
                check_health=check_health, retry_socket_connect=retry_socket_connect
            )
        except (ConnectionError, TimeoutError) as exc:
            self.breaker.record_failure(exc)
            raise
        except BaseException:
            self.breaker.release(self)
            raise
        self.breaker.record_success()

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        self.breaker.admit(self)
        try:
            await super().send_packed_command(command, check_health)
        except TimeoutError as exc:
            self.breaker.record_failure(exc)
            raise
        except BaseException:
            self.breaker.release(self)
            raise

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        try:
            response = await super().read_response(
                disable_decoding,
                timeout,
                disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )
        except ResponseError:
            self.breaker.record_success()
            raise
        except TimeoutError as exc:
            self.breaker.record_failure(exc)
            raise
        except BaseException:
            self.breaker.release(self)
            raise
        if response is None and timeout is not None:
            # A read with its own timeout (pub/sub polling) returns None when nothing
            # came: no verdict.
            self.breaker.release(self)
        else:
            self.breaker.record_success()
        return response


class BreakerConnection(_BreakerHooks, Connection):
    """TCP (`redis://`)."""


class BreakerSSLConnection(_BreakerHooks, SSLConnection):
    """TLS (`rediss://`)."""


class BreakerUnixDomainSocketConnection(_BreakerHooks, UnixDomainSocketConnection):
    """Unix socket (`unix://`)."""


_GUARDED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: BreakerConnection,
    SSLConnection: BreakerSSLConnection,
    UnixDomainSocketConnection: BreakerUnixDomainSocketConnection,
}


def guarded_connection_class(plain: type[AbstractConnection]) -> type[AbstractConnection]:
    """The breaker-aware twin of a redis-py connection class."""
    if issubclass(plain, _BreakerHooks):
        return plain
    try:
        return _GUARDED[plain]
    except KeyError:
        raise TypeError(f"no circuit breaker support for {plain.__name__}") from None


class BreakerConnectionPool(BlockingConnectionPool):
    """A `BlockingConnectionPool` whose connections all report to `breaker`.

    `from_url` keeps working as usual: redis-py picks the connection class from the
    scheme (and lets it override any class passed in), and this pool swaps in the
    breaker-aware twin, so `redis://`, `rediss://` and `unix://` all get the breaker.
    `breaker` travels in `connection_kwargs`, which the pool hands to every connection
    it makes. While the breaker is open, a checkout fails at once instead of waiting
    for a free connection (under a hung Redis they are all busy timing out).

    A checkout that finds a connection free while nobody waits for one takes it at
    once, and a release with nobody waiting just returns it: the blocking pool's
    condition, timeout and bookkeeping cost about a fifth of a command's CPU, for the
    one case (every connection busy) where they do anything. Waiting keeps its order:
    while anyone waits, checkouts queue behind them.
    """

    def __init__(
        self,
        *,
        breaker: Breaker,
        connection_class: type[AbstractConnection] = Connection,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            connection_class=guarded_connection_class(connection_class),
            breaker=breaker,
            **kwargs,
        )
        self.breaker = breaker
        self._waiting = 0

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        self.breaker.check()
        if not self._waiting and self.can_get_connection():
            take = cast(Callable[[], AbstractConnection], self.get_available_connection)
            connection = take()
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        get = cast(Callable[..., Awaitable[AbstractConnection]], super().get_connection)
        self._waiting += 1
        try:
            return await get(*args, **kwargs)
        finally:
            self._waiting -= 1

    async def release(self, connection: AbstractConnection) -> None:
        if self._waiting:
            await super().release(connection)  # and wake the next waiter
        else:
            await ConnectionPool.release(self, connection)


def redis_clients(
    url: str,
    *,
    max_connections: int,
    command_timeout_s: float = 1.0,
    connect_timeout_s: float = 1.0,
    pool_timeout_s: float = 1.0,
    breaker_open_s: float = 1.0,
    tail_timeout_s: float = TAIL_BLOCK_S + 2.0,
    multiplex: bool = True,
) -> tuple[Redis, Redis, Breaker]:
    """The shared client, the tail client and the breaker they share.

    * The shared client: a bounded pool that waits up to `pool_timeout_s` for a free
      connection rather than failing at once; each command gets `command_timeout_s`
      to be written and answered, each new connection `connect_timeout_s` to connect.
      Closing the client closes its pool.
    * The tail: one dedicated connection for the stream log's blocking XREAD, which
      holds its connection for as long as it waits, and for CLIENT ID (CLIENT UNBLOCK
      needs a fixed connection). Its socket timeout, `tail_timeout_s`, must exceed the
      longest block (`TAIL_BLOCK_S`); a timeout there is still a failure that opens the
      breaker.
    * `multiplex` (the default): the shared client carries every command on one
      connection (`app/redis_mux.py`: a fraction of the CPU per command, no waiting for
      a free connection); `max_connections` and `pool_timeout_s` then play no part.
      Off: a pool of up to `max_connections`, a command per checkout.
    * No client-side retries: a retry doubles the time to fail against a hung Redis,
      and the callers decide what a failure means.

    Every error is a `redis.exceptions.RedisError`: `CircuitOpenError` (a
    `ConnectionError`) while the breaker is open, `TimeoutError` or `ConnectionError`
    otherwise.
    """
    timeouts = (command_timeout_s, connect_timeout_s, pool_timeout_s, tail_timeout_s)
    if min(timeouts) <= 0:
        raise ValueError("timeouts must be positive")
    if urlparse(url).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("Redis URL must start with redis://, rediss:// or unix://")
    breaker = Breaker(
        breaker_open_s,
        # The longest a probe can take when Redis is fine: connect, handshake, reply.
        probe_timeout_s=connect_timeout_s + 2 * command_timeout_s,
    )
    common = _pool_options(breaker, connect_timeout_s, pool_timeout_s)
    pool = BreakerConnectionPool.from_url(
        url, max_connections=max_connections, socket_timeout=command_timeout_s, **common
    )
    client = (
        MultiplexedRedis(pool, breaker=breaker, timeout_s=command_timeout_s)
        if multiplex
        else Redis.from_pool(pool)  # from_pool: closing the client closes the pool
    )
    return client, _single(url, tail_timeout_s, common, multiplex), breaker


def blocking_client(
    url: str,
    breaker: Breaker,
    *,
    connect_timeout_s: float = 1.0,
    pool_timeout_s: float = 1.0,
    block_s: float = 1.0,
    multiplex: bool = True,
) -> Redis:
    """One more dedicated connection for a blocking command (the job queue's
    XREADGROUP), sharing `breaker`: a blocking command on the tail's connection would
    hold every reader of the stream log behind it."""
    options = _pool_options(breaker, connect_timeout_s, pool_timeout_s)
    return _single(url, block_s + 2.0, options, multiplex)


def _pool_options(
    breaker: Breaker, connect_timeout_s: float, pool_timeout_s: float
) -> dict[str, Any]:
    """What every pool shares: the breaker, the timeouts, and no retries (a retry would
    double a hung command's cost; the breaker decides)."""
    return {
        "breaker": breaker,
        "timeout": pool_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "retry": Retry(NoBackoff(), 0),
    }


def _single(url: str, timeout_s: float, common: dict[str, Any], multiplex: bool) -> Redis:
    """A client of one connection whose commands may wait in Redis (never a probe).
    Multiplexed, it is the same single connection with less Python per command; its
    commands go one at a time anyway (each caller waits for its reply)."""
    pool = BreakerConnectionPool.from_url(
        url, max_connections=1, socket_timeout=timeout_s, may_probe=False, **common
    )
    if multiplex:
        return MultiplexedRedis(
            pool, breaker=common["breaker"], timeout_s=timeout_s, may_probe=False
        )
    single = Redis(connection_pool=pool, single_connection_client=True)
    single.auto_close_connection_pool = True  # as from_pool does: the pool is its own
    return single
