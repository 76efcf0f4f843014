"""Following a stream from the log: replay after an id, then live, until its end."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Awaitable, Callable

from .events import Event, EventEncoder
from .log import StreamLog


async def follow(
    log: StreamLog,
    stream_id: str,
    after: int,
    *,
    grace_s: float,
    end_lost: Callable[[str], Awaitable[bool]],
) -> AsyncGenerator[list[Event], None]:
    """Yield events with id > `after` until the terminal one, in the groups the log
    returned them (a reader catching up writes a group to its client at once).

    While it waits it tells the log a reader is attached (so the stream is not cancelled
    as orphaned) at a third of the grace period. If the stream is still `running` but
    the process generating it stopped renewing its lease, it crashed: `end_lost` writes
    its end (a retryable `stream_lost` error with the usage the log shows, billed once)
    and the reader relays it, instead of waiting forever on a stream that will never end.
    """
    last = after
    heartbeat = grace_s / 3
    next_touch = 0.0
    while True:
        now = time.monotonic()
        if now >= next_touch:
            next_touch = now + heartbeat
            liveness = await log.touch_reader(stream_id, grace_s)
            if liveness is None:
                yield [_expired(last)]
                return
        events = _upto_terminal(await log.read(stream_id, last, block_s=heartbeat))
        if events:
            yield events
            last = events[-1].id
            if events[-1].terminal:
                return
            continue
        next_touch = time.monotonic() + heartbeat
        liveness = await log.touch_reader(stream_id, grace_s)
        if liveness is None:
            yield [_expired(last)]
            return
        if liveness.status == "running" and liveness.generating:
            continue
        # Ended, or its generator died: whatever was appended before that is final.
        tail = _upto_terminal(await log.read(stream_id, last))
        if tail:
            yield tail
            last = tail[-1].id
            if tail[-1].terminal:
                return
        elif liveness.status != "running":
            # It ended, but its end never reached the log (the log failed under it).
            yield [_ended(last)]
            return
        else:
            # The end is written to the log, so every reader, now or reconnecting, sees
            # the same terminal event under a real id; the next read relays it. If the
            # generator got there first it is alive after all, and reading goes on.
            await end_lost(stream_id)


def _expired(last: int) -> Event:
    return EventEncoder(last)(
        "error",
        {"code": "stream_expired", "message": "the stream no longer exists", "retryable": False},
    )


def _ended(last: int) -> Event:
    return EventEncoder(last)(
        "error",
        {
            "code": "stream_lost",
            "message": "the stream ended but its end was not stored",
            "retryable": True,
        },
    )


def _upto_terminal(events: list[Event]) -> list[Event]:
    for i, event in enumerate(events):
        if event.terminal:
            return events[: i + 1]
    return events
