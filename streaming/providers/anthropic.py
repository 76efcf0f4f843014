"""Anthropic Messages API through the official SDK.

The SDK's own retries are off: retry policy lives in one place (the pipeline's upstream
reader) so that it can stop retrying the moment anything has been relayed.

Only the SDK's public surface is used (`anthropic.Timeout`, `DefaultAsyncHttpxClient`,
`DEFAULT_CONNECTION_LIMITS`), never the HTTP library underneath it, which is the SDK's own
business and changes with it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic

from ..chunks import Chunk, Stop, TextDelta, Usage
from . import _errors
from .base import GenerationRequest


class AnthropicProvider:
    def __init__(
        self,
        name: str,
        *,
        base_url: str | None,
        api_key: str | None,
        connect_timeout_s: float = 5.0,
        max_connections: int = 1000,
    ) -> None:
        self.name = name
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or "missing-key",
            base_url=base_url,
            max_retries=0,
            timeout=anthropic.Timeout(None, connect=connect_timeout_s),
            http_client=anthropic.DefaultAsyncHttpxClient(
                limits=type(anthropic.DEFAULT_CONNECTION_LIMITS)(
                    max_connections=max_connections, max_keepalive_connections=100
                ),
            ),
        )

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        return None

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if request.prefill:
            # A final assistant message is a prefill: the model writes what follows it,
            # and only that is streamed back.
            messages.append({"role": "assistant", "content": request.prefill})
        kwargs: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
            "stream": True,
        }
        if request.system:
            kwargs["system"] = request.system
        if request.temperature is not None:
            kwargs["temperature"] = request.temperature
        if request.stop:
            kwargs["stop_sequences"] = list(request.stop)
        if request.headers:
            kwargs["extra_headers"] = dict(request.headers)
        try:
            events = await self._client.messages.create(**kwargs)
        except anthropic.APIStatusError as exc:
            raise _status_error(exc) from exc
        except anthropic.APIConnectionError as exc:
            raise _errors.connection_error(f"cannot reach the provider: {exc.message}") from exc
        except (ValueError, anthropic.APIResponseValidationError) as exc:
            raise _errors.protocol_error("the provider sent an unreadable event") from exc
        stopped = False
        stop_reason = "end_turn"
        try:
            async for event in events:
                kind = event.type
                if kind == "content_block_delta":
                    text = getattr(event.delta, "text", None)
                    if text:
                        yield TextDelta(text, 1)
                elif kind == "message_start":
                    yield Usage(input_tokens=event.message.usage.input_tokens)
                elif kind == "message_delta":
                    stop_reason = event.delta.stop_reason or stop_reason
                    yield Usage(output_tokens=event.usage.output_tokens)
                elif kind == "message_stop":
                    stopped = True
        except anthropic.APIStatusError as exc:  # an `error` event in the stream
            raise _status_error(exc) from exc
        except (ValueError, anthropic.APIResponseValidationError) as exc:
            raise _errors.protocol_error("the provider sent an unreadable event") from exc
        except anthropic.APIConnectionError as exc:
            # The response had begun: a failed read of its body is a dropped stream, not
            # an unreachable provider (newer SDKs wrap the transport's error in this).
            raise _errors.dropped_error() from exc
        except anthropic.AnthropicError:
            raise
        except Exception as exc:
            # Older SDKs let their transport's errors through unwrapped once the response
            # has started (a reset, a truncated chunk): the stream dropped.
            raise _errors.dropped_error() from exc
        finally:
            await events.close()
        if not stopped:
            raise _errors.dropped_error()
        yield Stop(stop_reason)

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        await self._client.close()


def _status_error(exc: anthropic.APIStatusError) -> Exception:
    # A mid-stream `error` event arrives as a plain APIStatusError carrying the HTTP 200
    # of the stream; the real cause is in body.error.type.
    kind = None
    message = exc.message
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            kind = error.get("type") if isinstance(error.get("type"), str) else None
            message = str(error.get("message") or message)
    status = exc.status_code
    if status == 200:
        status = 529 if kind == "overloaded_error" else 503
    retry_after = _errors.parse_retry_after(dict(exc.response.headers))
    return _errors.status_error(status, message, retry_after=retry_after, kind=kind)
