"""Metrics that a real Prometheus scrapes (and whose first increments `increase()`
sees), promtool's checks, several workers summed in one scrape, time to first token
while a stream runs, request records and feedback through both stores, and their
export."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml

from app.records import MemoryRecordStore, RecordStore, RedisRecordStore
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerProcess, ServerThread, free_port, wait_http
from testkit.sse import collect, sse_events
from tests.support import ROOT, SECRET, auth, relay_settings, write_config

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    not (PROMTOOL and PROMETHEUS) and not os.environ.get("CI"),
    reason="apt-get install -y prometheus (CI installs it)",
)


async def traffic(client: httpx.AsyncClient, url: str, upstream: FakeUpstreamServer) -> None:
    """Streams of every ending, refusals, resumes: every family gets samples."""
    body = {"model": "sim-fast", "prompt": "metrics", "max_tokens": 5}
    for _ in range(3):
        async with client.stream("POST", url + "/v1/chat/stream", json=body, headers=auth()) as r:
            await collect(r)
    upstream.app.push_faults([{"fault": "drop", "fault_after": 2}])
    async with client.stream(
        "POST",
        url + "/v1/chat/stream",
        headers=auth(),
        json={"model": "gpt", "prompt": "x", "max_tokens": 50},
    ) as r:
        await collect(r)
    created = (await client.post(url + "/v1/streams", json=body, headers=auth())).json()
    async with client.stream("GET", url + created["events_url"]) as r:
        await collect(r)
    await client.get(url + created["events_url"], headers={"last-event-id": "2"})
    await client.get(url + "/v1/models", headers={"authorization": "Bearer nope"})


@needs_prometheus
async def test_promtool_accepts_a_real_scrape_and_the_rules(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    assert PROMTOOL, "promtool is needed: apt-get install -y prometheus"
    await traffic(client, relay.url, upstream)
    scrape = (await client.get(relay.url + "/metrics")).text
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=scrape, text=True, capture_output=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = subprocess.run(
        [PROMTOOL, "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rules.returncode == 0, rules.stdout + rules.stderr
    for family in (
        "sserelay_http_requests_total",
        "sserelay_inter_token_gap_seconds_bucket",
        "sserelay_sse_events_sent_total",
        "sserelay_upstream_requests_total",
        "sserelay_upstream_errors_total",
        "sserelay_auth_failures_total",
        "sserelay_build_info",
        "sserelay_stream_resumes_total",
    ):
        assert family in scrape, family
    assert 'route="/v1/streams/{stream_id}/events"' in scrape  # templates, never raw paths
    assert 'sserelay_upstream_errors_total{kind="upstream_dropped"' in scrape


@needs_prometheus
async def test_a_real_prometheus_scrapes_the_counters(
    tmp_path: Path,
    relay: ServerThread,
    upstream: FakeUpstreamServer,
    client: httpx.AsyncClient,
) -> None:
    assert PROMETHEUS, "prometheus is needed: apt-get install -y prometheus"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: sserelay\n    static_configs: [{{targets: ['127.0.0.1:{relay.port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}", "/-/ready", 30.0)
        before = (await client.get(relay.url + "/metrics")).text
        await traffic(client, relay.url, upstream)
        after = (await client.get(relay.url + "/metrics")).text
        expected = _sum(after, "sserelay_streams_finished_total")
        assert expected - _sum(before, "sserelay_streams_finished_total") >= 5
        value = None
        for _ in range(100):
            r = await client.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": "sum(sserelay_streams_finished_total)"},
            )
            result = r.json()["data"]["result"]
            value = float(result[0]["value"][1]) if result else None
            if value == expected:
                break
            await asyncio.sleep(0.2)
        assert value == expected
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@asynccontextmanager
async def _prometheus(
    tmp_path: Path, target_port: int, client: httpx.AsyncClient
) -> AsyncIterator[Callable[[str], Awaitable[float | None]]]:
    """A real Prometheus scraping one sserelay every 500 ms; yields `query(expr)`: the
    value of an instant query (None when it has no result)."""
    assert PROMETHEUS, "prometheus is needed: apt-get install -y prometheus"
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 500ms, scrape_timeout: 400ms}\n"
        "scrape_configs:\n"
        f"  - job_name: sserelay\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def query(expr: str) -> float | None:
        r = await client.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr})
        result = r.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}", "/-/ready", 30.0)
        yield query
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def _until(
    query: Callable[[str], Awaitable[float | None]],
    expr: str,
    ok: Callable[[float | None], bool],
    timeout_s: float = 20.0,
) -> float | None:
    deadline = time.monotonic() + timeout_s
    value = await query(expr)
    while not ok(value) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await query(expr)
    assert ok(value), f"{expr} = {value}"
    return value


@needs_prometheus
async def test_increase_counts_the_first_streams_of_a_fresh_process(
    tmp_path: Path, config_path: Path, client: httpx.AsyncClient
) -> None:
    """rate() and increase() count what grew between two samples: a series that first
    appears already holding its first stream's tokens reads as no increase at all. So a
    fresh process, scraped before any stream, then streaming: increase() must see it."""
    server = ServerThread(relay_settings(config_path))
    try:
        async with _prometheus(tmp_path, server.port, client) as query:
            up = 'max(timestamp(up{job="sserelay"}))'
            # Scraped (successfully) at least once before any stream.
            await _until(query, 'up{job="sserelay"}', lambda v: v == 1)
            tokens = cost = 0.0
            streams = 4
            for _ in range(streams):
                async with client.stream(
                    "POST",
                    server.url + "/v1/chat/stream",
                    json={"model": "sim-fast", "prompt": "count me", "max_tokens": 100},
                    headers=auth(),
                ) as r:
                    done = (await collect(r)).last("done")
                tokens += done["usage"]["output_tokens"]
                cost += done["cost_usd"]
            assert tokens > 0
            output = 'sserelay_tokens_total{direction="output"}'
            await _until(query, f"sum({output})", lambda v: v == tokens)
            # One more scrape after the one that saw the tokens.
            seen = await query(up)
            assert seen is not None
            await _until(query, up, lambda v: v is not None and v > seen)
            increase = await query(f"sum(increase({output}[1m]))")
            # increase() extrapolates to the window's end: a little above, never below.
            assert increase is not None and 0.9 * tokens <= increase <= 2 * tokens, (
                increase,
                tokens,
            )
            finished = await query("sum(increase(sserelay_streams_finished_total[1m]))")
            assert finished is not None and finished >= 0.9 * streams
            started = await query("sum(increase(sserelay_streams_started_total[1m]))")
            assert started is not None and started >= 0.9 * streams
            ttft = await query("sum(increase(sserelay_time_to_first_token_seconds_count[1m]))")
            assert ttft is not None and ttft >= 0.9 * streams
            spent = await query("sum(increase(sserelay_cost_usd_total[1m]))")
            assert spent is not None and spent >= 0.9 * cost > 0
    finally:
        server.stop()


def _value(scrape: str, series: str) -> float | None:
    """The value of one exact series (`name{labels}` as rendered), None if absent."""
    for line in scrape.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_time_to_first_token_is_observed_at_the_first_token(
    config_path: Path, client: httpx.AsyncClient
) -> None:
    """A long stream's first token reaches the histogram while the stream still runs,
    and its end does not count it a second time."""
    server = ServerThread(relay_settings(config_path))
    count = 'sserelay_time_to_first_token_seconds_count{model="sim-slow"}'

    async def scrape() -> str:
        return (await client.get(server.url + "/metrics")).text

    try:
        before = _value(await scrape(), count) or 0.0
        body = {"model": "sim-slow", "prompt": "take your time", "max_tokens": 40}
        async with client.stream(
            "POST", server.url + "/v1/chat/stream", json=body, headers=auth()
        ) as r:
            events = sse_events(r)
            head = await collect(events, stop_after=2)
            assert head.names == ["start", "delta"]
            during = await scrape()
            assert _value(during, count) == before + 1
            assert _sum(during, "sserelay_streams_finished_total") == 0  # still running
            assert _value(during, 'sserelay_streams_active{route="chat"}') == 1
            rest = await collect(events)
            assert rest.names[-1] == "done"
        finished = 0.0
        for _ in range(100):  # counted as the response closes
            after = await scrape()
            finished = _sum(after, "sserelay_streams_finished_total")
            if finished:
                break
            await asyncio.sleep(0.05)
        assert finished == 1
        assert _value(after, count) == before + 1
        assert (
            _value(after, 'sserelay_time_to_first_token_seconds_bucket{le="+Inf",model="sim-slow"}')
            == before + 1
        )
    finally:
        server.stop()


async def test_every_series_exists_at_zero_before_its_first_increment(
    tmp_path: Path, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    """Children for every plan's allowed models, every outcome, route and direction, at
    startup; a plan added by a reload gets its own."""
    config = write_config(tmp_path, upstream.url, name="primed")
    server = ServerThread(relay_settings(config, config_poll_s=0.05))
    try:
        scrape = (await client.get(server.url + "/metrics")).text
        for series in (
            'sserelay_tokens_total{direction="output",model="claude",plan="pro"}',
            'sserelay_tokens_total{direction="input",model="sim-fast",plan="free"}',
            'sserelay_cost_usd_total{model="gpt",plan="pro"}',
            'sserelay_streams_started_total{model="sim-fast",plan="free",route="chat"}',
            'sserelay_streams_finished_total{model="sim-slow",outcome="lost",plan="pro",route="streams"}',
            'sserelay_streams_finished_total{model="sim-fast",outcome="done",plan="free",route="chat"}',
            'sserelay_streams_active{route="streams"}',
            'sserelay_time_to_first_token_seconds_count{model="gpt"}',
            'sserelay_time_to_first_token_seconds_bucket{le="0.5",model="claude"}',
            'sserelay_stream_duration_seconds_count{model="claude",outcome="orphaned"}',
            'sserelay_upstream_requests_total{model="claude",provider="anthropic"}',
            'sserelay_upstream_errors_total{kind="upstream_timeout",model="gpt",provider="openai"}',
            'sserelay_upstream_retries_total{model="sim-fast"}',
            'sserelay_limiter_decisions_total{limit="all",plan="pro",result="allowed"}',
            'sserelay_auth_failures_total{reason="token_expired"}',
            'sserelay_feedback_total{rating="5"}',
        ):
            assert _value(scrape, series) == 0, series
        # Only what can happen: plan free may use sim-fast alone; no running outcome.
        assert 'model="claude",plan="free"' not in scrape
        assert 'outcome="running"' not in scrape

        raw = yaml.safe_load(config.read_text())
        raw["plans"]["team"] = {"models": ["gpt"], "requests_per_minute": 5}
        config.write_text(yaml.safe_dump(raw))
        series = 'sserelay_tokens_total{direction="output",model="gpt",plan="team"}'
        for _ in range(100):
            scrape = (await client.get(server.url + "/metrics")).text
            if series in scrape:
                break
            await asyncio.sleep(0.05)
        assert _value(scrape, series) == 0
        assert (
            _value(
                scrape,
                'sserelay_limiter_decisions_total{limit="requests_per_minute",plan="team",result="refused"}',
            )
            == 0
        )
        assert 'model="sim-fast",plan="team"' not in scrape
        # Still there: a removed plan's series may stay, a kept one must.
        assert _value(scrape, 'sserelay_cost_usd_total{model="sim-fast",plan="free"}') == 0
    finally:
        server.stop()


def _sum(scrape: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in scrape.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


async def test_two_workers_one_scrape(config_path: Path, client: httpx.AsyncClient) -> None:
    directory = tempfile.mkdtemp(prefix="sserelay-mp-")
    server = ServerProcess(
        {
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_CONFIG": str(config_path),
            "PROMETHEUS_MULTIPROC_DIR": directory,
        },
        args=["--workers", "2"],
    )
    body = {"model": "sim-fast", "prompt": "workers", "max_tokens": 3}
    try:
        sent = 0
        for _ in range(200):  # new connections until both workers have served some
            async with httpx.AsyncClient(headers={"connection": "close"}) as fresh:
                r = await fresh.post(server.url + "/v1/chat/stream", json=body, headers=auth())
                assert r.status_code == 200 and "event: done" in r.text
            sent += 1
            pids = {p.name.rsplit("_", 1)[1] for p in Path(directory).glob("counter_*.db")}
            if len(pids) >= 2 and sent >= 10:
                break
        assert len(pids) >= 2
        await asyncio.sleep(0.2)
        scrape = (await client.get(server.url + "/metrics")).text
        assert _sum(scrape, "sserelay_streams_finished_total") == sent
        assert _sum(scrape, "sserelay_streams_active") == 0
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[RecordStore]:
    if request.param == "memory":
        yield MemoryRecordStore(max_records=100)
        return
    client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield RedisRecordStore(client, prefix=f"t-{uuid.uuid4().hex[:6]}:", max_records=100, ttl_s=60)
    await client.aclose()


async def test_records_and_feedback_round_trip(store: RecordStore) -> None:
    start = time.time() - 10  # records are stored after they finish
    for i in range(5):
        await store.add(
            {"id": f"s_{i}", "subject": "alice", "finished_at": start + i, "cost_usd": 0.001 * i}
        )
    assert await store.attach_feedback("s_3", {"rating": "up", "correct": True})
    assert not await store.attach_feedback("s_missing", {"rating": "down"})
    got = await store.get("s_3")
    assert got is not None and got["feedback"]["rating"] == "up"
    everything = [r async for r in store.export(start - 1)]
    assert [r["id"] for r in everything] == [f"s_{i}" for i in range(5)]
    assert everything[3]["feedback"] == {"rating": "up", "correct": True}
    window = [r["id"] async for r in store.export(start + 1, start + 3)]
    assert window == ["s_1", "s_2"]


async def test_feedback_and_export_end_to_end(
    config_path: Path,
    redis_url: str,
    upstream: FakeUpstreamServer,
    client: httpx.AsyncClient,
) -> None:
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    server = ServerThread(
        relay_settings(
            config_path, redis_url=redis_url, redis_prefix=prefix, records_content="hash"
        )
    )
    since = time.time() - 1
    try:
        created = (
            await client.post(
                server.url + "/v1/streams",
                headers=auth(),
                json={"model": "sim-fast", "prompt": "rate me", "max_tokens": 4},
            )
        ).json()
        async with client.stream("GET", server.url + created["events_url"]) as r:
            done = (await collect(r)).last("done")
        url = server.url + f"/v1/streams/{created['id']}/feedback"
        for _ in range(50):  # the record lands as the stream's task ends
            r = await client.post(
                url, headers=auth(), json={"rating": 5, "correct": True, "comment": "good\x07"}
            )
            if r.status_code != 404:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 200 and r.json()["feedback"]["comment"] == "good"
        other = await client.post(url, headers=auth("mallory"), json={"rating": "down"})
        assert other.status_code == 404
        bad = await client.post(url, headers=auth(), json={"rating": 9})
        assert bad.status_code == 422
    finally:
        server.stop()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")},
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": prefix,
    }
    start = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(since))
    exported = subprocess.run(
        [sys.executable, "-m", "app.cli", "records", "export", "--since", start],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    record: dict[str, Any] = next(r for r in lines if r["id"] == created["id"])
    assert record["outcome"] == "done" and record["subject"] == "alice"
    assert record["output_tokens"] == done["usage"]["output_tokens"]
    assert record["cost_usd"] == done["cost_usd"]
    assert record["feedback"]["rating"] == 5 and record["feedback"]["correct"] is True
    # Stored as hashes only: the prompt itself is nowhere in the record.
    assert record["input"].startswith("sha256:") and "rate me" not in json.dumps(record)
    assert record["output"].startswith("sha256:")


async def test_the_coalescing_window_and_the_process_load_are_exported(
    config_path: Path, client: httpx.AsyncClient
) -> None:
    """Idle, the window is the configured floor; the pacer samples on its own."""
    settings = relay_settings(config_path).model_copy(
        update={"coalesce_ms": 20, "coalesce_max_ms": 80}
    )
    server = ServerThread(settings)
    try:
        scrape = (await client.get(server.url + "/metrics")).text
        assert _value(scrape, "sserelay_coalesce_window_seconds") == pytest.approx(0.02, abs=0.01)
        busy = _value(scrape, "sserelay_process_busy_ratio")
        assert busy is not None and busy >= 0
    finally:
        server.stop()
