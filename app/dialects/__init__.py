"""The OpenAI and Anthropic APIs, spoken on top of sserelay's own streams.

Each dialect maps its request body to a `CompletionRequest` (refusing, with a 400, what
it cannot honour rather than ignoring it), renders sserelay's events in its own stream
format and its own non-streaming body, and shapes errors the way its SDK reads them.
The routes (`app/routes/compat.py`) run everything else (auth, limits, metering,
continuation, the cache, records) exactly as the native routes do.
"""

from __future__ import annotations

import abc
import json
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from streaming import Event

from ..errors import ProblemError
from ..schemas import CompletionRequest


@dataclass
class Mapped:
    """A dialect's request, in sserelay's terms."""

    completion: CompletionRequest
    stream: bool
    include_usage: bool = False


class Transcript(abc.ABC):
    """One stream as a dialect renders it: fed sserelay's events as they come, it
    returns the dialect's SSE frames, and at the end can say the whole answer."""

    name: ClassVar[str]
    """The dialect's name (the `dialect` of request records and error rendering)."""

    def __init__(self, model: str, *, include_usage: bool = False, input_tokens: int = 0) -> None:
        """`input_tokens`: the prompt's estimate, until the stream's end says the count."""
        self.model = model
        self.include_usage = include_usage
        self.created = int(time.time())
        self.stream_id = ""
        self.parts: list[str] = []
        self.stop_reason: str | None = None
        self.input_tokens = input_tokens
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.cached = False
        self.error: tuple[str, str] | None = None
        """The terminal error's (code, message), when it ended in one."""
        self.ended = False

    def frames(self, batch: list[Event]) -> bytes:
        """The dialect's frames for a group of events produced together (one write)."""
        out: list[bytes] = []
        for event in batch:
            name = event.name
            if name == "delta":
                text = event.text
                self.parts.append(text)
                out.append(self.delta_frame(text))
                continue
            if name not in ("start", "done", "error"):
                continue  # progress, continued: sserelay's own
            data = event.json()
            if name == "start":
                self.stream_id = str(data.get("stream_id", ""))
                out.append(self.start_frame(data))
                continue
            self.ended = True
            usage = data.get("usage") or {}
            self.input_tokens = int(usage.get("input_tokens", 0))
            self.output_tokens = int(usage.get("output_tokens", 0))
            self.cost_usd = float(data.get("cost_usd", 0.0))
            self.cached = bool(data.get("cached", False))
            if name == "done":
                self.stop_reason = data.get("stop_reason")
                out.append(self.done_frame())
            else:
                self.error = (str(data.get("code", "internal_error")), str(data.get("message")))
                out.append(self.error_frame(*self.error))
        return b"".join(out)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def extras(self) -> dict[str, Any]:
        """What a non-streaming body carries beyond the API's own fields."""
        return {"stream_id": self.stream_id, "cost_usd": self.cost_usd, "cached": self.cached}

    # What each dialect writes.

    @abc.abstractmethod
    def start_frame(self, data: dict[str, Any]) -> bytes: ...

    @abc.abstractmethod
    def delta_frame(self, text: str) -> bytes: ...

    @abc.abstractmethod
    def done_frame(self) -> bytes: ...

    @abc.abstractmethod
    def error_frame(self, code: str, message: str) -> bytes: ...

    @abc.abstractmethod
    def body(self) -> dict[str, Any]:
        """The non-streaming response, once the stream ended in `done`."""

    @staticmethod
    @abc.abstractmethod
    def error_body(status: int, code: str, message: str) -> dict[str, Any]:
        """The body of an error response with `status`, in the dialect's shape."""


def text_template(frame: bytes, marker: bytes) -> tuple[bytes, bytes]:
    """`frame` (made with an empty text) cut around its text: what goes before and after
    the JSON string. `marker` is the key and the empty string (`b'"text":""'`), found
    once in the frame. Each delta's frame is then `before + json_string(text) + after`:
    only the text is escaped, the rest of the chunk is encoded once per stream."""
    at = frame.index(marker) + len(marker) - 2
    return frame[:at], frame[at + 2 :]


def data_frame(payload: dict[str, Any], event: str | None = None) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


def unsupported(parameter: str, why: str = "") -> ProblemError:
    return ProblemError(
        "unsupported_parameter",
        f"{parameter} is not supported here{': ' + why if why else ''}",
        extra={"param": parameter},
    )


_PART_KEYS = frozenset(("type", "text", "cache_control"))
"""What a text part may carry. `cache_control` (Anthropic's prompt-caching hint) changes
the provider's bill, never the answer, so it is accepted."""


def only_keys(value: dict[str, Any], allowed: frozenset[str], where: str) -> None:
    """Refuse what would otherwise be dropped without a word."""
    for key in value:
        if key not in allowed:
            raise unsupported(f"{where}.{key}")


def text_of(content: Any, where: str) -> str:
    """Text content: a string, or a list of text parts (other kinds are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise unsupported(f"{where} of type {kind!r}", "only text content is")
            only_keys(part, _PART_KEYS, f"{where}[{i}]")
            text = part.get("text")
            if not isinstance(text, str):
                raise ProblemError("invalid_request", f"{where}: a text part needs `text`")
            texts.append(text)
        return "".join(texts)
    raise ProblemError("invalid_request", f"{where} must be a string or a list of text parts")


@dataclass
class Defaults:
    """Parameters a dialect accepts only at the value that changes nothing."""

    values: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def check(self, given: dict[str, Any]) -> None:
        for name, value in given.items():
            if value is None:
                continue
            allowed = self.values.get(name)
            # By type too: `n: true` is not `n: 1`, nor `logprobs: 0` `logprobs: false`.
            if allowed is None or not any(type(value) is type(a) and value == a for a in allowed):
                raise unsupported(name)


__all__ = [
    "Defaults",
    "Mapped",
    "Transcript",
    "data_frame",
    "only_keys",
    "text_of",
    "text_template",
    "unsupported",
]
