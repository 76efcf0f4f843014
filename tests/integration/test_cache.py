"""The response cache end to end, over real HTTP, with both stores (memory without
Redis, Redis with it) and with the API and worker split in two processes: a repeated
request is replayed (same text, same event shapes, `done.cached`, no cost), scopes keep
answers apart, `Cache-Control` bypasses it, only finished answers are kept, a hit costs
a request but no tokens, and the metrics and records say what happened."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from streaming import GenerationRequest, Message, simulated_text
from testkit.fake_upstream import FakeUpstreamServer, expected_text
from testkit.servers import ServerProcess, ServerThread
from testkit.sse import Collected, collect, sse_events
from tests.support import SECRET, auth, relay_settings, write_config

METERED = {
    "requests_per_minute": 100,
    "tokens_per_minute": 1_000_000,
    "daily_budget_usd": 10.0,
    "max_tokens": 4096,
}

TIGHT = {"tokens_per_minute": 270, "max_tokens": 4096}
"""Room for one request of 200 tokens at most (its prompt's bound comes on top)."""


def cache_config(tmp: Path, upstream_url: str) -> Path:
    """The test config, with the response cache on for most models: subject scope on
    the simulators and `gpt`, plan scope on `claude`, global scope and a 1 s TTL on
    `gpt-ttl`; `sim-plain` does not cache."""
    path = write_config(
        tmp,
        upstream_url,
        extra_plans={"team": {"max_tokens": 4096}, "metered": METERED, "tight": TIGHT},
        name="cache",
    )
    raw = yaml.safe_load(path.read_text())
    models = raw["models"]
    models["sim-plain"] = dict(models["sim-fast"])
    models["sim-fast"]["cache"] = {"ttl_s": 60, "scope": "subject"}
    models["sim-slow"]["cache"] = {"ttl_s": 60}
    models["claude"]["cache"] = {"ttl_s": 60, "scope": "plan"}
    models["gpt"]["cache"] = {"ttl_s": 60, "scope": "subject"}
    models["gpt-ttl"] = {
        "provider": "openai",
        "upstream": "fake?tokens=10",
        "cache": {"ttl_s": 1, "scope": "global"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class Relay:
    """A server under test, and where its request records are."""

    url: str
    server: ServerThread | None = None
    redis_url: str | None = None
    prefix: str | None = None

    async def record(self, stream_id: str) -> dict[str, Any] | None:
        if self.prefix is None:
            assert self.server is not None
            found: dict[str, Any] | None = await self.server.services.records.get(stream_id)
            return found
        assert self.redis_url is not None
        client = aioredis.Redis.from_url(self.redis_url)
        try:
            raw = await client.hget(f"{self.prefix}rec:{{{stream_id}}}", "record")
        finally:
            await client.aclose()
        return json.loads(raw) if raw else None

    async def recorded(self, stream_id: str) -> dict[str, Any]:
        """The stream's record, once written: it is written after its answer is kept
        in the cache (or not), so what follows sees the cache as the stream left it."""
        for _ in range(200):
            record = await self.record(stream_id)
            if record is not None:
                return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"no record for {stream_id}")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer) -> Path:
    return cache_config(tmp_path_factory.mktemp("cache"), upstream.url)


@pytest.fixture(scope="module")
def memory_relay(config: Path) -> Iterator[Relay]:
    server = ServerThread(relay_settings(config))
    yield Relay(server.url, server)
    server.stop()


@pytest.fixture(scope="module")
def redis_relay(config: Path, redis_url: str) -> Iterator[Relay]:
    prefix = f"t-cache-{uuid.uuid4().hex[:6]}:"
    server = ServerThread(relay_settings(config, redis_url=redis_url, redis_prefix=prefix))
    yield Relay(server.url, server, redis_url, prefix)
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def relay(request: pytest.FixtureRequest) -> Relay:
    found: Relay = request.getfixturevalue(f"{request.param}_relay")
    return found


@dataclass
class Run:
    x_cache: str | None
    events: Collected
    id: str
    record: dict[str, Any]


def _headers(sub: str, plan: str, cache_control: str | None) -> dict[str, str]:
    headers = auth(sub, plan)
    if cache_control is not None:
        headers["cache-control"] = cache_control
    return headers


async def created(
    client: httpx.AsyncClient,
    relay: Relay,
    body: dict[str, Any],
    sub: str = "alice",
    plan: str = "pro",
    cache_control: str | None = None,
) -> tuple[str | None, dict[str, Any]]:
    r = await client.post(
        relay.url + "/v1/streams", json=body, headers=_headers(sub, plan, cache_control)
    )
    assert r.status_code == 201, r.text
    return r.headers.get("x-cache"), r.json()


async def read(client: httpx.AsyncClient, url: str, last_event_id: int = 0) -> Collected:
    headers = {"last-event-id": str(last_event_id)} if last_event_id else None
    async with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        return await collect(response)


async def resumable(
    client: httpx.AsyncClient,
    relay: Relay,
    body: dict[str, Any],
    sub: str = "alice",
    plan: str = "pro",
    cache_control: str | None = None,
) -> Run:
    """POST /v1/streams, read the stream to its end, wait for its record."""
    x_cache, links = await created(client, relay, body, sub, plan, cache_control)
    events = await read(client, relay.url + links["events_url"])
    return Run(x_cache, events, links["id"], await relay.recorded(links["id"]))


async def direct(
    client: httpx.AsyncClient,
    relay: Relay,
    body: dict[str, Any],
    sub: str = "alice",
    plan: str = "pro",
    cache_control: str | None = None,
) -> Run:
    """POST /v1/chat/stream, read it to its end, wait for its record."""
    async with client.stream(
        "POST",
        relay.url + "/v1/chat/stream",
        json=body,
        headers=_headers(sub, plan, cache_control),
    ) as response:
        assert response.status_code == 200, await response.aread()
        x_cache = response.headers.get("x-cache")
        events = await collect(response)
    stream_id = events.events[0].data["stream_id"]
    return Run(x_cache, events, stream_id, await relay.recorded(stream_id))


def prompt_body(model: str = "sim-fast", max_tokens: int = 40, **extra: Any) -> dict[str, Any]:
    """A prompt no other test sends (the plan and global scopes are shared)."""
    return {
        "model": model,
        "prompt": f"cache test {uuid.uuid4().hex}",
        "max_tokens": max_tokens,
        **extra,
    }


async def metric(client: httpx.AsyncClient, url: str, name: str, model: str) -> float:
    """The sum of `name`'s series for `model` (whatever its other labels)."""
    text = (await client.get(url + "/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'model="{model}"' in line
    )


def check_replay(hit: Collected, live: Collected) -> None:
    """The hit's events have the shapes of the live stream's, with the same text and
    usage; its `done` says `cached: true` and costs nothing."""
    names = hit.names
    assert names[0] == "start" and names[-2:] == ["progress", "done"]
    assert set(names) == {"start", "delta", "progress", "done"}
    assert [e.id for e in hit.events] == list(range(1, len(names) + 1))
    start, original = hit.events[0].data, live.events[0].data
    assert set(start) == set(original)
    assert {k: start[k] for k in ("model", "provider", "plan", "max_tokens")} == {
        k: original[k] for k in ("model", "provider", "plan", "max_tokens")
    }
    assert start["stream_id"] != original["stream_id"]
    assert hit.text == live.text and hit.text
    deltas = [e.data for e in hit.events if e.event == "delta"]
    assert len(deltas) >= 2 and len(deltas) >= len(hit.text) // 64
    assert all(set(d) == {"text", "index"} for d in deltas)
    offset = 0
    for delta in deltas:
        assert delta["index"] == offset
        offset += len(delta["text"].encode("utf-16-le")) // 2
    progress = [e.data for e in hit.events if e.event == "progress"]
    live_progress = next(e.data for e in live.events if e.event == "progress")
    assert all(set(p) == set(live_progress) for p in progress)
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100
    assert (
        progress[-1]["cost_usd"] == 0
        and progress[-1]["output_tokens"] == (live.last("done")["usage"]["output_tokens"])
    )
    done, live_done = hit.last("done"), live.last("done")
    assert "cached" not in live_done and live_done["cost_usd"] > 0
    assert set(done) == set(live_done) | {"cached"}
    assert done["cached"] is True
    assert done["cost_usd"] == 0
    assert done["usage"] == live_done["usage"]
    assert done["stop_reason"] == live_done["stop_reason"]


async def test_a_repeated_request_is_replayed_from_the_cache(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    body = prompt_body(max_tokens=60)
    miss = await resumable(client, relay, body)
    assert miss.x_cache == "MISS" and miss.events.names[-1] == "done"
    assert miss.record["cached"] is False
    status = (await client.get(relay.url + f"/v1/streams/{miss.id}", headers=auth())).json()
    assert "cache_key" not in status and "cached" not in status["done"]
    hit = await resumable(client, relay, body)
    assert hit.x_cache == "HIT"
    check_replay(hit.events, miss.events)
    # Read like any stream: the status, and a resume after Last-Event-ID.
    status = (await client.get(relay.url + f"/v1/streams/{hit.id}", headers=auth())).json()
    assert status["status"] == "done" and status["text"] == miss.events.text
    assert status["done"]["cached"] is True
    ticket = (await client.post(relay.url + f"/v1/streams/{hit.id}/ticket", headers=auth())).json()
    rest = await read(client, relay.url + ticket["events_url"], last_event_id=3)
    assert [(e.id, e.event, e.data) for e in rest.events] == [
        (e.id, e.event, e.data) for e in hit.events.events[3:]
    ]
    # Someone else's cached stream is as invisible as any other.
    other = await client.get(relay.url + f"/v1/streams/{hit.id}", headers=auth("mallory"))
    assert other.status_code == 404


async def test_the_direct_route_hits_the_cache_too(relay: Relay, client: httpx.AsyncClient) -> None:
    body = prompt_body()
    miss = await direct(client, relay, body)
    assert miss.x_cache == "MISS"
    hit = await direct(client, relay, body)
    assert hit.x_cache == "HIT"
    check_replay(hit.events, miss.events)
    assert hit.record["cached"] is True and hit.record["route"] == "chat"
    # One cache for both routes: an answer kept from one is replayed on the other.
    again = await resumable(client, relay, body)
    assert again.x_cache == "HIT" and again.events.text == miss.events.text
    body2 = prompt_body()
    first = await resumable(client, relay, body2)
    assert first.x_cache == "MISS"
    second = await direct(client, relay, body2)
    assert second.x_cache == "HIT"
    check_replay(second.events, first.events)


async def test_a_hit_never_calls_the_provider(
    memory_relay: Relay, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = prompt_body("claude", max_tokens=100)
    miss = await resumable(client, memory_relay, body)
    assert miss.x_cache == "MISS" and miss.events.text == expected_text(40)
    hit = await direct(client, memory_relay, body)
    assert hit.x_cache == "HIT"
    check_replay(hit.events, miss.events)
    assert len(upstream.app.records) == 1


async def test_no_cache_skips_the_lookup_and_refreshes_the_entry(
    relay: Relay, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = prompt_body("claude", max_tokens=100)
    first = await resumable(client, relay, body)
    assert first.x_cache == "MISS" and first.events.text == expected_text(40)
    upstream.app.push_faults([{"seed": "another answer"}])
    fresh = await direct(client, relay, body, cache_control="no-cache")
    assert fresh.x_cache == "MISS"
    assert fresh.events.text == expected_text(40, "another answer") != first.events.text
    assert len(upstream.app.records) == 2  # generated again, not looked up
    hit = await resumable(client, relay, body, cache_control="max-age=60")
    assert hit.x_cache == "HIT"
    assert hit.events.text == fresh.events.text  # the entry was replaced
    assert len(upstream.app.records) == 2


async def test_no_store_keeps_the_answer_out_of_the_cache(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    body = prompt_body()
    unstored = await resumable(client, relay, body, cache_control="no-store")
    assert unstored.x_cache == "MISS" and unstored.events.names[-1] == "done"
    assert (await direct(client, relay, body, cache_control="No-Store")).x_cache == "MISS"
    assert (await direct(client, relay, body)).x_cache == "MISS"
    # no-store still looks up: what is there is served.
    assert (await resumable(client, relay, body, cache_control="no-store")).x_cache == "HIT"


async def test_subject_scope_keeps_each_callers_answers_apart(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    body = prompt_body()
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    assert (await resumable(client, relay, body, sub=alice)).x_cache == "MISS"
    assert (await resumable(client, relay, body, sub=bob)).x_cache == "MISS"
    assert (await direct(client, relay, body, sub=bob)).x_cache == "HIT"
    assert (await direct(client, relay, body, sub=alice)).x_cache == "HIT"


async def test_plan_scope_shares_answers_within_a_plan_only(
    relay: Relay, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = prompt_body("claude", max_tokens=100)
    first = await resumable(client, relay, body, sub="p-alice", plan="pro")
    assert first.x_cache == "MISS"
    same_plan = await resumable(client, relay, body, sub="p-bob", plan="pro")
    assert same_plan.x_cache == "HIT"
    other_plan = await resumable(client, relay, body, sub="p-carol", plan="team")
    assert other_plan.x_cache == "MISS"
    assert len(upstream.app.records) == 2
    assert (await direct(client, relay, body, sub="p-dave", plan="team")).x_cache == "HIT"


async def test_every_sampling_parameter_is_part_of_the_key(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    body = prompt_body(max_tokens=30)
    assert (await direct(client, relay, body)).x_cache == "MISS"
    assert (await direct(client, relay, body)).x_cache == "HIT"
    for change in (
        {"max_tokens": 31},
        {"temperature": 0.3},
        {"stop": ["zzz"]},
        {"system": "be brief"},
        {"prompt": body["prompt"] + " "},
    ):
        assert (await direct(client, relay, {**body, **change})).x_cache == "MISS", change
    # What only annotates a request is not.
    tagged = {**body, "metadata": {"trace": "other"}}
    assert (await direct(client, relay, tagged)).x_cache == "HIT"


async def test_entries_expire_after_their_ttl(
    relay: Relay, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    body = prompt_body("gpt-ttl", max_tokens=50)
    stores = await metric(client, relay.url, "sserelay_cache_stores_total", "gpt-ttl")
    first = await resumable(client, relay, body)
    assert first.x_cache == "MISS" and first.events.names[-1] == "done"
    assert await metric(client, relay.url, "sserelay_cache_stores_total", "gpt-ttl") == stores + 1
    # Look up without storing (no-store), until the 1 s entry is gone.
    seen = []
    for _ in range(100):
        run = await direct(client, relay, body, sub="anyone-else", cache_control="no-store")
        seen.append(run.x_cache)
        if run.x_cache == "MISS":
            break
        assert run.events.text == first.events.text
        await asyncio.sleep(0.1)
    assert seen[-1] == "MISS", seen
    assert len(upstream.app.records) == 2  # the first answer, and the one after expiry


async def test_an_errored_or_cancelled_stream_is_never_kept(
    relay: Relay, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    # Refused by the provider before any text.
    body = prompt_body("gpt", max_tokens=100)
    upstream.app.push_faults([{"fault": "status_400"}])
    failed = await resumable(client, relay, body)
    assert failed.x_cache == "MISS" and failed.events.names[-1] == "error"
    # Dropped mid-answer on a model that does not continue: a partial text.
    upstream.app.push_faults([{"fault": "drop", "fault_after": 5}])
    partial = await direct(client, relay, body)
    assert partial.x_cache == "MISS" and partial.events.names[-1] == "error"
    assert partial.events.text and partial.record["outcome"] == "error"
    done = await direct(client, relay, body)
    assert done.x_cache == "MISS" and done.events.names[-1] == "done"
    assert done.events.text == expected_text(40) != partial.events.text
    assert (await direct(client, relay, body)).x_cache == "HIT"

    # Cancelled (DELETE) and abandoned (the direct route's client left) answers.
    slow = prompt_body("sim-slow", max_tokens=400)
    x_cache, links = await created(client, relay, slow)
    assert x_cache == "MISS"
    async with client.stream("GET", relay.url + links["events_url"]) as response:
        events = sse_events(response)
        assert (await collect(events, stop_after=3)).names[0] == "start"
        r = await client.delete(relay.url + f"/v1/streams/{links['id']}", headers=auth())
        assert r.status_code in (200, 202)
        rest = await collect(events)
    assert rest.last("error")["code"] == "cancelled"
    assert (await relay.recorded(links["id"]))["outcome"] == "cancelled"
    async with client.stream(
        "POST", relay.url + "/v1/chat/stream", json=slow, headers=auth()
    ) as response:
        assert response.headers["x-cache"] == "MISS"
        head = await collect(response, stop_after=3)
    gone = await relay.recorded(head.events[0].data["stream_id"])
    assert gone["outcome"] == "client_gone"
    x_cache, links = await created(client, relay, slow, cache_control="no-store")
    assert x_cache == "MISS"
    await client.delete(relay.url + f"/v1/streams/{links['id']}", headers=auth())


async def test_a_hit_counts_as_a_request_but_not_as_tokens_or_cost(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    sub = f"metered-{uuid.uuid4().hex[:6]}"

    async def usage() -> tuple[int, int, float]:
        body = (await client.get(relay.url + "/v1/usage", headers=auth(sub, "metered"))).json()
        limits = {entry["name"]: entry for entry in body["limits"]}
        return (
            limits["requests_per_minute"]["used"],
            limits["tokens_per_minute"]["used"],
            body["budget"]["spent_usd"],
        )

    body = prompt_body(max_tokens=40)
    miss = await resumable(client, relay, body, sub=sub, plan="metered")
    assert miss.x_cache == "MISS"
    requests, tokens, spent = await usage()
    done = miss.events.last("done")
    assert requests == 1
    assert tokens == done["usage"]["input_tokens"] + done["usage"]["output_tokens"] > 0
    assert spent == pytest.approx(done["cost_usd"]) and spent > 0
    hit = await resumable(client, relay, body, sub=sub, plan="metered")
    assert hit.x_cache == "HIT"
    hit_direct = await direct(client, relay, body, sub=sub, plan="metered")
    assert hit_direct.x_cache == "HIT"
    assert await usage() == (3, tokens, spent)
    for record in (hit.record, hit_direct.record):
        assert record["cached"] is True and record["outcome"] == "done"
        assert record["input_tokens"] == record["output_tokens"] == 0
        assert record["cost_usd"] == 0 and record["subject"] == sub
    assert miss.record["cached"] is False and miss.record["output_tokens"] > 0


async def test_a_hit_is_admitted_when_the_tokens_are_spent(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    """Admission asks a hit for a request only: a caller whose tokens are spent (for a
    live answer) still gets the cached one."""
    sub = f"tight-{uuid.uuid4().hex[:6]}"
    body = prompt_body(max_tokens=200)
    miss = await resumable(client, relay, body, sub=sub, plan="tight")
    assert miss.x_cache == "MISS" and miss.events.names[-1] == "done"
    refused = await client.post(
        relay.url + "/v1/streams", json=prompt_body(max_tokens=200), headers=auth(sub, "tight")
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["violated"] == ["tokens_per_minute"]
    hit = await direct(client, relay, body, sub=sub, plan="tight")
    assert hit.x_cache == "HIT" and hit.events.text == miss.events.text
    again = await resumable(client, relay, body, sub=sub, plan="tight")
    assert again.x_cache == "HIT"
    bypass = await client.post(
        relay.url + "/v1/streams", json=body, headers=_headers(sub, "tight", "no-cache")
    )
    assert bypass.status_code == 429 and "x-cache" not in bypass.headers


async def test_metrics_count_hits_misses_and_stores(
    relay: Relay, client: httpx.AsyncClient
) -> None:
    names = ("sserelay_cache_hits_total", "sserelay_cache_misses_total")
    names += ("sserelay_cache_stores_total",)

    async def counts() -> list[float]:
        return [await metric(client, relay.url, name, "sim-fast") for name in names]

    before = await counts()
    body = prompt_body()
    await resumable(client, relay, body)
    assert await counts() == [before[0], before[1] + 1, before[2] + 1]
    await direct(client, relay, body)
    await resumable(client, relay, body)
    assert await counts() == [before[0] + 2, before[1] + 1, before[2] + 1]
    await direct(client, relay, body, cache_control="no-cache, no-store")
    assert await counts() == [before[0] + 2, before[1] + 2, before[2] + 1]
    text = (await client.get(relay.url + "/metrics")).text
    series = [line for line in text.splitlines() if line.startswith("sserelay_cache_")]
    for model in ("sim-fast", "sim-slow", "claude", "gpt", "gpt-ttl"):  # all from startup
        assert any(
            line.startswith(f'sserelay_cache_stores_total{{model="{model}"}} ') for line in series
        )
    assert not [line for line in series if 'model="sim-plain"' in line]


async def test_a_model_without_cache_says_nothing(relay: Relay, client: httpx.AsyncClient) -> None:
    body = prompt_body("sim-plain")
    for _ in range(2):
        x_cache, links = await created(client, relay, body)
        assert x_cache is None
        events = await read(client, relay.url + links["events_url"])
        assert "cached" not in events.last("done")
        async with client.stream(
            "POST", relay.url + "/v1/chat/stream", json=body, headers=auth()
        ) as response:
            assert "x-cache" not in response.headers
            assert "cached" not in (await collect(response)).last("done")
        await relay.recorded(links["id"])
    metrics = (await client.get(relay.url + "/metrics")).text
    assert 'sserelay_cache_misses_total{model="sim-plain"}' not in metrics


@pytest.mark.redis
async def test_api_and_worker_processes_share_the_cache(
    tmp_path: Path, upstream: FakeUpstreamServer, redis_url: str, client: httpx.AsyncClient
) -> None:
    """The worker that generated a miss keeps its answer; the API process replays the
    hit itself, with no worker involved."""
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    env = {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": prefix,
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(cache_config(tmp_path, upstream.url)),
        "SSERELAY_SUPERVISOR_TICK_S": "0.2",
    }
    api = ServerProcess(env, ["--api-only"])
    worker = ServerProcess(env, executable=[sys.executable, "-m", "app.cli", "worker"])
    relay = Relay(api.url, redis_url=redis_url, prefix=prefix)
    try:
        body = prompt_body(max_tokens=50)
        miss = await resumable(client, relay, body)
        assert miss.x_cache == "MISS" and miss.events.names[-1] == "done"
        assert await metric(client, worker.url, "sserelay_cache_stores_total", "sim-fast") == 1
        assert await metric(client, api.url, "sserelay_cache_stores_total", "sim-fast") == 0
        hit = await resumable(client, relay, body)
        assert hit.x_cache == "HIT"
        check_replay(hit.events, miss.events)
        assert hit.record["cached"] is True
        direct_hit = await direct(client, relay, body)
        assert direct_hit.x_cache == "HIT" and direct_hit.events.text == miss.events.text
        assert await metric(client, api.url, "sserelay_cache_hits_total", "sim-fast") == 2
        # The worker generated only the miss.
        started = await metric(client, worker.url, "sserelay_upstream_requests_total", "sim-fast")
        assert started == 1
    finally:
        worker.stop()
        api.stop()


@pytest.mark.redis
async def test_an_answer_continued_after_a_takeover_is_kept_whole(
    tmp_path: Path, upstream: FakeUpstreamServer, redis_url: str, client: httpx.AsyncClient
) -> None:
    """The worker that takes a stream over keeps the whole answer: the text its
    predecessor logged, then its own."""
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    env = {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": prefix,
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(cache_config(tmp_path, upstream.url)),
        "SSERELAY_GENERATION_LEASE_S": "1.0",
        "SSERELAY_SUPERVISOR_TICK_S": "0.2",
    }
    worker = [sys.executable, "-m", "app.cli", "worker"]
    api = ServerProcess(env, ["--api-only"])
    doomed = ServerProcess(env, executable=worker)
    spare: ServerProcess | None = None
    relay = Relay(api.url, redis_url=redis_url, prefix=prefix)
    try:
        body = prompt_body("sim-slow", max_tokens=160)  # 8 s at 20 tokens/s
        x_cache, links = await created(client, relay, body)
        assert x_cache == "MISS"
        async with client.stream("GET", api.url + links["events_url"]) as response:
            events = sse_events(response)
            head = await collect(events, stop_after=6)
            spare = ServerProcess(env, executable=worker)
            assert head.names[-1] != "done"  # still running, however long that took
            doomed.proc.send_signal(signal.SIGKILL)
            doomed.proc.wait()
            tail = await asyncio.wait_for(collect(events), 30)
        live = Collected(head.events + tail.events)
        assert "continued" in live.names and live.names[-1] == "done"
        request = GenerationRequest("sim-slow", (Message("user", body["prompt"]),), 160)
        assert live.text == simulated_text(request, 160)
        record = await relay.recorded(links["id"])  # by the worker that took it over
        assert record["outcome"] == "done"
        assert await metric(client, spare.url, "sserelay_cache_stores_total", "sim-slow") == 1
        hit = await direct(client, relay, body)
        assert hit.x_cache == "HIT"
        assert hit.events.text == live.text
        assert hit.events.last("done")["usage"] == live.last("done")["usage"]
    finally:
        for process in (spare, doomed, api):
            if process is not None:
                process.stop()
