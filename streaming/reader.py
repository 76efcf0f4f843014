"""Following a stream from the log: replay after an id, then live, until its end."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from .events import Event, EventEncoder
from .log import StreamLog


async def follow(
    log: StreamLog, stream_id: str, after: int, *, grace_s: float
) -> AsyncIterator[Event]:
    """Yield events with id > `after` until the terminal one.

    While it waits it tells the log a reader is attached (so the stream is not cancelled
    as orphaned) at a third of the grace period. If the stream is still `running` but
    the process generating it stopped renewing its lease, it crashed: the reader gets a
    retryable `error` instead of waiting forever on a stream that will never end.
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
                yield _lost(last, "stream_expired", "the stream no longer exists", retryable=False)
                return
        events = await log.read(stream_id, last, block_s=heartbeat)
        for event in events:
            yield event
            last = event.id
            if event.terminal:
                return
        if events:
            continue
        next_touch = time.monotonic() + heartbeat
        liveness = await log.touch_reader(stream_id, grace_s)
        if liveness is None:
            yield _lost(last, "stream_expired", "the stream no longer exists", retryable=False)
            return
        if liveness.status == "running" and liveness.generating:
            continue
        # Ended, or its generator died: whatever was appended before that is final.
        tail = await log.read(stream_id, last)
        for event in tail:
            yield event
            last = event.id
            if event.terminal:
                return
        if not tail:
            # The end is written to the log, so every reader, now or reconnecting, sees
            # the same terminal event under a real id; if the generator got there
            # first it is alive after all, and reading simply goes on.
            lost = _lost(last, "stream_lost", "the stream stopped before it finished")
            if await log.claim_end(stream_id, lost):
                yield lost
                return


def _lost(last: int, code: str, message: str, *, retryable: bool = True) -> Event:
    return EventEncoder(last)("error", {"code": code, "message": message, "retryable": retryable})
