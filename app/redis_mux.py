"""The shared Redis client, multiplexed: every caller's commands on one connection,
written the moment they are issued and answered in the order they were sent.

Why: redis-py's asyncio client checks a connection out of its pool for each command,
packs it in Python, writes, drains, reads through its parser and checks the connection
back in; on a stream's hot path (the limiter, the log's appends, a stream's creation
and its settlement) that is about 100 us of Python per command, more than Redis takes to
run it. Redis answers one connection's commands in order, so a single connection can
carry any number of concurrent commands: each call writes its packed bytes
(`hiredis.pack_command`) and waits on a future; one `data_received` feeds hiredis's
reader and resolves futures in order. Concurrent callers share round trips for free
(their writes coalesce into one segment), and nothing waits for a free connection.

What it keeps from redis-py: the command methods and their reply callbacks (this is a
`redis.asyncio.Redis` whose `execute_command` and `pipeline` go through the connection),
the exception classes callers already translate, script objects (`register_script`), and
connecting itself: the connection is opened, authenticated and selected by a redis-py
connection of the circuit breaker's pool (so `redis://`, `rediss://` and `unix://`, the
connect timeout and the breaker all work as for every other client), then its transport
is handed to this protocol.

What it cannot carry: blocking commands (they would hold every other command behind
them) and connection state (WATCH, SUBSCRIBE, CLIENT ID); those belong to the dedicated
clients (`redis_client.redis_clients`' tail, `blocking_client`).

Failures, as with the pooled clients (`app/redis_client.py`):

* a command unanswered after `timeout_s` means a hung Redis: every command waiting on
  the connection fails with `TimeoutError`, the connection is closed (a late reply must
  not answer someone else's command) and the breaker opens;
* a connection closed under waiting commands fails them with `ConnectionError`, without
  opening the breaker: the next command reconnects, and connecting says whether Redis is
  really gone;
* while the breaker is open, commands fail at once; when it lets one probe through, only
  that command is sent.

A caller that is cancelled stops waiting; its reply is still read, and dropped.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    ConnectionError,
    DataError,
    ExecAbortError,
    InvalidResponse,
    RedisError,
    ResponseError,
    TimeoutError,
    WatchError,
)

if TYPE_CHECKING:
    from .redis_client import Breaker

__all__ = ["MultiplexedRedis"]

# redis-py's option names (redis.asyncio.client): a reply to substitute for an error
# reply, and two that only its own parser or cache use.
_EMPTY_RESPONSE = "EMPTY_RESPONSE"
_DROPPED_OPTIONS = ("keys", "NEVER_DECODE", _EMPTY_RESPONSE)
_INCOMPLETE = object()


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, as redis-py would write it: a command name with a space
    ("SCRIPT EXISTS") is two words; str is UTF-8, numbers are their repr; anything else
    (a bool, None) is a `DataError`."""
    name = args[0]
    if isinstance(name, str):
        if " " in name:
            args = (*name.split(), *args[1:])
    elif b" " in name:
        args = (*name.split(), *args[1:])
    try:
        return cast(bytes, hiredis.pack_command(args))
    except TypeError as exc:
        if any(isinstance(a, bytearray) for a in args):  # redis-py takes them; hiredis not
            return pack(tuple(bytes(a) if isinstance(a, bytearray) else a for a in args))
        raise DataError(str(exc)) from None


class _Call:
    """Commands written together, waiting for their replies (`expected` of them;
    None: a single command, answered by its one reply rather than a list)."""

    __slots__ = ("expected", "future", "replies", "sent_at")
    may_probe = True
    """What the breaker asks (`Breaker.admit`): may this command be its probe."""

    def __init__(self, future: asyncio.Future[Any], expected: int | None, sent_at: float):
        self.future = future
        self.expected = expected
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _PatientCall(_Call):
    """A command that may legitimately wait in Redis (a blocking read): never the
    breaker's probe, which would hold the probe slot while Redis is fine."""

    __slots__ = ()
    may_probe = False


class _Wire(asyncio.Protocol):
    """The protocol of one transport. A new one per connection, so that a closed
    connection's late callbacks cannot touch its successor."""

    def __init__(self, owner: _Connection) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        if self.owner._wire is self:
            self.owner._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner._wire is self:
            self.owner._fail(ConnectionError(f"Connection closed by Redis: {exc or 'EOF'}"))


class _Connection:
    """The one connection, its reader, and the calls waiting on it in order."""

    def __init__(
        self, pool: ConnectionPool, breaker: Breaker, timeout_s: float, may_probe: bool
    ) -> None:
        self._pool = pool
        self._call_type = _Call if may_probe else _PatientCall
        self._breaker = breaker
        self._timeout_s = timeout_s
        self._transport: asyncio.Transport | None = None
        self._wire: _Wire | None = None
        self._opener: AbstractConnection | None = None  # owns the transport's objects
        self._lock = asyncio.Lock()
        self._reader = self._new_reader()
        self._waiting: deque[_Call] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False

    @staticmethod
    def _new_reader() -> hiredis.Reader:
        # Error replies become the exceptions redis-py raises for them (NoScriptError...);
        # "no complete reply yet" is a sentinel, since a RESP3 reply may be False.
        return hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_INCOMPLETE,
        )

    async def call(self, payload: bytes, expected: int | None) -> Any:
        """Write `payload` (`expected` commands, or one if None) and wait for its
        replies. Error replies come back as exception instances, not raised."""
        self._breaker.check()
        transport = self._transport
        if transport is None:
            transport = await self._connect()
        loop = asyncio.get_running_loop()
        call = self._call_type(loop.create_future(), expected, loop.time())
        self._breaker.admit(call)  # a no-op while closed; one probe at a time otherwise
        transport.write(payload)
        self._waiting.append(call)
        if self._watchdog is None:
            self._watchdog = loop.call_at(call.sent_at + self._timeout_s, self._check)
        try:
            return await call.future
        except asyncio.CancelledError:
            self._breaker.release(call)
            raise

    async def _connect(self) -> asyncio.Transport:
        if self._closed:
            raise ConnectionError("the Redis client is closed")
        if self._lock.locked() and self._breaker.state == "open":
            # Someone is connecting, and that connect is the breaker's probe: fail at
            # once rather than wait for it, as commands do.
            raise self._breaker.open_error()
        async with self._lock:  # one connect for everyone who found no connection
            if self._transport is not None:
                return self._transport
            opener: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                # Socket connect, TLS, AUTH/HELLO, SELECT: redis-py's, through the breaker.
                await opener.connect()  # type: ignore[no-untyped-call]
                if self._closed:
                    raise ConnectionError("the Redis client is closed")
            except BaseException:
                await opener.disconnect(nowait=True)  # cancelled mid-handshake too
                raise
            writer = cast(asyncio.StreamWriter, opener._writer)
            transport = cast(asyncio.Transport, writer.transport)
            self._reader = self._new_reader()
            self._wire = _Wire(self)
            transport.set_protocol(self._wire)
            self._opener, self._transport = opener, transport
            return transport

    def _received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as exc:
                self._fail(ConnectionError(f"Redis sent a malformed reply: {exc}"))
                return
            if reply is _INCOMPLETE:
                break
            if isinstance(reply, hiredis.PushNotification):
                continue  # a RESP3 push (e.g. maintenance notices): nobody's reply
            if not waiting:
                self._fail(ConnectionError("Redis sent a reply to no command"))
                return
            call = waiting[0]
            if call.expected is None:
                waiting.popleft()
                if not call.future.done():
                    call.future.set_result(reply)
                continue
            call.replies.append(reply)
            if len(call.replies) == call.expected:
                waiting.popleft()
                if not call.future.done():
                    call.future.set_result(call.replies)
        self._breaker.record_success()  # a no-op while closed

    # the watchdog: one timer for the whole connection, re-armed on the oldest call
    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        loop = asyncio.get_running_loop()
        due = self._waiting[0].sent_at + self._timeout_s
        if loop.time() >= due:
            error = TimeoutError(f"Timeout reading from Redis after {self._timeout_s}s")
            self._fail(error)
            self._breaker.record_failure(error)
        else:
            self._watchdog = loop.call_at(due, self._check)

    def _fail(self, error: RedisError) -> None:
        """Close the connection and fail every call waiting on it with `error`."""
        transport, self._transport, self._wire = self._transport, None, None
        if transport is not None:
            # Not close(): what is still buffered must not reach Redis after its callers
            # were told it failed.
            transport.abort()
        if self._opener is not None:
            # Its reader and writer wrapped the transport just closed.
            self._opener._reader = self._opener._writer = None
            self._opener = None
        self._reader = self._new_reader()
        waiting, self._waiting = self._waiting, deque()
        for call in waiting:
            self._breaker.release(call)
            if not call.future.done():
                call.future.set_exception(type(error)(*error.args))  # one traceback each
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        self._closed = True
        self._fail(ConnectionError("the Redis client is closed"))


def _parse(callbacks: Mapping[Any, Any], args: tuple[Any, ...], options: Any, reply: Any) -> Any:
    """What redis-py's `parse_response` makes of a reply: an error reply raised (or its
    substitute returned), then the command's reply callback."""
    if isinstance(reply, RedisError):  # an error reply: LOADING, NOAUTH are not ResponseErrors
        if _EMPTY_RESPONSE in options and isinstance(reply, ResponseError):
            return options[_EMPTY_RESPONSE]
        raise reply
    callback = callbacks.get(args[0])
    if callback is None:
        return reply
    for name in _DROPPED_OPTIONS:
        options.pop(name, None)
    return callback(reply, **options)


class MultiplexedRedis(Redis):
    """A `redis.asyncio.Redis` whose commands and pipelines share one connection (see
    the module docstring). `pool` opens that connection (its connections should report
    to `breaker`); it carries no commands. `timeout_s`: how long a command may wait for
    its reply before Redis counts as hung (for a blocking read: longer than its block).
    `may_probe=False`: for commands that may wait in Redis (see `_PatientCall`)."""

    multiplexed = True
    """Concurrent calls already share round trips: batching them again (the limiter's
    `Pipeliner`) would only add a task and a queue."""

    def __init__(
        self,
        pool: ConnectionPool,
        *,
        breaker: Breaker,
        timeout_s: float,
        may_probe: bool = True,
    ) -> None:
        super().__init__(connection_pool=pool)
        self.auto_close_connection_pool = True
        self._connection = _Connection(pool, breaker, timeout_s, may_probe)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await self._connection.call(pack(args), None)
        result = _parse(self.response_callbacks, args, options, reply)
        return await result if inspect.isawaitable(result) else result

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return MultiplexedPipeline(self, transaction)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        self._connection.close()
        await super().aclose(close_connection_pool)


class MultiplexedPipeline(Pipeline):
    """A pipeline written in one piece on the shared connection; with `transaction`,
    wrapped in MULTI/EXEC. Replies are what redis-py's pipelines return. WATCH needs a
    connection of its own and is refused."""

    def __init__(self, client: MultiplexedRedis, transaction: bool) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, None)
        self._connection = client._connection

    async def watch(self, *names: Any) -> None:  # type: ignore[override]
        raise RedisError("WATCH needs a connection of its own: not on the shared client")

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        # What redis-py sends at once from a pipeline: WATCH and what follows it.
        raise RedisError(f"{args[0]} needs a connection of its own: not on the shared client")

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        if not stack:
            return []
        try:
            if self.scripts:
                await self._load_scripts()
            if self.is_transaction or self.explicit_transaction:
                return await self._transaction(stack, raise_on_error)
            replies = await self._connection.call(
                b"".join(pack(args) for args, _ in stack), len(stack)
            )
            results: list[Any] = []
            for (args, options), reply in zip(stack, replies, strict=True):
                try:
                    result = _parse(self.response_callbacks, args, options, reply)
                    results.append(await result if inspect.isawaitable(result) else result)
                except ResponseError as exc:
                    results.append(exc)
            if raise_on_error:
                self.raise_first_error(stack, results)
            return results
        finally:
            self.command_stack = []
            self.scripts = set()

    async def _transaction(self, stack: list[Any], raise_on_error: bool) -> list[Any]:
        """MULTI, the commands, EXEC; then as redis-py's `_execute_transaction`: a
        command refused while queueing takes its place in the replies (and aborts the
        EXEC), replies go through their callbacks."""
        sent = [(args, options) for args, options in stack if _EMPTY_RESPONSE not in options]
        payload = b"".join([pack(("MULTI",)), *(pack(a) for a, _ in sent), pack(("EXEC",))])
        replies = await self._connection.call(payload, len(sent) + 2)
        for reply in replies:
            if isinstance(reply, RedisError) and not isinstance(reply, ResponseError):
                raise reply  # LOADING, NOAUTH...: no answer at all, as redis-py raises
        errors: list[tuple[int, Any]] = []
        if isinstance(replies[0], ResponseError):
            errors.append((0, replies[0]))
        queued = iter(replies[1:-1])
        for i, (args, options) in enumerate(stack):
            if _EMPTY_RESPONSE in options:
                errors.append((i, options[_EMPTY_RESPONSE]))
                continue
            reply = next(queued)
            if isinstance(reply, ResponseError):
                self.annotate_exception(reply, i + 1, args)
                errors.append((i, reply))
        executed = replies[-1]
        if isinstance(executed, ExecAbortError):
            if errors:
                raise errors[0][1] from executed
            raise executed
        if isinstance(executed, ResponseError):
            raise executed
        if executed is None:
            raise WatchError("Watched variable changed.")
        response = list(executed)
        for i, error in errors:
            response.insert(i, error)
        if len(response) != len(stack):
            raise ResponseError("Wrong number of response items from pipeline execution")
        if raise_on_error:
            self.raise_first_error(stack, response)
        results: list[Any] = []
        for reply, (args, options) in zip(response, stack, strict=True):
            if not isinstance(reply, Exception):
                callback = self.response_callbacks.get(args[0])
                if callback is not None:
                    options.pop("keys", None)
                    reply = callback(reply, **options)
                    if inspect.isawaitable(reply):
                        reply = await reply
            results.append(reply)
        return results

    async def _load_scripts(self) -> None:
        """The pipeline's scripts into Redis's cache, where missing: an EVALSHA inside a
        pipeline cannot recover from NOSCRIPT."""
        scripts = list(self.scripts)
        exists = await self._connection.call(
            pack(("SCRIPT", "EXISTS", *(s.sha for s in scripts))), None
        )
        if isinstance(exists, RedisError):
            raise exists
        for script, found in zip(scripts, exists, strict=True):
            if not found:
                sha = await self._connection.call(pack(("SCRIPT", "LOAD", script.script)), None)
                if isinstance(sha, RedisError):
                    raise sha
                script.sha = sha.decode() if isinstance(sha, bytes) else sha
