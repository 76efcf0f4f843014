"""A process killed mid-stream (SIGKILL: no drain, no finish hook) must not leave its
callers charged for the worst case, nor charged twice: another process takes its
streams over once their lease lapsed, finishes them, and settles each one exactly once
for every attempt's usage."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from testkit.servers import ServerProcess
from testkit.sse import collect, sse_events
from tests.support import SECRET, auth, write_config

pytestmark = pytest.mark.redis

LEASE_S, GRACE_S = 1.0, 30.0


def _used(usage: dict[str, Any], name: str) -> int:
    return int(next(x["used"] for x in usage["limits"] if x["name"] == name))


async def test_a_killed_process_streams_are_settled_by_another(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    config = write_config(
        tmp_path,
        upstream.url,
        extra_plans={
            "daily": {"tokens_per_day": 10_000_000, "daily_budget_usd": 100, "max_tokens": 4096}
        },
        name="daily",
    )
    env = {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": f"t-{uuid.uuid4().hex[:6]}:",
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config),
        "SSERELAY_GENERATION_LEASE_S": str(LEASE_S),
        "SSERELAY_SUPERVISOR_TICK_S": "0.2",
        "SSERELAY_ORPHAN_GRACE_S": str(GRACE_S),
    }
    survivor, doomed = ServerProcess(env), ServerProcess(env)
    headers = auth(f"crash-{uuid.uuid4().hex[:6]}", "daily")
    body = {"model": "sim-slow", "prompt": "killed mid-answer", "max_tokens": 100}
    try:
        created = [
            (await client.post(doomed.url + "/v1/streams", json=body, headers=headers)).json()
            for _ in range(20)
        ]
        reserved = _used(
            (await client.get(survivor.url + "/v1/usage", headers=headers)).json(), "tokens_per_day"
        )
        assert reserved >= 20 * 100
        async with client.stream("GET", survivor.url + created[0]["events_url"]) as response:
            items = sse_events(response)
            await collect(items, stop_after=6)
            doomed.proc.send_signal(signal.SIGKILL)
            doomed.proc.wait()
            killed_at = time.monotonic()
            tail = await collect(items)
        assert tail.names[-1] == "done"  # taken over if it ran there: no error

        # Nobody reads the other 19: they are taken over (those the killed process
        # ran) and finish all the same.
        deadline = killed_at + LEASE_S + 15
        statuses: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            statuses = [
                (await client.get(survivor.url + c["status_url"], headers=headers)).json()
                for c in created
            ]
            if all(s["status"] == "done" for s in statuses):
                break
            await asyncio.sleep(0.2)
        assert [s["status"] for s in statuses] == ["done"] * 20
        billed = sum(
            s["done"]["usage"]["input_tokens"] + s["done"]["usage"]["output_tokens"]
            for s in statuses
        )
        usage = (await client.get(survivor.url + "/v1/usage", headers=headers)).json()
        assert _used(usage, "tokens_per_day") == billed  # exactly once each
        spent = usage["budget"]["spent_usd"]
        assert spent == pytest.approx(sum(s["done"]["cost_usd"] for s in statuses), abs=1e-6)
        taken = await client.get(survivor.url + "/metrics")
        assert "sserelay_takeovers_total" in taken.text
    finally:
        survivor.stop()
        doomed.stop()
