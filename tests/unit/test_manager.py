"""The stream manager's bookkeeping holds whatever arrives while a stream is ending."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from streaming import (
    Event,
    Generation,
    MemoryStreamLog,
    Outcome,
    PipelineOptions,
    Pricing,
    Stop,
    StreamInfo,
    StreamManager,
    TextDelta,
)
from tests.unit.test_pipeline import POLICY, REQUEST, Scripted


class SlowLog(MemoryStreamLog):
    """Appends take a while, as over a network."""

    async def append(self, stream_id: str, events: Sequence[Event], *, epoch: int = 1) -> None:
        await asyncio.sleep(0.05)
        await super().append(stream_id, events, epoch=epoch)


async def test_a_cancel_while_the_stream_is_ending_cannot_skip_its_finish() -> None:
    log = SlowLog(ttl_s=60, max_duration_s=60, max_events=1000)
    finished: list[Outcome] = []

    async def on_finish(info: StreamInfo, generation: Generation) -> None:
        finished.append(generation.outcome)

    manager = StreamManager(log, on_finish=on_finish, tick_s=60)
    info = StreamInfo("s1", "alice", "m", "p", "pro", 50, time.time())
    generation = Generation(
        Scripted([TextDelta("hi"), Stop("end_turn")]),
        REQUEST,
        start_data={},
        pricing=Pricing(),
        options=PipelineOptions(upstream=POLICY),
    )
    await manager.launch(info, generation)
    while generation.outcome.status == "running":  # `done` produced, appends still in flight
        await asyncio.sleep(0.001)
    await manager.cancel("s1")  # e.g. a DELETE that raced the natural end
    for _ in range(200):
        if finished:
            break
        await asyncio.sleep(0.01)
    assert [o.status for o in finished] == ["done"]
    stored = await log.info("s1")
    assert stored is not None and stored.status == "done"
    assert manager.active == 0
    events = await log.read("s1", 0)
    assert [e.name for e in events][-1] == "done"
    await manager.aclose()
