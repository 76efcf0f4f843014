"""Any OpenAI-compatible chat-completions server (vLLM, llama.cpp, Ollama, OpenAI...)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from ..chunks import Chunk, Stop, TextDelta, Usage
from . import _errors
from ._http import HTTPError, Pool, Response
from .base import GenerationRequest

_TAIL_WAIT_S = 0.05

_STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
}


class OpenAIProvider:
    def __init__(
        self,
        name: str,
        *,
        base_url: str,
        api_key: str | None,
        connect_timeout_s: float = 5.0,
        max_connections: int = 1000,
        receive_buffer_bytes: int = 256 * 1024,
    ) -> None:
        self.name = name
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # One pool per provider for the life of the app; read timeouts are enforced by
        # the pipeline (first token / between chunks), not by the client.
        self._pool = Pool(
            base_url,
            headers={**headers, "content-type": "application/json"},
            max_connections=max_connections,
            connect_timeout_s=connect_timeout_s,
            receive_buffer_bytes=receive_buffer_bytes,
        )

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        return None

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.extend({"role": m.role, "content": m.content} for m in request.messages)
        if request.prefill:
            messages.append({"role": "assistant", "content": request.prefill})
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.prefill:
            # vLLM / SGLang: extend the final assistant message instead of starting a new
            # turn after it (the chat template leaves that message open).
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop"] = list(request.stop)
        return body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        payload = json.dumps(self._body(request)).encode()
        try:
            async with self._pool.stream(
                "POST", "/chat/completions", payload, request.headers
            ) as response:
                if response.status != 200:
                    raise await _failed(response)
                # Accepted: from here the provider bills the prompt, whatever happens
                # next (its counts come only at the end, if the stream gets there).
                yield Usage()
                # Bytes split into lines as they arrive (splitting bytes skips two layers
                # of text decoding per network read), each line parsed at once.
                reader = _Reader()
                body = response.aiter()
                buffer = b""
                async for data in body:
                    buffer += data
                    if b"\n" not in data:
                        continue
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        for chunk in reader.line(line):
                            yield chunk
                        if reader.stop is not None:
                            await _finish_body(body)
                            yield reader.stop
                            return
                for chunk in reader.line(buffer):  # a last line without its newline
                    yield chunk
                if reader.stop is None:
                    # The body ended without [DONE]: never pass a truncated answer off
                    # as complete.
                    raise _errors.dropped_error()
                yield reader.stop
        except HTTPError as exc:
            if exc.mid_body:
                raise _errors.dropped_error() from exc
            raise _errors.connection_error(str(exc)) from exc

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self._pool.aclose()


async def _failed(response: Response) -> Exception:
    try:
        body = await response.aread()
    except HTTPError:
        body = b""
    message = f"provider answered {response.status}"
    kind = None
    try:
        error = json.loads(body).get("error") or {}
        message = str(error.get("message") or message)
        kind = error.get("type")
    except (ValueError, AttributeError):
        pass
    return _errors.status_error(
        response.status,
        message,
        retry_after=_errors.parse_retry_after(response.headers),
        kind=kind if isinstance(kind, str) else None,
    )


async def _finish_body(body: AsyncIterator[bytes]) -> None:
    """Read what follows `[DONE]` (normally just the end of the chunked body): a response
    read to its end returns its connection to the pool, one closed early costs the next
    stream a new TCP (and TLS) handshake. A server that keeps the body open is not waited
    for."""
    try:
        async with asyncio.timeout(_TAIL_WAIT_S):
            async for _ in body:
                pass
    except (TimeoutError, HTTPError):
        pass


class _Reader:
    """The chunks of an OpenAI stream, line by line: a plain method per line, so that a
    token costs the stream's one generator a resumption, not three stacked ones (reading,
    splitting lines, parsing), which is what relaying a token at 50 tokens/s mostly is."""

    __slots__ = ("finish", "stop")

    def __init__(self) -> None:
        self.finish: str | None = None
        self.stop: Stop | None = None
        """Set at `[DONE]`: the stream is complete."""

    def line(self, line: bytes) -> list[Chunk]:
        """The chunks of one line (a `\\r` before its newline goes with the payload's
        surrounding whitespace)."""
        if not line.startswith(b"data:"):
            return []  # comments, event names and blank separators carry nothing here
        payload = line[5:].strip()
        if payload == b"[DONE]":
            finish = self.finish
            self.stop = Stop(_STOP_REASONS.get(finish or "stop", finish or "end_turn"))
            return []
        try:
            data = json.loads(payload)
        except ValueError as exc:
            raise _errors.protocol_error("the provider sent a line that is not JSON") from exc
        if not isinstance(data, dict):
            raise _errors.protocol_error("the provider sent an unexpected chunk")
        if "error" in data:
            error = data["error"] or {}
            raise _errors.status_error(
                503, str(error.get("message") or "provider error"), kind=error.get("type")
            )
        out: list[Chunk] = []
        for choice in data.get("choices") or ():
            text = (choice.get("delta") or {}).get("content")
            if text:
                out.append(TextDelta(text, 1))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        usage = data.get("usage")
        if usage:
            out.append(Usage(usage.get("prompt_tokens"), usage.get("completion_tokens")))
        return out
