"""Anthropic Messages API through the official SDK.

The SDK's own retries are off: retry policy lives in one place (the pipeline's upstream
reader) so that it can stop retrying the moment anything has been relayed.

The SDK's public surface is used (`anthropic.Timeout`, `DefaultAsyncHttpxClient`,
`DEFAULT_CONNECTION_LIMITS`), and its HTTP library only through it: which library that
is (httpx, then httpx2) is the SDK's business and changes with it. One thing the SDK does
not offer is a bounded receive buffer per connection, so its transport is built here,
from the library its client class derives from, with the SDK's keep-alive options and
`SO_RCVBUF`. Why it matters: when a stream's consumer stops reading, the relay stops
reading the provider, but the library's next read moves everything the kernel had
received (autotuned up to several MB on a fast link) into the process at once, where it
waits for the consumer. With the buffer fixed, a stalled stream holds at most that much.
"""

from __future__ import annotations

import importlib
import socket
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import anthropic

from ..chunks import Chunk, Stop, TextDelta, Usage
from . import _errors
from .base import GenerationRequest

_MIN_RECEIVE_BUFFER = 128 * 1024
"""The library sets its socket options once connected, after the connection has
advertised a window from the kernel's default buffer (128 KiB on Linux). Shrunk below
that, a connection can stop receiving under a fast sender (seen on loopback at 16 KiB:
the stream stalled until its idle timeout), so the buffer is never made smaller."""


class AnthropicProvider:
    def __init__(
        self,
        name: str,
        *,
        base_url: str | None,
        api_key: str | None,
        connect_timeout_s: float = 5.0,
        max_connections: int = 1000,
        receive_buffer_bytes: int = 0,
    ) -> None:
        """`receive_buffer_bytes`: each upstream connection's kernel receive buffer
        (`SO_RCVBUF`, at least `_MIN_RECEIVE_BUFFER`; 0 leaves it to the kernel's
        autotuning)."""
        self.name = name
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key or "missing-key",
            base_url=base_url,
            max_retries=0,
            timeout=anthropic.Timeout(None, connect=connect_timeout_s),
            http_client=_http_client(max_connections, receive_buffer_bytes),
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


def _http_client(max_connections: int, receive_buffer_bytes: int) -> Any:
    limits = type(anthropic.DEFAULT_CONNECTION_LIMITS)(
        max_connections=max_connections, max_keepalive_connections=100
    )
    if not receive_buffer_bytes or urllib.request.getproxies():
        # A proxy from the environment is routed by the SDK's own client, which only
        # does so when it builds its transports itself.
        return anthropic.DefaultAsyncHttpxClient(limits=limits)
    library = next(
        importlib.import_module(cls.__module__.partition(".")[0])
        for cls in anthropic.DefaultAsyncHttpxClient.__mro__
        if not cls.__module__.startswith("anthropic")
    )
    options: list[tuple[int, int, int]] = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.SOL_SOCKET, socket.SO_RCVBUF, max(receive_buffer_bytes, _MIN_RECEIVE_BUFFER)),
    ]
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 60), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, name):  # as the SDK's own client sets them
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    transport = library.AsyncHTTPTransport(limits=limits, socket_options=options)
    return anthropic.DefaultAsyncHttpxClient(limits=limits, transport=transport)


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
