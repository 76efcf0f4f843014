"""The stream log's cross-stream append batching, against a scripted Redis pipeline:
when replies arrive decides whether an append is ever sent."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from streaming import EventEncoder
from streaming.events import Event
from streaming.log._appender import Appender


class Gate:
    """A Redis client whose pipelines all answer when the gate opens."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.sent: list[list[str]] = []

    def pipeline(self, transaction: bool) -> Any:
        gate = self

        class Pipe:
            def __init__(self) -> None:
                self.command_stack: list[str] = []

            async def __aenter__(self) -> Pipe:
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            def add(self, name: str) -> None:
                self.command_stack.append(name)

            async def execute(self, raise_on_error: bool = True) -> list[Any]:
                gate.sent.append(list(self.command_stack))
                await gate.open.wait()
                return [1] * len(self.command_stack)

        return Pipe()


def _queue(pipe: Any, stream_id: str, events: Sequence[Event], epoch: int) -> None:
    for event in events:
        pipe.add(f"{stream_id}:{event.id}")


async def test_appends_right_after_replies_in_the_same_turn_are_still_sent() -> None:
    # Two pipelines answer in the same loop turn and both writers append again at once:
    # the senders that just finished must not still count as busy.
    gate = Gate()
    appender = Appender(gate, _queue)  # type: ignore[arg-type]
    encoders = {"a": EventEncoder(), "b": EventEncoder()}

    async def writer(stream_id: str, appends: int) -> None:
        for _ in range(appends):
            await appender.append(stream_id, [encoders[stream_id]("delta", {})], 1)

    # Two pipelines in flight, one per stream; `b` appends once, so nothing but `a`
    # itself is left to start a sender afterwards.
    writers = [asyncio.create_task(writer("a", 5))]
    await asyncio.sleep(0.01)
    writers.append(asyncio.create_task(writer("b", 1)))
    await asyncio.sleep(0.01)
    assert len(gate.sent) == 2
    gate.open.set()
    await asyncio.wait_for(asyncio.gather(*writers), 2)
    sent = [command for batch in gate.sent for command in batch]
    assert [c for c in sent if c.startswith("a")] == [f"a:{i}" for i in range(1, 6)]
    assert [c for c in sent if c.startswith("b")] == ["b:1"]


async def test_a_cancelled_append_does_not_take_its_batch_down() -> None:
    gate = Gate()
    appender = Appender(gate, _queue)  # type: ignore[arg-type]
    first = asyncio.create_task(appender.append("a", [EventEncoder()("delta", {})], 1))
    await asyncio.sleep(0)
    others = [
        asyncio.create_task(appender.append(s, [EventEncoder()("delta", {})], 1)) for s in "bcd"
    ]
    await asyncio.sleep(0)
    others[0].cancel()
    gate.open.set()
    await asyncio.wait_for(first, 2)
    results = await asyncio.gather(*others, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None, None]
