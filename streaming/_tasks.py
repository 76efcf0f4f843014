"""Cancelling tasks so that they stay cancelled.

On Python 3.11, a cancellation that arrives while an `asyncio.timeout()` block is
expiring is swallowed: the block raises `TimeoutError`, uncancels the task, and the task
goes on as if nothing had asked it to stop. Readers and generations wait inside such
blocks all the time, so a single `cancel()` sometimes loses the race; this module cancels
again until the task is really done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]], *, every_s: float = 0.1) -> None:
    """Cancel `tasks` and return once all are done, cancelling again every `every_s`
    those that swallowed it."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
