"""One mapping from provider HTTP failures to `UpstreamError`, shared by all providers
so a 429 means the same thing whichever client library saw it."""

from __future__ import annotations

from collections.abc import Mapping

from .._exceptions import UpstreamError


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            return None  # an HTTP date: rare from model APIs; fall back to our backoff
        return seconds / 1000 if name == "retry-after-ms" else seconds
    return None


def status_error(
    status: int, message: str, *, retry_after: float | None = None, kind: str | None = None
) -> UpstreamError:
    """`kind` is the provider's own error type when the body named one."""
    if status == 429 or kind == "rate_limit_error":
        return UpstreamError(
            message,
            code="upstream_rate_limited",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    if status == 529 or kind == "overloaded_error":
        return UpstreamError(
            message,
            code="upstream_overloaded",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    if status in (401, 403):
        return UpstreamError(message, code="upstream_auth_failed", status=status)
    if status == 408 or status >= 500:
        return UpstreamError(
            message,
            code="upstream_unavailable",
            retryable=True,
            retry_after=retry_after,
            status=status,
        )
    return UpstreamError(message, code="upstream_rejected", status=status)


def connection_error(message: str) -> UpstreamError:
    return UpstreamError(message, code="upstream_unreachable", retryable=True)


def protocol_error(message: str) -> UpstreamError:
    # A garbled stream is not the request's fault; another attempt usually succeeds.
    return UpstreamError(message, code="upstream_protocol_error", retryable=True)


def dropped_error() -> UpstreamError:
    return UpstreamError(
        "the provider closed the stream before it finished",
        code="upstream_dropped",
        retryable=True,
    )
