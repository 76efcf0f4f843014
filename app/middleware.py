"""Pure ASGI middleware (never BaseHTTPMiddleware: it hides client disconnects from
streaming endpoints, and noticing those is how upstream requests get cancelled)."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("sserelay.access")

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

        try:
            await self.app(scope, receive, send_with_id)
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
