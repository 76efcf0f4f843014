"""`GET /v1/events`: many streams' events on one SSE connection.

Over HTTP/1.1 a browser opens at most six connections per host. A page following more
streams than that with one EventSource each leaves the extra ones queued in the browser:
the server sees no reader and cancels them after the orphan grace. One connection that
carries every stream of the page avoids that (and costs one socket instead of many).

    GET /v1/events?streams=s_a,s_b[&tickets=t_a,t_b][&last_event_id=s_a:12,s_b:7]

- Every event is the stream's own event, its JSON data with `"stream_id"` first.
- Every `id:` is the composite cursor after that event: `<stream id>:<last event id>`
  for each stream that has delivered anything, comma-separated, in the order of
  `streams`. A stream not named is at 0 (nothing delivered yet).
- `Last-Event-ID` (what EventSource sends on its own reconnects) and the `last_event_id`
  query parameter (what a fresh EventSource can say) are that cursor; per stream the
  larger id wins. Each stream is replayed after its own id, then followed live.
- Credentials: a Bearer token or the session cookie, as on every route; or `tickets`,
  the streams' own tickets (one per stream, in the order of `streams`, each verified for
  its own stream, all issued to one subject). No new kind of credential: a leaked URL
  opens those streams, for as long as their tickets live, and nothing else.
- Each stream must be the caller's (anyone else's answers 404, like a missing one); at
  most `MAX_STREAMS`, each named once.
- The connection ends once every stream has sent its terminal event (`done` or
  `error`); if the cursor says the client already has every one, the answer is 204,
  which makes EventSource stop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from auth import NotAuthenticated, Principal
from streaming import (
    Event,
    StreamInfo,
    StreamingError,
    StreamNotFound,
    cancel_and_wait,
    follow,
)

from ..errors import ProblemError
from ..limits import report, stash
from ..security import bearer_token, principal
from ..services import Services
from ..sse import SSEResponse
from .streams import LOG_UNAVAILABLE, RECONNECT, keep_attached

logger = logging.getLogger("sserelay.events")

MAX_STREAMS = 32
"""Streams one connection may carry."""

_STREAM_ID = re.compile(r"s_[0-9A-Za-z]{1,64}")
_CURSOR_ENTRY = re.compile(r"(s_[0-9A-Za-z]{1,64}):([0-9]{1,18})")
_MAX_QUERY_VALUE = 16_384  # tickets are ~250 bytes each: 32 of them fit
# The payload of the single-stream route's "stream log unavailable" error, reused here.
_LOG_UNAVAILABLE_DATA = LOG_UNAVAILABLE.split(b"data: ", 1)[1].rstrip(b"\n")


def _invalid(parameter: str, message: str) -> ProblemError:
    return ProblemError(
        "invalid_request",
        message,
        extra={"errors": [{"field": f"query.{parameter}", "message": message}]},
    )


def _one(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _invalid(name, f"give {name} once")
    if values and len(values[0]) > _MAX_QUERY_VALUE:
        raise _invalid(name, f"{name} is too long")
    return values[0] if values else None


def stream_ids(request: Request) -> list[str]:
    raw = _one(request, "streams")
    if not raw:
        raise _invalid("streams", "name the streams to follow: ?streams=<id>,<id>")
    ids = raw.split(",")
    if len(ids) > MAX_STREAMS:
        raise _invalid("streams", f"at most {MAX_STREAMS} streams per connection")
    for i, stream_id in enumerate(ids):
        if not _STREAM_ID.fullmatch(stream_id):
            raise _invalid("streams", f"streams[{i}] is not a stream id")
    if len(set(ids)) != len(ids):
        raise _invalid("streams", "name each stream once")
    return ids


def parse_cursor(value: str, streams: list[str]) -> dict[str, int]:
    """`s_a:12,s_b:7` -> {s_a: 12, s_b: 7}; only streams of this connection, each once."""
    bad = ProblemError(
        "invalid_last_event_id",
        "Last-Event-ID must be <stream id>:<event id>, comma-separated, "
        "naming only streams of this connection, each once",
    )
    entries = value.split(",")
    if len(entries) > len(streams):
        raise bad
    out: dict[str, int] = {}
    for entry in entries:
        match = _CURSOR_ENTRY.fullmatch(entry)  # ASCII digits only: "²".isdigit() is True
        if match is None or match[1] not in streams or match[1] in out:
            raise bad
        out[match[1]] = int(match[2])
    return out


def _resume_points(request: Request, streams: list[str]) -> dict[str, int]:
    """Per stream, the larger of the header's and the query's ids."""
    after = dict.fromkeys(streams, 0)
    for value in (request.headers.get("last-event-id"), _one(request, "last_event_id")):
        if value:
            for stream_id, last in parse_cursor(value, streams).items():
                after[stream_id] = max(after[stream_id], last)
    return after


async def _reader(request: Request, services: Services, streams: list[str]) -> Principal:
    """Bearer or cookie as anywhere; or one ticket per stream, all for one subject."""
    raw = _one(request, "tickets")
    if raw is None:
        caller = await principal(request)
    else:
        tickets = raw.split(",")
        if len(tickets) != len(streams):
            raise NotAuthenticated(
                "send one ticket per stream, in the order of `streams`", code="invalid_ticket"
            )
        callers = [services.tickets.verify(t, s) for t, s in zip(tickets, streams, strict=True)]
        caller = callers[0]
        if any(c.subject != caller.subject for c in callers):
            raise NotAuthenticated(
                "the stream tickets were issued to different subjects", code="invalid_ticket"
            )
        token = bearer_token(request)
        if token is not None and (await services.verifier.verify(token)).subject != caller.subject:
            raise NotAuthenticated(
                "the stream tickets were issued to someone else", code="invalid_ticket"
            )
    if caller.plan in services.config.plans:
        stash(request.scope, await report(services, caller))
    return caller


async def _complete(services: Services, info: StreamInfo, after: int) -> bool:
    """The client already has every event of this ended stream, terminal included."""
    if not after or info.status == "running":
        return False
    return not await services.log.read(info.id, after, limit=1)


def _tagged(stream_id: bytes, data: bytes) -> bytes:
    """The event's stored JSON with `"stream_id"` first, spliced rather than re-encoded.
    `start` carries it already (first)."""
    if data.startswith(b'{"stream_id":'):
        return data
    if data == b"{}":
        return b'{"stream_id":"%s"}' % stream_id
    return b'{"stream_id":"%s",%s' % (stream_id, data[1:])


class Cursor:
    """Every stream's last delivered id, rendered as the composite `id:`."""

    __slots__ = ("_parts",)

    def __init__(self, streams: list[str], after: dict[str, int]) -> None:
        self._parts = {s: b"%s:%d" % (s.encode(), after[s]) if after[s] else b"" for s in streams}

    def advance(self, stream_id: str, event_id: int) -> bytes:
        self._parts[stream_id] = b"%s:%d" % (stream_id.encode(), event_id)
        return b",".join([part for part in self._parts.values() if part])


async def _next(batches: AsyncGenerator[list[Event], None]) -> list[Event] | None:
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


async def multiplexed(
    followers: dict[str, AsyncGenerator[list[Event], None]],
    cursor: Cursor,
    sent: Callable[[str], None],
) -> AsyncIterator[bytes]:
    """Every stream's batches as they come, one write per wake-up. At most one batch per
    stream is in flight, so a slow client slows its streams' reading, not the server's
    memory. Closing this closes every follower.
    One stream's end is not the connection's, which ends when this iterator does (the
    response is told so: `ends_on_terminal=False`)."""
    order = {stream_id: i for i, stream_id in enumerate(followers)}
    encoded = {stream_id: stream_id.encode() for stream_id in followers}
    pending: dict[asyncio.Task[list[Event] | None], str] = {}

    def ask(stream_id: str) -> None:
        pending[asyncio.create_task(_next(followers[stream_id]))] = stream_id

    try:
        for stream_id in followers:
            ask(stream_id)
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            out: list[bytes] = []
            for task in sorted(done, key=lambda t: order[pending[t]]):
                stream_id = pending.pop(task)
                sid = encoded[stream_id]
                try:
                    batch = task.result()
                except StreamingError as exc:
                    # Its log failed under this reader: a terminal, retryable error with
                    # no id (the cursor stays on its last real event); the others go on.
                    logger.warning("a reader's stream log failed: %s", exc)
                    sent("error")
                    out.append(b"event: error\ndata: %s\n\n" % _tagged(sid, _LOG_UNAVAILABLE_DATA))
                    continue
                if not batch:
                    continue  # ended without a terminal event: nothing more to read
                for event in batch:
                    sent(event.name)
                    out.append(
                        b"id: %s\nevent: %s\ndata: %s\n\n"
                        % (
                            cursor.advance(stream_id, event.id),
                            event.name.encode(),
                            _tagged(sid, event.data),
                        )
                    )
                if not batch[-1].terminal:
                    ask(stream_id)
            if out:
                yield b"".join(out)
    finally:
        try:
            await cancel_and_wait(list(pending))  # a cancelled read ends its follower too
        finally:
            for batches in followers.values():
                await batches.aclose()


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def events(request: Request) -> Response | SSEResponse:
    services = _services(request)
    streams = stream_ids(request)
    caller = await _reader(request, services, streams)
    infos = await asyncio.gather(*(services.log.info(s) for s in streams))
    owned = [info for info in infos if info is not None and info.owner == caller.subject]
    if len(owned) != len(streams):
        raise StreamNotFound("no such stream")  # someone else's answers like a missing one
    after = _resume_points(request, streams)
    if any(after.values()):
        services.metrics.resumes.inc()
    complete = await asyncio.gather(*(_complete(services, i, after[i.id]) for i in owned))
    live = [info.id for info, done in zip(owned, complete, strict=True) if not done]
    if not live:
        return Response(status_code=204)  # the client has it all: EventSource stops
    settings = services.settings
    grace = settings.orphan_grace_s
    followers = {s: follow(services.log, s, after[s], grace_s=grace) for s in live}
    # A connection whose writes are stalled is still a reader of every stream on it.
    touches = [keep_attached(services, s, grace) for s in live]

    def touch_all() -> None:
        for touch in touches:
            touch()

    return SSEResponse(
        multiplexed(followers, Cursor(streams, after), services.metrics.sent),
        ping_s=settings.ping_interval_s,
        retry_ms=settings.retry_ms,
        stop=services.drain.stopping,
        stop_frame=lambda: RECONNECT,
        open_responses=services.drain.open_responses,
        send_timeout_s=settings.send_timeout_s,
        on_stall=touch_all,
        stall_tick_s=grace / 3,
        ends_on_terminal=False,
    )


routes = [Route("/v1/events", events, methods=["GET"])]
