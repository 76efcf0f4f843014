"""The event pipeline: provider chunks in, numbered SSE events out.

    provider ─ pump (normalise, timeouts, retries) ─▶ queue ─▶ coalesce ─▶ meter ─▶ encode

The pump runs in its own task so that reading the provider never waits on whoever
consumes the events, and so the coalescer can wait on a queue with a deadline (waiting
on another generator with a deadline would cancel it). Closing the event iterator
cancels the pump, which closes the upstream connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._exceptions import UpstreamError
from .chunks import Attempt, Chunk, Stop, TextDelta, Usage
from .events import Event, EventEncoder
from .log.base import StreamStatus
from .pacing import Pacer
from .providers.base import GenerationRequest, Provider, estimate_tokens
from .targets import Pricing, Target
from .upstream import UpstreamObserver, UpstreamPolicy, pump

logger = logging.getLogger("sserelay.pipeline")

Item = TextDelta | Usage | Stop | Attempt
T = TypeVar("T")


_ITEM_BYTES = 120
"""What a `TextDelta` costs besides its characters: the object, its string's header,
the list slot (measured with sys.getsizeof on CPython 3.11)."""


class Mailbox(Generic[T]):
    """A queue with one consumer: what `asyncio.Queue` does here, in a tenth of its
    memory (a list, where the queue has three deques). There is one per open stream.

    `limit` bounds the memory its text holds (bytes, estimated: each `TextDelta` costs
    its characters plus the objects around them; 0: unbounded): a producer that finds
    it `full()` awaits `space()`, which returns once the consumer has taken it below
    half. That is how a client that stops reading stops the reading
    of the provider, instead of the provider's whole answer piling up in memory."""

    __slots__ = ("_items", "_head", "_waiter", "_size", "_limit", "_space")

    def __init__(self, limit: int = 0) -> None:
        self._items: list[T] = []
        self._head = 0
        self._waiter: asyncio.Future[None] | None = None
        self._size = 0
        self._limit = limit
        self._space: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        if self._limit and isinstance(item, TextDelta):
            self._size += len(item.text) + _ITEM_BYTES
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return self._head == len(self._items)

    def full(self) -> bool:
        return bool(self._limit) and self._size >= self._limit

    async def space(self) -> None:
        while self.full():
            self._space = asyncio.get_running_loop().create_future()
            try:
                await self._space
            finally:
                self._space = None

    async def wait(self, deadline: float) -> bool:
        """Wait until there is an item or the loop's clock reaches `deadline`; whether
        there is one. What `asyncio.timeout` around `get` does, without cancelling
        anything (a timer and a future, once per held delta on every stream)."""
        if self._head != len(self._items):
            return True
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()
        return self._head != len(self._items)

    async def get(self) -> T:
        while self._head == len(self._items):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = self._items
        item = items[self._head]
        self._head += 1
        if self._head == len(items):
            items.clear()
            self._head = 0
        elif self._head >= 1024 and self._head * 2 >= len(items):
            del items[: self._head]  # a consumer that never quite catches up
            self._head = 0
        if self._limit and isinstance(item, TextDelta):
            self._size -= len(item.text) + _ITEM_BYTES
            space = self._space
            if space is not None and self._size * 2 < self._limit and not space.done():
                space.set_result(None)
        return item


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    coalesce_window_s: float = 0.01
    coalesce_max_chars: int = 2048
    pacer: Pacer | None = None
    """Widens the coalescing window as the process gets busy (None: it stays at
    `coalesce_window_s`)."""
    progress_interval_s: float = 0.25
    upstream: UpstreamPolicy = field(default_factory=UpstreamPolicy)
    buffer_bytes: int = 1_048_576
    """The most memory one stream's text may hold between the provider and its
    consumer; past it, the provider is read no further until the consumer catches up
    (0: unbounded)."""


async def coalesce(
    queue: Mailbox[Chunk | Attempt | BaseException],
    window_s: float | Callable[[], float],
    max_chars: int,
) -> AsyncIterator[Item]:
    """Merge text that arrives close together into one delta.

    The first text after a quiet spell goes out at once (time to first token is never
    delayed); text arriving within the window of the previous delta is held and merged,
    so a fast provider yields at most one delta per window instead of one per token.
    `window_s` is a number, or a function asked at each delta (a `Pacer`'s window,
    which widens as the process gets busy). Anything else (usage, stop, an error)
    flushes held text first, so text received before a failure is always delivered.
    """
    loop = asyncio.get_running_loop()
    window = window_s if callable(window_s) else (lambda: window_s)
    parts: list[str] = []
    tokens = size = 0
    hold_until = 0.0
    while True:
        if parts and queue.empty() and not await queue.wait(hold_until):
            yield TextDelta("".join(parts), tokens)
            parts.clear()
            tokens = size = 0
            hold_until = loop.time() + window()
            continue
        item = await queue.get()
        if isinstance(item, TextDelta):
            parts.append(item.text)
            tokens += item.tokens
            size += len(item.text)
            if size >= max_chars or loop.time() >= hold_until:
                yield TextDelta("".join(parts), tokens)
                parts.clear()
                tokens = size = 0
                hold_until = loop.time() + window()
            continue
        if parts:
            yield TextDelta("".join(parts), tokens)
            parts.clear()
            tokens = size = 0
        if isinstance(item, BaseException):
            raise item
        yield item
        if isinstance(item, Stop):
            return


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, as JavaScript counts (`"😀".length == 2`): browsers are
    the primary clients, so `delta.index` counts what they count. (Python clients:
    `len(s.encode("utf-16-le")) // 2`.)"""
    return len(text) if text.isascii() else len(text.encode("utf-16-le")) >> 1


class Meter:
    """Running counts for one stream: what it has cost so far, and what it will cost.

    Estimates (about one token per upstream chunk, four characters per input token) are
    replaced by the provider's reported usage as soon as it arrives. A stream may take
    several attempts (a retry, a continuation, a fallback model): each one's input and
    output are billed, so the counts of attempts that ended are kept apart (`prior_*`)
    and added to the current one's.
    """

    def __init__(
        self,
        *,
        pricing: Pricing,
        max_tokens: int,
        expected_tokens: int,
        input_estimate: int,
        progress_interval_s: float,
        started: float,
    ) -> None:
        self.pricing = pricing
        self.max_tokens = max_tokens
        self.expected_tokens = max(1, expected_tokens)
        self.input_tokens = input_estimate
        self.input_reported = False
        """Whether the provider said how many input tokens it counted."""
        self.accepted = False
        """Whether the provider accepted the request (sent any usage, or any text)."""
        self.output_tokens = 0
        """All attempts' output so far (what progress shows)."""
        self.reported_output: int | None = None
        self.attempt_output = 0
        self.attempt_chars = 0
        self.prior_input = 0
        self.prior_output = 0
        self.prior_cost = 0.0
        self.resumed = False
        """Another process started this stream: its time to first token is not known."""
        self.chars = 0
        self.started = started
        self.first_token_at: float | None = None
        self.percent = 0.0
        self.interval = progress_interval_s
        self.next_progress = 0.0

    @property
    def cost_usd(self) -> float:
        current = self.pricing.cost(self.input_tokens, self.output_tokens - self.prior_output)
        return round(self.prior_cost + current, 8)

    @property
    def total_input(self) -> int:
        return self.prior_input + self.input_tokens

    @property
    def ttft_ms(self) -> int | None:
        if self.first_token_at is None or self.resumed:
            return None
        return round((self.first_token_at - self.started) * 1000)

    def usage(self) -> dict[str, int]:
        return {"input_tokens": self.total_input, "output_tokens": self.output_tokens}

    def settle_attempt(self) -> tuple[int, int]:
        """The current attempt's (input, output): its prompt is billed once the provider
        accepted it or wrote anything."""
        if not self.accepted and self.attempt_chars == 0:
            self.input_tokens = 0
        return self.input_tokens, self.output_tokens - self.prior_output

    def next_attempt(self, pricing: Pricing, input_estimate: int) -> tuple[int, int]:
        """Close the current attempt's counts (returned) and start the next one's."""
        used_in, used_out = self.settle_attempt()
        self.prior_cost += self.pricing.cost(used_in, used_out)
        self.prior_input += used_in
        self.prior_output = self.output_tokens
        self.pricing = pricing
        self.input_tokens = input_estimate
        self.input_reported = self.accepted = False
        self.reported_output = None
        self.attempt_output = self.attempt_chars = 0
        return used_in, used_out

    def progress(self, now: float, *, final: bool = False) -> dict[str, Any]:
        out = self.output_tokens
        elapsed = now - self.started
        since_first = now - self.first_token_at if self.first_token_at is not None else 0.0
        tps = out / since_first if since_first > 0 else 0.0
        if final:
            percent = 100.0
            eta_ms: int | None = 0
            projected = self.cost_usd
        else:
            expected = max(self.expected_tokens, out)
            percent = min(99.0, round(out * 100 / expected, 1))
            remaining = expected - out
            eta_ms = round(remaining / tps * 1000) if tps > 0 else None
            projected = self.pricing.cost(self.input_tokens, expected)
        self.percent = percent = max(self.percent, percent)  # monotone, whatever estimates do
        return {
            "output_tokens": out,
            "max_tokens": self.max_tokens,
            "percent": percent,
            "tokens_per_second": round(tps, 2),
            "elapsed_ms": round(elapsed * 1000),
            "eta_ms": eta_ms,
            "cost_usd": self.cost_usd,
            "projected_cost_usd": projected,
        }


async def meter(
    items: AsyncIterator[Item],
    state: Meter,
    clock: Callable[[], float],
    observer: UpstreamObserver | None = None,
    on_attempt: Callable[[Attempt], dict[str, Any] | None] | None = None,
) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Turn text and usage into `delta` and (rate-limited) `progress` events; on `Stop`,
    one last `progress` at 100 % and `done` with the provider's usage. The first text
    is reported to `observer` (time to first token) before its `delta` is yielded.
    `on_attempt` switches the meter to a new attempt and says what the `continued`
    event carries (None: nothing to tell the reader).

    Events are yielded in groups, one group per item, so that what is produced together
    can be written to the client together (one socket write, not one per event)."""
    async for item in items:
        if isinstance(item, TextDelta):
            now = clock()
            if state.first_token_at is None:
                state.first_token_at = now
                if observer is not None:
                    observer.first_token(now - state.started)
            index = state.chars
            size = utf16_len(item.text)
            state.chars += size
            state.attempt_chars += size
            state.output_tokens += item.tokens
            state.attempt_output += item.tokens
            delta = ("delta", {"text": item.text, "index": index})
            if now >= state.next_progress:
                state.next_progress = now + state.interval
                yield [delta, ("progress", state.progress(now))]
            else:
                yield [delta]
        elif isinstance(item, Usage):
            state.accepted = True
            if item.input_tokens is not None:
                state.input_tokens = item.input_tokens
                state.input_reported = True
            if item.output_tokens is not None:
                state.reported_output = item.output_tokens
        elif isinstance(item, Attempt):
            told = on_attempt(item) if on_attempt is not None else None
            if told is not None:
                yield [("continued", told)]
        else:
            if state.reported_output is not None:
                state.output_tokens = state.prior_output + state.reported_output
            now = clock()
            yield [
                ("progress", state.progress(now, final=True)),
                (
                    "done",
                    {
                        "stop_reason": item.reason,
                        "usage": state.usage(),
                        "cost_usd": state.cost_usd,
                        "ttft_ms": state.ttft_ms,
                        "duration_ms": round((now - state.started) * 1000),
                    },
                ),
            ]
            return


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a stream stood when its process stopped, read from its log: the answer so
    far, the last event id, what it had used and how far it had got."""

    text: str
    last_id: int
    output_tokens: int
    input_tokens: int
    percent: float = 0.0
    elapsed_s: float = 0.0


@dataclass(slots=True)
class Outcome:
    """How a stream ended, for billing, metrics and logs."""

    status: StreamStatus = "running"
    stop_reason: str | None = None
    error_code: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    ttft_ms: int | None = None
    duration_ms: int = 0
    retries: int = 0


class Generation:
    """One request's trip through the pipeline, as a sequence of numbered events that
    always ends with `done` or `error` (unless the consumer cancels it, in which case
    `abort` produces the terminal event)."""

    def __init__(
        self,
        provider: Provider,
        request: GenerationRequest,
        *,
        start_data: dict[str, Any],
        pricing: Pricing,
        options: PipelineOptions,
        clock: Callable[[], float] = time.monotonic,
        observer: UpstreamObserver | None = None,
        keep_text: bool = False,
        model: str = "",
        continuation: bool = False,
        fallbacks: Sequence[Target] = (),
        resume: Resume | None = None,
    ) -> None:
        """`keep_text` keeps the generated text (for request records that store it);
        off, nothing but counters is kept per stream. `continuation`: the model can
        continue a partial answer (prefill); `fallbacks`: the models to try, in order,
        once its attempts are spent. `resume`: where another process left this stream
        (the events go on from its last id, and the answer from its text)."""
        self.provider = provider
        self.observer = observer
        self.parts: list[str] | None = [] if keep_text else None
        self.request = request
        self.options = options
        self.clock = clock
        self.start_data = start_data
        self.targets = (
            Target(provider, request, model, pricing, continuation),
            *fallbacks,
        )
        self.resume = resume
        self.encode = EventEncoder(resume.last_id if resume is not None else 0)
        expected = provider.expected_output_tokens(request) or request.max_tokens
        self.meter = Meter(
            pricing=pricing,
            max_tokens=request.max_tokens,
            expected_tokens=min(expected, request.max_tokens),
            input_estimate=estimate_tokens(request.prompt_chars()),
            progress_interval_s=options.progress_interval_s,
            started=clock(),
        )
        self.attempts: list[dict[str, Any]] = [
            {"model": model, "provider": provider.name, "reason": None}
        ]
        """Each attempt's model, why it started, and what it used: for the record."""
        if resume is not None:
            m = self.meter
            m.resumed = True
            m.started -= resume.elapsed_s
            m.chars = utf16_len(resume.text)
            m.output_tokens = m.prior_output = resume.output_tokens
            m.prior_input = resume.input_tokens
            m.prior_cost = pricing.cost(resume.input_tokens, resume.output_tokens)
            m.percent = resume.percent
            if resume.text:
                m.first_token_at = m.started
            if self.parts is not None and resume.text:
                self.parts.append(resume.text)
            self.attempts[0]["reason"] = "takeover"
        self.outcome = Outcome()

    def _on_attempt(self, attempt: Attempt) -> dict[str, Any] | None:
        target = self.targets[attempt.target]
        used_in, used_out = self.meter.next_attempt(target.pricing, attempt.input_estimate)
        entry = {"model": target.model, "provider": target.provider.name, "reason": attempt.reason}
        if attempt.number == 1:  # this process's first attempt, continuing a takeover
            self.attempts[-1] = entry
        else:
            self.attempts[-1].update(input_tokens=used_in, output_tokens=used_out)
            self.attempts.append(entry)
        if not attempt.continued:
            return None
        if self.observer is not None:
            self.observer.continued(attempt.reason)
        return {
            "attempt": attempt.number,
            "reason": attempt.reason,
            "model": target.model,
            "provider": target.provider.name,
        }

    async def events(self) -> AsyncGenerator[Event, None]:
        batches = self.batches()
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()  # now, not when collected: it closes the upstream

    async def batches(self) -> AsyncGenerator[list[Event], None]:
        """The events, grouped as they were produced: a consumer that writes a group at
        once makes one write where it would make two or three."""
        encode = self.encode
        if encode.last_id == 0:
            yield [encode("start", self.start_data)]
        queue: Mailbox[Chunk | Attempt | BaseException] = Mailbox(self.options.buffer_bytes)
        task = asyncio.create_task(self._pump(queue))
        try:
            options = self.options
            window = options.pacer.window_s if options.pacer else options.coalesce_window_s
            items = coalesce(queue, window, options.coalesce_max_chars)
            parts = self.parts
            async for group in meter(
                items, self.meter, self.clock, self.observer, self._on_attempt
            ):
                batch = []
                for name, data in group:
                    if parts is not None and name == "delta":
                        parts.append(data["text"])
                    if name == "done":
                        self.end("done", stop_reason=data["stop_reason"])
                    if name == "delta":
                        delta = encode.delta(data["text"], data["index"], self.meter.output_tokens)
                        batch.append(delta)
                    else:
                        batch.append(encode(name, data))
                yield batch
        except UpstreamError as exc:
            yield [self.abort(exc.code, exc.message, retryable=exc.retryable)]
        except Exception:
            logger.exception("stream failed")
            yield [self.abort("internal_error", "internal error", retryable=True)]
        finally:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _pump(self, queue: Mailbox[Chunk | Attempt | BaseException]) -> None:
        def count_retry(error: UpstreamError, attempt: int) -> None:
            self.outcome.retries = attempt

        resume = self.resume
        try:
            await pump(
                self.targets[0],
                self.options.upstream,
                queue.put_nowait,
                fallbacks=self.targets[1:],
                text=resume.text if resume is not None else "",
                output_tokens=resume.output_tokens if resume is not None else 0,
                on_retry=count_retry,
                observer=self.observer,
                full=queue.full,
                space=queue.space,
            )
        except Exception as exc:  # a bug in a provider must still end the stream visibly
            queue.put_nowait(exc)

    def text(self) -> str | None:
        return "".join(self.parts) if self.parts is not None else None

    def abort(
        self, code: str, message: str, *, retryable: bool = False, status: StreamStatus = "error"
    ) -> Event:
        """The terminal `error` event, carrying what was used so far: a partial stream is
        billed for exactly what it consumed."""
        self.end(status, error_code=code)
        return self.encode(
            "error",
            {
                "code": code,
                "message": message,
                "retryable": retryable,
                "usage": self.meter.usage(),
                "cost_usd": self.meter.cost_usd,
            },
        )

    def end(
        self,
        status: StreamStatus,
        *,
        stop_reason: str | None = None,
        error_code: str | None = None,
    ) -> None:
        """Record how the stream ended, with what it consumed up to now.

        A request the provider never accepted (refused with 429 or 529 on every attempt,
        unreachable, or cancelled before it answered) used nothing the provider bills
        for, so its input is not billed either. Once accepted, the prompt is billed: the
        provider's count, or else the estimate."""
        m, o = self.meter, self.outcome
        used_in, used_out = m.settle_attempt()
        self.attempts[-1].update(input_tokens=used_in, output_tokens=used_out)
        o.status, o.stop_reason, o.error_code = status, stop_reason, error_code
        o.input_tokens, o.output_tokens, o.cost_usd = m.total_input, m.output_tokens, m.cost_usd
        o.ttft_ms = m.ttft_ms
        o.duration_ms = round((self.clock() - m.started) * 1000)
