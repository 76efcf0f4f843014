"""What a connection may cost before it has earned a response: uvicorn's HTTP/1.1
protocols, with deadlines on the phases a client controls and caps on what idle
connections may hold.

Uvicorn on its own waits forever for a request head or body that never completes,
accepts heads of any size, and keeps every accepted connection until the process runs
out of file descriptors, after which new clients are dropped without a word. Here:

- **head**: a request head must be complete within `header_timeout_s`, counted from the
  accept (first request) or from its first byte (later requests on a keep-alive
  connection): a byte now and then buys nothing. Late: `408` if anything was received,
  else the connection is just closed;
- **body**: while a request body is being received, `body_timeout_s` without a byte ends
  it: `408` if the response has not started, and the handler's `receive()` returns
  `http.disconnect`. Time the server itself stops reading (flow control, or a pending
  `100 Continue`) is not held against the client;
- **size**: head bytes are counted as they arrive, before the parser sees them: past
  `max_header_bytes`, or past `MAX_HEADERS` headers, the answer is `431` and the
  connection closes, having buffered at most the limit;
- **idle**: a keep-alive connection waits `keepalive_timeout_s` for its next request, and
  at most `max_idle_connections` wait at once (the oldest is closed first);
- **cap**: at `max_connections` (by default the open-file limit minus a reserve for
  upstream, Redis and files), a new connection first takes the place of the oldest idle
  one (keep-alive, or silent since its accept for more than `EVICT_GRACE_S`); with none,
  it gets a static `503` with `Retry-After: 1` and is closed, instead of waiting in the
  accept queue for a descriptor.

A response in progress is never timed: an SSE stream may last as long as it likes (its
slow readers are the send timeout's business). Each connection has at most one timer
handle, moved only when a deadline comes earlier; a later deadline is picked up when the
timer fires. Refusals are counted and logged at debug level, at most one line per kind
every `LOG_EVERY_S`.

`protocol_class(limits)` is for `uvicorn.Config(http=...)` in this process;
`HttpToolsFromEnv` and `H11FromEnv` are for `--workers N`, where uvicorn imports the
protocol by name in each worker and the limits come from that worker's settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import socket
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast
from weakref import WeakKeyDictionary, ref

import h11
import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

if TYPE_CHECKING:
    from .settings import Settings

logger = logging.getLogger("sserelay.connections")

MAX_HEADERS = 100
"""Most header fields in one request head (browsers send about 20)."""
FD_RESERVE = 1000
"""Descriptors kept back from the connection cap for upstream, Redis and files."""
MIN_CONNECTIONS = 100
EVICT_GRACE_S = 1.0
"""A new connection may not yet have sent its request: at the cap, only one silent for
longer than this is closed to make room."""
LINGER_S = 1.0
"""After a refusal is written, how long the rest of the request is read and dropped, so
that closing does not reset the connection before the client reads the answer."""
MAX_LINGERING = 256
"""Refused connections lingering at once; past it, they are closed at once."""
LOG_EVERY_S = 10.0

_HEAD, _BODY, _IDLE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keepalive_timeout_s: float = 5.0
    max_header_bytes: int = 32_768
    max_headers: int = MAX_HEADERS
    max_connections: int = 0
    """0 is replaced at once by the cap derived from the open-file limit."""
    max_idle_connections: int = 1000
    send_buffer_bytes: int = 0
    """The kernel send buffer of each connection (SO_SNDBUF; 0: the kernel's own
    autotuning, up to several MB): what a client that stops reading can hold."""

    def __post_init__(self) -> None:
        if self.max_connections <= 0:
            object.__setattr__(self, "max_connections", derive_max_connections(0))

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
            max_header_bytes=settings.max_header_bytes,
            max_connections=settings.max_connections,
            max_idle_connections=settings.max_idle_connections,
            send_buffer_bytes=settings.send_buffer_bytes,
        )


def derive_max_connections(configured: int, soft_limit: int | None = None) -> int:
    """`configured` if set; else the soft RLIMIT_NOFILE minus a reserve of `FD_RESERVE`
    descriptors (a quarter of the limit, when that is less), at least `MIN_CONNECTIONS`."""
    if configured > 0:
        return configured
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY or soft_limit <= 0:
        return 1 << 30
    return max(MIN_CONNECTIONS, soft_limit - min(FD_RESERVE, soft_limit // 4))


def _answer(status: int, reason: str, code: str, detail: str, *extra: bytes) -> tuple[bytes, bytes]:
    """A `Connection: close` problem+json response, in two parts: before and after the
    request id (made when it is sent)."""
    body = json.dumps(
        {
            "type": f"https://sserelay.dev/problems/{code}",
            "title": reason,
            "status": status,
            "detail": detail,
            "code": code,
        }
    ).encode()
    head = [
        b"HTTP/1.1 %d %s" % (status, reason.encode()),
        b"content-type: application/problem+json",
        b"content-length: %d" % len(body),
        b"connection: close",
        b"cache-control: no-store",
        # The headers every response of the app carries (app/middleware.py).
        b"x-content-type-options: nosniff",
        b"referrer-policy: no-referrer",
        b"x-frame-options: DENY",
        b"cross-origin-opener-policy: same-origin",
        b"cross-origin-resource-policy: same-origin",
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\nx-request-id: ", b"\r\n\r\n" + body


_ANSWERS = {
    400: _answer(400, "Bad Request", "invalid_request_line", "the request is not valid HTTP/1.1"),
    408: _answer(408, "Request Timeout", "request_timeout", "the request was not received in time"),
    431: _answer(
        431,
        "Request Header Fields Too Large",
        "headers_too_large",
        "the request head is too large",
    ),
    503: _answer(
        503,
        "Service Unavailable",
        "too_many_connections",
        "this server has no room for another connection; retry shortly",
        b"retry-after: 1",
    ),
}


class _Registry:
    """One server's shared connection state: the idle and not-yet-heard-from
    connections, oldest first, and the refusal counts."""

    __slots__ = ("idle", "fresh", "lingering", "counts", "logged", "last_log")

    def __init__(self) -> None:
        self.idle: OrderedDict[_Guard, None] = OrderedDict()
        self.fresh: OrderedDict[_Guard, float] = OrderedDict()
        self.lingering = 0
        self.counts: dict[str, int] = {}
        self.logged: dict[str, int] = {}
        self.last_log: dict[str, float] = {}

    def make_room(self, now: float) -> bool:
        """Closes the oldest idle connection, if there is one to spare."""
        if self.idle:
            oldest, _ = self.idle.popitem(last=False)
            oldest._idle = False
        elif self.fresh:
            oldest, accepted = next(iter(self.fresh.items()))
            if now - accepted < EVICT_GRACE_S:
                return False
            del self.fresh[oldest]
            oldest._fresh = False
        else:
            return False
        self.note("evicted_idle", now)
        oldest.transport.close()
        return True

    def note(self, kind: str, now: float) -> None:
        count = self.counts[kind] = self.counts.get(kind, 0) + 1
        if not logger.isEnabledFor(logging.DEBUG):
            return
        if now - self.last_log.get(kind, -LOG_EVERY_S) >= LOG_EVERY_S:
            logger.debug(
                "connections: %s x%d since the last line", kind, count - self.logged.get(kind, 0)
            )
            self.logged[kind] = count
            self.last_log[kind] = now


_registries: WeakKeyDictionary[ServerState, _Registry] = WeakKeyDictionary()


def refusal_counts(server_state: ServerState) -> dict[str, int]:
    """Connections refused or closed early on this server, by kind (`header_timeout`,
    `body_timeout`, `headers_too_large`, `too_many_connections`, `evicted_idle`,
    `idle_cap`)."""
    registry = _registries.get(server_state)
    return dict(registry.counts) if registry is not None else {}


class _Guard:
    """The deadlines, caps and refusals, shared by the two protocols below. The
    subclasses keep `_in_head` and `_in_body` current and call the hooks."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    # Provided by the uvicorn protocol this is mixed into.
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    connections: set[Any]
    cycle: Any
    flow: Any

    # Per-connection state; these class values are the initial ones (an assignment
    # makes them the connection's own), which keeps setting up a connection cheap.
    _timer: asyncio.TimerHandle | None = None
    _timer_at = 0.0
    _fresh = False
    """Accepted, nothing received yet (in the registry's `fresh`)."""
    _idle = False
    """Between requests on a keep-alive connection (in the registry's `idle`)."""
    _in_head = True
    _in_body = False
    _head_start = 0.0
    _head_bytes = 0
    _head_seen = False
    _heads_done = 0
    _last_rx = 0.0
    _idle_since = 0.0
    _refused = False
    _lingering = False
    _detached = False

    def _guard_init(self, server_state: ServerState) -> None:
        registry = _registries.get(server_state)
        if registry is None:
            registry = _registries[server_state] = _Registry()
        self._registry = registry

    # -- connection lifetime --------------------------------------------------------

    def _admit(self, transport: asyncio.Transport) -> bool:
        """Whether the new connection may be served; if not, it has been answered 503."""
        now = self.loop.time()
        full = len(self.connections) >= self.limits.max_connections
        if full and not self._registry.make_room(now):
            self.transport = transport
            self._refuse(503, "too_many_connections", now)
            return False
        if self.limits.send_buffer_bytes:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET, socket.SO_SNDBUF, self.limits.send_buffer_bytes
                    )
        self._head_start = now
        self._fresh = True
        self._registry.fresh[self] = now
        # The earlier of the head and keep-alive deadlines: most connections send their
        # request and go idle before it fires, and the timer need not move.
        self._arm(now + min(self.limits.header_timeout_s, self.limits.keepalive_timeout_s))
        return True

    def _guard_lost(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._lingering:
            self._lingering = False
            self._registry.lingering -= 1
        self._leave_lists()

    def _detach(self) -> None:
        """The connection is handed to another protocol (a WebSocket upgrade)."""
        self._guard_lost()
        self._detached = True

    def _leave_lists(self) -> None:
        if self._fresh:
            self._fresh = False
            self._registry.fresh.pop(self, None)
        if self._idle:
            self._idle = False
            self._registry.idle.pop(self, None)

    def _received(self, now: float) -> None:
        """Bookkeeping for bytes that just arrived, before they are parsed."""
        if self._fresh:
            self._fresh = False
            self._registry.fresh.pop(self, None)
        elif self._idle:
            self._idle = False
            self._registry.idle.pop(self, None)
            self._in_head = True
            self._head_start = now
            self._head_bytes = 0
        if self._in_head:
            self._head_seen = True

    def _head_began(self) -> None:
        """The parser saw a request start: a pipelined one, or one after idling."""
        if not self._in_head:
            self._in_head = True
            self._head_start = self.loop.time()
            self._head_bytes = 0
        self._head_seen = True

    def _head_ended(self) -> None:
        """The head is complete (`_last_rx` is the caller's to set)."""
        self._in_head = False
        self._head_seen = False
        self._heads_done += 1
        self._in_body = True

    # -- deadlines --------------------------------------------------------------------

    def _busy(self) -> bool:
        cycle = self.cycle
        return cycle is not None and not cycle.response_complete

    def _deadline(self) -> tuple[float, int] | None:
        if self._in_body:
            return self._last_rx + self.limits.body_timeout_s, _BODY
        if self._busy():
            return None  # a response is being written: never timed here
        if self._in_head:
            return self._head_start + self.limits.header_timeout_s, _HEAD
        return self._idle_since + self.limits.keepalive_timeout_s, _IDLE

    def _settle(self) -> None:
        """After anything that may change the phase: become idle if nothing is going
        on, and make sure the timer fires no later than the current deadline."""
        if self._refused or self._detached or self.transport.is_closing():
            return
        limits = self.limits
        if self._in_body:
            self._arm(self._last_rx + limits.body_timeout_s)
        elif self._busy():
            return  # a response is being written: never timed here
        elif self._in_head:
            self._arm(self._head_start + limits.header_timeout_s)
        else:
            if not self._idle:
                self._become_idle()
            self._arm(self._idle_since + limits.keepalive_timeout_s)

    def _become_idle(self) -> None:
        now = self.loop.time()
        self._idle = True
        self._idle_since = now
        idle = self._registry.idle
        idle[self] = None
        if len(idle) > self.limits.max_idle_connections:
            oldest, _ = idle.popitem(last=False)
            oldest._idle = False
            self._registry.note("idle_cap", now)
            oldest.transport.close()

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return  # it fires first, and moves itself on
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._refused:
            self.transport.close()  # done lingering
            return
        if self._detached or self.transport.is_closing():
            return
        deadline = self._deadline()
        if deadline is None:
            return  # a response is running; the timer is set again once it ends
        when, phase = deadline
        now = self.loop.time()
        if now < when - 0.002:
            self._arm(when)
        elif phase == _HEAD:
            if self._head_seen:
                self._refuse(408, "header_timeout", now)
            else:
                self._registry.note("header_timeout", now)
                self.transport.close()
        elif phase == _BODY:
            cycle = self.cycle
            if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
                # The server is not reading, or the client waits for 100 Continue.
                self._last_rx = now
                self._arm(now + self.limits.body_timeout_s)
                return
            self._end_request()
            self._refuse(408, "body_timeout", now)
        elif self._idle:
            self.transport.close()
        else:
            self._settle()  # it has only just become idle: its keep-alive clock starts now

    def _end_request(self) -> None:
        """The request will get no more of its body: its handler's `receive()` says
        `http.disconnect`, and whatever it sends is dropped."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()

    # -- refusals ---------------------------------------------------------------------

    if TYPE_CHECKING:
        # Each protocol's parser: feeds `data`, False when the connection is done.
        def _feed(self, data: bytes | memoryview) -> bool: ...

    def _take(self, data: bytes) -> bool:
        """Feed `data` to the parser, a head only as far as the size limit lets it go
        (so nothing past the limit is buffered); False when the connection is done."""
        view: bytes | memoryview = data
        while self._in_head and view:
            fits = self._count_head(view)
            if fits == len(view):
                break
            # Parse only what fits: the head must end within it.
            heads = self._heads_done
            view = memoryview(view)
            if not self._feed(view[:fits]):
                return False
            view = view[fits:]
            if self._in_head and self._heads_done == heads:
                self._refuse(431, "headers_too_large")
                return False
        return not (view and not self._feed(view))

    def _refuse(self, status: int, kind: str, now: float | None = None) -> None:
        """Answers `status` (unless a response is already under way), then closes,
        reading and dropping what the client still sends for up to `LINGER_S`."""
        if now is None:
            now = self.loop.time()
        registry = self._registry
        registry.note(kind, now)
        answer = not self._refused and not (
            self.cycle is not None
            and self.cycle.response_started
            and not self.cycle.response_complete
        )
        self._refused = True
        self._leave_lists()
        transport = self.transport
        if transport.is_closing():
            return
        if not answer:
            transport.close()
            return
        before, after = _ANSWERS[status]
        transport.write(b"".join((before, uuid.uuid4().hex.encode(), after)))
        if registry.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        registry.lingering += 1
        self._lingering = True
        transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = now + LINGER_S
        self._timer = self.loop.call_at(self._timer_at, self._on_timer)

    def _count_head(self, data: bytes | memoryview) -> int:
        """How many of `data`'s bytes may be parsed before the head limit: all of them,
        or (when the head is in progress and they do not fit) what still fits."""
        room = self.limits.max_header_bytes - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            return len(data)
        self._head_bytes += room
        return room


class _TooManyHeaders(Exception):
    pass


class _AbortingTransport:
    """The connection's transport, except that closing it while its response is left
    incomplete with bytes still buffered aborts it. That is how an SSE response drops a
    client too slow to read (it ends without its last chunk, and uvicorn closes): a
    plain close would wait, holding the descriptor, for a buffer that client never
    drains.

    The protocol is held weakly: it holds this transport, and a strong reference back
    would make every connection a reference cycle, freed (with the request and
    response objects it reaches) only by the cyclic collector."""

    __slots__ = ("_transport", "_protocol")

    def __init__(self, transport: asyncio.Transport, protocol: HttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = ref(protocol)

    def close(self) -> None:
        protocol = self._protocol()
        cycle = protocol.cycle if protocol is not None else None
        dropped = cycle is not None and cycle.response_started and not cycle.response_complete
        if dropped and self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
    """uvicorn's httptools protocol (the one `sserelay serve` runs), guarded."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard_init(server_state)
        self._too_many_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._admit(transport):
            super().connection_made(cast(asyncio.Transport, _AbortingTransport(transport, self)))

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self._detached:
            return  # lingering after a refusal: read and dropped
        now = self.loop.time()
        self._received(now)
        if not self._take(data):
            return
        if self._in_body:
            self._last_rx = now
        self._settle()

    def _feed(self, data: bytes | memoryview) -> bool:
        """uvicorn's `data_received`, telling whether to go on."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self._too_many_headers:
                self._refuse(431, "headers_too_large")
            else:
                # Not uvicorn's plain-text 400: a problem with a code, like any refusal.
                self._refuse(400, "invalid_request_line")
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return not self._detached

    def handle_websocket_upgrade(self) -> None:
        self._detach()
        super().handle_websocket_upgrade()

    def on_message_begin(self) -> None:
        self._head_began()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        # Counted here rather than per header (the head's size is already bounded): the
        # app never sees the request.
        if len(self.headers) > self.limits.max_headers:
            self._too_many_headers = True
            raise _TooManyHeaders
        self._head_ended()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unset_keepalive_if_required()  # uvicorn's keep-alive timer: the guard's covers it
        self._settle()

    def _busy(self) -> bool:
        return _Guard._busy(self) or bool(self.pipeline)


class _H11Connection(h11.Connection):
    """h11 has no header callback: a head with too many fields is refused as the
    parser produces it, before the request reaches the app."""

    max_headers = MAX_HEADERS
    too_many_headers = False

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request) and len(event.headers) > self.max_headers:
            self.too_many_headers = True
            raise h11.RemoteProtocolError("too many header fields", error_status_hint=431)
        return event


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol, guarded: the fallback when httptools is missing."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._guard_init(server_state)
        conn = _H11Connection(h11.SERVER, self.limits.max_header_bytes + 1024)
        conn.max_headers = self.limits.max_headers
        self.conn = conn

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if self._admit(transport):
            super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_lost()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused or self._detached:
            return
        self._received(self.loop.time())
        if not self._take(data):
            return
        self._settle()

    def _feed(self, data: bytes | memoryview) -> bool:
        self.conn.receive_data(data if isinstance(data, bytes) else bytes(data))
        self.handle_events()
        if self._refused or self._detached or self.transport.is_closing():
            return False
        self._track()
        return True

    def _track(self) -> None:
        """Where the request stands, from the events h11 produced."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if not self._in_head:
                self._in_body = False  # done, and h11 is ready for the next request
            return
        if self._in_head:
            self._head_ended()
        self._in_body = state is h11.SEND_BODY
        if self._in_body:
            self._last_rx = self.loop.time()

    def send_400_response(self, msg: str) -> None:
        if isinstance(self.conn, _H11Connection) and self.conn.too_many_headers:
            self._refuse(431, "headers_too_large")
            return
        self._refuse(400, "invalid_request_line")

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._detach()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._unset_keepalive_if_required()
        if not self.transport.is_closing():
            self._track()  # a pipelined request may have been parsed just now
        self._settle()


def _env_limits(cls: type[_Guard]) -> None:
    if "limits" not in cls.__dict__:
        from .settings import Settings

        cls.limits = ConnectionLimits.from_settings(Settings())


class HttpToolsFromEnv(GuardedHttpToolsProtocol):
    """For `uvicorn.Config(http="app.connections:HttpToolsFromEnv")` in worker
    processes: the limits come from the worker's own `SSERELAY_*` settings."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        _env_limits(type(self))
        super().__init__(config, server_state, app_state, _loop)


class H11FromEnv(GuardedH11Protocol):
    """`HttpToolsFromEnv` for h11."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        _env_limits(type(self))
        super().__init__(config, server_state, app_state, _loop)


def protocol_class(
    limits: ConnectionLimits, *, h11_fallback: bool = False
) -> type[asyncio.Protocol]:
    """The guarded protocol with these limits, for `uvicorn.Config(http=...)`."""
    base: type[asyncio.Protocol] = GuardedH11Protocol if h11_fallback else GuardedHttpToolsProtocol
    return type(base.__name__, (base,), {"limits": limits, "__module__": __name__})


def protocol_path(*, h11_fallback: bool = False) -> str:
    """The import path of the protocol that reads its limits from the settings, for
    worker processes (which import it by name)."""
    name = H11FromEnv.__name__ if h11_fallback else HttpToolsFromEnv.__name__
    return f"{__name__}:{name}"
