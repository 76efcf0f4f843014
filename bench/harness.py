"""The processes a benchmark run measures, and one stream through each path.

All on loopback: the fake upstream (uvloop), sserelay (`sserelay serve`: one worker,
uvloop, httptools) with a private Redis for its limiter and stream log, and this process
as the load generator. Paths:

- `upstream`: straight to the fake upstream, the physical limit;
- `direct`: `POST /v1/chat/stream` through sserelay;
- `resumable`: `POST /v1/streams`, then its events URL (stream log in Redis);
- `openai`: `POST /v1/chat/completions` through sserelay (the OpenAI-compatible door,
  streaming, with `include_usage`).

The other topology (`ApiWorkers`, started only by the scenario that measures it):
`sserelay serve --api-only` and N `sserelay worker` processes on a Redis of their own,
the same config and the same fake upstream.
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from auth import SigningKey, TokenIssuer
from testkit.servers import RedisServer, free_port, wait_http

from . import client
from .client import Pool, Sample

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-that-is-long-enough-for-hs256"
PATHS = ("upstream", "direct", "resumable", "openai")

# The bench plan limits everything, generously, so every request pays for a real
# limiter decision and settlement (a plan without limits would skip them).
BENCH_PLAN = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 10_000_000_000,
    "concurrent_streams": 1_000_000,
    "daily_budget_usd": 1_000_000,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it (`sserelay serve --workers N`: the supervisor and
    its workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass  # exited meanwhile
        i += 1
    return pids


def tree_sum(pid: int, read: Callable[[int], float]) -> float:
    """`read` summed over `pid`'s process tree (a process that exited meanwhile counts
    nothing)."""
    total = 0.0
    for each in process_tree(pid):
        try:
            total += read(each)
        except (OSError, RuntimeError):
            pass
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_fd_limit() -> int:
    """Open files up to the hard limit, for this process and the ones it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def granian_command(port: int, workers: int) -> list[str]:
    """granian serving the app the way `sserelay serve` has uvicorn serve it: ASGI,
    uvloop, loopback, a deep accept queue, no access log."""
    return [
        sys.executable,
        "-m",
        "granian",
        "--interface",
        "asgi",
        "--factory",
        "app.factory:app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--workers",
        str(workers),
        "--runtime-threads",
        "1",
        "--backlog",
        "4096",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


class Harness:
    def __init__(
        self, logs: Path, *, redis: bool = True, relay_workers: int = 1, server: str = "uvicorn"
    ) -> None:
        """`relay_workers` > 1: `sserelay serve --workers N` (N processes behind one
        listening socket); CPU and memory are then summed over all of them. `server`
        "granian": the same app from `app.factory:app_from_env` served by granian
        (ASGI, uvloop, `relay_workers` processes of one runtime thread each), to compare the
        servers on the same load; sserelay's own connection guards are uvicorn
        protocols, so they are not in that path."""
        self.logs = logs
        self.relay_workers = relay_workers
        self.server = server
        self.use_redis = redis
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: RedisServer | None = None
        self.token = TokenIssuer(SigningKey("HS256", SECRET.encode())).issue(
            "bench", "bench", ttl_s=86400
        )[0]
        self.auth = {"authorization": f"Bearer {self.token}"}
        self.topologies: list[ApiWorkers] = []

    def start(self) -> None:
        self.up_port = free_port()
        self._spawn(
            "upstream",
            [sys.executable, "-m", "testkit.fake_upstream", "--port", str(self.up_port)],
            {},
        )
        wait_http(f"http://127.0.0.1:{self.up_port}", "/_control/health")
        config = {
            "providers": {
                "up": {
                    "kind": "openai",
                    "base_url": f"http://127.0.0.1:{self.up_port}/v1",
                    # Every held stream holds an upstream connection (default cap 1,000).
                    "max_connections": 20_000,
                }
            },
            "models": {
                "bench": {
                    "provider": "up",
                    "upstream": "fake",
                    "input_usd_per_mtok": 1,
                    "output_usd_per_mtok": 5,
                    "max_output_tokens": 1_000_000,
                }
            },
            "plans": {"bench": BENCH_PLAN},
            "default_plan": "bench",
        }
        path = Path(tempfile.mkdtemp(prefix="sserelay-bench-")) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {
            "SSERELAY_CONFIG": str(path),
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_LOG_LEVEL": "warning",
        }
        self.relay_env = dict(env)  # what another topology's processes share with this one
        if self.use_redis:
            self.redis = RedisServer()
            env["SSERELAY_REDIS_URL"] = self.redis.url
        self.relay_port = free_port()
        env["SSERELAY_PORT"] = str(self.relay_port)
        serve = [sys.executable, "-m", "app.cli", "serve"]
        if self.relay_workers > 1:
            serve += ["--workers", str(self.relay_workers)]
        if self.server == "granian":
            serve = granian_command(self.relay_port, self.relay_workers)
            if self.relay_workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                env["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sserelay-metrics-")
        self.relay = self._spawn("sserelay", serve, env)
        wait_http(f"http://127.0.0.1:{self.relay_port}")
        if self.relay_workers > 1:
            deadline = time.monotonic() + 30
            while len(process_tree(self.relay.pid)) <= self.relay_workers:
                if time.monotonic() > deadline:  # CPU would be counted for some only
                    raise RuntimeError(f"sserelay did not start {self.relay_workers} workers")
                time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Each process's output goes to a log beside the results, for the post-mortem.
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("wb") as sink:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def api_workers(self, workers: int) -> ApiWorkers:
        """Start `sserelay serve --api-only` and `workers` `sserelay worker`s on a Redis of
        their own (the one process's Redis has a queue its own generation tier claims
        from); returns once the API is ready and every worker answers."""
        topology = ApiWorkers(self, workers)
        self.topologies.append(topology)
        try:
            topology.start()
        except BaseException:
            topology.stop()
            raise
        return topology

    def stop(self) -> None:
        for topology in self.topologies:
            topology.stop()
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis:
            self.redis.stop()

    @property
    def relay_cpu(self) -> float:
        return tree_sum(self.relay.pid, cpu_seconds)

    @property
    def relay_rss(self) -> int:
        return int(tree_sum(self.relay.pid, rss_bytes))

    async def shape(self, **behaviour: Any) -> None:
        """What every upstream response looks like from now on (both paths ask the
        upstream for the same stream)."""
        await client.request_json(self.up_port, "PUT", "/_control/defaults", behaviour)
        # The upstream keeps a record per request; a long run must not grow it unboundedly.
        await client.request_json(self.up_port, "DELETE", "/_control/requests")

    async def one(
        self,
        path: str,
        max_tokens: int,
        first: asyncio.Future[None] | None = None,
        *,
        port: int | None = None,
        pool: Pool | None = None,
    ) -> Sample:
        """One stream. `port`: the sserelay process to ask (default: the one process);
        `pool`: keep-alive connections to reuse (default: a new connection per request,
        closed after it; the resumable path then opens two)."""
        if path == "upstream":
            body = {
                "model": "fake",
                "messages": [{"role": "user", "content": "bench"}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await client.stream(
                self.up_port,
                "POST",
                "/v1/chat/completions",
                body,
                {},
                "openai",
                first=first,
                pool=pool,
            )
        relay = self.relay_port if port is None else port
        if path == "openai":
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": "bench"}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await client.stream(
                relay,
                "POST",
                "/v1/chat/completions",
                body,
                self.auth,
                "openai",
                first=first,
                pool=pool,
            )
        body = {"model": "bench", "prompt": "bench", "max_tokens": max_tokens}
        if path == "direct":
            return await client.stream(
                relay,
                "POST",
                "/v1/chat/stream",
                body,
                self.auth,
                "sserelay",
                first=first,
                pool=pool,
            )
        started = time.perf_counter()
        created = await client.request_json(relay, "POST", "/v1/streams", body, self.auth, pool)
        # Time to first text counts from the POST: that is what a user waits.
        return await client.stream(
            relay,
            "GET",
            created["events_url"],
            None,
            {},
            "sserelay",
            started,
            first=first,
            pool=pool,
        )

    async def settle(self, timeout: float = 30.0) -> None:
        """Wait until sserelay has no stream open (streams end after their readers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reader, writer, _, headers = await client.request(self.relay_port, "GET", "/metrics")
            body = b"".join([c async for c in client.chunks(reader, headers)])
            writer.close()
            active = [
                float(line.rsplit(b" ", 1)[1])
                for line in body.splitlines()
                if line.startswith(b"sserelay_streams_active{")
            ]
            if sum(active) == 0:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("sserelay still has streams open")


class ApiWorkers:
    """`sserelay serve --api-only` (HTTP: admits, queues, serves the events) and N
    `sserelay worker`s (generation, claimed from the queue), sharing a private Redis."""

    def __init__(self, harness: Harness, workers: int) -> None:
        self.harness = harness
        self.workers = workers
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: RedisServer | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.worker_procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        h = self.harness
        self.redis = RedisServer()
        env = {**h.relay_env, "SSERELAY_REDIS_URL": self.redis.url}
        self.port = free_port()
        self.api = self._spawn(
            "sserelay-api", ["serve", "--api-only"], {**env, "SSERELAY_PORT": str(self.port)}
        )
        self.worker_ports = ports = [free_port() for _ in range(self.workers)]
        for i, port in enumerate(ports, 1):
            self.worker_procs.append(
                self._spawn(
                    f"sserelay-worker-{i}",
                    ["worker", "--host", "127.0.0.1", "--port", str(port)],
                    env,
                )
            )
        for port, proc in zip(ports, self.worker_procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}", "/readyz", alive=lambda p=proc: p.poll() is None)
        # 503 until a worker has beaten: then what the API queues is claimed.
        api = self.api
        wait_http(f"http://127.0.0.1:{self.port}", "/readyz", alive=lambda: api.poll() is None)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = self.harness._spawn(name, [sys.executable, "-m", "app.cli", *args], env)
        self.harness.procs.remove(proc)  # stopped here, before the harness's own
        self.procs.append(proc)
        return proc

    @property
    def api_cpu(self) -> float:
        assert self.api is not None
        return cpu_seconds(self.api.pid)

    @property
    def workers_cpu(self) -> float:
        return sum(cpu_seconds(proc.pid) for proc in self.worker_procs)

    @property
    def redis_cpu(self) -> float:
        assert self.redis is not None
        return cpu_seconds(self.redis.proc.pid)

    async def worker_counts(self) -> list[dict[str, float]]:
        """Per worker, from its /metrics: streams finished, jobs claimed and the seconds
        they waited in the queue, summed."""
        counts = []
        for port in self.worker_ports:
            reader, writer, _, headers = await client.request(port, "GET", "/metrics")
            body = b"".join([c async for c in client.chunks(reader, headers)])
            writer.close()
            count = {"finished": 0.0, "claimed": 0.0, "queue_wait_s": 0.0}
            for line in body.decode().splitlines():
                if line.startswith("sserelay_streams_finished_total{"):
                    count["finished"] += float(line.rsplit(" ", 1)[1])
                elif line.startswith("sserelay_queue_wait_seconds_count "):
                    count["claimed"] = float(line.rsplit(" ", 1)[1])
                elif line.startswith("sserelay_queue_wait_seconds_sum "):
                    count["queue_wait_s"] = float(line.rsplit(" ", 1)[1])
            counts.append(count)
        return counts

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def describe_machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0
    try:
        memory = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "kernel": os.uname().release,
    }
