"""Graceful shutdown under uvicorn, driven by sserelay rather than by uvicorn's default.

Uvicorn's own SIGTERM handling stops accepting connections at once and then waits for
open ones, which for SSE never end by themselves. Kubernetes needs something else: keep
answering (so `/readyz` can say 503 while endpoints update), refuse new streams, let
running streams finish for a while, then end the rest cleanly, and exit 0 in time.

SIGTERM drains with `drain_timeout_s`; SIGINT (Ctrl-C) drains with no wait; a second
signal forces uvicorn's immediate exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

logger = logging.getLogger("sserelay")


class DrainingServer(uvicorn.Server):
    def __init__(
        self, config: uvicorn.Config, *, drain: Callable[[float], Awaitable[None]], timeout_s: float
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._timeout_s = timeout_s
        self._task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._task is not None:
            logger.warning("second signal: exiting now")
            self.should_exit = self.force_exit = True
            return
        timeout = self._timeout_s if sig == signal.SIGTERM else 0.0
        logger.info("received %s: draining for up to %.0fs", signal.Signals(sig).name, timeout)
        loop = asyncio.get_event_loop()
        # A signal handler may run between any two bytecodes: hand over to the loop.
        loop.call_soon_threadsafe(self._begin, timeout)

    def _begin(self, timeout: float) -> None:
        self._task = asyncio.ensure_future(self._run_drain(timeout))

    async def _run_drain(self, timeout: float) -> None:
        try:
            await self._drain(timeout)
        except Exception:
            logger.exception("drain failed; shutting down anyway")
        finally:
            self.should_exit = True
