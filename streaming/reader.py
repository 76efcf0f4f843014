"""Following a stream from the log: replay after an id, then live, until its end."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from .events import Event, EventEncoder
from .log import StreamLog


async def follow(
    log: StreamLog,
    stream_id: str,
    after: int,
    *,
    grace_s: float,
) -> AsyncGenerator[list[Event], None]:
    """Yield events with id > `after` until the terminal one, in the groups the log
    returned them (a reader catching up writes a group to its client at once).

    While it waits it tells the log a reader is attached (so the stream is not cancelled
    as orphaned) at a third of the grace period. A stream still `running` with nobody
    generating it is waiting for a worker (queued, or its worker stopped and another
    will take it over): the reader waits too, and relays what the next owner writes.
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
        # Ended (what was appended before that is final), or waiting for a worker.
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
