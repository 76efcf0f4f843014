"""`make bench`: the same load, directly against the fake upstream and through sserelay,
in one run, so the difference is what sserelay adds on this machine today.

Processes, all on loopback: the fake upstream, sserelay (one worker, uvloop), and this
load generator (asyncio, raw HTTP/1.1 and SSE parsing, so it is not the bottleneck; its
own CPU is reported). Scenarios:

1. sequential: one stream at a time; added time to first text, p50 / p99.
2. concurrent: N streams at once, each `tokens` tokens at 20 tokens/s; added TTFT,
   sserelay CPU seconds per 1,000 relayed tokens, and every byte of text checked.

Routes: `direct` is POST /v1/chat/stream; `resumable` is POST /v1/streams then the events
URL (stream log in memory, or in Redis with --redis).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from auth import SigningKey, TokenIssuer
from bench.fake_upstream import expected_text
from tests.support import RedisServer, free_port, wait_http

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-that-is-long-enough-for-hs256"


@dataclass
class Sample:
    ttft_s: float
    text: str


@dataclass
class Result:
    scenario: str
    path: str
    streams: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    wall_s: float
    intact: bool
    extra: dict[str, Any] = field(default_factory=dict)


async def _request(
    host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int, dict[str, str]]:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"{method} {path} HTTP/1.1\r\nhost: {host}:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    writer.write(head.encode() + body)
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    response_headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        response_headers[name.strip().lower()] = value.strip()
    return reader, writer, status, response_headers


async def _request_json(host: str, port: int, method: str, path: str, body: dict[str, Any]) -> Any:
    reader, writer, status, headers = await _request(
        host, port, method, path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    raw = b"".join([c async for c in _chunks(reader, headers)])
    writer.close()
    if status >= 300:
        raise RuntimeError(f"{method} {path} answered {status}: {raw[:200]!r}")
    return json.loads(raw)


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """The body, de-chunked, as it arrives."""
    if headers.get("transfer-encoding") != "chunked":
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            return
        data = await reader.readexactly(size + 2)
        yield data[:-2]


async def stream_once(
    host: str,
    port: int,
    method: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    kind: str,
    started: float | None = None,
) -> Sample:
    """One stream; `kind` says how to find text: `openai` chunks or sserelay `delta`s.
    Time to first text counts from `started` (default: now)."""
    started = started if started is not None else time.perf_counter()
    payload = json.dumps(body).encode()
    reader, writer, status, response_headers = await _request(
        host,
        port,
        method,
        path,
        payload,
        {**headers, "content-type": "application/json", "accept": "text/event-stream"},
    )
    if status != 200:
        raise RuntimeError(f"{path} answered {status}")
    ttft = None
    text: list[str] = []
    buffer = b""
    try:
        async for data in _chunks(reader, response_headers):
            buffer += data
            *frames, buffer = buffer.split(b"\n\n")
            for frame in frames:
                if kind == "openai":
                    if not frame.startswith(b"data: {"):
                        continue
                    chunk = json.loads(frame[6:])
                    for choice in chunk.get("choices") or ():
                        piece = choice["delta"].get("content")
                        if piece:
                            ttft = ttft or time.perf_counter() - started
                            text.append(piece)
                elif b"event: delta" in frame:
                    ttft = ttft or time.perf_counter() - started
                    text.append(json.loads(frame.split(b"data: ", 1)[1])["text"])
    finally:
        writer.close()
    return Sample(ttft if ttft is not None else float("nan"), "".join(text))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] * 1000


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis: RedisServer | None = None
        self.token = TokenIssuer(SigningKey("HS256", SECRET.encode())).issue(
            "bench", "bench", ttl_s=86400
        )[0]

    def start(self) -> None:
        self.up_port = free_port()
        self._spawn(
            [
                sys.executable,
                "-m",
                "bench.fake_upstream",
                "--port",
                str(self.up_port),
                "--loop",
                "uvloop",
            ],
            {},
        )
        wait_http(f"http://127.0.0.1:{self.up_port}", "/_control/health")
        config = {
            "providers": {
                "up": {"kind": "openai", "base_url": f"http://127.0.0.1:{self.up_port}/v1"}
            },
            "models": {
                "bench": {
                    "provider": "up",
                    "upstream": "fake",
                    "input_usd_per_mtok": 1,
                    "output_usd_per_mtok": 5,
                }
            },
            "plans": {"bench": {}},
            "default_plan": "bench",
        }
        path = Path(tempfile.mkdtemp()) / "bench.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {
            "SSERELAY_CONFIG": str(path),
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_LOG_LEVEL": "warning",
        }
        if self.args.redis:
            self.redis = RedisServer()
            env["SSERELAY_REDIS_URL"] = self.redis.url
        self.relay_port = free_port()
        env["SSERELAY_PORT"] = str(self.relay_port)
        self.relay = self._spawn([sys.executable, "-m", "app.cli", "serve"], env)
        wait_http(f"http://127.0.0.1:{self.relay_port}")

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Each process's output goes to a log beside the results, for the post-mortem.
        log = self.args.out.parent / f"{cmd[2].split('.')[-1]}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**os.environ, **env}, stdout=sink, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=20)
        if self.redis:
            self.redis.stop()

    async def one(self, path: str, model: str, max_tokens: int) -> Sample:
        if path == "upstream":
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "bench"}],
                "max_tokens": max_tokens,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            return await stream_once(
                "127.0.0.1", self.up_port, "POST", "/v1/chat/completions", body, {}, "openai"
            )
        auth = {"authorization": f"Bearer {self.token}"}
        body = {"model": "bench", "prompt": "bench", "max_tokens": max_tokens}
        if path == "direct":
            return await stream_once(
                "127.0.0.1", self.relay_port, "POST", "/v1/chat/stream", body, auth, "sserelay"
            )
        started = time.perf_counter()
        reader, writer, status, headers = await _request(
            "127.0.0.1",
            self.relay_port,
            "POST",
            "/v1/streams",
            json.dumps(body).encode(),
            {**auth, "content-type": "application/json"},
        )
        raw = b"".join([c async for c in _chunks(reader, headers)])
        writer.close()
        # Time to first text counts from the POST: that is what a user waits.
        return await stream_once(
            "127.0.0.1",
            self.relay_port,
            "GET",
            json.loads(raw)["events_url"],
            {},
            {},
            "sserelay",
            started,
        )

    async def scenario(
        self, name: str, path: str, streams: int, concurrency: int, tokens: int, tps: float
    ) -> Result:
        # Both paths must ask the upstream for the same stream: set it as its default.
        await _request_json(
            "127.0.0.1", self.up_port, "PUT", "/_control/defaults", {"tokens": tokens, "tps": tps}
        )
        model = "fake"
        await self.one(path, model, tokens)  # warm up connections and code paths
        cpu_before = _cpu_seconds(self.relay.pid)
        gen_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        samples: list[Sample] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def run() -> None:
            async with semaphore:
                samples.append(await self.one(path, model, tokens))

        await asyncio.gather(*(run() for _ in range(streams)))
        wall = time.perf_counter() - started
        gen_after = resource.getrusage(resource.RUSAGE_SELF)
        relay_cpu = _cpu_seconds(self.relay.pid) - cpu_before
        want = expected_text(tokens)
        intact = all(s.text == want for s in samples)
        relayed = sum(len(s.text) > 0 and tokens for s in samples)
        extra = {
            "load_generator_cpu_s": round(
                gen_after.ru_utime + gen_after.ru_stime - gen_before.ru_utime - gen_before.ru_stime,
                3,
            ),
        }
        if path != "upstream":
            extra["sserelay_cpu_s"] = round(relay_cpu, 3)
            extra["sserelay_cpu_s_per_1k_tokens"] = round(relay_cpu / relayed * 1000, 4)
        ttfts = [s.ttft_s for s in samples]
        return Result(
            name,
            path,
            streams,
            round(_percentile(ttfts, 0.5), 3),
            round(_percentile(ttfts, 0.99), 3),
            round(wall, 2),
            intact,
            extra,
        )


def _print(results: list[Result]) -> None:
    print(
        f"{'scenario':<12} {'path':<10} {'streams':>7} {'ttft p50':>9} {'ttft p99':>9} "
        f"{'added p50':>9} {'added p99':>9} {'intact':>6}  cpu/1k tok"
    )
    base: dict[str, Result] = {r.scenario: r for r in results if r.path == "upstream"}
    for r in results:
        ref = base[r.scenario]
        added = (
            ("", "")
            if r.path == "upstream"
            else (
                f"{r.ttft_p50_ms - ref.ttft_p50_ms:+.2f}",
                f"{r.ttft_p99_ms - ref.ttft_p99_ms:+.2f}",
            )
        )
        print(
            f"{r.scenario:<12} {r.path:<10} {r.streams:>7} {r.ttft_p50_ms:>8.2f}m "
            f"{r.ttft_p99_ms:>8.2f}m {added[0]:>9} {added[1]:>9} {str(r.intact):>6}  "
            f"{r.extra.get('sserelay_cpu_s_per_1k_tokens', '')}"
        )


async def main_async(args: argparse.Namespace) -> list[Result]:
    bench = Bench(args)
    bench.start()
    try:
        sequential = 50 if args.quick else 200
        concurrent = 100 if args.quick else 500
        tokens = 50 if args.quick else 200
        results = []
        for path in ("upstream", "direct", "resumable"):
            results.append(await bench.scenario("sequential", path, sequential, 1, 20, 0))
        for path in ("upstream", "direct", "resumable"):
            results.append(
                await bench.scenario("concurrent", path, concurrent, concurrent, tokens, 20)
            )
        return results
    finally:
        bench.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    parser.add_argument("--redis", action="store_true", help="stream log in Redis")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "duration_s": round(time.perf_counter() - started, 1),
                "cpus": os.cpu_count(),
                "redis": args.redis,
                "results": [asdict(r) for r in results],
                "median_ttft_ms": statistics.median(r.ttft_p50_ms for r in results),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
