"""Each pipeline stage alone, driven by scripted inputs with controlled timing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from streaming import (
    Attempt,
    Chunk,
    Generation,
    GenerationRequest,
    Message,
    Meter,
    PipelineOptions,
    Pricing,
    Stop,
    Target,
    TextDelta,
    UpstreamError,
    UpstreamPolicy,
    Usage,
    coalesce,
    meter,
    normalise,
    pump,
)
from streaming.pipeline import Mailbox

REQUEST = GenerationRequest(model="m", messages=(Message("user", "hello there"),), max_tokens=50)


class Scripted:
    """A provider whose attempts are scripted: each attempt is a list of chunks,
    exceptions to raise, or floats (seconds to sleep)."""

    name = "scripted"

    def __init__(self, *attempts: Sequence[Any], expected: int | None = None) -> None:
        self.attempts = list(attempts)
        self.calls = 0
        self.closed = 0
        self.expected = expected
        self.requests: list[GenerationRequest] = []

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        return self.expected

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        script = self.attempts[min(self.calls, len(self.attempts) - 1)]
        self.calls += 1
        self.requests.append(request)
        try:
            for step in script:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                elif isinstance(step, BaseException):
                    raise step
                else:
                    yield step
        finally:
            self.closed += 1

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def _list(it: AsyncIterator[Any]) -> list[Any]:
    return [x async for x in it]


async def test_normalise_drops_empty_text_and_refuses_a_stream_that_just_ends() -> None:
    async def source() -> AsyncIterator[Chunk]:
        yield TextDelta("")
        yield Usage()
        yield TextDelta("a")

    with pytest.raises(UpstreamError) as info:
        await _list(normalise(source()))
    assert info.value.code == "upstream_dropped"


async def test_normalise_closes_the_provider_stream_when_it_is_closed() -> None:
    """Closed with it, not later, when the event loop finalizes the abandoned generator:
    until then the provider's connection stays open, and its library may go on reading
    the socket into memory nobody consumes."""
    closed = []

    async def source() -> AsyncIterator[Chunk]:
        try:
            while True:
                yield TextDelta("a")
        finally:
            closed.append(True)

    chunks = normalise(source())
    assert await chunks.__anext__() == TextDelta("a")
    await chunks.aclose()
    assert closed == [True]


async def test_coalesce_sends_first_text_at_once_and_merges_a_burst() -> None:
    queue: Mailbox[Any] = Mailbox()
    for t in ["a", "b", "c", "d"]:
        queue.put_nowait(TextDelta(t))
    queue.put_nowait(Stop("end_turn"))
    out = await _list(coalesce(queue, window_s=1.0, max_chars=100))
    # The first delta is never held; the rest of the burst is merged into one.
    assert out == [TextDelta("a", 1), TextDelta("bcd", 3), Stop("end_turn")]


async def test_coalesce_bounds_by_size_and_flushes_on_timer() -> None:
    queue: Mailbox[Any] = Mailbox()
    for t in ["x", "yy", "zz", "w"]:
        queue.put_nowait(TextDelta(t))
    items = coalesce(queue, window_s=0.05, max_chars=3)
    assert await items.__anext__() == TextDelta("x", 1)
    assert await items.__anext__() == TextDelta("yyzz", 2)  # size bound reached
    # "w" is held until the window passes, then flushed without any further input.
    assert await asyncio.wait_for(items.__anext__(), 2) == TextDelta("w", 1)
    queue.put_nowait(Stop("end_turn"))
    assert await items.__anext__() == Stop("end_turn")


async def test_coalesce_delivers_held_text_before_an_error() -> None:
    queue: Mailbox[Any] = Mailbox()
    error = UpstreamError("boom", code="upstream_dropped")
    for item in [TextDelta("a"), TextDelta("b"), error]:
        queue.put_nowait(item)
    items = coalesce(queue, window_s=10, max_chars=100)
    assert await items.__anext__() == TextDelta("a", 1)
    assert await items.__anext__() == TextDelta("b", 1)
    with pytest.raises(UpstreamError):
        await items.__anext__()


async def test_meter_progress_is_rate_limited_monotone_and_ends_at_100() -> None:
    now = [0.0]

    async def items() -> AsyncIterator[Any]:
        yield Usage(input_tokens=1000)
        for i in range(10):
            now[0] = 1.0 + i * 0.1
            yield TextDelta("word ", 2)
        yield Usage(output_tokens=25)
        now[0] = 2.5
        yield Stop("end_turn")

    state = Meter(
        pricing=Pricing(1.0, 10.0),
        max_tokens=100,
        expected_tokens=20,
        input_estimate=3,
        progress_interval_s=0.25,
        started=0.0,
    )
    groups = await _list(meter(items(), state, lambda: now[0]))
    events = [event for group in groups for event in group]
    # What is produced together is grouped: a delta with its progress, progress with done.
    assert [[n for n, _ in g] for g in groups][-1] == ["progress", "done"]
    names = [n for n, _ in events]
    assert names.count("delta") == 10
    progress = [d for n, d in events if n == "progress"]
    # At most one per 250 ms of deltas (0.0 .. 0.9 s -> 4), plus the final one.
    assert len(progress) == 5
    percents = [p["percent"] for p in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert all(p < 100 for p in percents[:-1])
    assert names[-2:] == ["progress", "done"]
    done = events[-1][1]
    # Corrected to the provider's usage: 1000 in, 25 out.
    assert done["usage"] == {"input_tokens": 1000, "output_tokens": 25}
    assert done["cost_usd"] == pytest.approx((1000 * 1.0 + 25 * 10.0) / 1e6)
    assert done["ttft_ms"] == 1000 and done["duration_ms"] == 2500
    first = progress[0]
    assert first["projected_cost_usd"] == pytest.approx((1000 + 20 * 10) / 1e6)
    # Indices are character offsets: the text can be checked for gaps.
    deltas = [d for n, d in events if n == "delta"]
    assert [d["index"] for d in deltas] == [i * 5 for i in range(10)]


POLICY = UpstreamPolicy(
    first_token_timeout_s=0.5,
    idle_timeout_s=0.3,
    max_attempts=3,
    backoff_base_s=0.001,
    backoff_max_s=0.01,
)


async def _pump(provider: Scripted, policy: UpstreamPolicy = POLICY) -> list[Any]:
    out: list[Any] = []
    await pump(Target(provider, REQUEST), policy, out.append)
    return out


async def test_pump_retries_before_anything_is_relayed() -> None:
    provider = Scripted(
        [
            Usage(input_tokens=5),
            UpstreamError("busy", code="upstream_rate_limited", retryable=True),
        ],
        [Usage(input_tokens=5), TextDelta("ok"), Stop("end_turn")],
    )
    out = await _pump(provider)
    assert provider.calls == 2
    # Usage is relayed at once, each attempt's (an accepted request bills its prompt even
    # if it ends before its first token); the meter keeps the latest count.
    # The second attempt is marked, so that the first one's usage is billed on its own.
    mark = Attempt(2, 0, "", "scripted", "upstream_rate_limited", 3, continued=False)
    assert out == [
        Usage(input_tokens=5),
        mark,
        Usage(input_tokens=5),
        TextDelta("ok"),
        Stop("end_turn"),
    ]


async def test_pump_never_retries_after_text_was_relayed() -> None:
    error = UpstreamError("dropped", code="upstream_dropped", retryable=True)
    provider = Scripted([TextDelta("partial"), error], [TextDelta("again"), Stop("end_turn")])
    out = await _pump(provider)
    assert provider.calls == 1
    assert out == [TextDelta("partial"), error]


async def test_pump_does_not_retry_non_retryable_errors_and_gives_up_after_max() -> None:
    bad = UpstreamError("no", code="upstream_rejected", retryable=False)
    assert (await _pump(Scripted([bad])))[-1] is bad
    busy = UpstreamError("busy", code="upstream_overloaded", retryable=True)
    provider = Scripted([busy])
    assert (await _pump(provider))[-1] is busy
    assert provider.calls == 3


async def test_pump_times_out_first_token_and_between_chunks() -> None:
    slow_start = Scripted([5.0, TextDelta("late")])
    out = await _pump(slow_start, UpstreamPolicy(first_token_timeout_s=0.05, max_attempts=1))
    assert out[-1].code == "upstream_timeout"
    assert slow_start.closed == 1  # the upstream call was closed, not left running
    stall = Scripted([TextDelta("a"), 5.0, TextDelta("b")])
    out = await _pump(stall, UpstreamPolicy(idle_timeout_s=0.05))
    assert out[0] == TextDelta("a") and out[-1].code == "upstream_timeout"
    assert stall.calls == 1


def _generation(provider: Scripted) -> Generation:
    return Generation(
        provider,
        REQUEST,
        start_data={"stream_id": "x"},
        pricing=Pricing(1.0, 2.0),
        options=PipelineOptions(upstream=POLICY),
    )


async def test_generation_numbers_events_and_ends_with_error_on_failure() -> None:
    provider = Scripted(
        [TextDelta("a"), UpstreamError("gone", code="upstream_dropped", retryable=True)]
    )
    gen = _generation(provider)
    events = await _list(gen.events())
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[0].name == "start" and events[-1].name == "error"
    error = events[-1].json()
    assert error["code"] == "upstream_dropped" and error["retryable"] is True
    assert error["usage"]["output_tokens"] == 1
    assert gen.outcome.status == "error" and gen.outcome.output_tokens == 1


async def test_closing_a_generation_closes_the_provider() -> None:
    provider = Scripted([TextDelta("a"), 10.0, TextDelta("b"), Stop("end_turn")])
    gen = _generation(provider)
    events = gen.events()
    names = [(await events.__anext__()).name for _ in range(3)]
    assert names == ["start", "delta", "progress"]
    await events.aclose()
    assert provider.closed == 1


async def test_early_usage_does_not_shorten_the_first_token_wait() -> None:
    # Usage at once (as Anthropic's message_start), then text after longer than the
    # idle timeout but within the first-token timeout: not a timeout.
    provider = Scripted([Usage(input_tokens=3), 0.2, TextDelta("late"), Stop("end_turn")])
    policy = UpstreamPolicy(first_token_timeout_s=2.0, idle_timeout_s=0.05, max_attempts=1)
    out = await _pump(provider, policy)
    assert out == [Usage(input_tokens=3), TextDelta("late"), Stop("end_turn")]


async def test_a_retry_after_longer_than_the_backoff_cap_is_not_waited_for() -> None:
    busy = UpstreamError("busy", code="upstream_rate_limited", retryable=True, retry_after=60)
    provider = Scripted([busy], [TextDelta("ok"), Stop("end_turn")])
    out = await _pump(provider)  # backoff_max_s is 0.01
    assert out == [busy] and provider.calls == 1
    assert POLICY.backoff(1, 0.005) is not None and POLICY.backoff(1, 0.005) >= 0.005


async def test_mailbox_keeps_order_across_waits_and_compaction() -> None:
    box: Mailbox[int] = Mailbox()
    got: list[int] = []
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait(0)
    got.append(await waiting)
    sent = 1
    for _ in range(50):  # a producer always ahead of its consumer
        for _ in range(100):
            box.put_nowait(sent)
            sent += 1
        for _ in range(60):
            got.append(await box.get())
    while not box.empty():
        got.append(await box.get())
    assert got == list(range(sent))


class Endless:
    """A provider as fast as memory: text until cancelled, counting what it produced."""

    name = "endless"

    def __init__(self) -> None:
        self.produced = 0

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        return None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Any]:
        while True:
            self.produced += 1
            yield TextDelta("word ", 1)
            if self.produced % 100 == 0:
                await asyncio.sleep(0)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def test_a_consumer_that_stops_reading_stops_the_provider_being_read() -> None:
    """The mailbox between provider and consumer is bounded: once full, the pump waits
    (its idle timeout held), so an unread stream holds a bounded amount of memory."""
    box: Mailbox[Any] = Mailbox(limit=100_000)
    provider = Endless()
    policy = UpstreamPolicy(first_token_timeout_s=0.05, idle_timeout_s=0.05)
    task = asyncio.create_task(
        pump(Target(provider, REQUEST), policy, box.put_nowait, full=box.full, space=box.space)
    )
    await asyncio.sleep(0.3)  # several idle timeouts: none fires while held
    assert not task.done()
    held = provider.produced
    assert 100_000 / (5 + 120) <= held < 2 * 100_000 / (5 + 120)
    for _ in range(held // 2 + 10):  # the consumer catches up: reading resumes
        await box.get()
    await asyncio.sleep(0.05)
    assert provider.produced > held
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


DROP = UpstreamError("dropped", code="upstream_dropped", retryable=True)


async def test_a_drop_after_text_is_continued_from_the_text_so_far() -> None:
    """The prefill is the text without its trailing whitespace (Anthropic refuses it),
    and the same whitespace is dropped from the start of the continuation: the reader
    gets one answer, no character lost or doubled."""
    provider = Scripted(
        [Usage(input_tokens=7), TextDelta("Hello "), TextDelta("wor"), TextDelta("ld.  "), DROP],
        [
            Usage(input_tokens=9),
            TextDelta(" "),
            TextDelta(" The"),
            TextDelta(" end."),
            Stop("end_turn"),
        ],
    )
    out = await pump(Target(provider, REQUEST, "m", prefill=True), POLICY, (got := []).append)
    assert out is None
    text = "".join(c.text for c in got if isinstance(c, TextDelta))
    assert text == "Hello world.  The end."
    assert provider.requests[1].prefill == "Hello world."
    assert provider.requests[1].max_tokens == 50 - 3
    marks = [c for c in got if isinstance(c, Attempt)]
    assert marks == [
        Attempt(2, 0, "m", "scripted", "upstream_dropped", marks[0].input_estimate, True)
    ]
    assert marks[0].input_estimate > 3  # prompt plus prefill


async def test_a_model_without_continuation_is_never_sent_a_prefill() -> None:
    provider = Scripted([TextDelta("partial"), DROP], [TextDelta("again"), Stop("end_turn")])
    got: list[Any] = []
    await pump(Target(provider, REQUEST, "m", prefill=False), POLICY, got.append)
    assert provider.calls == 1 and got == [TextDelta("partial"), DROP]


async def test_continuation_falls_back_after_the_attempts_are_spent_and_is_bounded() -> None:
    primary = Scripted([TextDelta("one "), DROP], [TextDelta("two "), DROP])
    spare = Scripted([TextDelta("three"), Stop("end_turn")])
    refusing = Scripted([TextDelta("never")])
    got: list[Any] = []
    await pump(
        Target(primary, REQUEST, "a", prefill=True),
        POLICY,
        got.append,
        fallbacks=[Target(refusing, REQUEST, "b"), Target(spare, REQUEST, "c", prefill=True)],
    )
    assert primary.calls == 3 and refusing.calls == 0 and spare.calls == 1
    assert spare.requests[0].prefill == "one two two"
    assert "".join(c.text for c in got if isinstance(c, TextDelta)) == "one two two three"
    assert [c.model for c in got if isinstance(c, Attempt)] == ["a", "a", "c"]
    # Every attempt dropping: the error, after the bounded attempts, with the text kept.
    always = Scripted([TextDelta("x "), DROP])
    got = []
    await pump(Target(always, REQUEST, "a", prefill=True), POLICY, got.append)
    assert always.calls == 3 and got[-1] is DROP
    assert "".join(c.text for c in got if isinstance(c, TextDelta)) == "x x x "


async def test_a_continued_generation_sums_every_attempt_and_tells_the_reader() -> None:
    provider = Scripted(
        [Usage(input_tokens=10), TextDelta("ab "), TextDelta("cd "), DROP],
        [Usage(input_tokens=12), TextDelta(" ef"), Usage(output_tokens=1), Stop("end_turn")],
    )
    gen = Generation(
        provider,
        REQUEST,
        start_data={},
        pricing=Pricing(1.0, 2.0),
        options=PipelineOptions(upstream=POLICY),
        model="m",
        continuation=True,
    )
    events = await _list(gen.events())
    names = [e.name for e in events]
    assert names.count("start") == 1 and names.count("continued") == 1
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    deltas = [e.json() for e in events if e.name == "delta"]
    assert "".join(d["text"] for d in deltas) == "ab cd ef"
    assert [d["index"] for d in deltas] == [0, 3, 6]
    continued = next(e.json() for e in events if e.name == "continued")
    assert continued == {
        "attempt": 2,
        "reason": "upstream_dropped",
        "model": "m",
        "provider": "scripted",
    }
    done = events[-1].json()
    assert done["usage"] == {"input_tokens": 22, "output_tokens": 3}
    assert done["cost_usd"] == pytest.approx((22 * 1.0 + 3 * 2.0) / 1e6)
    assert [(a["input_tokens"], a["output_tokens"]) for a in gen.attempts] == [(10, 2), (12, 1)]
    percents = [e.json()["percent"] for e in events if e.name == "progress"]
    assert percents == sorted(percents)
