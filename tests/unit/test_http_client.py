"""The upstream HTTP/1.1 client against raw socket servers: what reaches the wire and
what a broken peer turns into."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from streaming.providers._http import HTTPError, Pool
from testkit.servers import free_port

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, list[int], str]:
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(on_connect, "127.0.0.1", port)
    return server, connections, f"http://127.0.0.1:{port}/v1"


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def _chunked(*parts: bytes) -> bytes:
    out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    out += b"transfer-encoding: chunked\r\n\r\n"
    for part in parts:
        out += b"%x\r\n%s\r\n" % (len(part), part)
    return out + b"0\r\n\r\n"


async def _body(pool: Pool, payload: bytes = b"{}") -> tuple[int, bytes]:
    async with pool.stream("POST", "/chat", payload, {"x-extra": "1"}) as response:
        return response.status, b"".join([d async for d in response.aiter()])


async def test_request_on_the_wire_and_keep_alive_reuse() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                seen.append(await _read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(_chunked(b"data: a\n\n", b"data: b\n\n"))
            await writer.drain()

    server, connections, url = await _serve(handler)
    pool = Pool(url, headers={"authorization": "Bearer k"})
    try:
        for _ in range(3):
            assert await _body(pool, b'{"x":1}') == (200, b"data: a\n\ndata: b\n\n")
    finally:
        await pool.aclose()
        server.close()
    assert len(connections) == 1  # one socket carried all three exchanges
    head = seen[0].decode()
    assert head.startswith("POST /v1/chat HTTP/1.1\r\n")
    for line in ("host: 127.0.0.1:", "authorization: Bearer k", "x-extra: 1", "content-length: 7"):
        assert line in head
    assert seen[0].endswith(b'{"x":1}')


async def test_an_idle_connection_closed_by_the_server_is_replaced_transparently() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_chunked(b"ok"))
        await writer.drain()  # then close: keep-alive refused after the fact

    server, connections, url = await _serve(handler)
    pool = Pool(url)
    try:
        assert await _body(pool) == (200, b"ok")
        await asyncio.sleep(0.05)
        assert await _body(pool) == (200, b"ok")
    finally:
        await pool.aclose()
        server.close()
    assert len(connections) == 2


async def test_a_body_without_length_ends_with_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b'HTTP/1.1 503 Busy\r\nconnection: close\r\n\r\n{"error": 1}')
        await writer.drain()

    server, _, url = await _serve(handler)
    pool = Pool(url)
    try:
        assert await _body(pool) == (503, b'{"error": 1}')
    finally:
        await pool.aclose()
        server.close()


async def test_a_connection_dropped_mid_body_is_an_error_after_the_bytes_received() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_chunked(b"data: a\n\n")[:-5])  # no terminating chunk
        await writer.drain()

    server, _, url = await _serve(handler)
    pool = Pool(url)
    received: list[bytes] = []
    try:
        with pytest.raises(HTTPError) as caught:
            async with pool.stream("POST", "/chat", b"") as response:
                async for data in response.aiter():
                    received.append(data)
    finally:
        await pool.aclose()
        server.close()
    assert caught.value.mid_body
    assert b"".join(received) == b"data: a\n\n"


async def test_leaving_mid_body_closes_the_socket() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await reader.read()  # returns at EOF: the client went away
        closed.set()

    server, _, url = await _serve(handler)
    pool = Pool(url)
    try:
        async with pool.stream("POST", "/chat", b"") as response:
            async for data in response.aiter():
                assert data == b"hello"
                break
        await asyncio.wait_for(closed.wait(), 5)
    finally:
        await pool.aclose()
        server.close()


async def test_an_unreachable_provider_is_not_a_mid_body_error() -> None:
    pool = Pool(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(HTTPError) as caught:
        await _body(pool)
    assert not caught.value.mid_body


async def test_a_large_body_arrives_whole_through_back_pressure() -> None:
    blob = bytes(range(256)) * 8192  # 2 MiB, above the buffering high-water mark

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob) + blob)
        await writer.drain()

    server, _, url = await _serve(handler)
    pool = Pool(url)
    try:
        async with pool.stream("POST", "/chat", b"") as response:
            received = bytearray()
            async for data in response.aiter():
                received += data
                await asyncio.sleep(0)  # a slow reader
    finally:
        await pool.aclose()
        server.close()
    assert bytes(received) == blob


def test_only_http_urls() -> None:
    with pytest.raises(ValueError):
        Pool("ftp://example.com")


async def test_a_connection_left_with_reading_paused_is_not_reused() -> None:
    blob = b"x" * (300 * 1024)  # above the high-water mark: the last read pauses reading

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(blob) + blob)
            await writer.drain()

    server, connections, url = await _serve(handler)
    pool = Pool(url)
    try:
        async with pool.stream("POST", "/chat", b""):
            await asyncio.sleep(0.2)  # the whole body is buffered, reading paused
            # ... and the caller leaves without reading it (its client went away)
        status, body = await asyncio.wait_for(_body(pool), 5)
    finally:
        await pool.aclose()
        server.close()
    assert (status, len(body)) == (200, len(blob))
