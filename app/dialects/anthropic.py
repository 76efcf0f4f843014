"""Anthropic's Messages API: `POST /v1/messages`, streaming or not.

Streaming follows Anthropic's event sequence, which its SDK (`messages.create(stream=
True)` and the `messages.stream()` helper) assembles: `message_start`, `ping`,
`content_block_start`, `content_block_delta`s, `content_block_stop`, `message_delta`
with the stop reason and the cumulative usage, `message_stop`. A stream that fails after
it started ends with `event: error`, which the SDK raises.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from streaming.events import json_string

from ..body import validate
from ..errors import ProblemError
from ..schemas import CompletionRequest
from . import Defaults, Mapped, Transcript, data_frame, only_keys, text_of, text_template

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}

_DEFAULTS = Defaults(
    {
        "tools": ([],),
        "tool_choice": ({"type": "auto"}, {"type": "none"}),
        "service_tier": ("auto", "standard_only"),
        "thinking": ({"type": "disabled"},),
    }
)


class MessagesRequest(BaseModel):
    """The fields sserelay maps; every other field is checked by `_DEFAULTS`."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=10_000)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    stream: bool | None = None
    metadata: dict[str, str | None] | None = None


def map_request(body: MessagesRequest) -> Mapped:
    _DEFAULTS.check(body.model_extra or {})
    messages = []
    for i, message in enumerate(body.messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ProblemError("invalid_request", f"messages[{i}].role must be user or assistant")
        only_keys(message, frozenset(("role", "content")), f"messages[{i}]")
        content = message.get("content")
        if content is None:
            raise ProblemError("invalid_request", f"messages[{i}].content is required")
        messages.append({"role": role, "content": text_of(content, f"messages[{i}].content")})
    system = None if body.system is None else text_of(body.system, "system")
    metadata: dict[str, str | int | float | bool] = {
        k: v for k, v in (body.metadata or {}).items() if v is not None
    }
    completion = validate(
        CompletionRequest,
        {
            "model": body.model,
            "messages": messages,
            "system": system or None,
            "max_tokens": body.max_tokens,
            "temperature": body.temperature,
            "stop": body.stop_sequences or None,
            "metadata": metadata or None,
        },
    )
    return Mapped(completion, stream=bool(body.stream))


class Message(Transcript):
    name = "anthropic"

    @property
    def id(self) -> str:
        return "msg_" + self.stream_id

    def start_frame(self, data: dict[str, Any]) -> bytes:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return (
            data_frame({"type": "message_start", "message": message}, "message_start")
            + data_frame(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            )
            + data_frame({"type": "ping"}, "ping")
        )

    def delta_frame(self, text: str) -> bytes:
        return _DELTA_BEFORE + json_string(text) + _DELTA_AFTER

    def done_frame(self) -> bytes:
        return (
            data_frame({"type": "content_block_stop", "index": 0}, "content_block_stop")
            + data_frame(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": {
                        "input_tokens": self.input_tokens,
                        "output_tokens": self.output_tokens,
                    },
                },
                "message_delta",
            )
            + data_frame({"type": "message_stop"}, "message_stop")
        )

    def error_frame(self, code: str, message: str) -> bytes:
        kind = {
            "upstream_overloaded": "overloaded_error",
            "upstream_rate_limited": "rate_limit_error",
            "upstream_rejected": "invalid_request_error",
        }.get(code, "api_error")
        return data_frame(
            {"type": "error", "error": {"type": kind, "message": message, "code": code}}, "error"
        )

    def body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": self.stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
            "sserelay": self.extras(),
        }

    @staticmethod
    def error_body(status: int, code: str, message: str) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message, "code": code}}


# Every delta frame is the same but for its text: encoded once, the text escaped alone.
_DELTA_BEFORE, _DELTA_AFTER = text_template(
    data_frame(
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ""}},
        "content_block_delta",
    ),
    b'"text":""',
)
