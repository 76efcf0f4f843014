"""A small HTTP/1.1 client for streaming from one upstream: a keep-alive pool of
asyncio protocols around httptools' C parser (the one uvicorn uses).

Why not httpx: relaying a stream is one request and then many small body reads, and
httpx spends most of a short stream's CPU in its pure-Python layers (h11, anyio, the
pool and its locks); this client does the same work in a fraction of it. What it
supports is what streaming from a model server needs: one origin per pool, http and
https, chunked or sized bodies, keep-alive, a connect timeout, back-pressure, and
cancellation that closes the socket. Read timeouts belong to the caller (the pipeline's
first-token and idle timeouts).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

_HIGH_WATER = 256 * 1024  # bytes buffered before the socket stops being read (at most)


class HTTPError(Exception):
    """The connection failed; `mid_body` says whether a response had begun."""

    def __init__(self, message: str, *, mid_body: bool = False) -> None:
        super().__init__(message)
        self.mid_body = mid_body


class _Connection(asyncio.Protocol):
    """One socket; one exchange at a time. Parser callbacks fill the current response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._response: Response | None = None
        self._parser: httptools.HttpResponseParser | None = None
        self._keep_alive = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HTTPError(f"malformed HTTP from the provider: {exc}", mid_body=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self._response
        if response is None or response.complete:
            return
        if response.status and not response.delimited and exc is None:
            response.complete = True  # a body without a length ends with its connection
            response._wake()
            return
        self._fail(
            HTTPError(
                f"the provider closed the connection: {exc or 'EOF'}",
                mid_body=response.status != 0,
            )
        )

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        response = self._response
        assert response is not None and self._parser is not None
        key = name.decode("latin-1").lower()
        if key == "content-length" or (key == "transfer-encoding" and b"chunked" in value):
            response.delimited = True
        # A stream's headers are of no use once it is streaming; an error's may say
        # when to retry. Only the latter are kept (this is per open stream).
        if self._parser.get_status_code() != 200:
            response.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self._response is not None and self._parser is not None
        self._response.status = self._parser.get_status_code()
        self._response._wake()

    def on_body(self, body: bytes) -> None:
        assert self._response is not None
        self._response._push(body)

    def on_message_complete(self) -> None:
        assert self._response is not None and self._parser is not None
        # Asked now: once the message is parsed, the parser no longer knows.
        self._keep_alive = self._parser.should_keep_alive()
        self._response.complete = True
        self._response._wake()

    # the client side
    def start(self, response: Response, request: bytes) -> None:
        assert self.transport is not None
        self._response = response
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(request)

    def done(self) -> bool:
        """The exchange is over; True if the connection can carry another."""
        reusable = (
            not self.closed
            and self._response is not None
            and self._response.complete
            and self._keep_alive
            and not self._response._paused  # a paused socket would never read a reply
        )
        self._keep_alive = False
        self._response = None
        self._parser = None
        return reusable

    def _fail(self, error: HTTPError) -> None:
        if self._response is not None:
            self._response.error = error
            self._response._wake()
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """Status once it is in (and headers, for a status other than 200); the body as it
    arrives, through `aiter()`. Leaving `Pool.stream()` releases the connection."""

    def __init__(self, connection: _Connection, high_water: int = _HIGH_WATER) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.delimited = False  # a length or chunking, rather than the connection's end
        self.complete = False
        self.error: HTTPError | None = None
        self._connection = connection
        self._chunks: list[bytes] = []  # a list: a deque's first block alone is 600 bytes
        self._buffered = 0
        self._high_water = high_water
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _push(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > self._high_water and not self._paused:
            transport = self._connection.transport
            if transport is not None:
                transport.pause_reading()
                self._paused = True
        self._wake()

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def _head(self) -> None:
        while not self.status and self.error is None:
            await self._wait()
        if self.error is not None and not self.status:
            raise self.error

    async def aiter(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, in whatever pieces the network delivered."""
        chunks = self._chunks
        while True:
            if chunks:
                data = b"".join(chunks) if len(chunks) > 1 else chunks[0]
                chunks.clear()
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    transport = self._connection.transport
                    if transport is not None:
                        transport.resume_reading()
                yield data
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait()

    async def aread(self, limit: int = 1 << 20) -> bytes:
        body = bytearray()
        async for data in self.aiter():
            body += data
            if len(body) > limit:
                break
        return bytes(body)


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` at once (a stream
    waits for a free slot rather than failing).

    `receive_buffer_bytes` caps what a response buffers before its socket stops being
    read (`_HIGH_WATER` at most): what a stream whose consumer stopped reading holds of
    the provider's bytes in this process. The rest waits in the kernel's receive
    buffer, where the provider's flow control holds it back."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_connections: int = 1000,
        max_idle: int = 100,
        connect_timeout_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        receive_buffer_bytes: int = _HIGH_WATER,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = url.hostname
        self.tls = url.scheme == "https"
        self.port = url.port or (443 if self.tls else 80)
        self.base_path = url.path.rstrip("/")
        default_port = self.port == (443 if self.tls else 80)
        authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # IPv6 literal
            authority = f"[{self.host}]" if default_port else f"[{self.host}]:{self.port}"
        self._fixed = f"host: {authority}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in (headers or {}).items()
        )
        self._ssl = (ssl_context or ssl.create_default_context()) if self.tls else None
        self._idle: list[_Connection] = []
        self._max_idle = max_idle
        self._slots = asyncio.Semaphore(max_connections)
        self._connect_timeout_s = connect_timeout_s
        self.high_water = min(receive_buffer_bytes, _HIGH_WATER)
        self._closed = False

    async def _reuse(self) -> _Connection | None:
        """An idle connection still open. One loop turn first, so that a close the
        server sent while it idled is seen before the request is written: once it is
        written, a failure is never retried here (the server may have acted on it; the
        pipeline's retry policy decides)."""
        if not self._idle:
            return None
        await asyncio.sleep(0)
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and not (
                connection.transport is None or connection.transport.is_closing()
            ):
                return connection
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
        except TimeoutError as exc:
            raise HTTPError("timed out connecting to the provider") from exc
        except OSError as exc:
            raise HTTPError(f"cannot reach the provider: {exc}") from exc
        return protocol

    def _release(self, connection: _Connection) -> None:
        if connection.done() and not self._closed and len(self._idle) < self._max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    def stream(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> _Exchange:
        """`async with pool.stream(...) as response:`; leaving the block releases the
        connection (closed, unless the body was read to its end)."""
        head = f"{method} {self.base_path}{path} HTTP/1.1\r\n{self._fixed}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"content-length: {len(body)}\r\n\r\n"
        return _Exchange(self, head.encode("latin-1") + body)

    async def aclose(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()


class _Exchange:
    def __init__(self, pool: Pool, request: bytes) -> None:
        self._pool = pool
        self._request = request
        self._connection: _Connection | None = None
        self._held = False

    async def __aenter__(self) -> Response:
        await self._pool._slots.acquire()
        self._held = True
        try:
            connection = await self._pool._reuse() or await self._pool._connect()
            self._connection = connection
            response = Response(connection, self._pool.high_water)
            connection.start(response, self._request)
            self._request = b""  # written: the prompt need not stay in memory for the stream
            await response._head()
            return response
        except BaseException:
            await self.__aexit__(None, None, None)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        if self._connection is not None:
            self._pool._release(self._connection)
            self._connection = None
        if self._held:
            self._held = False
            self._pool._slots.release()
