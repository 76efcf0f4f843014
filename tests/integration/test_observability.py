"""Metrics that a real Prometheus scrapes, promtool's checks, several workers summed in
one scrape, request records and feedback through both stores, and their export."""

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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from app.records import MemoryRecordStore, RecordStore, RedisRecordStore
from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import ServerProcess, ServerThread, free_port, wait_http
from testkit.sse import collect
from tests.support import ROOT, SECRET, auth, relay_settings

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
