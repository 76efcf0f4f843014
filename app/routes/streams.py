"""Streams: start one, read it (live or resumed), poll it, cancel it; and the direct
route that streams straight into its own response."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streaming import Event, Outcome, StreamInfo, StreamNotFound, follow

from ..errors import ProblemError
from ..generation import start
from ..schemas import clean
from ..security import authorize, principal, stream_reader
from ..services import Services
from ..sse import SSEResponse

# Sent to readers still open when a draining server closes: EventSource reconnects by
# itself (with Last-Event-ID), to another replica, and resumes from the shared log.
RECONNECT = b'event: reconnect\ndata: {"reason":"shutdown"}\n\n'


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


async def create_stream(request: Request) -> Response:
    caller = await principal(request)
    services = _services(request)
    info, generation = await start(request, caller, "s_")
    stream_id = info.id
    try:
        await services.manager.launch(info, generation)
    except BaseException:  # cancelled too: a reservation must never outlive its request
        await asyncio.shield(services.settle(info.id, Outcome()))  # nothing was used
        raise
    services.metrics.stream_started("streams", info.plan, info.model)
    ticket, expires = services.tickets.issue(stream_id, caller.subject, caller.plan)
    return JSONResponse(
        _links(request, stream_id, ticket, expires),
        status_code=201,
        headers={"Location": f"/v1/streams/{stream_id}"},
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
        if not value.isdigit() or len(value) > 18:
            raise ProblemError(
                400, "invalid_last_event_id", "Last-Event-ID must be a non-negative integer"
            )
        after = max(after, int(value))
    return after


async def _frames(
    batches: AsyncGenerator[list[Event], None], sent: Callable[[str], None]
) -> AsyncIterator[bytes]:
    """One write per group of events produced together. The groups are closed when the
    response ends, not when collected: closing a generation's batches cancels upstream."""
    async with aclosing(batches):
        async for batch in batches:
            for event in batch:
                sent(event.name)
            yield b"".join([event.frame() for event in batch])


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
    return SSEResponse(
        _frames(events, services.metrics.sent),
        ping_s=services.settings.ping_interval_s,
        retry_ms=services.settings.retry_ms,
        stop=services.stopping,
        stop_frame=lambda: RECONNECT,
    )


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
                text.append(event.json()["text"])
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
    caller = await principal(request)
    services = _services(request)
    info, generation = await start(request, caller, "c_")
    services.metrics.stream_started("chat", info.plan, info.model)

    async def finished() -> None:
        # Closed or cancelled before the end: the client left, and closing the
        # generation has already cancelled the upstream request.
        try:
            if generation.outcome.status == "running":
                generation.end("client_gone", error_code="client_gone")
            await asyncio.shield(services.stream_finished("chat", info, generation))
        finally:
            services.direct_streams -= 1  # only once its usage is settled

    def shutdown() -> bytes:
        return generation.abort(
            "shutdown", "the server is shutting down; retry", retryable=True
        ).frame()

    services.direct_streams += 1
    return SSEResponse(
        _frames(generation.batches(), services.metrics.sent),
        ping_s=services.settings.ping_interval_s,
        on_close=finished,
        stop=services.stopping,
        stop_frame=shutdown,
    )


async def feedback(request: Request) -> Response:
    """The user's judgement of an answer, attached to the stream's request record."""
    caller = await authorize(request)
    services = _services(request)
    stream_id = request.path_params["stream_id"]
    record = await services.records.get(stream_id)
    if record is None or record["subject"] != caller.subject:
        raise ProblemError(404, "record_not_found", "no finished stream with this id")
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise ProblemError(400, "invalid_json", "the body is not valid JSON") from exc
    if not isinstance(body, dict) or set(body) - {"rating", "correct", "comment"}:
        raise ProblemError(
            422, "invalid_request", "the body may only have rating, correct, comment"
        )
    rating = body.get("rating")
    if not (rating in ("up", "down") or (isinstance(rating, int) and 1 <= rating <= 5)):
        raise ProblemError(422, "invalid_request", "rating must be up, down, or 1 to 5")
    correct = body.get("correct")
    comment = body.get("comment")
    if correct is not None and not isinstance(correct, bool):
        raise ProblemError(422, "invalid_request", "correct must be true or false")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 2000):
        raise ProblemError(
            422, "invalid_request", "comment must be text of at most 2000 characters"
        )
    entry = {
        "rating": rating,
        "correct": correct,
        "comment": clean(comment) if comment else None,
        "at": time.time(),
    }
    await services.records.attach_feedback(stream_id, entry)
    services.metrics.feedback.labels(str(rating)).inc()
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
