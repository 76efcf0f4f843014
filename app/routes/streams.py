"""Streams: start one, read it (live or resumed), poll it, cancel it; and the direct
route that streams straight into its own response."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streaming import (
    Event,
    StreamFenced,
    StreamInfo,
    StreamingError,
    StreamNotFound,
    encode_data,
    follow,
)

from ..body import read_body
from ..errors import ProblemError
from ..generation import Started, cache_headers, log_replay, open_direct, start
from ..jobs import encode_job
from ..limits import stash
from ..middleware import request_id_of
from ..schemas import CompletionRequest, Feedback
from ..security import authorize, principal, stream_reader
from ..services import Services
from ..sse import SSEResponse

logger = logging.getLogger("sserelay.streams")

# Sent to readers still open when a draining server closes: EventSource reconnects by
# itself (with Last-Event-ID), to another replica, and resumes from the shared log.
RECONNECT = b'event: reconnect\ndata: {"reason":"shutdown"}\n\n'

# Sent (without an id, so Last-Event-ID stays on the last real event) to a reader whose
# stream log cannot be read: its connection ends with a terminal, retryable event.
LOG_UNAVAILABLE = b"event: error\ndata: %s\n\n" % encode_data(
    {
        "code": "stream_log_unavailable",
        "message": "stream storage is unavailable; retry shortly",
        "retryable": True,
    }
)

_EVENT_ID = re.compile(r"[0-9]{1,18}")


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _links(request: Request, stream_id: str, ticket: str, expires: int) -> dict[str, Any]:
    return {
        "id": stream_id,
        "events_url": f"/v1/streams/{stream_id}/events?ticket={ticket}",
        "status_url": f"/v1/streams/{stream_id}",
        "ticket": ticket,
        "expires_at": expires,
    }


async def _owned(services: Services, stream_id: str, subject: str) -> StreamInfo:
    """Someone else's stream answers exactly like a missing one."""
    info = await services.log.info(stream_id)
    if info is None or info.owner != subject:
        raise StreamNotFound("no such stream")
    return info


async def _start(request: Request, prefix: str) -> tuple[Services, Started]:
    caller = await principal(request)
    services = _services(request)
    body = await read_body(request, CompletionRequest, max_bytes=services.settings.max_body_bytes)
    started = await start(
        services,
        caller,
        body,
        request_id_of(request.scope),
        prefix,
        cache_control=request.headers.get("cache-control"),
    )
    stash(request.scope, started.decision)
    return services, started


async def create_stream(request: Request) -> Response:
    """Register the stream and queue its generation for a worker (this process, when it
    has the worker role and a free slot, or any other). A cache hit needs no worker:
    the stream is written whole, from the cached answer, before the 201."""
    services, started = await _start(request, "s_")
    info = started.info
    stream_id = info.id
    reservation = started.decision.reservation if started.decision is not None else None
    if started.cached is not None:
        try:
            await log_replay(services, started)
        except BaseException:  # nothing was used (the limiter settles a reservation once)
            if reservation is not None:
                await asyncio.shield(services.accounting.refund(stream_id, reservation))
            raise
        return _created(request, services, started)
    try:
        # The stream first, then its job: a worker never finds a job without its stream
        # (with Redis Cluster they are on different nodes; one pipeline cannot hold both).
        await services.manager.create(info)
        try:
            payload = encode_job(info, started.request)
            await services.queue.submit(stream_id, payload, now=time.time())
        except BaseException as exc:
            # Nobody will generate it: end it, so no reader waits for it. Unless the job
            # did land (a timeout after Redis applied it) and a worker took the stream:
            # then it runs, and this request answers as if nothing had happened.
            try:
                await asyncio.shield(services.log.finish(stream_id, "error", epoch=0))
            except StreamFenced:
                queued = True
            else:
                queued = False
            if not queued or not isinstance(exc, Exception):
                raise
    except BaseException:  # cancelled too: a reservation must never outlive its request
        if reservation is not None:  # nothing was used
            await asyncio.shield(services.accounting.refund(stream_id, reservation))
        raise
    if reservation is not None:  # its lease lives on while it waits for a worker
        services.accounting.hold_queued(stream_id, reservation)
    services.metrics.stream_started("streams", info.plan, info.model, active=False)
    return _created(request, services, started)


def _created(request: Request, services: Services, started: Started) -> Response:
    info = started.info
    ticket, expires = services.tickets.issue(info.id, info.owner, info.plan)
    return JSONResponse(
        _links(request, info.id, ticket, expires),
        status_code=201,
        headers={"Location": f"/v1/streams/{info.id}", **cache_headers(started)},
    )


def _last_event_id(request: Request) -> int:
    """Where to resume. EventSource sends the header on its own reconnects; a fresh
    EventSource can only say it in the query. When both are present the larger wins:
    the header is then newer than the URL it reconnects to."""
    values = [request.headers.get("last-event-id"), request.query_params.get("last_event_id")]
    after = 0
    for value in values:
        if value is None or value == "":
            continue
        if not _EVENT_ID.fullmatch(value):  # ASCII digits only: "²".isdigit() is True
            raise ProblemError(
                "invalid_last_event_id", "Last-Event-ID must be a non-negative integer"
            )
        after = max(after, int(value))
    return after


async def _frames(
    batches: AsyncGenerator[list[Event], None], sent: Callable[[str], None]
) -> AsyncIterator[bytes]:
    """One write per group of events produced together. The groups are closed when the
    response ends, not when collected: closing a generation's batches cancels upstream.
    A stream log that fails under a reader ends its response with a terminal, retryable
    `error` rather than a connection cut with no last word."""
    async with aclosing(batches):
        try:
            async for batch in batches:
                for event in batch:
                    sent(event.name)
                yield b"".join([event.frame() for event in batch])
        except StreamingError as exc:
            logger.warning("a reader's stream log failed: %s", exc)
            sent("error")
            yield LOG_UNAVAILABLE


async def stream_events(request: Request) -> Response | SSEResponse:
    stream_id = request.path_params["stream_id"]
    services = _services(request)
    reader = await stream_reader(request, stream_id)
    info = await _owned(services, stream_id, reader.subject)
    after = _last_event_id(request)
    if after:
        services.metrics.resumes.inc()
        if info.status != "running" and not await services.log.read(stream_id, after, limit=1):
            # The client has everything, terminal event included: 204 stops EventSource.
            return Response(status_code=204)

    events = follow(services.log, stream_id, after, grace_s=services.settings.orphan_grace_s)
    grace = services.settings.orphan_grace_s
    return SSEResponse(
        _frames(events, services.metrics.sent),
        ping_s=services.settings.ping_interval_s,
        retry_ms=services.settings.retry_ms,
        stop=services.drain.stopping,
        stop_frame=lambda: RECONNECT,
        open_responses=services.drain.open_responses,
        send_timeout_s=services.settings.send_timeout_s,
        on_stall=keep_attached(services, stream_id, grace),
        stall_tick_s=grace / 3,
    )


def keep_attached(services: Services, stream_id: str, grace_s: float) -> Callable[[], None]:
    """A reader whose connection drains slowly is still a reader: while its writes are
    stalled (up to the send timeout) it keeps the stream from being cancelled as
    orphaned, as reading would."""
    touching: set[asyncio.Task[Any]] = set()

    def done(task: asyncio.Task[Any]) -> None:
        touching.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("cannot mark a slow reader attached: %s", task.exception())

    def touch() -> None:
        task = asyncio.ensure_future(services.log.touch_reader(stream_id, grace_s))
        touching.add(task)
        task.add_done_callback(done)

    return touch


async def stream_status(request: Request) -> Response:
    caller = await authorize(request)
    services = _services(request)
    stream_id = request.path_params["stream_id"]
    info = await _owned(services, stream_id, caller.subject)
    if info.status == "running":
        # Polling is reading: a client on the polling fallback keeps its stream alive.
        await services.log.touch_reader(stream_id, services.settings.orphan_grace_s)
    text: list[str] = []
    body: dict[str, Any] = {**info.as_dict(), "last_event_id": 0}
    after = 0
    while batch := await services.log.read(stream_id, after, limit=5000):
        for event in batch:
            after = event.id
            if event.name == "delta":
                text.append(event.text)
            elif event.name == "progress":
                body["progress"] = event.json()
            elif event.name in ("done", "error"):
                body[event.name] = event.json()
    body["text"] = "".join(text)
    body["last_event_id"] = after
    return JSONResponse(body)


async def cancel_stream(request: Request) -> Response:
    caller = await authorize(request)
    services = _services(request)
    stream_id = request.path_params["stream_id"]
    info = await _owned(services, stream_id, caller.subject)
    if info.status != "running":
        return JSONResponse({"id": stream_id, "status": info.status})
    await services.manager.cancel(stream_id)
    return JSONResponse({"id": stream_id, "status": "cancelling"}, status_code=202)


async def new_ticket(request: Request) -> Response:
    """A fresh ticket for a stream the caller owns: how a page resumes after the ticket
    its EventSource was using expired."""
    caller = await authorize(request)
    services = _services(request)
    stream_id = request.path_params["stream_id"]
    await _owned(services, stream_id, caller.subject)
    ticket, expires = services.tickets.issue(stream_id, caller.subject, caller.plan)
    return JSONResponse(_links(request, stream_id, ticket, expires))


async def chat_stream(request: Request) -> SSEResponse:
    services, started = await _start(request, "c_")
    info = started.info
    generation = await open_direct(services, started)
    drain = services.drain

    async def finished() -> None:
        # Closed or cancelled before the end: the client left, and closing the
        # generation has already cancelled the upstream request.
        try:
            if generation.outcome.status == "running":
                generation.end("client_gone", error_code="client_gone")
            await asyncio.shield(services.accounting.stream_finished("chat", info, generation))
        finally:
            drain.direct_streams -= 1  # only once its usage is settled

    def shutdown() -> bytes:
        return generation.abort(
            "shutdown", "the server is shutting down; retry", retryable=True, status="shutdown"
        ).frame()

    drain.direct_streams += 1
    return SSEResponse(
        _frames(generation.batches(), services.metrics.sent),
        ping_s=services.settings.ping_interval_s,
        headers=cache_headers(started),
        on_close=finished,
        stop=drain.stopping,
        stop_frame=shutdown,
        open_responses=drain.open_responses,
        send_timeout_s=services.settings.send_timeout_s,
    )


async def feedback(request: Request) -> Response:
    """The user's judgement of an answer, attached to the stream's request record."""
    caller = await authorize(request)
    services = _services(request)
    stream_id = request.path_params["stream_id"]
    body = await read_body(request, Feedback, max_bytes=16_384)
    record = await services.records.get(stream_id)
    if record is None or record["subject"] != caller.subject:
        raise ProblemError("record_not_found", "no finished stream with this id")
    entry = {**body.model_dump(), "at": time.time()}
    await services.records.attach_feedback(stream_id, entry)
    services.metrics.feedback.labels(str(body.rating)).inc()
    return JSONResponse({"id": stream_id, "feedback": entry})


routes = [
    Route("/v1/streams/{stream_id}/feedback", feedback, methods=["POST"]),
    Route("/v1/streams", create_stream, methods=["POST"]),
    Route("/v1/streams/{stream_id}", stream_status, methods=["GET"]),
    Route("/v1/streams/{stream_id}", cancel_stream, methods=["DELETE"]),
    Route("/v1/streams/{stream_id}/events", stream_events, methods=["GET"]),
    Route("/v1/streams/{stream_id}/ticket", new_ticket, methods=["POST"]),
    Route("/v1/chat/stream", chat_stream, methods=["POST"]),
]
