"""OpenAI's Chat Completions API: `POST /v1/chat/completions`, streaming or not.

Streaming follows OpenAI's wire format, which its SDK parses: `data:` lines of
`chat.completion.chunk` objects (no event names), the first carrying the role, a last
one the `finish_reason`, then (with `stream_options.include_usage`) a chunk with empty
`choices` and the usage, then `data: [DONE]`. A stream that fails after it started ends
with `data: {"error": {...}}` and no `[DONE]`: the SDK raises instead of returning a
truncated answer as if it were whole.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from streaming.events import json_string

from ..body import validate
from ..errors import ProblemError
from ..schemas import CompletionRequest
from . import (
    Defaults,
    Mapped,
    Transcript,
    data_frame,
    only_keys,
    text_of,
    text_template,
    unsupported,
)

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "refusal": "content_filter",
    "tool_use": "tool_calls",
}
"""sserelay's stop reasons (Anthropic's words) in OpenAI's."""

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}

# Accepted only where they change nothing: anything else cannot be honoured, and is
# refused rather than silently ignored.
_DEFAULTS = Defaults(
    {
        "n": (1,),
        "top_p": (1, 1.0),
        "presence_penalty": (0, 0.0),
        "frequency_penalty": (0, 0.0),
        "logprobs": (False,),
        "tools": ([],),
        "functions": ([],),
        "tool_choice": ("none", "auto"),
        "function_call": ("none", "auto"),
        "parallel_tool_calls": (True, False),
        "response_format": ({"type": "text"},),
        "store": (False,),
        "modalities": (["text"],),
        "service_tier": ("auto", "default"),
        "logit_bias": ({},),
    }
)


_MESSAGE_KEYS = frozenset(("role", "content", "refusal"))
"""What a user or assistant message may carry here (`name` cannot be honoured by every
provider, tool calls not at all)."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatCompletionRequest(BaseModel):
    """The fields sserelay maps; every other field is checked by `_DEFAULTS`."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: str | list[str] | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def map_request(body: ChatCompletionRequest) -> Mapped:
    _DEFAULTS.check(body.model_extra or {})
    system: list[str] = []
    messages: list[dict[str, str]] = []
    for i, message in enumerate(body.messages):
        role = message.get("role")
        where = f"messages[{i}].content"
        if role in ("system", "developer"):
            system.append(text_of(message.get("content"), where))
            continue
        if role not in ("user", "assistant"):
            raise unsupported(f"messages[{i}] with role {role!r}", "only text chat is")
        if message.get("tool_calls") or message.get("function_call"):
            raise unsupported(f"messages[{i}].tool_calls")
        if message.get("audio"):
            raise unsupported(f"messages[{i}].audio")
        only_keys(message, _MESSAGE_KEYS, f"messages[{i}]")
        content = message.get("content")
        if content is None:
            raise ProblemError("invalid_request", f"{where} is required")
        messages.append({"role": role, "content": text_of(content, where)})
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        if body.max_tokens != body.max_completion_tokens:
            raise ProblemError(
                "invalid_request", "give max_tokens or max_completion_tokens, not both"
            )
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    if stream_options_without_stream(body):
        raise ProblemError("invalid_request", "stream_options is only allowed with stream: true")
    metadata: dict[str, str | int | float | bool] = dict(body.metadata or {})
    if body.user is not None:
        metadata["user"] = body.user
    completion = validate(
        CompletionRequest,
        {
            "model": body.model,
            "messages": messages,
            "system": "\n\n".join(system) if system else None,
            "max_tokens": body.max_completion_tokens or body.max_tokens,
            "temperature": body.temperature,
            "stop": stop or None,
            "metadata": metadata or None,
        },
    )
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Mapped(completion, stream=bool(body.stream), include_usage=include_usage)


def stream_options_without_stream(body: ChatCompletionRequest) -> bool:
    return body.stream_options is not None and not body.stream


class ChatCompletion(Transcript):
    name = "openai"
    _template: tuple[str, bytes, bytes] | None = None
    """The stream's id, and its delta chunk before and after the text."""

    @property
    def id(self) -> str:
        return "chatcmpl-" + self.stream_id

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        return data_frame(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
                "usage": None,
            }
        )

    def start_frame(self, data: dict[str, Any]) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def delta_frame(self, text: str) -> bytes:
        # The chunk names the stream, which is known from its start on: made once then.
        if self._template is None or self._template[0] != self.stream_id:
            before, after = text_template(self._chunk({"content": ""}), b'"content":""')
            self._template = (self.stream_id, before, after)
        return self._template[1] + json_string(text) + self._template[2]

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def _finish_reason(self) -> str:
        return FINISH_REASONS.get(self.stop_reason or "end_turn", "stop")

    def done_frame(self) -> bytes:
        out = self._chunk({}, self._finish_reason())
        if self.include_usage:
            out += data_frame(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": self._usage(),
                }
            )
        return out + b"data: [DONE]\n\n"

    def error_frame(self, code: str, message: str) -> bytes:
        return data_frame({"error": _error(code, message, _stream_error_type(code))})

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self._finish_reason(),
                }
            ],
            "usage": self._usage(),
            "sserelay": self.extras(),
        }

    @staticmethod
    def error_body(status: int, code: str, message: str) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        return {"error": _error(code, message, kind)}


def _error(code: str, message: str, kind: str) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": None, "code": code}


def _stream_error_type(code: str) -> str:
    if code == "upstream_rate_limited":
        return "rate_limit_error"
    if code in ("upstream_rejected",):
        return "invalid_request_error"
    return "server_error"
