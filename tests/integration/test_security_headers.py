"""The headers a browser-facing service owes its users, on every response, and no
redirect or answer built from a forged Host header."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from testkit.servers import ServerThread
from tests.support import auth, relay_settings

HELMET = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


@pytest.fixture(scope="module")
def guarded(config_path: Path) -> Iterator[ServerThread]:
    server = ServerThread(
        relay_settings(config_path, allowed_hosts="127.0.0.1,relay.example.com", hsts=True)
    )
    yield server
    server.stop()


async def test_every_response_carries_the_helmet_set(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    responses = [
        await client.get(relay.url + "/healthz"),
        await client.get(relay.url + "/v1/models", headers=auth()),
        await client.get(relay.url + "/v1/models"),  # 401
        await client.get(relay.url + "/nope"),  # 404
        await client.post(relay.url + "/v1/streams", content=b"{", headers=auth()),  # 415
        await client.post(
            relay.url + "/v1/chat/stream",
            json={"model": "sim-fast", "prompt": "hi"},
            headers=auth(),
        ),
        await client.get(relay.url + "/"),
        await client.get(relay.url + "/static/app.js"),
    ]
    for r in responses:
        for name, value in HELMET.items():
            assert r.headers.get(name) == value, (r.request.url, name, r.headers)
        assert "strict-transport-security" not in r.headers  # plain http, not told otherwise
    # User data is never cached; the demo page's files keep their own caching.
    for r in responses[:6]:
        assert r.headers["cache-control"] == "no-store", r.request.url
    assert responses[6].headers["cache-control"] == "no-cache"
    assert "frame-ancestors 'none'" in responses[6].headers["content-security-policy"]


async def test_hsts_when_told(guarded: ServerThread, client: httpx.AsyncClient) -> None:
    r = await client.get(guarded.url + "/healthz")
    assert r.headers["strict-transport-security"].startswith("max-age=31536000")


async def test_no_redirect_is_built_from_the_host_header(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    r = await client.get(relay.url + "/v1/models/", headers={**auth(), "host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert r.headers["content-type"] == "application/problem+json"


async def test_hosts_outside_the_allow_list_are_refused(
    guarded: ServerThread, client: httpx.AsyncClient
) -> None:
    evil = await client.get(guarded.url + "/v1/models", headers={**auth(), "host": "evil.example"})
    assert evil.status_code == 400 and evil.json()["code"] == "invalid_host"
    assert evil.headers["x-content-type-options"] == "nosniff"
    good = await client.get(
        guarded.url + "/v1/models", headers={**auth(), "host": "relay.example.com:443"}
    )
    assert good.status_code == 200
    assert (await client.get(guarded.url + "/v1/models", headers=auth())).status_code == 200
