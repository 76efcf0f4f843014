"""Reading SSE the way a client does: events by the spec's parsing rules, and whole
streams collected up to their terminal event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class SSEEvent:
    id: int | None
    event: str
    data: dict[str, Any]


@dataclass
class Collected:
    events: list[SSEEvent] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None

    @property
    def names(self) -> list[str]:
        return [e.event for e in self.events]

    @property
    def text(self) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta")

    def last(self, name: str) -> dict[str, Any]:
        return next(e.data for e in reversed(self.events) if e.event == name)


async def sse_events(response: httpx.Response) -> AsyncIterator[SSEEvent | str]:
    """Parse an SSE body by the spec's rules; yields events, and comments as strings."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line == "":
            if "retry" in fields:  # alone, or (as sserelay sends it) with the first event
                yield f"retry:{fields['retry']}"
            if "data" in fields:
                yield SSEEvent(
                    int(fields["id"]) if "id" in fields else None,
                    fields.get("event", "message"),
                    json.loads(fields["data"]),
                )
            fields = {}
        elif line.startswith(":"):
            yield line[1:].strip()
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


async def collect(
    source: httpx.Response | AsyncIterator[SSEEvent | str], stop_after: int | None = None
) -> Collected:
    """Events until the terminal one (or `stop_after`). Pass `sse_events(response)` rather
    than the response to go on reading the same response afterwards."""
    out = Collected()
    items = sse_events(source) if isinstance(source, httpx.Response) else source
    async for item in items:
        if isinstance(item, str):
            if item.startswith("retry:"):
                out.retry = int(item[6:])
            else:
                out.comments.append(item)
            continue
        out.events.append(item)
        if item.event in ("done", "error") or (stop_after and len(out.events) >= stop_after):
            break
    return out
