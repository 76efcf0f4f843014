"""`sserelay serve`: check the settings and the config file first, so a mistake stops
startup with one line naming the field, then hand over to uvicorn."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from .authn import AuthConfigError, check_auth
from .cli_apikeys import add_commands as add_apikey_commands
from .cli_auth import add_commands
from .cli_records import add_commands as add_record_commands
from .config import ConfigError, describe, load_config
from .logs import configure
from .settings import Settings, unknown_variables


def _fail(message: str) -> int:
    print(f"sserelay: {message}", file=sys.stderr)
    return 2


def _settings_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        field = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"SSERELAY_{field.upper()}: {message}" if field else message)
    return "invalid setting " + "; ".join(parts)


def serve(args: argparse.Namespace) -> int:
    role = "worker" if args.command == "worker" else "api" if args.api_only else "all"
    overrides = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "config": args.config,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        return _fail(_settings_error(exc))
    try:
        config = load_config(settings.config)
    except ConfigError as exc:
        return _fail(str(exc))
    except ValidationError as exc:  # pragma: no cover - load_config translates these
        return _fail(describe(exc))
    try:
        check_auth(settings)
    except AuthConfigError as exc:
        return _fail(str(exc))
    problem = settings.serving_problem()
    if problem is not None:
        return _fail(problem)
    if role != "all" and not settings.redis_url:
        what = "a worker" if role == "worker" else "--api-only"
        return _fail(f"{what} needs SSERELAY_REDIS_URL: API processes and workers share a queue")
    for line in unknown_variables(os.environ):
        print(f"sserelay: warning: {line}", file=sys.stderr)
    try:
        sock = _bind(settings.host, settings.port)
    except OSError as exc:
        return _fail(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}")
    configure(settings.log_format, settings.log_level)

    import uvicorn

    from .connections import ConnectionLimits, protocol_class, protocol_path
    from .drain import DrainingServer
    from .factory import create_app

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    h11_fallback = importlib.util.find_spec("httptools") is None
    # Bound already: a busy port was one line above, and this one is true.
    serves = {
        "all": "demo page at /, metrics at /metrics",
        "api": "API only: generations run on workers; metrics at /metrics",
        "worker": "worker: /healthz, /readyz and /metrics only",
    }[role]
    print(
        f"sserelay: listening on http://{settings.host}:{settings.port} ({serves})",
        file=sys.stderr,
        flush=True,
    )
    common = {
        "host": settings.host,
        "port": settings.port,
        "loop": loop,
        "log_config": None,
        "access_log": False,
        "backlog": 4096,  # a burst of stream starts must not overflow the accept queue
        "timeout_graceful_shutdown": 5,
        # Deadlines, size limits and connection caps: app/connections.py. uvicorn's own
        # keep-alive timer is replaced by the protocol's, with the same value.
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "h11_max_incomplete_event_size": settings.max_header_bytes + 1024,
    }
    if args.workers > 1:
        sock.close()  # uvicorn's supervisor binds for its workers
        # Each worker builds its own app from the same environment, and writes its
        # metrics where any worker's /metrics can sum them.
        for key, value in overrides.items():
            os.environ[f"SSERELAY_{key.upper()}"] = str(value)
        if role == "api":
            os.environ["SSERELAY_ROLE"] = "api"
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sserelay-metrics-")
        uvicorn.run(
            "app.factory:app_from_env",
            factory=True,
            workers=args.workers,
            http=protocol_path(h11_fallback=h11_fallback),
            **common,  # type: ignore[arg-type]
        )
    else:
        app = create_app(settings, config, role=role)  # type: ignore[arg-type]

        async def drain(timeout_s: float) -> None:
            await app.state.services.drain.run(timeout_s)

        limits = ConnectionLimits.from_settings(settings)
        logging.getLogger("sserelay").info(
            "connections: at most %d open, %d idle; heads %d bytes within %gs; "
            "bodies may pause %gs; keep-alive %gs",
            limits.max_connections,
            limits.max_idle_connections,
            limits.max_header_bytes,
            limits.header_timeout_s,
            limits.body_timeout_s,
            limits.keepalive_timeout_s,
        )
        http = protocol_class(limits, h11_fallback=h11_fallback)
        server = DrainingServer(
            uvicorn.Config(app, http=http, **common),  # type: ignore[arg-type]
            drain=drain,
            timeout_s=settings.drain_timeout_s,
        )
        server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so a busy port is one
    clear line and "listening" is printed only once it is true."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(4096)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sserelay", description="SSE streaming AI proxy")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="run the HTTP server")
    run.add_argument("--host", help="bind address (default 127.0.0.1; SSERELAY_HOST)")
    run.add_argument("--port", type=int, help="port (default 8000; SSERELAY_PORT)")
    run.add_argument("--config", type=Path, help="YAML file of providers, models and plans")
    run.add_argument("--workers", type=int, default=1, help="worker processes (needs Redis)")
    run.add_argument(
        "--api-only",
        action="store_true",
        help="serve HTTP only; generations run on `sserelay worker` processes (needs Redis)",
    )
    run.set_defaults(handler=serve)
    work = commands.add_parser(
        "worker", help="run generations only (needs Redis); the port serves health and metrics"
    )
    work.add_argument("--host", help="bind address (default 127.0.0.1; SSERELAY_HOST)")
    work.add_argument("--port", type=int, help="port (default 8000; SSERELAY_PORT)")
    work.add_argument("--config", type=Path, help="YAML file of providers, models and plans")
    work.set_defaults(handler=serve, workers=1, api_only=False)
    add_commands(commands)
    add_record_commands(commands)
    add_apikey_commands(commands)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
