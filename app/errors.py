"""Every error a client can see, as RFC 9457 problem+json: where its status is decided.

Two tables decide every status, and nothing else does:

- `STATUS`, by stable `code`, for the problems the app raises itself (`ProblemError`):
  a route says *what* went wrong, never which HTTP status that is;
- `_BY_TYPE`, by exception type, for what the packages raise (`auth.AuthError`,
  `streaming.StreamingError`, `ratelimit.LimiterUnavailable`), most specific first.

Every 503 says when to retry (`Retry-After: 1`); every 401 carries the Bearer challenge.
Anything else is a bug: `RequestContextMiddleware` answers it with a bare 500 that has a
stable code and the request id, and the traceback goes to the server log only.
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

from auth import (
    ApiKeyStoreUnavailable,
    AuthError,
    NotAuthenticated,
    PermissionDenied,
    RefreshConflict,
    RefreshStoreUnavailable,
)
from ratelimit import LimiterUnavailable
from streaming import StreamingError, StreamLogError, StreamNotFound, UpstreamError

logger = logging.getLogger("sserelay.errors")

PROBLEM_JSON = "application/problem+json"

STATUS: Mapping[str, int] = {
    # the request itself
    "invalid_json": 400,
    "invalid_last_event_id": 400,
    "invalid_host": 400,
    "invalid_request_line": 400,
    "not_found": 404,
    "model_not_found": 404,
    "record_not_found": 404,
    "api_key_not_found": 404,
    "method_not_allowed": 405,
    "no_config_file": 409,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "unknown_plan": 422,
    "max_tokens_too_large": 422,
    "too_many_messages": 422,
    "content_too_long": 422,
    "exceeds_plan_limit": 422,
    "config_invalid": 422,
    "model_not_allowed": 403,
    "rate_limited": 429,
    "unsupported_parameter": 400,
    # written by the connection guard (`connections`), below the app
    "request_timeout": 408,
    "headers_too_large": 431,
    "too_many_connections": 503,
    # the server's state
    "draining": 503,
    "limiter_unavailable": 503,
    "stream_log_unavailable": 503,
    "internal_error": 500,
}
"""Status of every code the app raises; the README's error table mirrors it."""

ENDED_STATUS: Mapping[str, int] = {
    "upstream_rate_limited": 429,
    "upstream_overloaded": 529,
    "upstream_unavailable": 503,
    "upstream_timeout": 504,
    "upstream_rejected": 400,
    "shutdown": 503,
    "stream_log_unavailable": 503,
    "stream_lost": 503,
    "internal_error": 500,
}
"""The status a front door that answers in one piece (or before its first byte of
text) gives a stream that ended in an `error` event with this code: what the client
would have got from the provider itself. Codes not here are 502 (the upstream failed)."""


def ended_status(code: str) -> int:
    return ENDED_STATUS.get(code, 502)


DIALECT_KEY = "sserelay.dialect"
"""A route speaking another API's dialect puts its error shaper in the request scope
under this key: errors keep their status and headers from the tables here, and take
the body shape that API's SDK reads."""

_BY_TYPE: tuple[tuple[type[Exception], int], ...] = (
    (RefreshConflict, 409),
    (RefreshStoreUnavailable, 503),
    (ApiKeyStoreUnavailable, 503),
    (NotAuthenticated, 401),
    (PermissionDenied, 403),
    (AuthError, 403),
    (StreamNotFound, 404),
    (StreamLogError, 503),
    (UpstreamError, 502),
    (StreamingError, 500),
    (LimiterUnavailable, 503),
)

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
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}

# What clients see instead of a server-side message that may name internals.
_PUBLIC_DETAIL = {
    "stream_not_found": "no such stream",
    "stream_log_unavailable": "stream storage is unavailable; retry shortly",
    "limiter_unavailable": "rate limits cannot be checked right now; retry shortly",
    "auth_store_unavailable": "credentials cannot be checked right now; retry shortly",
}


class ProblemError(Exception):
    """A problem the app raises on purpose: a stable `code` (its status is `STATUS[code]`),
    a message for humans, and optional headers and extra members."""

    def __init__(
        self,
        code: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if code not in STATUS:
            raise ValueError(f"no status for problem code {code!r}: add it to STATUS")
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def status_of(exc: Exception) -> int:
    if isinstance(exc, ProblemError):
        return STATUS[exc.code]
    if isinstance(exc, HTTPException):
        return exc.status_code
    for kind, status in _BY_TYPE:
        if isinstance(exc, kind):
            return status
    return 500


def code_of(exc: Exception) -> str:
    if isinstance(exc, ProblemError | AuthError | StreamingError):
        return exc.code
    if isinstance(exc, LimiterUnavailable):
        return "limiter_unavailable"
    if isinstance(exc, HTTPException):
        return {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return "internal_error"


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
    all_headers = dict(headers or {})
    if status == 503:
        all_headers.setdefault("Retry-After", "1")
    return Response(
        json.dumps(body, ensure_ascii=True),
        status_code=status,
        headers=all_headers,
        media_type=PROBLEM_JSON,
    )


def response_for(exc: Exception) -> Response:
    """The one place an exception becomes a response."""
    status, code = status_of(exc), code_of(exc)
    headers: dict[str, str] = {}
    extra: Mapping[str, Any] | None = None
    if isinstance(exc, ProblemError):
        detail = exc.detail
        headers, extra = exc.headers, exc.extra
    elif isinstance(exc, HTTPException):
        detail = str(exc.detail)
        headers = dict(exc.headers or {})
    elif isinstance(exc, AuthError | StreamingError):
        detail = _PUBLIC_DETAIL.get(code, exc.message)
    else:
        detail = _PUBLIC_DETAIL.get(code, "an internal error occurred")
    if status == 401:
        headers = {**headers, **_bearer_challenge(code, detail)}
    elif isinstance(exc, RefreshConflict):
        headers = {**headers, "Retry-After": "0"}
    if status >= 500 and not isinstance(exc, ProblemError):
        logger.error("%s: %s", code, exc)
    return problem(status, code, detail, headers=headers, extra=extra)


def internal_error() -> Response:
    return problem(500, "internal_error", "an internal error occurred")


def _bearer_challenge(code: str, detail: str) -> dict[str, str]:
    error = "invalid_request" if code == "missing_credentials" else "invalid_token"
    description = detail.encode("ascii", "replace").decode().replace('"', "'").replace("\\", "")
    return {"WWW-Authenticate": f'Bearer error="{error}", error_description="{description}"'}


async def _handle(request: Request, exc: Exception) -> Response:
    if isinstance(exc, AuthError):
        services = getattr(request.app.state, "services", None)
        if services is not None:
            services.metrics.auth_failures.labels(exc.code).inc()
    response = response_for(exc)
    reshape = request.scope.get(DIALECT_KEY)
    return reshape(response) if reshape is not None else response


def exception_handlers() -> dict[Any, ExceptionHandler]:
    """Everything expected maps through `response_for`; anything else propagates to
    `RequestContextMiddleware`, which answers it as an internal error."""
    return {
        kind: _handle
        for kind in (ProblemError, AuthError, StreamingError, LimiterUnavailable, HTTPException)
    }
