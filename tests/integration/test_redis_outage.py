"""Redis hung (SIGSTOP) or gone while streams run: requests fail fast with a 503 and
recover by themselves; readers get a last word, never a silent cut."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import pytest

from streaming import GenerationRequest, Message, simulated_text
from testkit.servers import RedisServer, ServerThread
from testkit.sse import collect, sse_events
from tests.support import auth, relay_settings, until_ok

pytestmark = pytest.mark.redis


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_a_hung_redis_fails_requests_fast_and_recovers(
    config_path: Path, private_redis: RedisServer, client: httpx.AsyncClient
) -> None:
    server = ServerThread(
        relay_settings(config_path, redis_url=private_redis.url, redis_prefix="hung:")
    )
    body = {"model": "sim-fast", "prompt": "hung", "max_tokens": 5}
    try:
        assert (
            await client.post(server.url + "/v1/streams", json=body, headers=auth())
        ).status_code == 201
        private_redis.proc.send_signal(signal.SIGSTOP)
        # Each answers within a bounded time (the command timeout is 1 s; before, every
        # one of these waited 10 s and /readyz 20 s), and keeps doing so.
        for _ in range(3):
            models, took = await _timed(client.get(server.url + "/v1/models", headers=auth()))
            assert models.status_code == 200 and took < 3, took
            start, took = await _timed(
                client.post(server.url + "/v1/streams", json=body, headers=auth())
            )
            assert start.status_code == 503 and took < 3, took
            assert start.json()["code"] in ("limiter_unavailable", "stream_log_unavailable")
            assert start.headers["retry-after"] == "1"
            ready, took = await _timed(client.get(server.url + "/readyz"))
            assert ready.status_code == 503 and took < 2.5, took
        # While the circuit is open, refusals take no time at all.
        burst = await asyncio.gather(
            *(client.post(server.url + "/v1/streams", json=body, headers=auth()) for _ in range(20))
        )
        assert {r.status_code for r in burst} == {503}
        private_redis.proc.send_signal(signal.SIGCONT)
        r = await until_ok(lambda: client.get(server.url + "/readyz"), pause_s=0.1)
        assert r.status_code == 200
        created = await client.post(server.url + "/v1/streams", json=body, headers=auth())
        assert created.status_code == 201
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        server.stop()


async def test_readers_get_a_last_word_when_redis_goes_away(
    config_path: Path, private_redis: RedisServer, client: httpx.AsyncClient
) -> None:
    server = ServerThread(
        relay_settings(
            config_path,
            redis_url=private_redis.url,
            redis_prefix=f"gone-{uuid.uuid4().hex[:4]}:",
            limiter_fail_mode="open",
        )
    )
    slow = {"model": "sim-slow", "prompt": "outage", "max_tokens": 200}
    try:
        created = (await client.post(server.url + "/v1/streams", json=slow, headers=auth())).json()
        async with (
            client.stream("GET", server.url + created["events_url"]) as reader,
            client.stream(
                "POST", server.url + "/v1/chat/stream", json=slow, headers=auth()
            ) as direct,
        ):
            reader_items, direct_items = sse_events(reader), sse_events(direct)
            await collect(reader_items, stop_after=4)
            await collect(direct_items, stop_after=4)
            private_redis.stop()
            tail = await asyncio.wait_for(collect(reader_items), 30)
            # The direct route needs no log: it goes on to its end.
            direct_tail = await asyncio.wait_for(collect(direct_items), 30)
        assert tail.names and tail.names[-1] == "error", tail.names
        error = tail.last("error")
        assert error["code"] == "stream_log_unavailable" and error["retryable"] is True
        assert direct_tail.names[-1] == "done"
    finally:
        server.stop()


async def test_a_stream_whose_events_cannot_be_written_is_continued_not_ended(
    config_path: Path, private_redis: RedisServer, client: httpx.AsyncClient
) -> None:
    """Redis hangs for longer than a command's timeout mid-answer: the appends fail. The
    process steps back from the stream instead of ending it: no error is counted or
    recorded, nothing is settled from the partial usage; once Redis answers, the job is
    taken over (here by the same process) and the answer continued. A reader resuming
    from its last id gets exactly the rest, and the stream is counted once, as done."""
    server = ServerThread(
        relay_settings(
            config_path,
            redis_url=private_redis.url,
            redis_prefix=f"blip-{uuid.uuid4().hex[:4]}:",
            generation_lease_s=1.0,
            supervisor_tick_s=0.2,
        )
    )
    body = {"model": "sim-slow", "prompt": "blip", "max_tokens": 60}
    try:
        created = (await client.post(server.url + "/v1/streams", json=body, headers=auth())).json()
        url = server.url + created["events_url"]
        seen = []
        async with client.stream("GET", url) as reader:
            items = sse_events(reader)
            head = await collect(items, stop_after=6)
            seen.extend(e for e in head.events if e.event == "delta")
            last_id = head.events[-1].id
            private_redis.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(1.5)  # past the 1 s command timeout: appends fail
            private_redis.proc.send_signal(signal.SIGCONT)
        for _ in range(20):  # follow it again, from where this reader was
            async with client.stream("GET", url, headers={"last-event-id": str(last_id)}) as reader:
                tail = await asyncio.wait_for(collect(sse_events(reader)), 30)
            seen.extend(e for e in tail.events if e.event == "delta")
            if tail.events:
                last_id = tail.events[-1].id
            if tail.names and tail.names[-1] == "done":
                break
        assert tail.names[-1] == "done", tail.names
        assert "takeover" in [e.data["reason"] for e in tail.events if e.event == "continued"]
        text = "".join(e.data["text"] for e in seen)
        request = GenerationRequest("sim-slow", (Message("user", "blip"),), max_tokens=60)
        assert text == simulated_text(request, 60)
        for _ in range(50):  # counted just after the `done` went out
            if any(_finished((await client.get(server.url + "/metrics")).text).values()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # and nothing else comes after it
        metrics = (await client.get(server.url + "/metrics")).text
        finished = _finished(metrics)
        assert {k: v for k, v in finished.items() if v} == {"done": 1.0}, finished
        assert "sserelay_generations_stepped_back_total 1.0" in metrics
    finally:
        private_redis.proc.send_signal(signal.SIGCONT)
        server.stop()


def _finished(metrics: str) -> dict[str, float]:
    """sserelay_streams_finished_total by outcome, summed over the other labels."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("sserelay_streams_finished_total"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = out.get(outcome, 0.0) + float(line.rsplit(" ", 1)[1])
    return out
