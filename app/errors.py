"""Every error a client can see, as RFC 9457 problem+json, mapped in one place.

Packages raise their own exceptions (auth.AuthError, streaming.StreamingError); this
module alone decides the HTTP status and the body. Unexpected exceptions become a bare
500 with a stable code; the traceback goes to the server log only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ExceptionHandler

from auth import AuthError, NotAuthenticated, RefreshConflict, RefreshStoreUnavailable
from streaming import StreamingError, StreamLogError, StreamNotFound, UpstreamError

logger = logging.getLogger("sserelay.errors")

PROBLEM_JSON = "application/problem+json"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class ProblemError(Exception):
    """An error the app raises on purpose, already decided as to status and code."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": f"https://sserelay.dev/problems/{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    body.update(extra or {})
    return Response(
        json.dumps(body, ensure_ascii=False),
        status_code=status,
        headers=headers,
        media_type=PROBLEM_JSON,
    )


def _bearer_challenge(code: str, detail: str) -> dict[str, str]:
    error = "invalid_request" if code == "missing_credentials" else "invalid_token"
    description = detail.replace('"', "'")
    return {"WWW-Authenticate": f'Bearer error="{error}", error_description="{description}"'}


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ProblemError)
    return problem(exc.status, exc.code, exc.detail, headers=exc.headers, extra=exc.extra)


async def _on_auth(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthError)
    services = getattr(request.app.state, "services", None)
    if services is not None:
        services.metrics.auth_failures.labels(exc.code).inc()
    if isinstance(exc, RefreshConflict):
        return problem(409, exc.code, exc.message, headers={"Retry-After": "0"})
    if isinstance(exc, RefreshStoreUnavailable):
        return problem(
            503,
            exc.code,
            "sessions cannot be checked right now; retry shortly",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, NotAuthenticated):
        return problem(401, exc.code, exc.message, headers=_bearer_challenge(exc.code, exc.message))
    return problem(403, exc.code, exc.message)


async def _on_streaming(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StreamingError)
    if isinstance(exc, StreamNotFound):
        return problem(404, exc.code, "no such stream")
    if isinstance(exc, StreamLogError):
        logger.error("stream log unavailable: %s", exc.message)
        return problem(
            503,
            exc.code,
            "stream storage is unavailable; retry shortly",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, UpstreamError):
        return problem(502, exc.code, exc.message)
    return problem(500, exc.code, exc.message)


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    return problem(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=exc.headers,
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "internal_error", "an internal error occurred")


def exception_handlers() -> dict[Any, ExceptionHandler]:
    return {
        ProblemError: _on_problem,
        AuthError: _on_auth,
        StreamingError: _on_streaming,
        HTTPException: _on_http,
        Exception: _on_unexpected,
    }
