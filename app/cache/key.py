"""The response cache's key: SHA-256 of a canonical JSON encoding of everything that
shapes an answer.

That is the scope value (who may share it), the model's configured name, and every
field of the provider request (`GenerationRequest`): the upstream model id, messages,
system prompt, `max_tokens`, every sampling parameter (temperature, stop sequences, and
any field added later) - except those that only identify or annotate one request. The
fields are taken from the dataclass itself, so a new sampling parameter is part of the
key without anyone remembering to add it here; a field of a type this encoding does not
know fails loudly (TypeError) rather than being left out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from streaming import GenerationRequest

KEY_VERSION = 1
"""Bumped when the encoding changes, so old entries are never read as new ones."""

NOT_IN_KEY = frozenset({"request_id", "headers", "metadata", "prefill"})
"""Fields of `GenerationRequest` that do not change the answer: the request's id and
headers, the caller's own metadata, and the prefill (set only on continuations, never
on a request as it arrives)."""


def _canonical(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        # 1.0 and 1 ask for the same answer (JSON clients send either).
        return int(value) if value.is_integer() and abs(value) <= 2**53 else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    raise TypeError(f"cannot put a {type(value).__name__} in a cache key")


def request_fields(request: GenerationRequest) -> dict[str, Any]:
    """The fields of `request` that shape its answer, canonical."""
    return {
        f.name: _canonical(getattr(request, f.name))
        for f in dataclasses.fields(request)
        if f.name not in NOT_IN_KEY
    }


def cache_key(scope: str, scope_value: str, model: str, request: GenerationRequest) -> str:
    """The key of `request`'s answer for `model` (its configured name; the upstream id
    is `request.model`), shared within `scope` (`subject`, `plan` or `global`) by those
    with the same `scope_value` (the subject, the plan's name, or empty)."""
    document = {
        "v": KEY_VERSION,
        "scope": scope,
        "scope_value": scope_value,
        "model": model,
        "request": request_fields(request),
    }
    encoded = json.dumps(
        document, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    )
    return hashlib.sha256(encoded.encode()).hexdigest()
