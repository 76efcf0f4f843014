"""Reading a provider: normalising its chunks, timeouts, retries and continuation.

Retrying as is is only safe while nothing has been relayed: once a client has seen text,
a second attempt would produce different text. After that, a failed attempt is followed
by one that continues the same answer (the text so far sent as a prefill), on models set
up to continue; the reader sees one answer, no character lost or repeated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ._exceptions import UpstreamError
from .chunks import Attempt, Chunk, Stop, TextDelta, Usage
from .providers.base import GenerationRequest, Provider, estimate_tokens
from .targets import Target

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
    try:
        async for chunk in chunks:
            if isinstance(chunk, TextDelta):
                if chunk.text:
                    yield chunk
            elif isinstance(chunk, Usage):
                if (
                    chunk.input_tokens is not None
                    or chunk.output_tokens is not None
                    or not accepted
                ):
                    accepted = True
                    yield chunk
            else:
                yield chunk
                return
    finally:
        # Closed with this, not when collected: `async for` leaves the provider's
        # generator suspended, holding its connection open and reading, until the
        # garbage collector finds it.
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    raise UpstreamError(
        "the provider closed the stream before it finished",
        code="upstream_dropped",
        retryable=True,
    )


Sink = Callable[[Chunk | Attempt | BaseException], None]


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

    def continued(self, reason: str) -> None:
        """The answer goes on in a new attempt (after `reason`) or on another model."""


def _plan(targets: Sequence[Target], max_attempts: int) -> list[int]:
    """The order of attempts: the model asked for, `max_attempts` times, then each
    fallback once."""
    return [0] * max_attempts + list(range(1, len(targets)))


async def pump(
    target: Target,
    policy: UpstreamPolicy,
    put: Sink,
    *,
    fallbacks: Sequence[Target] = (),
    text: str = "",
    output_tokens: int = 0,
    on_retry: Callable[[UpstreamError, int], None] | None = None,
    observer: UpstreamObserver | None = None,
    full: Callable[[], bool] | None = None,
    space: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Read the provider into `put` until it stops, with retries, continuation and read
    timeouts.

    Every chunk ends up in `put`, followed by nothing after a `Stop`, or by the
    exception that ended the stream. Before any text went out, a failed attempt is
    retried as is (`max_attempts` times, then each fallback once). After text went out,
    the next attempt continues it: the text so far is sent as a prefill (without its
    trailing whitespace, which providers refuse; the same whitespace is then dropped
    from the start of what comes back), to targets that can continue only. An `Attempt`
    mark precedes every attempt after the first. `text` (and its `output_tokens`) is an
    answer another process started: the first attempt continues it.

    `put` must not block: the timeouts here bound only time spent waiting on the
    provider, never time spent by whoever consumes. When `full()` says the consumer is
    far behind, reading waits for `space()` (the provider's connection then fills up and
    it pauses too), with the timeouts held meanwhile.
    """
    targets = (target, *fallbacks)
    plan = _plan(targets, policy.max_attempts)
    # The text is kept only if some target could continue it: otherwise a stream holds
    # no copy of its answer, and relaying a token costs no more than it did.
    answer = _Answer(text, output_tokens, keep=any(t.prefill for t in targets))
    reason = "takeover" if text else ""
    error: UpstreamError | None = None
    tries = 0  # attempts of the current target
    number = 0
    step = 0
    while True:
        if answer.relayed:  # only a target that can continue may take over an answer
            while step < len(plan) and not targets[plan[step]].prefill:
                step += 1
        if step >= len(plan):
            put(
                error
                if error is not None
                else UpstreamError(
                    "the answer stopped and no model is set up to continue it",
                    code="upstream_dropped",
                    retryable=True,
                )
            )
            return
        index = plan[step]
        step += 1
        current = targets[index]
        tries = tries + 1 if number and index == plan[step - 2] else 1
        number += 1
        request = current.request
        trim = ""
        if answer.relayed:
            left = request.max_tokens - answer.tokens
            if left <= 0:  # the answer has all the tokens it may have
                put(Stop("max_tokens"))
                return
            so_far = answer.text()
            prefill = so_far.rstrip()
            trim = so_far[len(prefill) :]
            request = dataclasses.replace(request, prefill=prefill, max_tokens=left)
        if number > 1 or reason:
            put(
                Attempt(
                    number=number,
                    target=index,
                    model=current.model,
                    provider=current.provider.name,
                    reason=reason,
                    input_estimate=estimate_tokens(request.prompt_chars()),
                    continued=answer.relayed or index != 0,
                )
            )
        error = await _attempt(
            current.provider, request, policy, put, answer, trim, observer, full, space
        )
        if error is None:
            return
        if observer is not None:
            observer.failed(error.code)
        if not error.retryable:
            put(error)
            return
        delay = policy.backoff(tries, error.retry_after)
        same = step < len(plan) and plan[step] == index
        if delay is None and same:  # the provider asks for longer than we may hold
            while step < len(plan) and plan[step] == index:
                step += 1
            same = False
        if step >= len(plan):
            put(error)
            return
        logger.info(
            "provider %s failed with %s (attempt %d)%s",
            current.provider.name,
            error.code,
            number,
            ", continuing the answer" if answer.relayed else "",
        )
        if on_retry is not None:
            on_retry(error, number)
        reason = error.code
        if same and delay:
            await asyncio.sleep(delay)


class _Answer:
    """What went out so far: whether any text did, its tokens, and (when some target
    could continue it) the text itself."""

    __slots__ = ("parts", "tokens", "keep", "relayed")

    def __init__(self, text: str, tokens: int, *, keep: bool) -> None:
        self.parts = [text] if text else []
        self.tokens = tokens
        self.keep = keep
        self.relayed = bool(text)

    def add(self, text: str, tokens: int) -> None:
        if self.keep:
            self.parts.append(text)
        self.tokens += tokens
        self.relayed = True

    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


async def _attempt(
    provider: Provider,
    request: GenerationRequest,
    policy: UpstreamPolicy,
    put: Sink,
    answer: _Answer,
    trim: str,
    observer: UpstreamObserver | None,
    full: Callable[[], bool] | None,
    space: Callable[[], Awaitable[None]] | None,
) -> UpstreamError | None:
    """One call to the provider, into `put`; None once it stopped normally, else the
    error that ended it. `trim`: whitespace the answer already has, dropped from the
    start of this attempt's text."""
    loop = asyncio.get_running_loop()
    started = False
    last_text = 0.0
    carry = 0
    if observer is not None:
        observer.attempt()
    source = normalise(provider.stream(request))
    watchdog = _Watchdog(loop, policy.first_token_timeout_s)
    try:
        async for chunk in source:
            if isinstance(chunk, TextDelta):
                if observer is not None:
                    now = loop.time()
                    if last_text:
                        observer.gap(now - last_text)
                    last_text = now
                if trim:
                    text = chunk.text
                    while trim and text and text[0] == trim[0]:
                        text, trim = text[1:], trim[1:]
                    if text and trim:
                        trim = ""  # it went another way: keep what it wrote
                    if not text:
                        # Nothing left to relay, but its tokens were generated (billed).
                        carry += chunk.tokens
                        if not started:
                            watchdog.switch(policy.idle_timeout_s)
                            started = True
                        watchdog.active()
                        continue
                    chunk = TextDelta(text, chunk.tokens)
                if carry:
                    chunk = TextDelta(chunk.text, chunk.tokens + carry)
                    carry = 0
                answer.add(chunk.text, chunk.tokens)
            if started:
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
                started = True
                put(chunk)
            else:
                # Usage at once, text or not: an accepted request is billed its prompt
                # even if it ends before its first token.
                put(chunk)
        return None
    except asyncio.CancelledError:
        if not watchdog.fired:
            raise
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        return UpstreamError(
            "the provider sent nothing for too long"
            if started
            else "the provider did not start answering in time",
            code="upstream_timeout",
            retryable=True,
        )
    except UpstreamError as exc:
        return exc
    finally:
        watchdog.stop()
        await source.aclose()
