"""Generations that outlive their worker, on real processes and a real Redis: an API
process (`serve --api-only`) queues jobs, `sserelay worker` processes run them. A
worker killed (SIGKILL), paused past its lease (SIGSTOP) or drained (SIGTERM) mid-answer
costs its readers at most a pause: another worker takes the stream over, continues the
answer from the logged text, and every reader gets exactly the expected text, once."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from streaming import GenerationRequest, Message, QueueError, estimate_tokens, simulated_text
from testkit.servers import ServerProcess, ServerThread
from testkit.sse import SSEEvent, collect, sse_events
from tests.support import SECRET, auth, relay_settings, write_config

pytestmark = pytest.mark.redis

LEASE_S = 1.0
WORKER = [sys.executable, "-m", "app.cli", "worker"]


def _env(tmp_path: Path, upstream: Any, redis_url: str, **extra: str) -> dict[str, str]:
    config = write_config(
        tmp_path,
        upstream.url,
        extra_plans={"big": {"max_tokens": 4096, "concurrent_streams": 1000}},
        name="durable",
    )
    return {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": f"t-{uuid.uuid4().hex[:6]}:",
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config),
        "SSERELAY_GENERATION_LEASE_S": str(LEASE_S),
        "SSERELAY_SUPERVISOR_TICK_S": "0.2",
        "SSERELAY_ORPHAN_GRACE_S": "10",
        "SSERELAY_DRAIN_TIMEOUT_S": "0.5",
        **extra,
    }


def _expected(prompt: str, tokens: int) -> str:
    request = GenerationRequest("sim-slow", (Message("user", prompt),), max_tokens=tokens)
    return simulated_text(request, tokens)


class Reader:
    """One client following one stream on the API process, with arrival times."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.events: list[tuple[float, SSEEvent]] = []
        self.task = asyncio.create_task(self._read(client, url))

    async def _read(self, client: httpx.AsyncClient, url: str) -> None:
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            async for item in sse_events(response):
                if isinstance(item, SSEEvent):
                    self.events.append((time.monotonic(), item))
                    if item.event in ("done", "error"):
                        return

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for _, e in self.events if e.event == "delta")

    def names(self) -> list[str]:
        return [e.event for _, e in self.events]

    def check(self, expected: str) -> None:
        """Exactly the expected text, once, then `done`: one `start`, contiguous ids and
        indexes, progress never going back."""
        assert self.names()[-1] == "done", self.events[-1][1]
        assert self.text == expected
        assert self.names().count("start") == 1
        ids = [e.id for _, e in self.events]
        assert ids == list(range(1, len(ids) + 1))
        index = 0
        for _, event in self.events:
            if event.event == "delta":
                assert event.data["index"] == index
                index += len(event.data["text"].encode("utf-16-le")) // 2
        percents = [e.data["percent"] for _, e in self.events if e.event == "progress"]
        assert percents == sorted(percents)


async def _start(
    client: httpx.AsyncClient, api: ServerProcess, n: int, tokens: int, who: str
) -> list[tuple[str, Reader]]:
    started = []
    for i in range(n):
        prompt = f"durable {who} {i}"
        body = {"model": "sim-slow", "prompt": prompt, "max_tokens": tokens}
        r = await client.post(api.url + "/v1/streams", json=body, headers=auth(who, "big"))
        assert r.status_code == 201, r.text
        started.append((prompt, Reader(client, api.url + r.json()["events_url"])))
    return started


def _stop(*processes: ServerProcess | None) -> None:
    """Stop every process a test started (resumed first, if a test left it paused)."""
    for process in processes:
        if process is not None:
            if process.proc.poll() is None:
                process.proc.send_signal(signal.SIGCONT)
            process.stop()


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def test_streams_of_a_killed_worker_are_taken_over_and_complete_exactly(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    env = _env(tmp_path, upstream, redis_url)
    api = ServerProcess(env, ["--api-only"])
    doomed = ServerProcess(env, executable=WORKER)
    spare: ServerProcess | None = None
    try:
        streams = await _start(client, api, 20, 200, f"kill-{uuid.uuid4().hex[:6]}")
        await asyncio.sleep(1.0)  # all 20 run on the only worker, about 20 tokens in
        spare = ServerProcess(env, executable=WORKER)
        # Still running, however long the spare took to start (a loaded machine).
        assert all(r.text and r.names()[-1] != "done" for _, r in streams)
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        killed_at = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(r.task for _, r in streams)), 30)
        for prompt, reader in streams:
            reader.check(_expected(prompt, 200))
            continued = [e.data for _, e in reader.events if e.event == "continued"]
            assert [c["reason"] for c in continued] == ["takeover"]
            # Every attempt's usage summed: all 200 tokens out, the prompt twice in
            # (the second time with the text so far as a prefill).
            usage = reader.events[-1][1].data["usage"]
            assert 197 <= usage["output_tokens"] <= 203
            at = next(i for i, (_, e) in enumerate(reader.events) if e.event == "continued")
            prefill = "".join(
                e.data["text"] for _, e in reader.events[:at] if e.event == "delta"
            ).rstrip()
            assert usage["input_tokens"] == estimate_tokens(len(prompt)) + estimate_tokens(
                len(prompt) + len(prefill)
            )
            first = next(t for t, e in reader.events if t > killed_at and e.event == "delta")
            assert first - killed_at <= LEASE_S + 2
        assert _metric(spare.url, "sserelay_takeovers_total") == 20
        assert _metric(spare.url, 'sserelay_continuations_total{reason="takeover"}') == 20
    finally:
        _stop(api, doomed, spare)


async def test_a_paused_owner_cannot_write_once_taken_over(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    env = _env(tmp_path, upstream, redis_url)
    api = ServerProcess(env, ["--api-only"])
    paused = ServerProcess(env, executable=WORKER)
    spare: ServerProcess | None = None
    try:
        streams = await _start(client, api, 5, 160, f"stop-{uuid.uuid4().hex[:6]}")
        await asyncio.sleep(0.8)
        spare = ServerProcess(env, executable=WORKER)
        assert all(r.names()[-1] != "done" for _, r in streams)
        paused.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(LEASE_S + 2.0)  # past its lease: taken over meanwhile
        paused.proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(asyncio.gather(*(r.task for _, r in streams)), 30)
        for prompt, reader in streams:
            reader.check(_expected(prompt, 160))
        # In the log itself: every entry says which epoch wrote it, and once the new
        # owner (epoch 2) wrote, the old one (epoch 1) never did again.
        store = redis.Redis.from_url(redis_url)
        prefix = env["SSERELAY_REDIS_PREFIX"]
        for key in store.keys(f"{prefix}s:*:ev"):
            epochs = [int(fields[b"e"]) for _, fields in store.xrange(key)]
            assert epochs == sorted(epochs) and epochs[-1] == 2, epochs
        store.close()
        # The woken owner stops each stream at its first refused write or renewal, or,
        # if its own commands timed out across the pause (the store looks hung to it),
        # steps back from it: either way it ends, settles and records nothing.
        for _ in range(50):
            stopped = _metric(paused.url, "sserelay_fenced_writes_total") + _metric(
                paused.url, "sserelay_generations_stepped_back_total"
            )
            if stopped == 5:
                break
            await asyncio.sleep(0.1)
        assert stopped == 5
        assert _metric(paused.url, "sserelay_streams_finished_total") == 0
    finally:
        _stop(api, paused, spare)


async def test_a_drained_worker_hands_its_streams_over(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    env = _env(tmp_path, upstream, redis_url)
    api = ServerProcess(env, ["--api-only"])
    drained = ServerProcess(env, executable=WORKER)
    spare: ServerProcess | None = None
    try:
        streams = await _start(client, api, 10, 200, f"drain-{uuid.uuid4().hex[:6]}")
        await asyncio.sleep(0.8)
        spare = ServerProcess(env, executable=WORKER)
        await asyncio.sleep(0.5)  # the spare has beaten once: it counts as alive
        drained.proc.send_signal(signal.SIGTERM)
        try:
            assert drained.proc.wait(timeout=15) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("the drained worker did not exit:\n" + drained.stop())
        await asyncio.wait_for(asyncio.gather(*(r.task for _, r in streams)), 30)
        for prompt, reader in streams:
            reader.check(_expected(prompt, 200))  # no `shutdown` error anywhere
            assert "error" not in reader.names()
        output = drained.stop()
        assert "handing 10 generations over" in output, output
    finally:
        _stop(api, drained, spare)


async def test_workers_drained_together_end_their_streams_instead_of_waiting(
    tmp_path: Path, upstream: Any, redis_url: str, client: httpx.AsyncClient
) -> None:
    """Every worker drained at once (scaled to zero): none counts on another to take
    its streams over, so each ends them with a retryable `shutdown` error rather than
    leaving readers waiting for a worker that will never come."""
    env = _env(tmp_path, upstream, redis_url)
    api = ServerProcess(env, ["--api-only"])
    workers = [ServerProcess(env, executable=WORKER) for _ in range(2)]
    try:
        streams = await _start(client, api, 6, 200, f"down-{uuid.uuid4().hex[:6]}")
        await asyncio.sleep(1.0)
        for worker in workers:
            worker.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*(r.task for _, r in streams)), 15)
        for _, reader in streams:
            end = reader.events[-1][1]
            assert end.event == "error" and end.data["code"] == "shutdown", end
            assert end.data["retryable"] is True
    finally:
        _stop(api, *workers)


async def test_chaos_workers_killed_and_restarted_every_3s(
    tmp_path: Path, upstream: Any, redis_url: str
) -> None:
    """200 streams over three workers; every 3 s a random worker is SIGKILLed and a new
    one started, for 30 s. Every stream completes with exactly its text."""
    env = _env(tmp_path, upstream, redis_url, SSERELAY_MAX_TAKEOVERS="50")
    api = ServerProcess(env, ["--api-only"])
    workers = [ServerProcess(env, executable=WORKER) for _ in range(3)]
    rng = random.Random(13)
    limits = httpx.Limits(max_connections=300)  # one per reader, and some to start them
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0), limits=limits)
    try:
        streams = await _start(client, api, 200, 400, f"chaos-{uuid.uuid4().hex[:6]}")
        began = time.monotonic()
        kills = 0
        while kills < 10:  # at 3, 6, ... 30 s
            await asyncio.sleep(max(0.0, began + 3 * (kills + 1) - time.monotonic()))
            victim = workers.pop(rng.randrange(len(workers)))
            victim.proc.send_signal(signal.SIGKILL)
            kills += 1
            await asyncio.to_thread(victim.stop)
            # Started off the event loop: the readers keep reading meanwhile.
            workers.append(await asyncio.to_thread(ServerProcess, env, executable=WORKER))
        await asyncio.wait_for(asyncio.gather(*(r.task for _, r in streams)), 60)
        for prompt, reader in streams:
            reader.check(_expected(prompt, 400))
    finally:
        await client.aclose()
        _stop(api, *workers)


class _LandsThenTimesOut:
    """A queue whose submit lands, then reports a timeout (as when Redis applied the XADD
    but its reply was late): everything else is the real queue's."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def submit(self, stream_id: str, payload: bytes, *, now: float) -> None:
        await self.inner.submit(stream_id, payload, now=now)
        await asyncio.sleep(0.3)  # a worker claims it and takes the stream meanwhile
        raise QueueError("timed out")


async def test_a_job_that_landed_despite_a_timeout_is_not_ended_under_its_worker(
    config_path: Path, client: httpx.AsyncClient
) -> None:
    relay = ServerThread(relay_settings(config_path))
    try:
        services = relay.services
        object.__setattr__(services, "queue", _LandsThenTimesOut(services.queue))
        body = {"model": "sim-fast", "prompt": "landed", "max_tokens": 10}
        r = await client.post(relay.url + "/v1/streams", json=body, headers=auth())
        assert r.status_code == 201, r.text
        async with client.stream("GET", relay.url + r.json()["events_url"]) as response:
            events = await collect(response)
        assert events.names[-1] == "done"
        assert events.text == simulated_text(
            GenerationRequest("sim-fast", (Message("user", "landed"),), 10), 10
        )
    finally:
        relay.stop()
