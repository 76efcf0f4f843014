"""Several sserelay processes sharing one Redis behave as one service."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from streaming import GenerationRequest, Message, simulated_text
from testkit.servers import ServerProcess
from testkit.sse import Collected, collect, sse_events
from tests.support import SECRET, auth

pytestmark = pytest.mark.redis


@pytest.fixture(scope="module")
def pair(config_path: Path, redis_url: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    env = {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": f"t-{uuid.uuid4().hex[:6]}:",
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config_path),
        "SSERELAY_GENERATION_LEASE_S": "1",
        "SSERELAY_SUPERVISOR_TICK_S": "0.2",
    }
    a, b = ServerProcess(env), ServerProcess(env)
    yield a, b
    for server in (a, b):
        if server.proc.poll() is None:
            server.stop()


BODY = {"model": "sim-slow", "prompt": "across processes", "max_tokens": 30}


async def test_a_stream_started_on_one_process_resumes_on_another(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    a, b = pair
    r = await client.post(a.url + "/v1/streams", json=BODY, headers=auth())
    created = r.json()
    async with client.stream("GET", a.url + created["events_url"]) as response:
        first = await collect(response, stop_after=5)
    last = first.events[-1].id
    async with client.stream(
        "GET", b.url + created["events_url"], headers={"last-event-id": str(last)}
    ) as response:
        rest = await collect(response)
    assert rest.events[0].id == last + 1
    whole = Collected(events=first.events + rest.events)
    assert [e.id for e in whole.events] == list(range(1, len(whole.events) + 1))
    assert whole.names[-1] == "done"
    request = GenerationRequest("sim-slow", (Message("user", BODY["prompt"]),), 30)
    assert whole.text == simulated_text(request, 30)
    status = await client.get(b.url + created["status_url"], headers=auth())
    assert status.json()["text"] == whole.text


async def test_cancel_on_another_process_stops_the_generation(
    pair: tuple[ServerProcess, ServerProcess], client: httpx.AsyncClient
) -> None:
    a, b = pair
    created = (await client.post(a.url + "/v1/streams", json=BODY, headers=auth())).json()
    async with client.stream("GET", a.url + created["events_url"]) as response:
        items = sse_events(response)
        await collect(items, stop_after=3)
        r = await client.delete(b.url + created["status_url"], headers=auth())
        assert r.status_code == 202, r.text
        rest = await collect(items)
    assert rest.names[-1] == "error" and rest.last("error")["code"] == "cancelled"


async def test_a_reader_sees_no_error_when_a_process_dies(
    config_path: Path,
    redis_url: str,
    pair: tuple[ServerProcess, ServerProcess],
    client: httpx.AsyncClient,
) -> None:
    _, b = pair
    # A third process on the same Redis and prefix, killed mid-stream.
    doomed = ServerProcess(b.env)
    created = (await client.post(doomed.url + "/v1/streams", json=BODY, headers=auth())).json()
    async with client.stream("GET", b.url + created["events_url"]) as response:
        items = sse_events(response)
        head = await collect(items, stop_after=4)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        tail = await collect(items)
    doomed.stop()
    assert head.names[0] == "start", head
    # Whichever process ran it (a job goes to whoever claims it first), the answer is
    # whole: taken over and continued if it ran on the killed one.
    whole = Collected(events=head.events + tail.events)
    assert whole.names[-1] == "done", whole.names
    request = GenerationRequest("sim-slow", (Message("user", BODY["prompt"]),), 30)
    assert whole.text == simulated_text(request, 30)


async def test_two_processes_admit_exactly_the_limit(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    """200 concurrent requests, split across two processes sharing Redis, against a limit
    of 50 per minute: exactly 50 admitted, the rest refused with the right fields."""
    from tests.support import write_config

    config = write_config(
        tmp_path, upstream.url, extra_plans={"fifty": {"requests_per_minute": 50}}, name="fifty"
    )
    env = {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": f"t-{uuid.uuid4().hex[:6]}:",
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config),
    }
    a, b = ServerProcess(env), ServerProcess(env)
    try:
        headers = auth("burst-user", "fifty")
        body = {"model": "sim-fast", "prompt": "burst", "max_tokens": 1}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as burst:
            responses = await asyncio.gather(
                *(
                    burst.post((a if i % 2 else b).url + "/v1/streams", json=body, headers=headers)
                    for i in range(200)
                )
            )
        codes = [r.status_code for r in responses]
        assert codes.count(201) == 50 and codes.count(429) == 150
        for r in responses:
            assert '"requests_per_minute";q=50;w=60' in r.headers["ratelimit-policy"]
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["violated"] == ["requests_per_minute"]
                assert '"requests_per_minute";r=0;' in r.headers["ratelimit"]
        # Each process alone would have admitted up to 50 of its 100: they share one count.
    finally:
        a.stop()
        b.stop()
