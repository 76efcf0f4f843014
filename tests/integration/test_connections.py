"""Connection protections on a real `sserelay serve` process, over raw sockets: slow or
stalled request heads and bodies are cut off, oversized heads get 431, connections past
the cap get 503 while the oldest idle ones make room, idle keep-alive connections are
capped and timed out, and a long SSE response is never mistaken for an idle one."""

from __future__ import annotations

import errno
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testkit.servers import ServerProcess
from tests.support import SECRET, token

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEPALIVE_TIMEOUT_S = 2.0
SLACK_S = 2.5


def _env(config_path: Path, **extra: str) -> dict[str, str]:
    return {
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config_path),
        "SSERELAY_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "SSERELAY_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "SSERELAY_KEEPALIVE_TIMEOUT_S": str(KEEPALIVE_TIMEOUT_S),
        "SSERELAY_MAX_CONNECTIONS": "300",
        "SSERELAY_MAX_IDLE_CONNECTIONS": "50",
        **extra,
    }


@pytest.fixture(scope="module")
def server(config_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(_env(config_path))
    yield proc
    proc.stop()


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _poll(sock: socket.socket, received: bytearray) -> bool:
    """Reads what has arrived without waiting; whether the server closed the socket."""
    while True:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:
            return False
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not chunk:
            return True
        received += chunk


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within `timeout`, and what it sent."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(received)
        if not chunk:
            return True, bytes(received)
        received += chunk
    return False, bytes(received)


def _read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


def _status_of(received: bytes) -> int | None:
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received.split(b" ", 2)[1])


def _healthz(server: ServerProcess, timeout: float = 10.0) -> tuple[int, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    finally:
        conn.close()
    return status, time.monotonic() - started


def _healthz_in_thread(server: ServerProcess) -> tuple[threading.Thread, list[object]]:
    result: list[object] = []

    def run() -> None:
        time.sleep(0.3)
        try:
            result.append(_healthz(server))
        except OSError as exc:  # recorded, then asserted on
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _open_fds(server: ServerProcess) -> int:
    return len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir()))


def test_slowloris_heads_are_cut_off_at_the_header_timeout(server: ServerProcess) -> None:
    """25 new connections and 25 keep-alive ones (after a first request) trickle a header
    byte every 0.3 s: each byte must not buy more time, and all are closed (with a 408)
    at the header timeout, while a normal client is answered meanwhile."""
    socks: list[socket.socket] = []
    for i in range(50):
        sock = _connect(server)
        if i % 2:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock)[0] == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    started = time.monotonic()
    checker, health = _healthz_in_thread(server)
    open_socks = dict(enumerate(socks))
    received = {i: bytearray() for i in open_socks}
    closed_after: dict[int, float] = {}
    try:
        while open_socks and time.monotonic() - started < HEADER_TIMEOUT_S + SLACK_S:
            for i, sock in list(open_socks.items()):
                closed = _poll(sock, received[i])
                if not closed:
                    try:
                        sock.send(b"a")
                    except OSError as exc:
                        closed = exc.errno in (errno.EPIPE, errno.ECONNRESET)
                if closed:
                    closed_after[i] = time.monotonic() - started
                    del open_socks[i]
            time.sleep(0.3)
        checker.join(10)
        assert not open_socks, f"{len(open_socks)} of 50 slowloris connections still open"
        assert max(closed_after.values()) < HEADER_TIMEOUT_S + SLACK_S
        statuses = {_status_of(bytes(r)) for r in received.values()}
        assert statuses <= {408, None}, statuses
        assert 408 in statuses
        assert isinstance(health[0], tuple) and health[0][0] == 200, health
    finally:
        for sock in socks:
            sock.close()


def test_stalled_body_and_unfinished_request_line_are_ended(server: ServerProcess) -> None:
    body_sock = _connect(server)
    body_sock.sendall(
        b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + token().encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        b'{"model": '
    )
    line_sock = _connect(server)
    line_sock.sendall(b"GET /\r\n")
    try:
        started = time.monotonic()
        closed, received = _read_until_closed(body_sock, BODY_TIMEOUT_S + SLACK_S)
        assert closed, "a body shorter than its Content-Length is waited on"
        assert _status_of(received) in (408, None), received[:200]
        assert time.monotonic() - started < BODY_TIMEOUT_S + SLACK_S

        closed, received = _read_until_closed(line_sock, HEADER_TIMEOUT_S + SLACK_S)
        assert closed, "an unfinished request line is waited on"
        assert _status_of(received) in (408, 400, None), received[:200]
    finally:
        body_sock.close()
        line_sock.close()


def test_oversized_heads_get_431_and_only_head_bytes_count(server: ServerProcess) -> None:
    """A 64 KB head and a head of 1,000 fields get 431; a head just under the limit is
    served, and so is a 200 kB body arriving in the same reads as its small head."""
    for head in (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
        + b"\r\n",
    ):
        sock = _connect(server)
        try:
            try:
                sock.sendall(head)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the whole head was sent; the answer is still there
            closed, received = _read_until_closed(sock, 5)
            assert _status_of(received) == 431, received[:200]
            assert closed
        finally:
            sock.close()

    sock = _connect(server)
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 30_000 + b"\r\n\r\n")
        assert _read_response(sock)[0] == 200
    finally:
        sock.close()
    body = json.dumps({"model": "sim-fast", "prompt": "x" * 200_000, "max_tokens": 2}).encode()
    sock = _connect(server)
    try:
        sock.sendall(
            b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        sock.settimeout(10)
        received = b""
        while b"event: done" not in received:
            chunk = sock.recv(65536)
            assert chunk, received[:200]
            received += chunk
        assert _status_of(received) == 200
    finally:
        sock.close()


def test_connection_cap_and_idle_cap(config_path: Path) -> None:
    """Past max_connections a new connection gets a 503 with Retry-After (or the oldest
    idle connection is closed to make room); a normal client gets in; idle keep-alive
    connections beyond max_idle_connections are closed, oldest first."""
    server = ServerProcess(
        _env(config_path, SSERELAY_HEADER_TIMEOUT_S="10", SSERELAY_KEEPALIVE_TIMEOUT_S="10")
    )
    socks: list[socket.socket] = []
    try:
        baseline = _open_fds(server)
        for _ in range(340):
            socks.append(_connect(server))
        deadline = time.monotonic() + 3
        refused: dict[int, bytes] = {}
        while time.monotonic() < deadline and len(refused) < 40:
            for i, sock in enumerate(socks):
                if i not in refused:
                    received = bytearray()
                    if _poll(sock, received) or received:
                        refused[i] = bytes(received)
            time.sleep(0.05)
        assert len(refused) >= 40, f"only {len(refused)} of 340 refused or closed"
        answered = [r for r in refused.values() if r]
        for response in answered:
            assert _status_of(response) == 503, response[:200]
            assert b"\r\nretry-after: 1\r\n" in response.lower()
        time.sleep(1.2)  # refused sockets linger at most a second for the client to read
        assert _open_fds(server) < baseline + 300 + 10

        started = time.monotonic()
        while True:
            try:
                status, _ = _healthz(server, timeout=2)
            except OSError:
                status = 0
            if status == 200 or time.monotonic() - started > 5:
                break
            time.sleep(0.1)
        assert status == 200, "a normal client is shut out by idle connections"

        for sock in socks:
            sock.close()
        socks.clear()
        time.sleep(0.3)
        for _ in range(80):
            sock = _connect(server)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock)[0] == 200
            socks.append(sock)
        time.sleep(0.5)
        closed = [i for i, sock in enumerate(socks) if _poll(sock, bytearray())]
        assert len(closed) >= 30, f"{80 - len(closed)} idle connections kept (max 50)"
        assert min(closed) == 0 and len([i for i in closed if i >= 40]) < 10  # oldest first
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_a_long_stream_outlives_the_timeouts_then_idles_out(server: ServerProcess) -> None:
    """A ~3 s SSE response outlives header, body and keep-alive timeouts of 1-2 s and ends
    with `done`; the connection is then closed after the keep-alive timeout."""
    body = json.dumps({"model": "sim-slow", "prompt": "stream", "max_tokens": 60}).encode()
    sock = _connect(server)
    try:
        sock.sendall(
            b"POST /v1/chat/stream HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + token().encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        started = time.monotonic()
        sock.settimeout(15)
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            chunk = sock.recv(65536)
            assert chunk, f"closed mid-stream after {time.monotonic() - started:.1f}s"
            data += chunk
        duration = time.monotonic() - started
        assert data.startswith(b"HTTP/1.1 200 ")
        assert b"event: done" in data
        assert duration > max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S, KEEPALIVE_TIMEOUT_S)

        idle_from = time.monotonic()
        closed, _ = _read_until_closed(sock, KEEPALIVE_TIMEOUT_S + 1.5)
        assert closed, "idle keep-alive connection kept past keepalive_timeout_s"
        assert time.monotonic() - idle_from >= KEEPALIVE_TIMEOUT_S - 0.5
    finally:
        sock.close()


def test_the_h11_fallback_has_the_same_protections() -> None:
    """uvicorn's h11 protocol (used when httptools is missing), guarded the same way: in
    a server of its own, with a minimal app that reads the body and echoes it."""
    import uvicorn

    from app.connections import ConnectionLimits, protocol_class
    from testkit.servers import free_socket

    async def echo(scope: dict[str, object], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    limits = ConnectionLimits(
        header_timeout_s=1,
        body_timeout_s=1,
        keepalive_timeout_s=2,
        max_header_bytes=4096,
        max_connections=300,
        max_idle_connections=5,
    )
    listener = free_socket()
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        echo, http=protocol_class(limits, h11_fallback=True), lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    socks: list[socket.socket] = []

    def connect(data: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        socks.append(sock)
        sock.sendall(data)
        return sock

    try:
        deadline = time.monotonic() + 5
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        slow = connect(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        stalled = connect(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        big = connect(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        many = connect(
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
            + b"\r\n"
        )
        for sock, status in ((slow, 408), (stalled, 408), (big, 431), (many, 431)):
            closed, received = _read_until_closed(sock, 1 + SLACK_S)
            assert closed and _status_of(received) == status, received[:100]
        echo_hi = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
        idle = [connect(echo_hi) for _ in range(10)]
        for sock in idle:
            assert _read_response(sock) == (200, b"hi")
        time.sleep(0.3)
        closed_idle = [i for i, sock in enumerate(idle) if _poll(sock, bytearray())]
        assert closed_idle == [0, 1, 2, 3, 4]
    finally:
        for sock in socks:
            sock.close()
        server.should_exit = True
        thread.join(10)
