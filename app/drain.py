"""Graceful shutdown: the coordinator every part of the app consults, and the uvicorn
server that starts it on a signal.

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
from typing import Any, Protocol

import uvicorn

from streaming import StreamManager

logger = logging.getLogger("sserelay")


class WorkerRole(Protocol):
    """What the drain needs of this process's worker (when it has the worker role)."""

    def stop_claiming(self) -> None: ...

    async def others(self) -> int: ...

    async def hand_over(self) -> None: ...


class Drain:
    """The drain's state and its steps, owned by the lifespan.

    - `draining`: set at once on SIGTERM: `/readyz` answers 503 and new streams are
      refused, while running ones may finish;
    - `stopping`: set at the deadline: every open SSE response says its last word (a
      `shutdown` error for a direct stream, `event: reconnect` for a reader) and closes.
    """

    def __init__(self, manager: StreamManager) -> None:
        self.manager = manager
        self.draining = asyncio.Event()
        self.stopping = asyncio.Event()
        self.direct_streams = 0
        """Responses of POST /v1/chat/stream in flight (they are not in the manager)."""
        self.open_responses: set[Any] = set()
        """Every SSE response still open, readers and direct streams alike."""
        self.worker: WorkerRole | None = None
        """This process's worker, when it has the role: it stops claiming at once, and
        at the deadline hands its generations over if another worker can take them."""

    async def run(self, timeout_s: float, *, last_words_s: float = 5.0) -> None:
        """Refuse new streams at once, let running ones finish for up to `timeout_s`,
        then hand the rest over to another worker (when one is alive: readers see no
        error), or else end them with a retryable `shutdown` error (written to the
        stream log, so a client resuming elsewhere sees it), and close every reader with
        a `reconnect` event (a reader following a stream that another replica generates
        resumes there). Returns once every open response has said its last word and
        settled its usage (or `last_words_s` has passed)."""
        self.draining.set()
        if self.worker is not None:
            self.worker.stop_claiming()
        logger.info(
            "draining: %d resumable and %d direct streams running",
            self.manager.active,
            self.direct_streams,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.manager.active or self.direct_streams) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.manager.active and self.worker is not None and await self.worker.others():
            logger.warning(
                "drain deadline: handing %d generations over to other workers",
                self.manager.active,
            )
            await self.worker.hand_over()
        if self.manager.active or self.direct_streams:
            logger.warning(
                "drain deadline: ending %d resumable and %d direct streams",
                self.manager.active,
                self.direct_streams,
            )
        await self.manager.aclose()
        await asyncio.sleep(0.2)  # readers relay the `shutdown` errors just written
        self.stopping.set()
        settle_by = loop.time() + last_words_s
        while (self.open_responses or self.direct_streams) and loop.time() < settle_by:
            await asyncio.sleep(0.02)
        if self.open_responses:
            logger.warning("drain: %d responses still open", len(self.open_responses))


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
