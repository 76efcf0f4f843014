"""The scenarios. Each measures the same load on every path it names, in the same run,
and returns figures per path (`{path: {figure: value}}`) and, for the charts, the times
to first text it saw."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testkit.fake_upstream import expected_text

from . import client
from .client import Pool, Sample
from .harness import BENCH_PLAN, PATHS, ApiWorkers, Harness, cpu_seconds, own_cpu_seconds

Figures = dict[str, dict[str, Any]]


@dataclass
class Measured:
    figures: Figures
    ttfts: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Sizes:
    sequential_streams: int = 200
    concurrent_streams: int = 500
    concurrent_tokens: int = 200
    concurrent_tps: float = 20.0
    saturation_tokens: int = 2000
    saturation_levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    saturation_level_s: float = 3.0
    events_per_write: int = 32
    open_counts: tuple[int, ...] = (1000, 5000, 10_000)
    hold_tps: float = 0.1
    limiter_s: float = 5.0
    limiter_concurrency: int = 32
    limiter_latency_samples: int = 2000
    api_workers: int = 2
    # Not 500 as in 2: this topology spends about 0.6 s of CPU per 1,000 events (the API
    # reads every event back from Redis), so 500 streams at 20 tokens/s would need about
    # six cores, and on two would measure only the backlog.
    api_workers_in_flight: int = 100
    api_workers_tokens: int = 100  # at concurrent_tps: 5 s streams, 15 s a path
    burst_streams: int = 100
    burst_rounds: int = 5
    realistic_levels: tuple[int, ...] = (100, 250, 500, 1000)
    realistic_tps: float = 50.0
    realistic_tokens: int = 150  # at 50 tokens/s: 3 s streams

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            sequential_streams=50,
            concurrent_streams=100,
            concurrent_tokens=40,
            saturation_tokens=1000,
            saturation_levels=(1, 4, 16),
            saturation_level_s=1.5,
            open_counts=(200, 1000),
            limiter_s=2.0,
            limiter_latency_samples=500,
            api_workers_tokens=40,
            burst_rounds=2,
            realistic_levels=(100, 250),
            realistic_tokens=100,
        )


def percentile_ms(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000, 3)


def _ttft_figures(samples: Sequence[Sample]) -> dict[str, Any]:
    ttfts = [s.ttft_s for s in samples]
    return {"ttft_p50_ms": percentile_ms(ttfts, 0.5), "ttft_p99_ms": percentile_ms(ttfts, 0.99)}


def _added(figures: Figures) -> None:
    """Each sserelay path against the upstream measured in the same scenario."""
    base = figures["upstream"]
    for path, values in figures.items():
        if path == "upstream":
            continue
        for q in ("p50", "p99"):
            values[f"added_{q}_ms"] = round(values[f"ttft_{q}_ms"] - base[f"ttft_{q}_ms"], 3)


async def sequential(h: Harness, sizes: Sizes) -> Measured:
    """1. One stream at a time: what sserelay adds to the first text, nothing else running."""
    tokens = 20
    await h.shape(tokens=tokens, tps=0, batch=1)
    want = expected_text(tokens)
    figures: Figures = {}
    ttfts: dict[str, list[float]] = {}
    for path in PATHS:
        await h.one(path, tokens)  # warm connections and code paths
        cpu = h.relay_cpu
        samples = [await h.one(path, tokens) for _ in range(sizes.sequential_streams)]
        figures[path] = {
            **_ttft_figures(samples),
            "streams": len(samples),
            "intact": all(s.text == want for s in samples),
        }
        if path != "upstream":
            figures[path]["sserelay_cpu_ms_per_stream"] = round(
                (h.relay_cpu - cpu) / len(samples) * 1000, 3
            )
        ttfts[path] = [s.ttft_s for s in samples]
    _added(figures)
    return Measured(figures, ttfts)


async def burst(h: Harness, sizes: Sizes) -> Measured:
    """100 streams started at the same instant, each on a new connection (a page load,
    a retry storm): what the starts cost when they queue behind each other. Measured
    from each request's own start; every text is checked."""
    n, tokens = sizes.burst_streams, 20
    await h.shape(tokens=tokens, tps=0, batch=1)
    want = expected_text(tokens)
    figures: Figures = {}
    ttfts: dict[str, list[float]] = {}
    for path in PATHS:
        await h.one(path, tokens)
        samples: list[Sample] = []
        cpu = h.relay_cpu
        for _ in range(sizes.burst_rounds):
            samples += await asyncio.gather(*(h.one(path, tokens) for _ in range(n)))
            if path != "upstream":
                await h.settle()
        figures[path] = {
            **_ttft_figures(samples),
            "streams": len(samples),
            "burst": n,
            "intact": all(s.text == want for s in samples),
        }
        if path != "upstream":
            figures[path]["sserelay_cpu_ms_per_stream"] = round(
                (h.relay_cpu - cpu) / len(samples) * 1000, 3
            )
        ttfts[path] = [s.ttft_s for s in samples]
    _added(figures)
    return Measured(figures, ttfts)


async def concurrent(h: Harness, sizes: Sizes) -> Measured:
    """2. A steady N streams in flight: arrivals evenly spread over one stream's lifetime,
    for two lifetimes, so the second half of the streams start while N are running.
    Only those are measured; every stream's text is checked."""
    n, tokens, tps = sizes.concurrent_streams, sizes.concurrent_tokens, sizes.concurrent_tps
    await h.shape(tokens=tokens, tps=tps, batch=1)
    want = expected_text(tokens)
    interval = tokens / tps / n
    figures: Figures = {}
    ttfts: dict[str, list[float]] = {}
    for path in PATHS:
        await h.one(path, tokens)
        samples: list[Sample | None] = [None] * (2 * n)
        cpu, own = h.relay_cpu, own_cpu_seconds()
        t0 = time.perf_counter()

        async def run(
            i: int, path: str = path, t0: float = t0, samples: list[Sample | None] = samples
        ) -> None:
            await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
            samples[i] = await h.one(path, tokens)

        await asyncio.gather(*(run(i) for i in range(2 * n)))
        wall = time.perf_counter() - t0
        done = [s for s in samples if s is not None]
        steady = done[n:]
        relayed = sum(len(s.text) > 0 for s in done) * tokens
        figures[path] = {
            **_ttft_figures(steady),
            "streams": len(done),
            "in_flight": n,
            "intact": len(done) == 2 * n and all(s.text == want for s in done),
            "wall_s": round(wall, 2),
            "load_generator_cpu_s": round(own_cpu_seconds() - own, 3),
        }
        if path != "upstream":
            used = h.relay_cpu - cpu
            figures[path]["sserelay_cpu_s"] = round(used, 3)
            figures[path]["sserelay_cpu_s_per_1k_tokens"] = round(used / relayed * 1000, 4)
        ttfts[path] = [s.ttft_s for s in steady]
    _added(figures)
    return Measured(figures, ttfts)


REALISTIC_PATHS = ("upstream", "direct", "resumable")


async def realistic(h: Harness, sizes: Sizes) -> Measured:
    """Real token rates: streams at 50 tokens/s (every token its own upstream event),
    arriving at random (Poisson) at the rate that keeps N in flight, N rising level by
    level. At each level, for two lifetimes of a stream: added TTFT of the streams that
    started while N were running, text events delivered per second, and sserelay's CPU
    (per second of wall time and per event). Every stream's text is checked."""
    tokens, tps = sizes.realistic_tokens, sizes.realistic_tps
    await h.shape(tokens=tokens, tps=tps, batch=1)
    want = expected_text(tokens)
    lifetime = tokens / tps
    figures: Figures = {path: {"levels": []} for path in REALISTIC_PATHS}
    ttfts: dict[str, list[float]] = {}
    rng = random.Random(15)
    for n in sizes.realistic_levels:
        # The same arrival times on every path: what differs is only what serves them.
        arrivals, at = [], 0.0
        while at < 2 * lifetime:
            arrivals.append(at)
            at += rng.expovariate(n / lifetime)
        for path in REALISTIC_PATHS:
            await h.one(path, tokens)
            level = await _realistic_level(h, path, arrivals, lifetime, tokens, want)
            level["in_flight"] = n
            figures[path]["levels"].append(level)
            if n == sizes.realistic_levels[-1]:
                ttfts[path] = level.pop("_ttfts")
            else:
                level.pop("_ttfts")
            if path != "upstream":
                await h.settle(timeout=120)
    for path in REALISTIC_PATHS:
        top = figures[path]["levels"][-1]
        figures[path].update({k: v for k, v in top.items()})
        figures[path]["intact"] = all(x["intact"] for x in figures[path]["levels"])
    base = figures["upstream"]
    for path in ("direct", "resumable"):
        for level, ref in zip(figures[path]["levels"], base["levels"], strict=True):
            for q in ("p50", "p99"):
                level[f"added_{q}_ms"] = round(level[f"ttft_{q}_ms"] - ref[f"ttft_{q}_ms"], 3)
        for q in ("p50", "p99"):
            figures[path][f"added_{q}_ms"] = figures[path]["levels"][-1][f"added_{q}_ms"]
    return Measured(figures, ttfts)


async def _realistic_level(
    h: Harness, path: str, arrivals: list[float], lifetime: float, tokens: int, want: str
) -> dict[str, Any]:
    samples: list[Sample | None] = [None] * len(arrivals)
    failed = 0
    cpu, own = h.relay_cpu, own_cpu_seconds()
    t0 = time.perf_counter()

    async def run(i: int, at: float) -> None:
        nonlocal failed
        await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
        try:
            samples[i] = await h.one(path, tokens)
        except (OSError, RuntimeError, ValueError, EOFError):
            failed += 1  # refused or cut: counted, and the level is not intact

    await asyncio.gather(*(run(i, at) for i, at in enumerate(arrivals)))
    wall = time.perf_counter() - t0
    done = [s for s in samples if s is not None]
    pairs = zip(samples, arrivals, strict=True)
    steady = [s for s, at in pairs if s is not None and at >= lifetime]
    events = sum(s.events for s in done)
    relayed = sum(len(s.text) > 0 for s in done) * tokens
    errors: dict[str, int] = {}
    for s in done:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    level: dict[str, Any] = {
        **_ttft_figures(steady),
        "streams": len(done),
        "failed": failed,
        "ended_in_error": errors,
        "intact": failed == 0 and all(s.text == want for s in done),
        "wall_s": round(wall, 2),
        "text_events_per_s": round(events / wall),
        "tokens_per_event": round(relayed / events, 2) if events else None,
        "load_generator_cpu_util": round((own_cpu_seconds() - own) / wall, 2),
        "_ttfts": [s.ttft_s for s in steady],
    }
    if path != "upstream":
        used = h.relay_cpu - cpu
        level["sserelay_cpu_util"] = round(used / wall, 2)
        level["sserelay_cpu_s_per_1k_tokens"] = round(used / relayed * 1000, 4) if relayed else None
        level["sserelay_cpu_us_per_event"] = round(used / events * 1e6, 1) if events else None
    return level


async def saturation(h: Harness, sizes: Sizes) -> Measured:
    """3 and 6. Tokens as fast as the upstream sends them, concurrency doubling until
    sserelay's CPU is saturated or throughput stops growing. Text tokens, not events.

    Everything shares two cores, so next to tokens/s (what this box delivered) the
    figure that describes sserelay is tokens per CPU-second of its process: the rate
    one process sustains with a core to itself."""
    tokens = sizes.saturation_tokens
    await h.shape(tokens=tokens, tps=0, batch=sizes.events_per_write)
    want = expected_text(tokens)
    figures: Figures = {}
    for path in PATHS:
        await h.one(path, tokens)
        levels: list[dict[str, Any]] = []
        for concurrency in sizes.saturation_levels:
            level = await _saturate(h, path, concurrency, tokens, want, sizes.saturation_level_s)
            levels.append(level)
            best = max(levels[:-1], key=lambda x: x["tokens_per_s"], default=None)
            if best is not None and level["tokens_per_s"] < best["tokens_per_s"] * 1.03:
                break  # no longer growing: something is saturated
            if level.get("sserelay_cpu_util", 0) >= 0.97:
                break
        best = max(levels, key=lambda x: x["tokens_per_s"])
        figures[path] = {
            **{k: v for k, v in best.items()},
            "intact": all(level["intact"] for level in levels),
            "levels": levels,
        }
    for path in ("direct", "resumable", "openai"):
        figures[path]["vs_upstream_tokens_per_s"] = round(
            figures[path]["tokens_per_s"] / figures["upstream"]["tokens_per_s"], 3
        )
    figures["resumable"]["cpu_vs_direct"] = round(
        figures["resumable"]["sserelay_cpu_s_per_1k_tokens"]
        / figures["direct"]["sserelay_cpu_s_per_1k_tokens"],
        2,
    )
    return Measured(figures)


async def _saturate(
    h: Harness, path: str, concurrency: int, tokens: int, want: str, seconds: float
) -> dict[str, Any]:
    cpu, own = h.relay_cpu, own_cpu_seconds()
    up = cpu_seconds(h.procs[0].pid)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    streams = 0
    intact = True

    async def worker() -> None:
        nonlocal streams, intact
        while time.perf_counter() < deadline:
            sample = await h.one(path, tokens)
            intact = intact and sample.text == want
            streams += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    relayed = streams * tokens
    level: dict[str, Any] = {
        "concurrency": concurrency,
        "tokens_per_s": round(relayed / wall),
        "intact": intact,
        "upstream_cpu_util": round((cpu_seconds(h.procs[0].pid) - up) / wall, 2),
        "load_generator_cpu_util": round((own_cpu_seconds() - own) / wall, 2),
    }
    if path != "upstream":
        used = h.relay_cpu - cpu
        level["sserelay_cpu_util"] = round(used / wall, 2)
        level["tokens_per_cpu_s"] = round(relayed / used) if used else None
        level["sserelay_cpu_s_per_1k_tokens"] = round(used / relayed * 1000, 4)
    return level


async def open_streams(h: Harness, sizes: Sizes, hard_fd_limit: int) -> Measured:
    """4. N slow streams held open through sserelay: resident memory per stream and how
    late the event loop answers a health check meanwhile. Each stream holds two sockets
    in sserelay (client and upstream), so N is capped by the open-file hard limit."""
    cap = (hard_fd_limit - 500) // 2
    counts = sorted({min(n, cap) for n in sizes.open_counts})
    await h.shape(tokens=1_000_000, tps=sizes.hold_tps, batch=1)
    await h.settle()
    idle_rss = h.relay_rss
    idle = [await client.latency(h.relay_port, "/healthz") for _ in range(100)]
    figures: Figures = {
        "idle": {
            "rss_mb": round(idle_rss / 2**20, 1),
            "healthz_p50_ms": percentile_ms(idle, 0.5),
            "healthz_p99_ms": percentile_ms(idle, 0.99),
        }
    }
    for n in counts:
        tasks = await _hold(h, n)
        try:
            await asyncio.sleep(2)  # let allocations settle
            rss = h.relay_rss
            probes = []
            for _ in range(100):
                probes.append(await client.latency(h.relay_port, "/healthz"))
                await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        figures[str(n)] = {
            "streams": n,
            "rss_mb": round(rss / 2**20, 1),
            "rss_per_stream_kb": round((rss - idle_rss) / n / 1024, 1),
            "healthz_p50_ms": percentile_ms(probes, 0.5),
            "healthz_p99_ms": percentile_ms(probes, 0.99),
            "loop_lag_p99_ms": round(
                percentile_ms(probes, 0.99) - figures["idle"]["healthz_p99_ms"], 3
            ),
        }
        await h.settle(timeout=120)
    figures["max"] = dict(figures[str(counts[-1])])
    return Measured(figures)


async def _hold(h: Harness, n: int) -> list[asyncio.Task[Sample]]:
    """Open n streams, at most 100 starting at a time; return once all have text."""
    loop = asyncio.get_running_loop()
    starting = asyncio.Semaphore(100)
    tasks: list[asyncio.Task[Sample]] = []
    firsts: list[asyncio.Future[None]] = []
    for _ in range(n):
        try:
            async with asyncio.timeout(60):
                await starting.acquire()
        except TimeoutError:
            for task in tasks:
                task.cancel()
            raise RuntimeError(f"stuck opening streams: {len(tasks) - 100} of {n} open") from None
        first: asyncio.Future[None] = loop.create_future()
        first.add_done_callback(lambda _: starting.release())
        task = asyncio.create_task(h.one("direct", 1_000_000, first=first))
        task.add_done_callback(lambda _, f=first: f.cancel())  # failed before any text
        tasks.append(task)
        firsts.append(first)
    await asyncio.gather(*firsts, return_exceptions=True)
    failed = [t for t in tasks if t.done()]
    if failed:
        for task in tasks:
            task.cancel()
        error = failed[0].exception() if not failed[0].cancelled() else None
        raise RuntimeError(f"{len(failed)} of {n} held streams ended early: {error!r}")
    return tasks


async def limiter(h: Harness, sizes: Sizes) -> Measured:
    """5. The limiter against sserelay's Redis, from this process, as sserelay uses it: a
    decision over every window of the bench plan (`acquire`), and when the stream ends
    its settlement; 1,000 callers. Measured three ways: alone (pure latency), flat out
    with 32 concurrent callers (capacity: decisions alone, and decision + settlement),
    and at a fixed 10,000 decisions/s (latency at the target rate, leases left to expire)."""
    from app.redis_client import redis_clients
    from ratelimit import Demand, Plan, RedisLimiter

    assert h.redis is not None
    redis_client, tail, _ = redis_clients(h.redis.url, max_connections=200)
    await tail.aclose()
    limiter = RedisLimiter(redis_client, prefix="bench:")
    plan = Plan(**BENCH_PLAN)
    windows = plan.windows()
    demand = Demand(requests=1, tokens=1024, cost_nano_usd=5_000)
    subjects = [f"caller-{i}" for i in range(1000)]
    rng = random.Random(7)

    async def admit(settle: bool = True) -> float:
        started = time.perf_counter()
        decision = await limiter.acquire(
            rng.choice(subjects), windows, demand, concurrency_limit=plan.concurrent_streams
        )
        elapsed = time.perf_counter() - started
        if not decision.allowed or decision.reservation is None:
            raise RuntimeError("the bench plan refused an admission")
        if settle:
            await limiter.settle(decision.reservation, tokens=512, cost_nano_usd=2_500)
        return elapsed

    async def flat_out(settle: bool) -> tuple[list[float], float, float]:
        latencies: list[float] = []
        own = own_cpu_seconds()
        t0 = time.perf_counter()
        deadline = t0 + sizes.limiter_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                latencies.append(await admit(settle))

        await asyncio.gather(*(worker() for _ in range(sizes.limiter_concurrency)))
        wall = time.perf_counter() - t0
        return latencies, wall, own_cpu_seconds() - own

    async def paced(rate: int) -> tuple[list[float], float]:
        latencies: list[float] = []
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            latencies.append(await admit(settle=False))

        t0 = time.perf_counter()
        total = int(rate * sizes.limiter_s)
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        return latencies, len(latencies) / (time.perf_counter() - t0)

    try:
        for _ in range(50):
            await admit()
        alone = [await admit() for _ in range(sizes.limiter_latency_samples)]
        redis_cpu = cpu_seconds(h.redis.proc.pid)
        decisions, decisions_wall, decisions_cpu = await flat_out(settle=False)
        both, both_wall, both_cpu = await flat_out(settle=True)
        redis_util = (cpu_seconds(h.redis.proc.pid) - redis_cpu) / (decisions_wall + both_wall)
        at_rate, achieved = await paced(10_000)
    finally:
        await redis_client.aclose()
    figures: Figures = {
        "redis": {
            "admissions_per_s": round(len(decisions) / decisions_wall),
            "admissions_with_settlement_per_s": round(len(both) / both_wall),
            "concurrency": sizes.limiter_concurrency,
            "process_cpu_us_per_decision": round(decisions_cpu / len(decisions) * 1e6, 1),
            "process_cpu_us_per_decision_and_settlement": round(both_cpu / len(both) * 1e6, 1),
            "flat_out_decision_p99_ms": percentile_ms(decisions, 0.99),
            "at_10k_per_s_achieved": round(achieved),
            "decision_p50_ms": percentile_ms(at_rate, 0.5),
            "decision_p99_ms": percentile_ms(at_rate, 0.99),
            "alone_decision_p50_ms": percentile_ms(alone, 0.5),
            "alone_decision_p99_ms": percentile_ms(alone, 0.99),
            "redis_cpu_util_flat_out": round(redis_util, 2),
            "windows": len(windows),
        }
    }
    return Measured(figures)


# The api+workers scenario's paths: each sserelay path is compared with the upstream
# reached the same way (a new connection per request, or kept-alive connections).
API_WORKERS_PATHS = ("upstream", "upstream_reused", "resumable", "resumable_reused")
_BASE = {"resumable": "upstream", "resumable_reused": "upstream_reused"}


async def api_workers(h: Harness, sizes: Sizes) -> dict[str, Measured]:
    """7. The other topology: `sserelay serve --api-only` plus N `sserelay worker`s on a
    private Redis, on the resumable route (POST /v1/streams to the API, a worker claims
    and generates, GET events_url from the API), against the upstream in the same
    scenario: one stream at a time (as 1) and N in flight (as 2). Each load twice: a new
    connection per request (the POST and the GET each open one), and kept-alive
    connections (the POST and the GET on one connection, reused by the next stream)."""
    topology = h.api_workers(sizes.api_workers)
    try:
        one = await _api_workers_sequential(h, topology, sizes)
        many = await _api_workers_concurrent(h, topology, sizes)
    finally:
        topology.stop()
    return {"api_workers_sequential": one, "api_workers_concurrent": many}


def _api_workers_path(
    h: Harness, topology: ApiWorkers, path: str
) -> tuple[Callable[[int], Awaitable[Sample]], Pool | None]:
    upstream = path.startswith("upstream")
    pool = Pool(h.up_port if upstream else topology.port) if path.endswith("_reused") else None
    if upstream:
        return lambda tokens: h.one("upstream", tokens, pool=pool), pool
    return lambda tokens: h.one("resumable", tokens, port=topology.port, pool=pool), pool


async def _spread(topology: ApiWorkers, before: list[dict[str, float]]) -> dict[str, Any]:
    """How the streams since `before` spread over the workers, and how long their jobs
    waited to be claimed."""
    after = await topology.worker_counts()
    finished = [a["finished"] - b["finished"] for a, b in zip(after, before, strict=True)]
    claimed = sum(a["claimed"] - b["claimed"] for a, b in zip(after, before, strict=True))
    waited = sum(a["queue_wait_s"] - b["queue_wait_s"] for a, b in zip(after, before, strict=True))
    return {
        "busiest_worker_share": round(max(finished) / sum(finished), 3) if any(finished) else None,
        "queue_wait_mean_ms": round(waited / claimed * 1000, 3) if claimed else None,
    }


def _api_workers_added(figures: Figures, topology: ApiWorkers) -> None:
    for path, base in _BASE.items():
        for q in ("p50", "p99"):
            figures[path][f"added_{q}_ms"] = round(
                figures[path][f"ttft_{q}_ms"] - figures[base][f"ttft_{q}_ms"], 3
            )
        figures[path]["workers"] = topology.workers


async def _api_workers_sequential(h: Harness, topology: ApiWorkers, sizes: Sizes) -> Measured:
    tokens = 20
    await h.shape(tokens=tokens, tps=0, batch=1)
    want = expected_text(tokens)
    figures: Figures = {}
    ttfts: dict[str, list[float]] = {}
    for path in API_WORKERS_PATHS:
        one, pool = _api_workers_path(h, topology, path)
        try:
            await one(tokens)  # warm connections and code paths
            counts = await topology.worker_counts()
            api, workers = topology.api_cpu, topology.workers_cpu
            samples = [await one(tokens) for _ in range(sizes.sequential_streams)]
        finally:
            if pool is not None:
                pool.close()
        figures[path] = {
            **_ttft_figures(samples),
            "streams": len(samples),
            "intact": all(s.text == want for s in samples),
        }
        if pool is not None:
            figures[path]["connections_opened"] = pool.opened
        if not path.startswith("upstream"):
            api, workers = topology.api_cpu - api, topology.workers_cpu - workers
            figures[path] |= {
                "sserelay_cpu_ms_per_stream": round((api + workers) / len(samples) * 1000, 3),
                "api_cpu_ms_per_stream": round(api / len(samples) * 1000, 3),
                "workers_cpu_ms_per_stream": round(workers / len(samples) * 1000, 3),
                **await _spread(topology, counts),
            }
        ttfts[path] = [s.ttft_s for s in samples]
    _api_workers_added(figures, topology)
    return Measured(figures, ttfts)


async def _api_workers_concurrent(h: Harness, topology: ApiWorkers, sizes: Sizes) -> Measured:
    n, tokens, tps = sizes.api_workers_in_flight, sizes.api_workers_tokens, sizes.concurrent_tps
    await h.shape(tokens=tokens, tps=tps, batch=1)
    want = expected_text(tokens)
    interval = tokens / tps / n
    figures: Figures = {}
    ttfts: dict[str, list[float]] = {}
    for path in API_WORKERS_PATHS:
        one, pool = _api_workers_path(h, topology, path)
        samples: list[Sample | None] = [None] * (2 * n)
        try:
            await one(tokens)
            counts = await topology.worker_counts()
            api, workers, own = topology.api_cpu, topology.workers_cpu, own_cpu_seconds()
            t0 = time.perf_counter()

            async def run(
                i: int,
                one: Callable[[int], Awaitable[Sample]] = one,
                t0: float = t0,
                samples: list[Sample | None] = samples,
            ) -> None:
                await asyncio.sleep(max(0.0, t0 + i * interval - time.perf_counter()))
                samples[i] = await one(tokens)

            await asyncio.gather(*(run(i) for i in range(2 * n)))
            wall = time.perf_counter() - t0
        finally:
            if pool is not None:
                pool.close()
        done = [s for s in samples if s is not None]
        steady = done[n:]
        relayed = sum(len(s.text) > 0 for s in done) * tokens
        figures[path] = {
            **_ttft_figures(steady),
            "streams": len(done),
            "in_flight": n,
            "intact": len(done) == 2 * n and all(s.text == want for s in done),
            "wall_s": round(wall, 2),
            "load_generator_cpu_s": round(own_cpu_seconds() - own, 3),
        }
        if pool is not None:
            figures[path]["connections_opened"] = pool.opened
        if not path.startswith("upstream"):
            api, workers = topology.api_cpu - api, topology.workers_cpu - workers
            figures[path] |= {
                "sserelay_cpu_s": round(api + workers, 3),
                "api_cpu_s": round(api, 3),
                "workers_cpu_s": round(workers, 3),
                "sserelay_cpu_s_per_1k_tokens": round((api + workers) / relayed * 1000, 4),
                **await _spread(topology, counts),
            }
        ttfts[path] = [s.ttft_s for s in steady]
    _api_workers_added(figures, topology)
    return Measured(figures, ttfts)
