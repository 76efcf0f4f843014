"""Plans enforced over real HTTP: 429s with the right fields, RateLimit headers, usage,
reservations settled to actual usage however a stream ends, concurrency leases, reload."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerThread
from testkit.sse import collect, sse_events
from tests.support import auth, relay_settings, until_ok, write_config

PLANS = {
    "rpm3": {"requests_per_minute": 3, "requests_per_day": 100},
    "metered": {"tokens_per_minute": 100_000, "daily_budget_usd": 1.0},
    "single": {"concurrent_streams": 1},
    "tight": {"tokens_per_minute": 500},
    "crafted": {"tokens_per_minute": 5000, "max_tokens": 20},
}


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer, redis_url: str
) -> Iterator[ServerThread]:
    config = write_config(
        tmp_path_factory.mktemp("limits"), upstream.url, extra_plans=PLANS, name="limits"
    )
    server = ServerThread(
        relay_settings(
            config,
            redis_url=redis_url,
            redis_prefix=f"t-{uuid.uuid4().hex[:6]}:",
            orphan_grace_s=0.8,
            supervisor_tick_s=0.1,
        )
    )
    yield server
    server.stop()


def who(plan: str) -> dict[str, str]:
    return auth(f"user-{uuid.uuid4().hex[:8]}", plan)


BODY = {"model": "sim-fast", "prompt": "limits", "max_tokens": 5}


async def test_requests_over_the_limit_get_429_with_the_right_fields(
    limited: ServerThread, client: httpx.AsyncClient
) -> None:
    headers = who("rpm3")
    for i in range(3):
        r = await client.post(limited.url + "/v1/chat/stream", json=BODY, headers=headers)
        assert r.status_code == 200
        assert f'"requests_per_minute";r={2 - i};' in r.headers["ratelimit"]
        # The reset is when the counted weight leaves, never "now" once something counts.
        reset = int(
            r.headers["ratelimit"].split('"requests_per_minute";')[1].split("t=")[1].split(",")[0]
        )
        assert 59 <= reset <= 61
    r = await client.post(limited.url + "/v1/chat/stream", json=BODY, headers=headers)
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "rate_limited" and problem["violated"] == ["requests_per_minute"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 61 and problem["retry_after_s"] == retry
    policy = r.headers["ratelimit-policy"]
    assert '"requests_per_minute";q=3;w=60;qu="requests"' in policy
    assert '"requests_per_day";q=100;w=86400' in policy
    # The reset announced is no earlier than the Retry-After.
    assert f'"requests_per_minute";r=0;t={retry}' in r.headers["ratelimit"]
    # Refusals take nothing: the day window counted only the three admissions.
    usage = (await client.get(limited.url + "/v1/usage", headers=headers)).json()
    by_name = {limit["name"]: limit for limit in usage["limits"]}
    assert by_name["requests_per_day"]["used"] == 3
    assert by_name["requests_per_minute"]["remaining"] == 0


async def test_every_v1_response_carries_the_fields(
    limited: ServerThread, client: httpx.AsyncClient
) -> None:
    headers = who("rpm3")
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/usage"),
        ("GET", "/v1/streams/s_missing"),
    ]:
        r = await client.request(method, limited.url + path, headers=headers)
        assert "ratelimit-policy" in r.headers and "ratelimit" in r.headers, path
    created = (await client.post(limited.url + "/v1/streams", json=BODY, headers=headers)).json()
    async with client.stream("GET", limited.url + created["events_url"]) as response:
        assert '"requests_per_minute"' in response.headers["ratelimit"]
        await collect(response)


async def test_a_streams_reader_reports_its_admission_without_asking_again(
    limited: ServerThread, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST then GET of the events URL is how every EventSource client opens a stream:
    the GET's rate-limit fields come from the POST's admission (a second old at most),
    not from another limiter round trip. Later, the limiter is asked again."""
    services = limited.services
    asked: list[str] = []
    usage = services.limiter.usage

    async def counted(subject: str, *args: Any, **kwargs: Any) -> Any:
        asked.append(subject)
        return await usage(subject, *args, **kwargs)

    monkeypatch.setattr(services.limiter, "usage", counted)
    headers = who("rpm3")
    posted = await client.post(limited.url + "/v1/streams", json=BODY, headers=headers)
    async with client.stream("GET", limited.url + posted.json()["events_url"]) as response:
        assert response.headers["ratelimit"] == posted.headers["ratelimit"]
        assert '"requests_per_minute";r=2;' in response.headers["ratelimit"]
        await collect(response)
    assert asked == []
    monkeypatch.setattr(services.recent, "max_age_s", 0.2)
    await asyncio.sleep(0.3)
    r = await client.get(limited.url + "/v1/models", headers=headers)
    assert '"requests_per_minute";r=2;' in r.headers["ratelimit"]
    assert len(asked) == 1


async def _usage(
    client: httpx.AsyncClient, server: ServerThread, headers: dict[str, str]
) -> dict[str, Any]:
    usage: dict[str, Any] = (await client.get(server.url + "/v1/usage", headers=headers)).json()
    return usage


def _tokens_used(usage: dict[str, Any]) -> int:
    return int(next(x["used"] for x in usage["limits"] if x["name"] == "tokens_per_minute"))


async def _settled(
    client: httpx.AsyncClient, server: ServerThread, headers: dict[str, str], want: int
) -> dict[str, Any]:
    """Settlement runs when the stream's task ends, a moment after its last event."""
    for _ in range(100):
        usage = await _usage(client, server, headers)
        if _tokens_used(usage) == want:
            return usage
        await asyncio.sleep(0.05)
    raise AssertionError(f"tokens used {_tokens_used(usage)} != {want}")


async def test_a_finished_stream_is_billed_its_actual_usage(
    limited: ServerThread, client: httpx.AsyncClient
) -> None:
    headers = who("metered")
    r = await client.post(
        limited.url + "/v1/streams",
        json={"model": "claude", "prompt": "x" * 400, "max_tokens": 1000},
        headers=headers,
    )
    # Reserved: about 100 input tokens + 1000 max_tokens, and their worst-case cost.
    reserved = _tokens_used(await _usage(client, limited, headers))
    assert reserved >= 1100
    async with client.stream("GET", limited.url + r.json()["events_url"]) as response:
        done = (await collect(response)).last("done")
    actual = done["usage"]["input_tokens"] + done["usage"]["output_tokens"]
    usage = await _settled(client, limited, headers, actual)
    assert usage["budget"]["spent_usd"] == pytest.approx(done["cost_usd"], abs=1e-8)


@pytest.mark.parametrize("ending", ["upstream_error", "cancelled", "orphaned", "client_gone"])
async def test_every_ending_settles_to_what_was_used(
    limited: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient, ending: str
) -> None:
    headers = who("metered")
    body = {"model": "gpt", "prompt": "y" * 40, "max_tokens": 1000}
    if ending == "upstream_error":
        upstream.app.push_faults([{"fault": "drop", "fault_after": 7}])
    else:
        upstream.app.push_faults([{"tokens": 1000, "tokens_per_second": 40}])
    if ending == "client_gone":
        async with client.stream(
            "POST", limited.url + "/v1/chat/stream", json=body, headers=headers
        ) as response:
            await collect(response, stop_after=6)
        await asyncio.sleep(0.3)  # the proxy notices and closes the upstream
        record = upstream.app.records[-1]
        assert record.client_closed
        # At least what was relayed is billed; the upstream may have sent a few more.
        used = _tokens_used(await _usage(client, limited, headers))
        assert 10 + 3 <= used <= 10 + record.tokens_sent
        return
    r = await client.post(limited.url + "/v1/streams", json=body, headers=headers)
    created = r.json()
    final: dict[str, Any]
    if ending == "orphaned":
        # Nobody reads (polling would count as reading): wait past the grace period.
        await asyncio.sleep(2.0)
        status = (await client.get(limited.url + created["status_url"], headers=headers)).json()
        assert status["status"] == "orphaned"
        final = status["error"]
    else:
        async with client.stream("GET", limited.url + created["events_url"]) as response:
            items = sse_events(response)
            await collect(items, stop_after=4)
            if ending == "cancelled":
                await client.delete(limited.url + created["status_url"], headers=headers)
            final = (await collect(items)).last("error")
    assert final["code"] == {"upstream_error": "upstream_dropped"}.get(ending, ending)
    actual = final["usage"]["input_tokens"] + final["usage"]["output_tokens"]
    assert 0 < final["usage"]["output_tokens"] < 1000
    await _settled(client, limited, headers, actual)


async def test_concurrent_streams_are_leased(
    limited: ServerThread, client: httpx.AsyncClient
) -> None:
    headers = who("single")
    body = {"model": "sim-slow", "prompt": "one at a time", "max_tokens": 200}
    first = (await client.post(limited.url + "/v1/streams", json=body, headers=headers)).json()
    second = await client.post(limited.url + "/v1/streams", json=body, headers=headers)
    assert second.status_code == 429 and second.json()["violated"] == ["concurrent_streams"]
    assert '"concurrent_streams";r=0' in second.headers["ratelimit"]
    usage = await _usage(client, limited, headers)
    assert usage["concurrent_streams"] == {"limit": 1, "in_use": 1, "remaining": 0}
    await client.delete(limited.url + first["status_url"], headers=headers)
    for _ in range(100):
        r = await client.post(limited.url + "/v1/streams", json=body, headers=headers)
        if r.status_code == 201:
            break
        await asyncio.sleep(0.05)
    assert r.status_code == 201
    await client.delete(limited.url + r.json()["status_url"], headers=headers)


async def test_a_request_that_can_never_fit_the_plan(
    limited: ServerThread, client: httpx.AsyncClient
) -> None:
    r = await client.post(
        limited.url + "/v1/streams",
        json={"model": "sim-fast", "prompt": "x", "max_tokens": 600},
        headers=who("tight"),
    )
    assert r.status_code == 422 and r.json()["code"] == "exceeds_plan_limit"


async def _limit_raised_by_reload(
    client: httpx.AsyncClient, url: str, config: Path, reload: Callable[[], object]
) -> None:
    """Plan `r` allows 1 request a minute; raised to 5 in the file, and once `reload`
    has made it take effect, the caller is admitted again."""
    headers = who("r")
    assert (await client.post(url, json=BODY, headers=headers)).status_code == 200
    assert (await client.post(url, json=BODY, headers=headers)).status_code == 429
    raw = yaml.safe_load(config.read_text())
    raw["plans"]["r"]["requests_per_minute"] = 5
    config.write_text(yaml.safe_dump(raw))
    reload()
    r = await until_ok(lambda: client.post(url, json=BODY, headers=headers))
    assert r.status_code == 200


async def test_plans_reload_when_the_file_changes(
    tmp_path: Path, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path, upstream.url, extra_plans={"r": {"requests_per_minute": 1}}, name="reload"
    )
    server = ServerThread(relay_settings(config, config_poll_s=0.05))
    try:
        url = server.url + "/v1/chat/stream"
        await _limit_raised_by_reload(client, url, config, lambda: None)
        headers = who("r")
        # A broken file keeps the running plans.
        config.write_text("plans: [")
        await asyncio.sleep(0.3)
        assert server.services.config.plans["r"].requests_per_minute == 5
        assert (await client.post(url, json=BODY, headers=headers)).status_code == 200
    finally:
        server.stop()


async def test_sighup_reloads_plans(
    tmp_path: Path, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    import signal

    from testkit.servers import ServerProcess
    from tests.support import SECRET

    config = write_config(
        tmp_path, upstream.url, extra_plans={"r": {"requests_per_minute": 1}}, name="hup"
    )
    server = ServerProcess(
        {
            "SSERELAY_CONFIG": str(config),
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_CONFIG_POLL_S": "3600",
        }
    )  # only the signal reloads
    try:
        url = server.url + "/v1/chat/stream"
        await _limit_raised_by_reload(
            client, url, config, lambda: server.proc.send_signal(signal.SIGHUP)
        )
    finally:
        output = server.stop()
    assert "plans reloaded" in output


async def test_a_prompt_crafted_to_tokenize_badly_cannot_overrun_the_limit(
    limited: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    """One-letter words are a token per two bytes, not per four characters: admission
    must count the prompt at its upper bound, so `used` never ends above the limit."""
    headers = who("crafted")
    crafted = {"model": "claude", "prompt": "a " * 9000, "max_tokens": 20}
    upstream.app.push_faults([{"tokenizer": "words", "tokens": 20}])
    r = await client.post(limited.url + "/v1/chat/stream", json=crafted, headers=headers)
    if r.status_code == 200:  # admitted: it must not have overrun
        await asyncio.sleep(0.2)
    else:
        assert r.status_code == 422 and r.json()["code"] == "exceeds_plan_limit"
    assert _tokens_used(await _usage(client, limited, headers)) <= 5000
    # A prompt that fits at its bound is admitted and billed what the provider counted;
    # a second one that could only fit by the estimate is refused, not admitted.
    fits = {"model": "claude", "prompt": "a " * 2400, "max_tokens": 20}
    upstream.app.push_faults([{"tokenizer": "words", "tokens": 20}])
    r = await client.post(limited.url + "/v1/chat/stream", json=fits, headers=headers)
    assert r.status_code == 200 and "event: done" in r.text
    await _settled(client, limited, headers, 2400 + 20)
    upstream.app.push_faults([{"tokenizer": "words", "tokens": 20}])
    r = await client.post(limited.url + "/v1/chat/stream", json=fits, headers=headers)
    assert r.status_code == 429
    assert _tokens_used(await _usage(client, limited, headers)) <= 5000


@pytest.mark.parametrize("fault", ["status_429", "status_529"])
async def test_a_request_the_provider_refused_costs_nothing(
    limited: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient, fault: str
) -> None:
    headers = who("metered")
    upstream.app.push_faults([{"fault": fault}] * 3)  # every attempt
    r = await client.post(
        limited.url + "/v1/chat/stream",
        json={"model": "claude", "prompt": "refused " * 10, "max_tokens": 50},
        headers=headers,
    )
    error = next(
        json.loads(line[6:]) for line in r.text.splitlines() if line.startswith('data: {"code')
    )
    assert error["code"] in ("upstream_rate_limited", "upstream_overloaded")
    assert error["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert error["cost_usd"] == 0
    usage = await _settled(client, limited, headers, 0)
    assert usage["budget"]["spent_usd"] == 0


async def test_a_request_the_provider_accepted_bills_its_prompt_even_without_text(
    limited: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    """Refusals cost nothing, but a request the provider accepted (its `message_start`
    counted the prompt) is billed that prompt even if the client leaves before the
    first token: else "huge prompt, disconnect at once" would be free."""
    headers = who("metered")
    upstream.app.push_faults([{"ttft_ms": 5000}])
    prompt = "accepted " * 400
    async with client.stream(
        "POST",
        limited.url + "/v1/chat/stream",
        json={"model": "claude", "prompt": prompt, "max_tokens": 50},
        headers=headers,
    ) as response:
        items = sse_events(response)  # kept open: the client leaves only after 0.5 s
        assert (await collect(items, stop_after=1)).names == ["start"]
        await asyncio.sleep(0.5)
    counted = len(prompt) // 4  # the fake provider's count
    await _settled(client, limited, headers, counted)


async def test_a_stream_waiting_in_the_queue_keeps_its_concurrency_slot(
    tmp_path: Path, upstream: Any, client: httpx.AsyncClient
) -> None:
    """A stream queued behind a busy worker for longer than the concurrency lease still
    holds its slot: the process that admitted it renews the lease until a worker does."""
    config = write_config(
        tmp_path, upstream.url, extra_plans={"two": {"concurrent_streams": 2}}, name="two"
    )
    relay = ServerThread(
        relay_settings(config, worker_concurrency=1, concurrency_lease_s=3, orphan_grace_s=30)
    )
    try:
        headers = auth(f"queued-{uuid.uuid4().hex[:6]}", "two")
        body = {"model": "sim-slow", "prompt": "hold the only worker", "max_tokens": 200}
        running = await client.post(relay.url + "/v1/streams", json=body, headers=headers)
        queued = await client.post(relay.url + "/v1/streams", json=body, headers=headers)
        assert running.status_code == queued.status_code == 201
        await asyncio.sleep(5)  # past the 3 s lease: the second is still in the queue
        third = await client.post(relay.url + "/v1/streams", json=body, headers=headers)
        assert third.status_code == 429, third.text
        assert third.json()["violated"] == ["concurrent_streams"]
        for created in (running, queued):
            await client.delete(relay.url + created.json()["status_url"], headers=headers)
    finally:
        relay.stop()
