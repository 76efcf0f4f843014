"""The public HTTP/SSE contract, end to end over real HTTP: every provider kind, resume,
cancellation, orphans, upstream faults."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from streaming import GenerationRequest, Message, simulated_text
from testkit.fake_upstream import FakeUpstreamServer, expected_text
from testkit.servers import ServerThread
from testkit.sse import Collected, collect, sse_events
from tests.support import auth, relay_settings

BODY = {"model": "sim-fast", "prompt": "Tell me about streams", "max_tokens": 20}


async def start_stream(
    client: httpx.AsyncClient,
    relay: ServerThread,
    body: dict[str, Any] | None = None,
    sub: str = "alice",
) -> dict[str, Any]:
    r = await client.post(relay.url + "/v1/streams", json=body or BODY, headers=auth(sub))
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def read_events(
    client: httpx.AsyncClient,
    url: str,
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> Collected:
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return await collect(response, stop_after=stop_after)


def check_contract(events: Collected, *, max_tokens: int) -> None:
    names = events.names
    assert names[0] == "start" and names[-1] == "done"
    assert names[-2] == "progress"
    assert set(names) == {"start", "delta", "progress", "done"}
    ids = [e.id for e in events.events]
    assert ids == list(range(1, len(ids) + 1))
    start = events.events[0].data
    assert {"stream_id", "model", "provider", "plan", "max_tokens", "created_at"} <= set(start)
    assert start["max_tokens"] == max_tokens
    percents = [e.data["percent"] for e in events.events if e.event == "progress"]
    assert percents == sorted(percents) and percents[-1] == 100
    done = events.last("done")
    assert set(done) >= {"stop_reason", "usage", "cost_usd", "ttft_ms", "duration_ms"}
    # delta indices are offsets in UTF-16 code units, as JavaScript counts: no gap,
    # no overlap (an emoji counts two)
    offset = 0
    for e in events.events:
        if e.event == "delta":
            assert e.data["index"] == offset
            offset += len(e.data["text"].encode("utf-16-le")) // 2


async def test_simulated_stream_full_event_order(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    created = await start_stream(client, any_relay)
    assert set(created) == {"id", "events_url", "status_url", "ticket", "expires_at"}
    events = await read_events(client, any_relay.url + created["events_url"])
    check_contract(events, max_tokens=20)
    assert events.retry is not None
    request = GenerationRequest("sim-fast", (Message("user", BODY["prompt"]),), 20)
    assert events.text == simulated_text(request, 20)
    done = events.last("done")
    assert done["usage"]["output_tokens"] == 20
    assert done["stop_reason"] == "max_tokens"
    assert done["cost_usd"] == pytest.approx((done["usage"]["input_tokens"] * 1.0 + 20 * 5.0) / 1e6)


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_upstream_providers_stream_text_usage_and_cost(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient, model: str
) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 100}
    created = await start_stream(client, relay, body)
    events = await read_events(client, relay.url + created["events_url"])
    check_contract(events, max_tokens=100)
    assert events.text == expected_text(40)
    done = events.last("done")
    # The fake upstream reports input = chars // 4, output = tokens sent.
    assert done["usage"] == {"input_tokens": 100, "output_tokens": 40}
    prices = {"claude": (3.0, 15.0), "gpt": (2.0, 8.0)}[model]
    assert done["cost_usd"] == pytest.approx((100 * prices[0] + 40 * prices[1]) / 1e6)
    assert done["stop_reason"] == "end_turn"
    record = upstream.app.records[-1]
    assert record.api == ("anthropic" if model == "claude" else "openai")
    assert record.completed and not record.client_closed
    assert record.headers.get("x-request-id")


async def test_direct_chat_stream(relay: ServerThread, client: httpx.AsyncClient) -> None:
    async with client.stream(
        "POST", relay.url + "/v1/chat/stream", json=BODY, headers=auth()
    ) as response:
        assert response.status_code == 200
        events = await collect(response)
    check_contract(events, max_tokens=20)


async def test_resume_with_last_event_id_replays_exactly_the_missing_events(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    body = {"model": "sim-slow", "prompt": "resume me", "max_tokens": 30}
    created = await start_stream(client, any_relay, body)
    url = any_relay.url + created["events_url"]
    first = await read_events(client, url, stop_after=6)  # the reader drops mid-stream
    last_id = first.events[-1].id
    assert last_id is not None
    rest = await read_events(client, url, headers={"last-event-id": str(last_id)})
    assert rest.events[0].id == last_id + 1
    whole = Collected(events=first.events + rest.events)
    check_contract(whole, max_tokens=30)
    request = GenerationRequest("sim-slow", (Message("user", "resume me"),), 30)
    assert whole.text == simulated_text(request, 30)
    # A fresh EventSource can only say where it was in the query string.
    again = await read_events(client, url + f"&last_event_id={last_id}")
    assert [e.id for e in again.events] == [e.id for e in rest.events]
    # After the terminal event there is nothing left: 204 tells EventSource to stop.
    r = await client.get(url, headers={"last-event-id": str(whole.events[-1].id)})
    assert r.status_code == 204


async def test_finished_stream_replays_and_status_shows_text(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    created = await start_stream(client, any_relay)
    live = await read_events(client, any_relay.url + created["events_url"])
    replay = await read_events(client, any_relay.url + created["events_url"])
    assert [(e.id, e.event, e.data) for e in replay.events] == [
        (e.id, e.event, e.data) for e in live.events
    ]
    r = await client.get(any_relay.url + created["status_url"], headers=auth())
    assert r.status_code == 200
    status = r.json()
    assert status["status"] == "done" and status["text"] == live.text
    assert status["done"] == live.last("done")
    assert status["last_event_id"] == live.events[-1].id


async def test_streams_are_private_to_their_owner(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    created = await start_stream(client, any_relay)
    stream_id = created["id"]
    for method, path in [
        ("GET", f"/v1/streams/{stream_id}"),
        ("DELETE", f"/v1/streams/{stream_id}"),
        ("POST", f"/v1/streams/{stream_id}/ticket"),
        ("GET", f"/v1/streams/{stream_id}/events"),
    ]:
        theirs = await client.request(method, any_relay.url + path, headers=auth("mallory"))
        missing = await client.request(
            method, any_relay.url + path.replace(stream_id, "s_nope"), headers=auth("mallory")
        )
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json()["code"] == missing.json()["code"] == "stream_not_found"
    # A ticket is bound to its stream.
    other = await start_stream(client, any_relay)
    r = await client.get(
        any_relay.url + f"/v1/streams/{other['id']}/events", params={"ticket": created["ticket"]}
    )
    assert r.status_code == 401 and r.json()["code"] == "invalid_ticket"
    assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    # A fresh ticket for one's own stream works.
    r = await client.post(any_relay.url + f"/v1/streams/{stream_id}/ticket", headers=auth())
    assert r.status_code == 200
    events = await read_events(client, any_relay.url + r.json()["events_url"])
    assert events.names[-1] == "done"


async def test_cancel_ends_the_stream_and_closes_upstream(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = {"model": "claude", "prompt": "cancel me", "max_tokens": 100}
    upstream.app.push_faults([{"fault": "stall", "fault_after": 3}])
    created = await start_stream(client, relay, body)
    data = None
    async with client.stream("GET", relay.url + created["events_url"]) as response:
        async for item in sse_events(response):
            if isinstance(item, str):
                continue
            if item.event == "delta":
                r = await client.delete(relay.url + created["status_url"], headers=auth())
                assert r.status_code in (200, 202)
            if item.event == "error":
                data = item.data
                break
    assert data is not None and data["code"] == "cancelled"
    assert data["usage"]["output_tokens"] >= 1
    await _eventually(lambda: upstream.app.records[-1].client_closed)
    r = await client.get(relay.url + created["status_url"], headers=auth())
    assert r.json()["status"] == "cancelled"


async def _eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_direct_route_cancels_upstream_when_the_client_leaves(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = {"model": "gpt", "prompt": "leave early", "max_tokens": 100}
    upstream.app.push_faults([{"tokens": 1000, "tokens_per_second": 50}])
    async with client.stream(
        "POST", relay.url + "/v1/chat/stream", json=body, headers=auth()
    ) as response:
        await collect(response, stop_after=4)  # start, delta, progress, delta
    await _eventually(lambda: upstream.app.records[-1].client_closed)
    assert upstream.app.records[-1].tokens_sent < 1000


async def test_direct_route_cancels_upstream_before_the_first_token(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = {"model": "claude", "prompt": "leave before first token", "max_tokens": 100}
    upstream.app.push_faults([{"ttft_ms": 30000}])
    async with client.stream(
        "POST", relay.url + "/v1/chat/stream", json=body, headers=auth()
    ) as response:
        items = sse_events(response)  # kept: dropping it would close the connection now
        await collect(items, stop_after=1)  # only `start`
        await _eventually(lambda: bool(upstream.app.records))  # upstream is waiting
    await _eventually(lambda: upstream.app.records[-1].client_closed)
    assert upstream.app.records[-1].tokens_sent == 0


async def test_a_stream_nobody_reads_is_cancelled_upstream(
    config_path: Any, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    server = ServerThread(relay_settings(config_path, orphan_grace_s=0.6, supervisor_tick_s=0.1))
    try:
        upstream.app.push_faults([{"tokens": 1000, "tokens_per_second": 50}])
        created = await start_stream(client, server, {"model": "gpt", "prompt": "nobody"})
        await _eventually(
            lambda: bool(upstream.app.records) and upstream.app.records[-1].client_closed,
            timeout=10,
        )
        assert upstream.app.records[-1].tokens_sent < 1000
        r = await client.get(server.url + created["status_url"], headers=auth())
        assert r.json()["status"] == "orphaned"
        assert r.json()["error"]["code"] == "orphaned"
    finally:
        server.stop()


async def test_idle_streams_get_ping_comments(
    config_path: Any, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    server = ServerThread(relay_settings(config_path, ping_interval_s=0.2))
    try:
        upstream.app.push_faults([{"ttft_ms": 1200}])  # a long time to first token
        created = await start_stream(client, server, {"model": "claude", "prompt": "slow"})
        events = await read_events(client, server.url + created["events_url"])
        assert events.names[-1] == "done"
        assert events.comments.count("ping") >= 3
    finally:
        server.stop()


async def test_polling_keeps_a_stream_alive(
    config_path: Any, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    """The polling fallback is a reader too: it must not get its stream orphaned."""
    server = ServerThread(relay_settings(config_path, orphan_grace_s=0.6, supervisor_tick_s=0.1))
    try:
        upstream.app.push_faults([{"tokens": 60, "tokens_per_second": 30}])  # about 2 s
        created = await start_stream(client, server, {"model": "gpt", "prompt": "poll me"})
        status: dict[str, Any] = {}
        for _ in range(200):
            r = await client.get(server.url + created["status_url"], headers=auth())
            status = r.json()
            if status["status"] != "running":
                break
            await asyncio.sleep(0.2)
        assert status["status"] == "done" and status["text"] == expected_text(60)
    finally:
        server.stop()


async def test_delta_index_counts_utf16_code_units(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    """The fake provider's words include an emoji outside the BMP: a browser, whose
    strings count UTF-16 code units, must see no false gap after it."""
    r = await client.post(
        relay.url + "/v1/chat/stream",
        json={"model": "gpt", "prompt": "emoji", "max_tokens": 40},
        headers=auth(),
    )
    deltas = [
        json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {"text"')
    ]
    text = "".join(d["text"] for d in deltas)
    assert any(ord(c) > 0xFFFF for c in text), "the fake provider sent no emoji"
    js_length = 0
    for d in deltas:
        assert d["index"] == js_length
        js_length += len(d["text"].encode("utf-16-le")) // 2
    assert js_length > len(text)
