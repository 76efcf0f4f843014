"""The one way a request body is read: bounded, parsed, validated.

Every route with a body reads it through `read_body`, so every route refuses the same
things the same way, before any of it can cost memory or a stack:

- a declared `Content-Length` over the limit is refused before reading a byte, and the
  body is read as a stream that stops at the limit (a lying or absent length changes
  nothing);
- nesting is measured on the raw bytes, without recursion, before the JSON parser (which
  recurses) sees them;
- the JSON must be strict: no NaN or infinities, no duplicate keys, no integers longer
  than Python's conversion limit, valid UTF-8, and no lone surrogates (`"\\ud800"`), which
  no provider, log line or Redis key can encode;
- the result is validated by a strict pydantic model: `true` is not a rating, `"5"` is not
  a number.

Every refusal is a 4xx `ProblemError`; nothing here can raise anything else.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .config import describe
from .errors import ProblemError

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 32
"""Deepest nesting any body may have; the deepest real one (a message list) is 3."""

# A JSON string, unrolled so a long one is matched in one linear pass.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether `raw` nests arrays and objects deeper than `max_depth`: brackets counted
    outside strings, in one pass, stopping at the first level too deep."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                return True
        else:
            depth -= 1
    return False


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(value: Any) -> bool:
    """Depth is already bounded, so this recursion is too."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def parse_json(raw: bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    if too_deep(raw, max_depth):
        raise ProblemError("invalid_json", f"the body nests deeper than {max_depth} levels")
    try:
        value = json.loads(
            raw,
            object_pairs_hook=_unique,
            parse_float=_finite,
            parse_constant=_no_constants,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProblemError("invalid_json", "the body is not valid JSON") from exc
    if _has_surrogate(value):
        raise ProblemError("invalid_json", "the body holds an unpaired UTF-16 surrogate")
    return value


async def read_raw(request: Request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ProblemError("invalid_request", "Content-Length must be a number")
        if int(declared) > max_bytes:
            raise ProblemError("body_too_large", f"the body is larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ProblemError("body_too_large", f"the body is larger than {max_bytes} bytes")
    return bytes(body)


def validate(model: type[M], value: Any) -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise ProblemError("invalid_request", describe(exc), extra={"errors": errors}) from exc


async def read_body(
    request: Request, model: type[M], *, max_bytes: int, empty_ok: bool = False
) -> M:
    """The body as `model`. `empty_ok`: an empty body (with any or no content type)
    stands for `{}`, for routes whose every field is optional."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    raw = await read_raw(request, max_bytes)
    if not raw and empty_ok:
        return validate(model, {})
    if media != "application/json":
        raise ProblemError("unsupported_media_type", "send the body as application/json")
    return validate(model, parse_json(raw))
