"""SSE events as they travel: encoded once, framed cheaply.

An event's JSON payload is encoded exactly once, when it is produced. The stream log
stores that payload as is and every reader, live or replaying, frames it with a byte
template, so relaying an event costs no JSON work and no string building per reader.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

TERMINAL_EVENTS = frozenset({"done", "error"})

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def encode_data(data: dict[str, Any]) -> bytes:
    return _dumps(data).encode()


def json_string(text: str) -> bytes:
    """`text` as a JSON string, quoted and escaped as `encode_data` escapes it."""
    return encode_basestring(text).encode()


_DELTA_HEAD = b'{"text":"'

_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
"""The JSON string at an offset (after its opening quote): the C scanner `json` uses."""


def encode_delta(text: str, index: int) -> bytes:
    """A `delta` payload, `{"text":...,"index":...}`, byte for byte what `encode_data`
    makes of it: a template with only the text escaped, the one event every token
    makes (an eighth of the time of a generic encode)."""
    return b'{"text":%s,"index":%d}' % (json_string(text), index)


def delta_text(data: bytes) -> str:
    """The text of a `delta` payload, read without parsing the rest of it (every payload
    this process or an earlier version wrote starts with the text)."""
    if data.startswith(_DELTA_HEAD):
        return _scanstring(data.decode(), len(_DELTA_HEAD))[0]
    value: str = json.loads(data)["text"]
    return value


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event: `id` increases by one within a stream, starting at 1."""

    id: int
    name: str
    data: bytes
    tokens: int = 0
    """For a `delta`: the stream's output tokens up to and including it, as counted
    then. Stored with the event, never sent: a process taking the stream over knows
    exactly how much of the answer's budget is spent."""

    @property
    def terminal(self) -> bool:
        return self.name in TERMINAL_EVENTS

    def frame(self) -> bytes:
        return b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.name.encode(), self.data)

    def json(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value

    @property
    def text(self) -> str:
        """A `delta`'s text."""
        return delta_text(self.data)


def retry_frame(milliseconds: int) -> bytes:
    return b"retry: %d\n\n" % milliseconds


PING_FRAME = b": ping\n\n"


class EventEncoder:
    """Numbers events of one stream and encodes their payloads."""

    __slots__ = ("last_id",)

    def __init__(self, last_id: int = 0) -> None:
        self.last_id = last_id

    def __call__(self, name: str, data: dict[str, Any], tokens: int = 0) -> Event:
        self.last_id += 1
        return Event(self.last_id, name, encode_data(data), tokens)

    def delta(self, text: str, index: int, tokens: int = 0) -> Event:
        self.last_id += 1
        return Event(self.last_id, "delta", encode_delta(text, index), tokens)
