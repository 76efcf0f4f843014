"""Adaptive coalescing: the window widens with the process's load, and whatever the
window, the first text goes out at once, the text is exact and progress is monotone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.settings import Settings
from streaming import (
    Chunk,
    Generation,
    GenerationRequest,
    Message,
    Pacer,
    PipelineOptions,
    Pricing,
    Stop,
    TextDelta,
    coalesce,
)
from streaming.pipeline import Mailbox


class Clock:
    """Wall time and CPU time, moved by hand."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def run(self, seconds: float, busy: float) -> None:
        self.wall += seconds
        self.cpu += seconds * busy


def _pacer(clock: Clock, **kwargs: Any) -> Pacer:
    return Pacer(0.01, 0.05, clock=lambda: clock.wall, cpu=lambda: clock.cpu, **kwargs)


def test_an_idle_process_keeps_the_configured_window() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    for _ in range(10):
        clock.run(0.1, busy=0.3)
        assert pacer.sample() == pytest.approx(0.01)
    assert pacer.busy == pytest.approx(0.3)


def test_a_busy_process_widens_the_window_to_its_ceiling_and_back() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    windows = []
    for _ in range(12):
        clock.run(0.1, busy=0.95)
        windows.append(pacer.sample())
    # Smoothed: it widens over a few samples, never past the ceiling.
    assert windows == sorted(windows)
    assert windows[0] < 0.05 and windows[-1] == pytest.approx(0.05, abs=1e-3)
    clock.run(0.1, busy=0.7)  # half-way between busy_low (0.5) and busy_high (0.9)
    for _ in range(12):
        clock.run(0.1, busy=0.7)
        pacer.sample()
    assert pacer.window_s() == pytest.approx(0.03, abs=1e-3)
    for _ in range(12):
        clock.run(0.1, busy=0.1)
        pacer.sample()
    assert pacer.window_s() == 0.01


def test_a_late_loop_counts_as_busy_even_when_the_process_is_not() -> None:
    """A process starved of CPU by its neighbours uses little CPU itself, but its loop
    runs everything late: that is load too."""
    clock = Clock()
    pacer = _pacer(clock, smoothing=1.0)
    clock.run(0.1, busy=0.2)
    assert pacer.sample(lag_s=0.05) == pytest.approx(0.05)
    clock.run(0.1, busy=0.2)
    assert pacer.sample(lag_s=0.0) == pytest.approx(0.01)


def test_a_pacer_refuses_a_ceiling_below_its_floor() -> None:
    with pytest.raises(ValueError):
        Pacer(0.05, 0.01)
    with pytest.raises(ValueError):
        Pacer(0.01, 0.05, busy_low=0.9, busy_high=0.5)


async def test_a_fixed_window_stays_fixed_and_the_load_is_still_measured() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    fixed = Pacer(0.01, 0.01, clock=lambda: clock.wall, cpu=lambda: clock.cpu)
    clock.run(0.1, busy=1.0)
    assert pacer.sample() > 0.01  # the same load widens an adaptive window
    assert fixed.sample() == 0.01 and fixed.busy == pytest.approx(1.0)


def test_the_coalescing_ceiling_follows_the_settings() -> None:
    assert Settings().coalesce_ceiling_ms == 50  # 10 ms idle, up to 50 busy
    assert Settings(coalesce_ms=0).coalesce_ceiling_ms == 0  # off stays off
    assert Settings(coalesce_ms=0, coalesce_max_ms=30).coalesce_ceiling_ms == 30
    assert Settings(coalesce_ms=80).coalesce_ceiling_ms == 80  # never below the floor
    assert Settings(coalesce_ms=20, coalesce_max_ms=5).coalesce_ceiling_ms == 20


async def test_the_pacer_does_not_count_the_cpu_spent_before_it_runs() -> None:
    clock = Clock()
    pacer = _pacer(clock, smoothing=1.0)
    clock.run(0.1, busy=10.0)  # startup: imports, config, clients
    seen: list[float] = []
    task = asyncio.create_task(pacer.run(0.01, on_sample=lambda p: seen.append(p.busy)))
    try:
        while not seen:
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
    assert seen[0] == 0.0  # no CPU used since it started


async def test_the_running_pacer_reports_each_sample() -> None:
    pacer = Pacer(0.0, 0.05)
    seen: list[float] = []
    task = asyncio.create_task(pacer.run(0.01, on_sample=lambda p: seen.append(p.window_s())))
    try:
        while len(seen) < 3:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert all(0.0 <= w <= 0.05 for w in seen)


async def _feed(queue: Mailbox[Any], n: int, gap_s: float) -> None:
    for i in range(n):
        queue.put_nowait(TextDelta(f"t{i} "))
        await asyncio.sleep(gap_s)
    queue.put_nowait(Stop("end_turn"))


async def _deltas(window: Any, n: int = 40, gap_s: float = 0.005) -> list[TextDelta]:
    queue: Mailbox[Any] = Mailbox()
    feeder = asyncio.create_task(_feed(queue, n, gap_s))
    out = [x async for x in coalesce(queue, window, max_chars=10_000)]
    await feeder
    assert out[-1] == Stop("end_turn")
    return [x for x in out if isinstance(x, TextDelta)]


async def test_a_wider_window_means_fewer_events_and_the_same_text() -> None:
    """Tokens every 5 ms: at a 1 ms window nearly each is its own event; at the 50 ms a
    busy process gets, about one in ten. The first token goes out alone either way."""
    want = "".join(f"t{i} " for i in range(40))
    narrow = await _deltas(lambda: 0.001)
    wide = await _deltas(lambda: 0.05)
    assert "".join(d.text for d in narrow) == "".join(d.text for d in wide) == want
    assert sum(d.tokens for d in wide) == sum(d.tokens for d in narrow) == 40
    assert narrow[0] == wide[0] == TextDelta("t0 ", 1)
    assert len(wide) * 3 < len(narrow)
    assert len(wide) <= 8


async def test_the_window_is_asked_at_every_event() -> None:
    """What a pacer says now applies to the next held delta, not from the next stream."""
    windows = iter([0.001] * 10 + [0.05] * 100)
    deltas = await _deltas(lambda: next(windows), n=60)
    sizes = [d.tokens for d in deltas]
    assert sizes[:5] == [1, 1, 1, 1, 1]  # narrow: one token per event
    assert max(sizes[10:]) >= 5  # then wide: many per event


class Steady:
    """A provider that sends `n` one-token pieces `gap_s` apart."""

    name = "steady"

    def __init__(self, n: int, gap_s: float) -> None:
        self.n, self.gap_s = n, gap_s

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        return self.n

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        for i in range(self.n):
            yield TextDelta(f"w{i} ")
            await asyncio.sleep(self.gap_s)
        yield Stop("end_turn")

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def _run(pacer: Pacer) -> list[tuple[str, dict[str, Any]]]:
    generation = Generation(
        Steady(60, 0.004),
        GenerationRequest(model="m", messages=(Message("user", "hi"),), max_tokens=100),
        start_data={"stream_id": "x"},
        pricing=Pricing(1.0, 2.0),
        options=PipelineOptions(coalesce_window_s=0.001, pacer=pacer, progress_interval_s=0.01),
    )
    return [(e.name, e.json()) async for e in generation.events()]


async def test_a_busy_process_sends_fewer_events_with_exact_text_and_monotone_progress() -> None:
    clock = Clock()
    idle = Pacer(0.001, 0.05, clock=lambda: clock.wall, cpu=lambda: clock.cpu)
    busy = Pacer(0.001, 0.05, clock=lambda: clock.wall, cpu=lambda: clock.cpu, smoothing=1.0)
    clock.run(1.0, busy=1.0)
    busy.sample()
    assert busy.window_s() == pytest.approx(0.05)
    results = {}
    for name, pacer in (("idle", idle), ("busy", busy)):
        events = await _run(pacer)
        deltas = [d for n, d in events if n == "delta"]
        assert "".join(d["text"] for d in deltas) == "".join(f"w{i} " for i in range(60))
        assert deltas[0]["text"] == "w0 "  # the first token is never held
        indexes = [d["index"] for d in deltas]
        assert indexes == sorted(indexes) and indexes[0] == 0
        percents = [d["percent"] for n, d in events if n == "progress"]
        assert percents == sorted(percents) and percents[-1] == 100
        assert events[-1][0] == "done" and events[-1][1]["usage"]["output_tokens"] == 60
        results[name] = len(deltas)
    assert results["busy"] * 3 < results["idle"]
