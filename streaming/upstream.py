"""Reading a provider: normalising its chunks, timeouts, and retries.

Retrying is only safe while nothing has been relayed: once a client has seen text, a
second attempt would produce different text. So the reader holds back everything that
precedes the first text (input usage, say), and retries only until it lets text through.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from ._exceptions import UpstreamError
from .chunks import Chunk, Stop, TextDelta, Usage
from .providers.base import GenerationRequest, Provider

logger = logging.getLogger("sserelay.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    first_token_timeout_s: float = 60.0
    idle_timeout_s: float = 30.0
    max_attempts: int = 3
    backoff_base_s: float = 0.25
    backoff_max_s: float = 8.0

    def backoff(self, attempt: int, retry_after: float | None) -> float | None:
        """Full jitter (AWS architecture blog), never earlier than the provider asked.
        None when the provider asks for longer than `backoff_max_s`: holding the client
        that long is worse than telling it (the error carries the provider's hint)."""
        if retry_after is not None and retry_after > self.backoff_max_s:
            return None
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return max(random.uniform(0, ceiling), retry_after or 0.0)


async def normalise(chunks: AsyncIterator[Chunk]) -> AsyncGenerator[Chunk, None]:
    """Drop empty text and repeated empty usage (the first says "accepted"), stop at the
    first `Stop`, and refuse a stream that just ends: a provider that closes without
    saying it finished has truncated the answer."""
    accepted = False
    async for chunk in chunks:
        if isinstance(chunk, TextDelta):
            if chunk.text:
                yield chunk
        elif isinstance(chunk, Usage):
            if chunk.input_tokens is not None or chunk.output_tokens is not None or not accepted:
                accepted = True
                yield chunk
        else:
            yield chunk
            return
    raise UpstreamError(
        "the provider closed the stream before it finished",
        code="upstream_dropped",
        retryable=True,
    )


Sink = Callable[[Chunk | BaseException], None]


class _Watchdog:
    """A read timeout that costs one float store per chunk: the timer is armed once and,
    when it fires, re-arms itself at the last activity plus the limit instead of being
    rescheduled on every chunk. When it expires it cancels the reading task."""

    __slots__ = ("_loop", "_task", "_handle", "last", "limit", "fired", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float) -> None:
        self._loop = loop
        self._task = asyncio.current_task()
        self.last = loop.time()
        self.limit = limit
        self.fired = False
        self.held = False
        """Waiting on our own consumer, not the provider: the timeout does not run."""
        self._handle: asyncio.TimerHandle | None = loop.call_at(self.last + limit, self._check)

    def active(self) -> None:
        self.last = self._loop.time()

    def switch(self, limit: float) -> None:
        """A new limit from now on (the first token arrived: idle timeout from here)."""
        self.limit = limit
        self.last = self._loop.time()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = self._loop.call_at(self.last + limit, self._check)

    def _check(self) -> None:
        due = self.last + self.limit
        if self.held:
            due = self._loop.time() + self.limit
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._handle = None
        self.fired = True
        if self._task is not None:
            self._task.cancel()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class UpstreamObserver(Protocol):
    """Hooks for metrics. Called per upstream chunk, so implementations bind whatever
    they need (metric label children) once per stream, not per call."""

    def attempt(self) -> None: ...

    def failed(self, code: str) -> None: ...

    def gap(self, seconds: float) -> None:
        """Time between two consecutive text chunks from the provider."""

    def first_token(self, seconds: float) -> None:
        """Time from the request to its first text, once per stream, as that text goes
        out (called by the pipeline's `meter`, not by `pump`)."""


async def pump(
    provider: Provider,
    request: GenerationRequest,
    policy: UpstreamPolicy,
    put: Sink,
    *,
    on_retry: Callable[[UpstreamError, int], None] | None = None,
    observer: UpstreamObserver | None = None,
    full: Callable[[], bool] | None = None,
    space: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Read the provider into `put` until it stops, with retries and read timeouts.

    Every chunk ends up in `put`, followed by nothing after a `Stop`, or by the
    exception that ended the stream. `put` must not block: the timeouts here bound only
    time spent waiting on the provider, never time spent by whoever consumes. When
    `full()` says the consumer is far behind, reading waits for `space()` (the provider's
    connection then fills up and it pauses too), with the timeouts held meanwhile.
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        attempt += 1
        relayed = False
        last_text = 0.0
        if observer is not None:
            observer.attempt()
        source = normalise(provider.stream(request))
        watchdog = _Watchdog(loop, policy.first_token_timeout_s)
        try:
            async for chunk in source:
                if observer is not None and isinstance(chunk, TextDelta):
                    now = loop.time()
                    if last_text:
                        observer.gap(now - last_text)
                    last_text = now
                if relayed:
                    watchdog.active()
                    put(chunk)
                    if full is not None and space is not None and full():
                        watchdog.held = True
                        await space()
                        watchdog.held = False
                        watchdog.active()
                elif isinstance(chunk, TextDelta | Stop):
                    # Only text ends the wait for the first token: usage that some
                    # providers send at once must not turn it into the idle timeout.
                    watchdog.switch(policy.idle_timeout_s)
                    relayed = True
                    put(chunk)
                else:
                    # Usage at once, text or not: an accepted request is billed its
                    # prompt even if it ends before its first token. (A retried
                    # attempt's count is replaced by the next attempt's.)
                    put(chunk)
            return
        except asyncio.CancelledError:
            if not watchdog.fired:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            error = UpstreamError(
                "the provider sent nothing for too long"
                if relayed
                else "the provider did not start answering in time",
                code="upstream_timeout",
                retryable=True,
            )
        except UpstreamError as exc:
            error = exc
        finally:
            watchdog.stop()
            await source.aclose()
        if observer is not None:
            observer.failed(error.code)
        delay = policy.backoff(attempt, error.retry_after)
        if relayed or not error.retryable or attempt >= policy.max_attempts or delay is None:
            put(error)
            return
        logger.info(
            "retrying provider %s after %s (attempt %d, in %.2fs)",
            provider.name,
            error.code,
            attempt,
            delay,
        )
        if on_retry is not None:
            on_retry(error, attempt)
        await asyncio.sleep(delay)
