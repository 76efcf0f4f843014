"""Errors raised by the streaming package.

The tree, so callers can catch at the depth they care about::

    StreamingError                 anything this package raises on purpose
    ├── UpstreamError              a provider failed; carries `code`, `retryable`, `retry_after`
    ├── StreamNotFound             no such stream (or it expired)
    └── StreamLogError             the stream log's storage failed
        └── StreamFenced           another process took the stream over: stop writing

Third-party errors (httpx, anthropic, redis) are translated into these at the boundary
with ``raise ... from exc`` so nothing above this package needs to know which client
library a provider or a log uses.
"""

from __future__ import annotations


class StreamingError(Exception):
    """Base class; `code` is a stable, machine-readable identifier."""

    code = "streaming_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class UpstreamError(StreamingError):
    """A provider call failed.

    `retryable` says whether the same request may succeed if sent again (rate limits,
    overload, 5xx, connection failures, timeouts); `retry_after` is the provider's hint
    in seconds when it gave one.
    """

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        code: str = "upstream_error",
        retryable: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


class StreamNotFound(StreamingError):
    code = "stream_not_found"


class StreamLogError(StreamingError):
    code = "stream_log_unavailable"


class StreamFenced(StreamLogError):
    """A write refused because the stream's fencing epoch moved on: another process took
    the generation over (this one was paused or cut off past its lease). The writer
    must stop, write nothing more and leave the stream to its new owner."""

    code = "stream_fenced"
