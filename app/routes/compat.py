"""The front doors for the official SDKs: `POST /v1/chat/completions` (OpenAI) and
`POST /v1/messages` (Anthropic).

They run the same pipeline as `POST /v1/chat/stream`: the same auth (a JWT or an API
key, in `Authorization` or `x-api-key`), limits, metering, continuation, records and
upstream cancellation when the client leaves. Only the shapes differ (`app/dialects`).

The response waits for the answer's first text (or its end) before committing to a
status: a request the provider refuses before answering (rate limited, overloaded, a bad
parameter) gets the HTTP status the provider's own API would give, which the SDKs act on
(their retries honour 429 and 5xx with `Retry-After`). From the first text on, the
answer streams, and a failure ends it with the dialect's in-stream error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streaming import Event

from ..body import read_body
from ..dialects import Mapped, Transcript
from ..dialects import anthropic as anthropic_dialect
from ..dialects import openai as openai_dialect
from ..errors import DIALECT_KEY, ended_status
from ..generation import DirectGeneration, cache_headers, open_direct, start
from ..limits import stash
from ..middleware import request_id_of
from ..security import principal
from ..services import Services
from ..sse import SSEResponse

B = TypeVar("B", bound=BaseModel)

_BEGUN = frozenset(("delta", "done", "error"))
"""Events after which the status is known: text began, or the stream is over."""


def _shaper(dialect: type[Transcript]) -> Callable[[Response], Response]:
    """Reshapes a problem+json error into `dialect`'s error body (same status and
    headers: `Retry-After`, the rate-limit headers, the Bearer challenge)."""

    def reshape(response: Response) -> Response:
        problem = json.loads(bytes(response.body))
        # Both APIs answer a request they cannot accept with 400 (their SDKs raise
        # BadRequestError); sserelay's own routes say 422 for a body that does not
        # validate.
        status = 400 if response.status_code == 422 else response.status_code
        headers = {
            k: v
            for k, v in response.headers.items()
            if k.lower() not in ("content-type", "content-length")
        }
        body = dialect.error_body(status, problem["code"], problem["detail"])
        return JSONResponse(body, status_code=status, headers=headers)

    return reshape


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (its body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _serve(
    request: Request,
    schema: type[B],
    mapper: Callable[[B], Mapped],
    dialect: type[Transcript],
) -> Response | SSEResponse:
    request.scope[DIALECT_KEY] = _shaper(dialect)
    caller = await principal(request)
    services: Services = request.app.state.services
    body = await read_body(request, schema, max_bytes=services.settings.max_body_bytes)
    mapped = mapper(body)
    started = await start(
        services,
        caller,
        mapped.completion,
        request_id_of(request.scope),
        "c_",
        cache_control=request.headers.get("cache-control"),
    )
    stash(request.scope, started.decision)
    info = started.info
    generation = await open_direct(services, started)
    headers = cache_headers(started)
    drain = services.drain
    drain.direct_streams += 1
    transcript = dialect(
        info.model, include_usage=mapped.include_usage, input_tokens=info.input_tokens
    )

    settled = False

    async def finished() -> None:
        """Once, however the response ends (the settlement and the drain count)."""
        nonlocal settled
        if settled:
            return
        settled = True
        try:
            if generation.outcome.status == "running":
                generation.end("client_gone", error_code="client_gone")
            await asyncio.shield(services.accounting.stream_finished("chat", info, generation))
        finally:
            drain.direct_streams -= 1

    batches = generation.batches()
    try:
        head = await _first(request, batches, whole=not mapped.stream)
    except BaseException:
        await batches.aclose()
        await finished()
        raise
    if head is None:  # the client left before the answer began
        await batches.aclose()
        await finished()
        return Response(status_code=499)
    failed = next((e for batch in head for e in batch if e.name == "error"), None)
    if failed is not None and not any(e.name == "delta" for batch in head for e in batch):
        # Refused before any text: the status the provider's own API would give.
        await batches.aclose()
        await finished()
        data = failed.json()
        code, message = str(data.get("code", "internal_error")), str(data.get("message"))
        status = ended_status(code)
        if status in (429, 503, 529):
            headers = {**headers, "Retry-After": "1"}
        error = dialect.error_body(status, code, message)
        return JSONResponse(error, status_code=status, headers=headers)
    if not mapped.stream:
        await batches.aclose()
        await finished()
        for batch in head:
            transcript.frames(batch)
        if transcript.error is not None:  # failed after text: the answer is lost
            code, message = transcript.error
            status = ended_status(code)
            error = dialect.error_body(status, code, message)
            return JSONResponse(error, status_code=status, headers=headers)
        return JSONResponse(transcript.body(), headers=headers)
    return SSEResponse(
        _frames(head, batches, transcript, services),
        ping_s=services.settings.ping_interval_s,
        on_close=finished,
        stop=drain.stopping,
        stop_frame=lambda: _shutdown(generation, transcript),
        open_responses=drain.open_responses,
        send_timeout_s=services.settings.send_timeout_s,
        ends_on_terminal=False,
        headers=headers,
    )


async def _first(
    request: Request, batches: AsyncGenerator[list[Event], None], *, whole: bool
) -> list[list[Event]] | None:
    """The batches up to the first text or the end (all of them if `whole`), or None if
    the client left first (the generation is then closed, which cancels upstream)."""
    head: list[list[Event]] = []

    async def pull() -> None:
        async for batch in batches:
            head.append(batch)
            if any(e.terminal for e in batch):
                return
            if not whole and any(e.name in _BEGUN for e in batch):
                return

    puller = asyncio.ensure_future(pull())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait((puller, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (puller, watcher):
            task.cancel()
        await asyncio.gather(puller, watcher, return_exceptions=True)
    if puller not in done or puller.cancelled():
        return None
    error = puller.exception()
    if error is not None:
        raise error
    return head


async def _frames(
    head: list[list[Event]],
    batches: AsyncGenerator[list[Event], None],
    transcript: Transcript,
    services: Services,
) -> AsyncIterator[bytes]:
    sent = services.metrics.sent
    async with aclosing(batches):
        for batch in head:
            for event in batch:
                sent(event.name)
            if frame := transcript.frames(batch):
                yield frame
        async for batch in batches:
            for event in batch:
                sent(event.name)
            if frame := transcript.frames(batch):
                yield frame


def _shutdown(generation: DirectGeneration, transcript: Transcript) -> bytes:
    message = "the server is shutting down; retry"
    generation.abort("shutdown", message, retryable=True, status="shutdown")
    return transcript.error_frame("shutdown", message)


async def chat_completions(request: Request) -> Response | SSEResponse:
    return await _serve(
        request,
        openai_dialect.ChatCompletionRequest,
        openai_dialect.map_request,
        openai_dialect.ChatCompletion,
    )


async def messages(request: Request) -> Response | SSEResponse:
    return await _serve(
        request,
        anthropic_dialect.MessagesRequest,
        anthropic_dialect.map_request,
        anthropic_dialect.Message,
    )


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/messages", messages, methods=["POST"]),
]
