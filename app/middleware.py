"""Pure ASGI middleware (never BaseHTTPMiddleware: it hides client disconnects from
streaming endpoints, and noticing those is how upstream requests get cancelled)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import internal_error, problem

access_log = logging.getLogger("sserelay.access")
logger = logging.getLogger("sserelay.errors")

_VALID_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


class RequestContextMiddleware:
    """Gives every request an id (the caller's `X-Request-ID` when it is sane), returns
    it with any rate-limit fields a route stashed for the caller (so errors carry them
    too), and writes one access-log line when the response ends.

    The line has the path but never the query string: stream tickets travel there.
    """

    def __init__(self, app: ASGIApp, routes: Mapping[Any, str] | None = None) -> None:
        """`routes` maps endpoints to their path templates: metrics are labelled by
        route, never by raw path (ids would explode the series)."""
        self.app = app
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        request_id = incoming if incoming and _VALID_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode())]
                # Rate-limit fields that a route computed for this caller, on any response.
                for name, value in scope["state"].get("ratelimit_headers", {}).items():
                    extra.append((name.lower().encode(), value.encode()))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        started_response = False

        async def send_tracked(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
            await send_with_id(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception as exc:
            # A bug, never an expected refusal (those are mapped in `errors`). The client
            # gets a problem with the request id, the log gets the traceback, and the
            # exception stops here: uvicorn would otherwise close a keep-alive
            # connection under the client's next request.
            logger.error(
                "unhandled error on %s %s (request %s)",
                scope["method"],
                scope["path"],
                request_id,
                exc_info=exc,
            )
            if started_response:
                raise  # mid-response: only closing the connection can say it
            await internal_error()(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = self.routes.get(scope.get("endpoint"), "unmatched")
            services = getattr(scope.get("app"), "state", None)
            metrics = getattr(getattr(services, "services", None), "metrics", None)
            if metrics is not None:
                metrics.http_requests.labels(route, scope["method"], str(status)).inc()
                metrics.http_duration.labels(route, scope["method"]).observe(elapsed)
            access_log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )


def _host_of(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"host":
            host: str = value.decode("latin-1").lower()
            if host.startswith("["):  # [::1]:8000
                return host.split("]")[0] + "]"
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


class SecurityHeadersMiddleware:
    """The response headers a browser-facing service owes its users (helmet's set). The
    outermost middleware, so every response has them, a bug's 500 included.

    - `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`,
      `X-Frame-Options: DENY` (with CSP `frame-ancestors 'none'` for documents),
      `Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Resource-Policy:
      same-origin` (CORS requests are not subject to it, so an allow-listed origin still
      reads the API);
    - `Strict-Transport-Security` over TLS, or always when told (behind a TLS proxy);
    - `Cache-Control: no-store` unless the route chose its own (the demo page's files):
      API answers carry user data, which no shared cache may keep.
    """

    def __init__(self, app: ASGIApp, *, hsts: bool = False, hsts_max_age_s: int = 31_536_000):
        self.app = app
        self.hsts = hsts
        self.hsts_value = f"max-age={hsts_max_age_s}; includeSubDomains".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tls = self.hsts or scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                extra = [(k, v) for k, v in _SECURITY_HEADERS if k not in present]
                if b"cache-control" not in present:
                    extra.append((b"cache-control", b"no-store"))
                if tls:
                    extra.append((b"strict-transport-security", self.hsts_value))
                message["headers"] = [*headers, *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class AllowedHostsMiddleware:
    """Refuses (400 `invalid_host`) a request naming a host outside the allow-list
    before any route sees it: nothing this server builds may come from a forged Host.
    `*.example.com` allows the subdomains of example.com."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = {h for h in allowed_hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in allowed_hosts if h.startswith("*."))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = _host_of(scope)
            if host not in self.allowed and not (self.suffixes and host.endswith(self.suffixes)):
                response = problem(400, "invalid_host", "this server does not answer to that host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
