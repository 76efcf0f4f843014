"""The load generator's HTTP: raw HTTP/1.1 over asyncio streams, raw SSE parsing.

No HTTP library on purpose: the generator must cost less than what it measures, and
every layer it skips is CPU the two-core box gives back to the proxy.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

HOST = "127.0.0.1"


@dataclass
class Sample:
    ttft_s: float
    text: str
    events: int = 0
    """Events that carried text (sserelay `delta`s, OpenAI chunks with content)."""
    error: str | None = None
    """The code of the error the stream ended with, if it ended with one."""


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Pool:
    """Keep-alive connections to one port: a request takes the most recently returned
    idle one, or opens one if none is idle; a response read to its end gives it back."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[Connection] = []
        self.opened = 0

    async def take(self) -> tuple[Connection, bool]:
        """A connection, and whether it was used before."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return (reader, writer), True
            writer.close()
        self.opened += 1
        return await asyncio.open_connection(HOST, self.port), False

    def give(self, conn: Connection, headers: dict[str, str]) -> None:
        if headers.get("connection", "").lower() == "close":
            conn[1].close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def request(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    pool: Pool | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
    """The response head. Without `pool`, on a new connection that the server closes
    after the response; with one, on a kept-alive connection from it (the caller reads
    the body with `chunks(..., keep_alive=True)` and gives the connection back)."""
    if pool is None:
        reader, writer = await asyncio.open_connection(HOST, port)
        reused = False
    else:
        assert pool.port == port, "a pool serves one port"
        (reader, writer), reused = await pool.take()
    head = f"{method} {path} HTTP/1.1\r\nhost: {HOST}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head += f"content-length: {len(body)}\r\n"
    head += "connection: close\r\n\r\n" if pool is None else "\r\n"
    writer.write(head.encode() + body)
    try:
        status_line = await reader.readline()
    except ConnectionError:
        if not reused:
            raise
        status_line = b""
    if not status_line:
        writer.close()
        if reused and pool is not None:  # closed by the server while idle: once more, anew
            pool.close()
            return await request(port, method, path, body, headers, pool)
        raise ConnectionError(f"{method} {path}: connection closed before a response")
    status = int(status_line.split()[1])
    response_headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return reader, writer, status, response_headers


async def chunks(
    reader: asyncio.StreamReader, headers: dict[str, str], *, keep_alive: bool = False
) -> AsyncIterator[bytes]:
    """The body, de-chunked, as it arrives. `keep_alive`: the connection stays open, so
    the body ends at its length or its last chunk's trailer, not at the close."""
    if headers.get("transfer-encoding") != "chunked":
        if keep_alive:
            if length := int(headers.get("content-length", "0")):
                yield await reader.readexactly(length)
            return
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            if keep_alive:
                while (await reader.readline()) not in (b"\r\n", b""):
                    pass  # trailer fields, then the blank line that ends the response
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def request_json(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    pool: Pool | None = None,
) -> Any:
    payload = b"" if body is None else json.dumps(body).encode()
    reader, writer, status, response_headers = await request(
        port, method, path, payload, {"content-type": "application/json", **(headers or {})}, pool
    )
    if pool is None:
        try:
            raw = b"".join([c async for c in chunks(reader, response_headers)])
        finally:
            writer.close()
    else:
        try:
            raw = b"".join([c async for c in chunks(reader, response_headers, keep_alive=True)])
        except BaseException:
            writer.close()
            raise
        pool.give((reader, writer), response_headers)
    if status >= 300:
        raise RuntimeError(f"{method} {path} answered {status}: {raw[:200]!r}")
    return json.loads(raw) if raw else None


async def latency(port: int, path: str) -> float:
    """Seconds for one small GET, connection included."""
    started = time.perf_counter()
    reader, writer, _, headers = await request(port, "GET", path)
    async for _ in chunks(reader, headers):
        pass
    writer.close()
    return time.perf_counter() - started


async def stream(
    port: int,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
    kind: str,
    started: float | None = None,
    first: asyncio.Future[None] | None = None,
    pool: Pool | None = None,
) -> Sample:
    """One stream read to its end; `kind` says how to find text: `openai` chunks or
    sserelay `delta`s. Time to first text counts from `started` (default: now); `first`,
    if given, is resolved when the first text arrives. `pool`: on a kept-alive connection
    from it, given back once the stream has ended."""
    started = started if started is not None else time.perf_counter()
    payload = b"" if body is None else json.dumps(body).encode()
    reader, writer, status, response_headers = await request(
        port,
        method,
        path,
        payload,
        {**headers, "content-type": "application/json", "accept": "text/event-stream"},
        pool,
    )
    if status != 200:
        writer.close()
        raise RuntimeError(f"{path} answered {status}")
    ttft = None
    text: list[str] = []
    error: str | None = None
    buffer = b""
    ended = False
    try:
        async for data in chunks(reader, response_headers, keep_alive=pool is not None):
            buffer += data
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if kind == "openai":
                    if not frame.startswith(b"data: {"):
                        continue
                    chunk = json.loads(frame[6:])
                    if "error" in chunk:
                        error = str((chunk["error"] or {}).get("code"))
                    for choice in chunk.get("choices") or ():
                        piece = choice["delta"].get("content")
                        if piece:
                            text.append(piece)
                elif frame.startswith(b"id: ") and b"\nevent: delta\n" in frame:
                    text.append(json.loads(frame.split(b"data: ", 1)[1])["text"])
                elif b"event: error\n" in frame:
                    error = str(json.loads(frame.split(b"data: ", 1)[1]).get("code"))
                    continue
                else:
                    continue
                if ttft is None and text:
                    ttft = time.perf_counter() - started
                    if first is not None and not first.done():
                        first.set_result(None)
        ended = True
    finally:
        if pool is not None and ended:
            pool.give((reader, writer), response_headers)
        else:
            writer.close()
    return Sample(ttft if ttft is not None else float("nan"), "".join(text), len(text), error)
