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
from starlette.requests import ClientDisconnect, Request

from .config import describe
from .errors import ProblemError

M = TypeVar("M", bound=BaseModel)

MAX_DEPTH = 32
"""Deepest nesting any body may have; the deepest real one (a message list) is 3."""

# One left-to-right pass over the tokens that matter for nesting: whole strings (their
# brackets do not count), brackets, and a quote that starts a string never closed. The
# quantifiers are possessive, so an unterminated string is given up on at once instead of
# being retried from every later quote (which made a 32 kB body take seconds).
_TOKEN = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]|"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Unterminated(ValueError):
    pass


def too_deep(text: str, max_depth: int) -> bool:
    """Whether `text` nests arrays and objects deeper than `max_depth`, counted in one
    linear pass without recursion, stopping at the first level too deep. Raises
    `_Unterminated` (a ValueError) for a string that never closes."""
    depth = 0
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return True
        elif token in ("]", "}"):
            depth -= 1
        elif token == '"':
            raise _Unterminated("unterminated string")
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
    try:
        # UTF-8 only: `json.loads(bytes)` would also guess UTF-16 and UTF-32.
        text = raw.decode("utf-8")
        deep = too_deep(text, max_depth)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ProblemError("invalid_json", "the body is not valid JSON (UTF-8)") from exc
    if deep:
        raise ProblemError("invalid_json", f"the body nests deeper than {max_depth} levels")
    try:
        value = json.loads(
            text,
            object_pairs_hook=_unique,
            parse_float=_finite,
            parse_constant=_no_constants,
        )
    except (ValueError, RecursionError) as exc:
        raise ProblemError("invalid_json", "the body is not valid JSON") from exc
    try:
        surrogate = _has_surrogate(value)
    except RecursionError as exc:  # cannot happen within MAX_DEPTH; never a 500 if it did
        raise ProblemError("invalid_json", "the body nests too deep") from exc
    if surrogate:
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
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes:
                raise ProblemError("body_too_large", f"the body is larger than {max_bytes} bytes")
    except ClientDisconnect as exc:
        # The client left mid-body, or stalled past the body timeout: nobody will read
        # an answer, and it is no server error either.
        raise ProblemError("request_timeout", "the body did not arrive in time") from exc
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
