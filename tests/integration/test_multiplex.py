"""`GET /v1/events`: many streams on one SSE connection, over real HTTP.

Each event's data carries its `stream_id`; each `id:` is the composite cursor
`s_a:12,s_b:7` (every stream's last event delivered so far), which is what a reconnect
sends back as `Last-Event-ID` to resume every stream at once."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaming import GenerationRequest, Message, simulated_text
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerThread
from tests.support import auth, relay_settings

CURSOR = re.compile(r"s_[0-9a-f]{32}:[1-9][0-9]*(,s_[0-9a-f]{32}:[1-9][0-9]*)*")


@dataclass
class MuxEvent:
    id: str | None
    event: str
    data: dict[str, Any]

    @property
    def stream(self) -> str:
        value: str = self.data["stream_id"]
        return value

    def position(self) -> int:
        """This event's id within its own stream, read from the composite cursor."""
        assert self.id is not None
        return cursor(self.id)[self.stream]


@dataclass
class Read:
    events: list[MuxEvent]
    ended: bool
    """The server closed the connection (rather than the reader leaving early)."""

    def of(self, stream_id: str) -> list[MuxEvent]:
        return [e for e in self.events if e.stream == stream_id]

    def text(self, stream_id: str) -> str:
        return "".join(e.data["text"] for e in self.of(stream_id) if e.event == "delta")


def cursor(value: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in value.split(","):
        stream_id, _, last = part.partition(":")
        out[stream_id] = int(last)
    return out


async def mux_events(response: httpx.Response) -> AsyncIterator[MuxEvent]:
    """SSE by the spec's rules (a field's value loses one leading space), ids kept raw."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield MuxEvent(
                    fields.get("id"), fields.get("event", "message"), json.loads(fields["data"])
                )
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def read_mux(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> Read:
    async with asyncio.timeout(30):
        async with client.stream("GET", merged(url, params), headers=headers) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            events: list[MuxEvent] = []
            async for event in mux_events(response):
                events.append(event)
                if stop_after is not None and len(events) >= stop_after:
                    return Read(events, ended=False)
            return Read(events, ended=True)


def merged(url: str, params: dict[str, str] | None) -> httpx.URL:
    """`url` with `params` added to its query (httpx's `params=` would replace it)."""
    return httpx.URL(url).copy_merge_params(params or {})


def expected(prompt: str, tokens: int) -> str:
    return simulated_text(GenerationRequest("m", (Message("user", prompt),), tokens), tokens)


async def start_stream(
    client: httpx.AsyncClient, server: ServerThread, prompt: str, tokens: int, **kw: Any
) -> dict[str, Any]:
    body = {"model": kw.pop("model", "sim-fast"), "prompt": prompt, "max_tokens": tokens}
    r = await client.post(server.url + "/v1/streams", json=body, headers=auth(**kw))
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def events_url(server: ServerThread, *stream_ids: str) -> str:
    return server.url + "/v1/events?streams=" + ",".join(stream_ids)


def check_cursors(events: list[MuxEvent], start: dict[str, int] | None = None) -> None:
    """Every id is the state after its event: each stream's last id so far (none at 0)."""
    state = dict(start or {})
    for event in events:
        assert event.id is not None and CURSOR.fullmatch(event.id), event.id
        position = event.position()
        assert position == state.get(event.stream, 0) + 1  # no gap, no repeat
        state[event.stream] = position
        assert cursor(event.id) == {k: v for k, v in state.items() if v}


def problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == code


async def test_two_streams_share_one_connection(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    a = await start_stream(client, any_relay, "first of two", 20)
    b = await start_stream(client, any_relay, "second of two", 30)
    read = await read_mux(client, events_url(any_relay, a["id"], b["id"]), headers=auth())
    assert read.ended  # the server closed it: every stream has ended
    check_cursors(read.events)
    for created, prompt, tokens in ((a, "first of two", 20), (b, "second of two", 30)):
        mine = read.of(created["id"])
        names = [e.event for e in mine]
        assert names[0] == "start" and names[-1] == "done"
        assert set(names) == {"start", "delta", "progress", "done"}
        assert read.text(created["id"]) == expected(prompt, tokens)
        start = mine[0].data
        assert start["stream_id"] == created["id"] and list(start).count("stream_id") == 1
        assert mine[-1].data["usage"]["output_tokens"] == tokens
    # The connection ended right after the last stream's terminal event.
    assert read.events[-1].event == "done"
    assert {e.stream for e in read.events} == {a["id"], b["id"]}


async def test_resume_gets_exactly_the_missing_events_of_each_stream(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    a = await start_stream(client, any_relay, "resume a", 40, model="sim-slow")
    b = await start_stream(client, any_relay, "resume b", 30, model="sim-slow")
    url = events_url(any_relay, a["id"], b["id"])
    first = await read_mux(client, url, headers=auth(), stop_after=7)  # drops mid-stream
    assert not first.ended
    check_cursors(first.events)
    last = first.events[-1].id
    assert last is not None
    # What EventSource does on its own reconnect: the last id as Last-Event-ID.
    rest = await read_mux(client, url, headers={**auth(), "last-event-id": last})
    assert rest.ended
    check_cursors(rest.events, start=cursor(last))
    whole = first.events + rest.events
    check_cursors(whole)
    assert "".join(e.data.get("text", "") for e in whole if e.stream == a["id"]) == expected(
        "resume a", 40
    )
    assert "".join(e.data.get("text", "") for e in whole if e.stream == b["id"]) == expected(
        "resume b", 30
    )
    # A fresh reader (a reloaded page) says the same in the query; the larger id wins per
    # stream when both are given.
    middle = whole[len(whole) // 2].id
    assert middle is not None
    again = await read_mux(client, url, headers=auth(), params={"last_event_id": middle})
    check_cursors(again.events, start=cursor(middle))
    missing = [
        (e.stream, e.position()) for e in whole if e.position() > cursor(middle).get(e.stream, 0)
    ]
    assert sorted((e.stream, e.position()) for e in again.events) == sorted(missing)
    mixed = await read_mux(
        client,
        url,
        headers={**auth(), "last-event-id": f"{a['id']}:3"},
        params={"last_event_id": f"{a['id']}:1,{b['id']}:2"},
    )
    assert min(e.position() for e in mixed.of(a["id"])) == 4
    assert min(e.position() for e in mixed.of(b["id"])) == 3
    # Once the client has every terminal event, a reconnect gets 204: EventSource stops.
    final = whole[-1].id
    r = await client.get(url, headers={**auth(), "last-event-id": final or ""})
    assert r.status_code == 204
    # A stream the client has finished is left out; the others are followed.
    done_a = max(e.position() for e in whole if e.stream == a["id"])
    partial = await read_mux(
        client, url, headers={**auth(), "last-event-id": f"{a['id']}:{done_a},{b['id']}:5"}
    )
    assert {e.stream for e in partial.events} == {b["id"]}
    assert partial.events[0].id == f"{a['id']}:{done_a},{b['id']}:6"


async def test_tickets_one_per_stream(relay: ServerThread, client: httpx.AsyncClient) -> None:
    a = await start_stream(client, relay, "ticket a", 10)
    b = await start_stream(client, relay, "ticket b", 10)
    url = events_url(relay, a["id"], b["id"])
    read = await read_mux(client, url, params={"tickets": f"{a['ticket']},{b['ticket']}"})
    assert read.ended and read.text(b["id"]) == expected("ticket b", 10)
    # Each ticket is verified for its own stream: swapped, or missing one, is refused.
    for tickets in (f"{b['ticket']},{a['ticket']}", a["ticket"], f"{a['ticket']},"):
        r = await client.get(merged(url, {"tickets": tickets}))
        problem(r, 401, "invalid_ticket")
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    # Tickets of two subjects do not make one reader, even for the streams' owners.
    c = await start_stream(client, relay, "ticket c", 10, sub="bob")
    both = {"tickets": f"{a['ticket']},{c['ticket']}"}
    r = await client.get(merged(events_url(relay, a["id"], c["id"]), both))
    problem(r, 401, "invalid_ticket")
    # A Bearer token alongside tickets must be the tickets' subject.
    r = await client.get(
        merged(url, {"tickets": f"{a['ticket']},{b['ticket']}"}), headers=auth("bob")
    )
    problem(r, 401, "invalid_ticket")
    # No credentials at all.
    problem(await client.get(url), 401, "missing_credentials")


async def test_someone_elses_stream_answers_like_a_missing_one(
    any_relay: ServerThread, client: httpx.AsyncClient
) -> None:
    mine = await start_stream(client, any_relay, "mine", 10)
    theirs = await start_stream(client, any_relay, "theirs", 10, sub="bob")
    r = await client.get(events_url(any_relay, mine["id"], theirs["id"]), headers=auth())
    problem(r, 404, "stream_not_found")
    missing = "s_" + "0" * 32
    r2 = await client.get(events_url(any_relay, mine["id"], missing), headers=auth())
    problem(r2, 404, "stream_not_found")
    assert r.json()["detail"] == r2.json()["detail"]


async def test_refused_stream_lists(relay: ServerThread, client: httpx.AsyncClient) -> None:
    a = await start_stream(client, relay, "list", 5)
    base = relay.url + "/v1/events"
    too_many = ",".join(f"s_{i:032x}" for i in range(33))
    for params in (
        {"streams": too_many},
        {},
        {"streams": ""},
        {"streams": f"{a['id']},{a['id']}"},
        {"streams": f"{a['id']},../x"},
        {"streams": f"{a['id']},s_x:1"},
        {"streams": "s_" + "a" * 65},
    ):
        problem(await client.get(base, params=params, headers=auth()), 422, "invalid_request")
    # 32 streams is the cap, not a refusal (they do not exist: 404).
    at_cap = ",".join(f"s_{i:032x}" for i in range(32))
    problem(
        await client.get(base, params={"streams": at_cap}, headers=auth()), 404, "stream_not_found"
    )


@pytest.mark.parametrize(
    "value",
    [
        "12",
        "s_{a}",
        "s_{a}:",
        "s_{a}:x",
        "s_{a}:-1",
        "s_{a}:1,",
        "s_{a}:1,s_{a}:2",
        "s_{a}:1;s_{b}:2",
        "s_{a}:²",
        "s_{a}:" + "9" * 19,
        "s_" + "0" * 32 + ":1",  # a stream not on this connection
    ],
)
async def test_bad_cursor_is_400(
    relay: ServerThread, client: httpx.AsyncClient, value: str
) -> None:
    a = await start_stream(client, relay, "cursor a", 5)
    b = await start_stream(client, relay, "cursor b", 5)
    value = value.replace("s_{a}", a["id"]).replace("s_{b}", b["id"])
    url = events_url(relay, a["id"], b["id"])
    if value.isascii():  # a header value is bytes; EventSource sends what it was given
        r = await client.get(url, headers={**auth(), "last-event-id": value})
        problem(r, 400, "invalid_last_event_id")
    problem(
        await client.get(merged(url, {"last_event_id": value}), headers=auth()),
        400,
        "invalid_last_event_id",
    )


@pytest.fixture(scope="module")
def short_grace(config_path: Path) -> Iterator[ServerThread]:
    server = ServerThread(relay_settings(config_path, orphan_grace_s=0.6, supervisor_tick_s=0.1))
    yield server
    server.stop()


async def test_one_reader_keeps_every_stream_alive_and_closing_it_lets_go(
    short_grace: ServerThread, client: httpx.AsyncClient
) -> None:
    server = short_grace
    # Streams of about two seconds, with a 0.6 s orphan grace: read together, they finish.
    a = await start_stream(client, server, "alive a", 40, model="sim-slow")
    b = await start_stream(client, server, "alive b", 40, model="sim-slow")
    c = await start_stream(client, server, "alive c", 40, model="sim-slow")
    read = await read_mux(client, events_url(server, a["id"], b["id"], c["id"]), headers=auth())
    for created, prompt in ((a, "alive a"), (b, "alive b"), (c, "alive c")):
        assert read.of(created["id"])[-1].event == "done"
        assert read.text(created["id"]) == expected(prompt, 40)
    # A reader that leaves: every stream it followed is let go (and orphaned).
    d = await start_stream(client, server, "left d", 200, model="sim-slow")
    e = await start_stream(client, server, "left e", 200, model="sim-slow")
    left = await read_mux(
        client, events_url(server, d["id"], e["id"]), headers=auth(), stop_after=6
    )
    assert {ev.stream for ev in left.events} == {d["id"], e["id"]}
    await asyncio.sleep(2.0)
    for created in (d, e):
        r = await client.get(server.url + created["status_url"], headers=auth())
        assert r.json()["status"] == "orphaned", r.json()


async def test_pings_go_on_after_one_stream_ended(
    config_path: Path, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    """One stream's terminal event is not the connection's: while another stream waits
    for its first token, the connection is kept alive with pings."""
    server = ServerThread(relay_settings(config_path, ping_interval_s=0.2))
    try:
        upstream.app.push_faults([{"ttft_ms": 1500}])
        slow = await start_stream(client, server, "slow to start", 10, model="claude")
        fast = await start_stream(client, server, "fast", 5)
        lines: list[str] = []
        url = events_url(server, slow["id"], fast["id"])
        async with asyncio.timeout(20), client.stream("GET", url, headers=auth()) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
        fast_done = next(
            i
            for i, line in enumerate(lines)
            if line == "event: done" and fast["id"] in lines[i + 1]
        )
        first_slow_delta = next(
            i
            for i, line in enumerate(lines)
            if line == "event: delta" and slow["id"] in lines[i + 1]
        )
        assert fast_done < first_slow_delta
        assert lines[fast_done:first_slow_delta].count(": ping") >= 3
        assert lines[-3].startswith("event: done") and slow["id"] in lines[-2]
    finally:
        server.stop()
