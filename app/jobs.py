"""A generation job's payload: everything a worker needs to run a stream another
process admitted (the stream's info, with its owner, plan, prices and reservation, and
the provider request), as JSON, so API and worker processes of two versions can share
a queue."""

from __future__ import annotations

import json
from typing import Any

from streaming import GenerationRequest, Message, StreamInfo


def encode_job(info: StreamInfo, request: GenerationRequest) -> bytes:
    return json.dumps(
        {
            "info": info.fields(),
            "request": {
                "model": request.model,
                "messages": [[m.role, m.content] for m in request.messages],
                "max_tokens": request.max_tokens,
                "system": request.system,
                "temperature": request.temperature,
                "stop": list(request.stop),
                "metadata": request.metadata,
                "request_id": request.request_id,
                "headers": dict(request.headers),
            },
        },
        separators=(",", ":"),
    ).encode()


def decode_job(payload: bytes) -> tuple[StreamInfo, GenerationRequest]:
    """Raises ValueError for a payload this version cannot read."""
    try:
        data: dict[str, Any] = json.loads(payload)
        fields = data["info"]
        info = StreamInfo(
            **{k: v for k, v in fields.items() if k in StreamInfo.__dataclass_fields__}
        )
        raw = data["request"]
        request = GenerationRequest(
            model=str(raw["model"]),
            messages=tuple(Message(str(role), str(content)) for role, content in raw["messages"]),
            max_tokens=int(raw["max_tokens"]),
            system=raw.get("system"),
            temperature=raw.get("temperature"),
            stop=tuple(str(s) for s in raw.get("stop") or ()),
            metadata=raw.get("metadata"),
            request_id=raw.get("request_id"),
            headers=dict(raw.get("headers") or {}),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable job: {exc}") from exc
    return info, request
