"""Hostile bodies, headers and tokens: every refusal is a 4xx problem, never a 500, and
no body is read past its limit. Each case was a 500 (or an unbounded read) once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from testkit.servers import ServerThread
from testkit.sse import collect
from tests.support import SECRET, auth, relay_settings

CLIENT_SECRET = "c" * 40
DEEP = b"[" * 6000 + b"]" * 6000


@pytest.fixture(scope="module")
def server(config_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(relay_settings(config_path, auth_client_secret=CLIENT_SECRET))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dev_server(config_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(relay_settings(config_path, jwt_secret=None))
    yield s
    s.stop()


def _problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == code
    assert "Traceback" not in r.text and "x-request-id" in r.headers


async def _finished_stream(server: ServerThread, client: httpx.AsyncClient) -> str:
    r = await client.post(
        server.url + "/v1/streams", json={"model": "sim-fast", "prompt": "hi"}, headers=auth()
    )
    assert r.status_code == 201
    async with client.stream("GET", server.url + r.json()["events_url"]) as events:
        assert (await collect(events)).names[-1] == "done"
    stream_id: str = r.json()["id"]
    return stream_id


def _json_headers(**extra: str) -> dict[str, str]:
    return {"content-type": "application/json", **extra}


async def test_deep_json_on_every_body_route(
    server: ServerThread, dev_server: ServerThread, client: httpx.AsyncClient
) -> None:
    stream_id = await _finished_stream(server, client)
    routes = [
        (server, "/v1/streams", auth()),
        (server, "/v1/chat/stream", auth()),
        (server, "/v1/auth/refresh", {}),
        (server, "/v1/auth/logout", {}),
        (server, "/v1/auth/token", {"authorization": f"Bearer {CLIENT_SECRET}"}),
        (server, f"/v1/streams/{stream_id}/feedback", auth()),
        (dev_server, "/v1/auth/dev-token", {}),
    ]
    for target, path, headers in routes:
        r = await client.post(target.url + path, content=DEEP, headers=_json_headers(**headers))
        _problem(r, 400, "invalid_json")
    # A prompt nested deep inside an otherwise valid request.
    nested = b'{"model":"sim-fast","prompt":"x","metadata":' + DEEP + b"}"
    r = await client.post(
        server.url + "/v1/streams", content=nested, headers=_json_headers(**auth())
    )
    _problem(r, 400, "invalid_json")


async def test_deep_json_over_keep_alive_gets_an_answer_every_time(
    server: ServerThread,
) -> None:
    """Each refusal is a complete response on a connection that stays usable: 300 in a
    row on one keep-alive connection, none cut."""
    async with httpx.AsyncClient(
        base_url=server.url, limits=httpx.Limits(max_connections=1)
    ) as one:
        for _ in range(300):
            r = await one.post("/v1/auth/refresh", content=DEEP, headers=_json_headers())
            assert r.status_code == 400 and r.headers.get("connection") != "close"


@pytest.mark.parametrize(
    "body",
    [
        {"sub": "alice", "plan": ["pro"]},
        {"sub": "alice", "plan": {"a": 1}},
        {"sub": "alice", "scopes": "sserelay:admin"},
        {"sub": "alice", "cookie": "yes"},
        {"sub": 5},
    ],
)
async def test_token_grant_types_are_strict(
    server: ServerThread, client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await client.post(
        server.url + "/v1/auth/token",
        json=body,
        headers={"authorization": f"Bearer {CLIENT_SECRET}"},
    )
    _problem(r, 422, "invalid_request")


async def test_feedback_is_strict(server: ServerThread, client: httpx.AsyncClient) -> None:
    stream_id = await _finished_stream(server, client)
    url = f"{server.url}/v1/streams/{stream_id}/feedback"
    for body in ({"rating": True}, {"rating": "5"}, {"rating": 6}, {"rating": 1.5}):
        _problem(await client.post(url, json=body, headers=auth()), 422, "invalid_request")
    surrogate = b'{"rating": "up", "comment": "\\ud800"}'
    r = await client.post(url, content=surrogate, headers=_json_headers(**auth()))
    _problem(r, 400, "invalid_json")
    ok = await client.post(url, json={"rating": 4, "comment": "fine"}, headers=auth())
    assert ok.status_code == 200 and ok.json()["feedback"]["rating"] == 4


async def test_lone_surrogates_are_refused_in_every_text_field(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    bodies = [
        b'{"model":"claude","prompt":"hi","system":"a\\udc00b"}',
        b'{"model":"sim-fast","prompt":"\\ud83d"}',
        b'{"model":"sim-fast","messages":[{"role":"user","content":"x\\udfff"}]}',
        b'{"model":"sim-fast","prompt":"hi","metadata":{"\\ud800":"k"}}',
    ]
    for body in bodies:
        r = await client.post(
            server.url + "/v1/streams", content=body, headers=_json_headers(**auth())
        )
        _problem(r, 400, "invalid_json")
    # A paired surrogate is an ordinary emoji.
    r = await client.post(
        server.url + "/v1/streams",
        content=b'{"model":"sim-fast","prompt":"\\ud83d\\ude00"}',
        headers=_json_headers(**auth()),
    )
    assert r.status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"sim-fast","prompt":"x","temperature":NaN}',
        b'{"model":"sim-fast","prompt":"x","temperature":1e999}',
        b'{"model":"sim-fast","prompt":"x","max_tokens":' + b"9" * 5000 + b"}",
        b'{"model":"sim-fast","prompt":"x","prompt":"y"}',
        b'{"model":"sim-fast","prompt":"\xff\xfe"}',
    ],
    ids=["nan", "infinity", "huge-int", "duplicate-key", "invalid-utf8"],
)
async def test_json_is_strict(server: ServerThread, client: httpx.AsyncClient, body: bytes) -> None:
    r = await client.post(server.url + "/v1/streams", content=body, headers=_json_headers(**auth()))
    _problem(r, 400, "invalid_json")


def _token(**claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "plan": "pro", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "\ud800"},
        {"sub": "a\x00b"},
        {"exp": str(int(time.time()) + 600)},
        {"exp": True},
        {"iat": "0"},
        {"nbf": "0"},
    ],
    ids=["surrogate-sub", "nul-sub", "string-exp", "bool-exp", "string-iat", "string-nbf"],
)
async def test_hostile_claims_are_401(
    server: ServerThread, client: httpx.AsyncClient, claims: dict[str, Any]
) -> None:
    if claims.get("sub") == "\ud800":
        # PyJWT cannot encode a lone surrogate itself: build the payload by hand.
        header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
        now = int(time.time())
        body = f'{{"sub":"\\ud800","plan":"pro","iat":{now},"exp":{now + 600}}}'.encode()
        signing_input = header + b"." + jwt.utils.base64url_encode(body)
        signature = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).sign(
            signing_input, SECRET.encode()
        )
        token = (signing_input + b"." + jwt.utils.base64url_encode(signature)).decode()
    else:
        token = _token(**claims)
    r = await client.get(server.url + "/v1/usage", headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 401, r.text
    assert r.json()["code"] in ("invalid_token", "token_expired")  # `true` is 1 to PyJWT


async def test_non_ascii_digits_in_last_event_id(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    r = await client.post(
        server.url + "/v1/streams", json={"model": "sim-fast", "prompt": "hi"}, headers=auth()
    )
    url = server.url + r.json()["events_url"]
    q = await client.get(url + "&last_event_id=%C2%B2")
    _problem(q, 400, "invalid_last_event_id")
    # The raw header byte 0xB2 ("²" in Latin-1), as a client can send it.
    host, port = server.url.removeprefix("http://").split(":")
    path = r.json()["events_url"]
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode()
        + b"Last-Event-ID: \xb2\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 400"), head


def _stream_body(host: str, port: int, path: str, chunks: int) -> tuple[bytes, int]:
    """POST a chunked body of `chunks` x 64 KiB, stopping as soon as the server answers;
    returns the answer's head and how many body bytes went out."""
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        piece = b"10000\r\n" + b" " * 65536 + b"\r\n"
        sock.setblocking(False)
        answer = b""
        for _ in range(chunks):
            try:
                answer += sock.recv(65536)
            except BlockingIOError:
                pass
            if answer:
                break
            try:
                sock.sendall(piece)
                sent += 65536
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
        sock.setblocking(True)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer, sent


@pytest.mark.parametrize("path", ["/v1/auth/refresh", "/v1/auth/logout"])
async def test_unauthenticated_routes_stop_reading_at_their_limit(
    server: ServerThread, path: str
) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    answer, sent = await asyncio.to_thread(_stream_body, host, int(port), path, 3200)  # 200 MB
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 8 * 1024 * 1024, f"{sent} bytes went out before the 413"


async def test_declared_length_over_the_limit_is_refused_unread(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/auth/refresh HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        "Content-Length: 200000000\r\n\r\n{".encode()
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413"), head


async def test_escaped_quotes_cost_linear_time(
    server: ServerThread, client: httpx.AsyncClient
) -> None:
    """An unterminated string of escaped quotes: the nesting check once retried it from
    every quote (a 32 kB body took 3 s, a 1 MB one would have taken most of an hour,
    with every stream on the process frozen)."""
    body = b'"' + b'\\"' * 450_000
    r = await client.post(
        server.url + "/v1/streams",
        content=body,
        headers=_json_headers(**auth()),
        timeout=30,
    )
    _problem(r, 400, "invalid_json")


async def test_json_in_utf16_is_refused(server: ServerThread, client: httpx.AsyncClient) -> None:
    """`json.loads(bytes)` would guess UTF-16, past a nesting check made for UTF-8."""
    for body in ("[" * 700 + "]" * 700, '{"model":"sim-fast","prompt":"x"}'):
        r = await client.post(
            server.url + "/v1/auth/refresh",
            content=body.encode("utf-16"),
            headers=_json_headers(),
        )
        _problem(r, 400, "invalid_json")
