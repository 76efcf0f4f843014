"""The generation tier: claims queued jobs up to its free slots, runs them, and takes
over the jobs of workers that stopped.

Every process with the worker role (`serve`, `worker`) runs one. It pulls: a worker
claims only as many jobs as it has free slots, so load spreads over workers by itself.
Each tick it keeps its jobs fresh in the queue (the stream leases are renewed by the
stream manager in the same beat) and reclaims jobs idle past the generation lease: their
worker died, was paused or lost its network. Taking a stream over raises its fencing
epoch, so the former owner can no longer write; the new owner continues the answer
from the text in the log, and readers see no error, only a pause.

On drain it stops claiming, lets its generations run until the deadline, then hands
them over (their leases given up, their jobs released) when another worker is there to
take them, or ends them with a retryable `shutdown` error when none is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid

from ratelimit import Reservation
from streaming import Event, EventEncoder, Job, QueueError, Resume, StreamInfo, StreamingError
from streaming.manager import logged_outcome, resume_point, terminal_outcome

from .errors import ProblemError
from .generation import build_generation
from .jobs import decode_job
from .services import Services

logger = logging.getLogger("sserelay.worker")


def consumer_name() -> str:
    """Unique per process start: a restarted worker never inherits a dead one's jobs
    by name (it takes them over like anyone else, fenced)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(self, services: Services, *, consumer: str | None = None) -> None:
        settings = services.settings
        self.services = services
        self.queue = services.queue
        self.consumer = consumer or consumer_name()
        self.concurrency = settings.worker_concurrency
        self.lease_s = settings.generation_lease_s
        self.tick_s = settings.supervisor_tick_s
        self.max_takeovers = settings.max_takeovers
        self._jobs: dict[str, Job] = {}
        self._starting = 0
        self._slot = asyncio.Event()
        self._claiming = True
        self._retiring: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._tick_loop(), name="worker-tick"),
        ]

    def stop_claiming(self) -> None:
        """Take no more jobs, and leave the count of live workers at once: a worker
        draining must not be counted on to take another's generations over."""
        if self._claiming:
            self._claiming = False
            self._retiring = asyncio.ensure_future(self._retire())
        self._slot.set()

    async def _retire(self) -> None:
        try:
            await self.queue.retire(self.consumer)
        except QueueError as exc:
            logger.warning("cannot leave the queue: %s", exc)

    async def aclose(self) -> None:
        self.stop_claiming()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def others(self) -> int:
        """Other workers alive now, that could take this one's generations over. This one
        left the count when it stopped claiming (at the signal, not at the deadline):
        workers drained together never count on each other."""
        self.stop_claiming()
        if self._retiring is not None:
            await self._retiring
        try:
            # Once more: a beat that was on its way when the drain began has landed.
            await self.queue.retire(self.consumer)
            return await self.queue.consumers(self.lease_s)
        except QueueError as exc:
            logger.warning("cannot count workers: %s", exc)
            return 0

    async def hand_over(self) -> None:
        """Stop every generation here without ending it and release its job, so that
        another worker takes it over at once."""
        self.stop_claiming()
        await self.services.manager.hand_over()

    async def _claim_loop(self) -> None:
        while self._claiming:
            free = self.concurrency - len(self._jobs) - self._starting
            if free <= 0:
                self._slot.clear()
                try:
                    async with asyncio.timeout(self.tick_s):
                        await self._slot.wait()
                except TimeoutError:
                    pass
                continue
            try:
                jobs = await self.queue.claim(self.consumer, free, block_s=1.0)
            except QueueError as exc:
                logger.warning("cannot claim jobs: %s", exc)
                await asyncio.sleep(self.tick_s)
                continue
            except Exception:  # the loop must outlive any one bad reply
                logger.exception("cannot claim jobs")
                await asyncio.sleep(self.tick_s)
                continue
            if not self._claiming:  # claimed as the drain began: for another worker
                await self.queue.release(self.consumer, jobs)
                break
            now = time.time()
            for job in jobs:
                self.services.metrics.queue_wait.observe(max(0.0, now - job.enqueued_at))
                await self._begin(job, takeover=False)

    async def _tick_loop(self) -> None:
        metrics = self.services.metrics
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.queue.keep(self.consumer, list(self._jobs.values()), beat=self._claiming)
                free = self.concurrency - len(self._jobs) - self._starting
                if self._claiming and free > 0:
                    for job in await self.queue.reclaim(self.consumer, self.lease_s, free):
                        await self._begin(job, takeover=True)
                metrics.queue_depth.set(await self.queue.depth())
            except QueueError as exc:
                logger.warning("worker tick: %s", exc)
            except Exception:  # one bad job must not stop the beat of the others
                logger.exception("worker tick failed")
            metrics.generations_active.set(len(self._jobs))

    async def _begin(self, job: Job, *, takeover: bool) -> None:
        self._starting += 1
        try:
            await self._run(job, takeover=takeover)
        except StreamingError as exc:
            logger.warning("stream %s: cannot start it: %s", job.stream_id, exc)
        except Exception:
            logger.exception("stream %s: cannot start it", job.stream_id)
        finally:
            self._starting -= 1

    async def _run(self, job: Job, *, takeover: bool) -> None:
        services = self.services
        try:
            info, request = decode_job(job.payload)
        except ValueError as exc:
            logger.error("job %s: %s; dropped", job.id, exc)
            await self.queue.ack(job)
            return
        log = services.log
        epoch = await log.take(info.id, self.lease_s)
        if epoch in (0, -2):  # ended, or gone (expired, or never created)
            await self.queue.ack(job)
            return
        if epoch < 0:  # its owner is alive after all; let the next look find it idle
            if takeover:
                await self.queue.release(self.consumer, [job])
            return
        events: list[Event] = []
        # The first owner finds nothing written: reading would cost a round trip.
        while epoch > 1 and (
            batch := await log.read(info.id, events[-1].id if events else 0, limit=5000)
        ):
            events.extend(batch)
        if events and events[-1].terminal:
            # It ended, but its worker stopped before recording that (or settling it).
            outcome = terminal_outcome(events[-1])
            await log.finish(info.id, outcome.status, epoch=epoch)
            await services.accounting.stream_lost(info, outcome)
            await self.queue.ack(job)
            return
        resume = resume_point(info, events, time.time()) if epoch > 1 else None
        if epoch > 1:
            services.metrics.takeovers.inc()
            logger.warning(
                "stream %s: taking it over (epoch %d) after %d events",
                info.id,
                epoch,
                len(events),
            )
        if resume is not None and epoch > self.max_takeovers + 1:
            await self._give_up(
                info, job, epoch, resume, "the stream was taken over too many times; retry"
            )
            return
        try:
            generation = build_generation(services, info, request, resume)
        except ProblemError as exc:  # e.g. a model this worker's config does not have
            logger.error("stream %s: cannot run it here: %s", info.id, exc.detail)
            where = resume or resume_point(info, [], time.time())
            await self._give_up(info, job, epoch, where, exc.detail, code=exc.code)
            return
        if info.billing:
            services.accounting.hold(info.id, Reservation.from_json(info.billing))
        self._jobs[info.id] = job
        services.metrics.streams_active.labels("streams").inc()

        async def ended(how: str) -> None:
            self._jobs.pop(info.id, None)
            self._slot.set()
            if how == "finished":
                await self.queue.ack(job)
                return
            if how == "unrecorded":
                # Settled and counted, but its end is not recorded: the job stays, and
                # whoever takes it over after the lease records the end from the log.
                return
            # Left to another owner, unsettled: whoever ends it settles and counts it.
            services.accounting.forget(info.id)
            services.metrics.streams_active.labels("streams").dec()
            if how == "fenced":
                services.metrics.fenced.inc()
                return
            if how == "unwritable":
                services.metrics.stepped_back.inc()
            try:  # for a takeover now rather than once the job's lease runs out
                await self.queue.release(self.consumer, [job])
            except QueueError as exc:
                logger.warning("stream %s: cannot release its job: %s", info.id, exc)

        services.manager.run(info, generation, epoch=epoch, on_end=ended)

    async def _give_up(
        self,
        info: StreamInfo,
        job: Job,
        epoch: int,
        resume: Resume,
        message: str,
        *,
        code: str = "stream_lost",
    ) -> None:
        """End a stream this worker cannot run (taken over too many times: each of its
        workers died on it; or not runnable here) with an error, billed for what its
        log shows."""
        services = self.services
        outcome = logged_outcome(info, resume, code)
        end = EventEncoder(resume.last_id)(
            "error",
            {
                "code": code,
                "message": message,
                "retryable": code == "stream_lost",
                "usage": {
                    "input_tokens": outcome.input_tokens,
                    "output_tokens": outcome.output_tokens,
                },
                "cost_usd": outcome.cost_usd,
            },
        )
        outcome.status = "lost" if code == "stream_lost" else "error"
        await services.log.append(info.id, [end], epoch=epoch)
        await services.log.finish(info.id, outcome.status, epoch=epoch)
        await services.accounting.stream_lost(info, outcome)
        await self.queue.ack(job)
