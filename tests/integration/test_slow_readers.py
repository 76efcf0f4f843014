"""Readers that stop reading: bounded memory, dropped after the send timeout, upstream
cancelled on the direct route; on the resumable route only that reader goes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerProcess
from tests.support import SECRET, auth, token, write_config

SEND_TIMEOUT_S = 3


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed while listed
            pass
    return count


@pytest.fixture(scope="module")
def fast_config(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer) -> Path:
    path = write_config(tmp_path_factory.mktemp("slow"), upstream.url, name="slow")
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    # As fast as the fake can write: far more than any socket buffer holds.
    for name, provider in (("huge", "openai"), ("huge-anthropic", "anthropic")):
        raw["models"][name] = {
            "provider": provider,
            "upstream": "fake?tokens=200000&batch=64",
            "max_output_tokens": 200_000,
        }
    raw["models"]["long"] = {  # 10 s of output, far more than a socket buffer holds
        "provider": "openai",
        "upstream": "fake?tokens=200000&tps=20000&batch=64",
        "max_output_tokens": 200_000,
    }
    raw["plans"]["pro"]["max_tokens"] = 200_000
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def server(fast_config: Path) -> Iterator[ServerProcess]:
    s = ServerProcess(
        {
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_CONFIG": str(fast_config),
            "SSERELAY_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
            "SSERELAY_SEND_BUFFER_BYTES": "16384",
            "SSERELAY_ORPHAN_GRACE_S": "1",
        }
    )
    yield s
    s.stop()


def _never_read(port: int, path: str, body: dict[str, Any], count: int) -> list[socket.socket]:
    raw = json.dumps(body).encode()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token()}\r\nContent-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        socks.append(s)
    return socks


@pytest.mark.parametrize("model", ["huge", "huge-anthropic"])
async def test_clients_that_never_read_cost_bounded_memory_and_are_dropped(
    server: ServerProcess, upstream: FakeUpstreamServer, model: str
) -> None:
    start = _rss_mb(server.proc.pid)
    idle_sockets = _sockets(server.proc.pid)
    socks = _never_read(
        server.port, "/v1/chat/stream", {"model": model, "prompt": "hi", "max_tokens": 200_000}, 10
    )
    try:
        peak = start
        deadline = time.monotonic() + SEND_TIMEOUT_S + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            peak = max(peak, _rss_mb(server.proc.pid))
            records = upstream.app.records
            if len(records) == 10 and all(r.client_closed for r in records):
                break
        records = upstream.app.records
        assert len(records) == 10
        # Upstream cancelled, not run to its end: nobody was reading.
        assert all(r.client_closed and r.tokens_sent < 200_000 for r in records), [
            (r.client_closed, r.tokens_sent) for r in records
        ]
        # What each holds of the provider's bytes is bounded by the send buffer setting
        # (16 KiB here), whatever the kernel would have buffered: about 1-2 MB each in
        # all. Unbounded, the Anthropic SDK's transport moves a whole autotuned receive
        # buffer into the process at once: 4-6 MB each.
        assert peak - start < 30, f"RSS grew {peak - start:.0f} MB"
        # The dropped connections are gone from the server (aborted: a plain close would
        # wait on a buffer these clients never drain), and so are the upstream ones.
        for _ in range(40):
            if _sockets(server.proc.pid) <= idle_sockets:
                break
            await asyncio.sleep(0.25)
        assert _sockets(server.proc.pid) <= idle_sockets
    finally:
        for s in socks:
            s.close()
    async with httpx.AsyncClient() as client:  # and the server is fine
        r = await client.get(server.url + "/v1/usage", headers=auth())
        assert r.status_code == 200


async def test_a_stalled_reader_of_a_resumable_stream_is_dropped_alone(
    server: ServerProcess,
) -> None:
    """A reader whose writes stall still counts as a reader until the send timeout (it
    used to be taken for no reader at all: the stream was cancelled as orphaned after the
    1 s grace); then only that reader is dropped, and with nobody else reading the
    stream ends as orphaned."""
    async with httpx.AsyncClient(timeout=60) as client:
        created = (
            await client.post(
                server.url + "/v1/streams",
                json={"model": "long", "prompt": "stalled", "max_tokens": 200_000},
                headers=auth(),
            )
        ).json()
        stalled = socket.create_connection(("127.0.0.1", server.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        stalled.sendall(f"GET {created['events_url']} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        status_url = server.url + created["status_url"]
        try:
            await asyncio.sleep(SEND_TIMEOUT_S - 0.5)  # well past the grace, stalled
            info = (await client.get(status_url, headers=auth())).json()
            # (polling is reading too, so only this one poll, after the wait)
            assert info["status"] == "running", info.get("error")
            # The send timeout drops it; then nobody reads: orphaned after the grace.
            await asyncio.sleep(SEND_TIMEOUT_S + 2)
            info = (await client.get(status_url, headers=auth())).json()
        finally:
            stalled.close()
    assert info["status"] == "orphaned", info["status"]
