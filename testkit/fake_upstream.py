"""A fake Anthropic / OpenAI streaming upstream for sserelay's tests and benchmark.

Real providers are slow, cost money and cannot be told to fail on cue. This server speaks
their SSE wire formats closely enough for the official SDKs, streams deterministic text (so
a test can compare bytes with `expected_text`) and records every request, including whether
the client hung up, so tests can prove that the proxy cancels its upstream calls.

A request ending with an assistant message asks to continue that answer (a prefill, as
Anthropic takes it, or `continue_final_message` for vLLM-style servers): the server streams
what follows the prefill in `expected_text`, and refuses a prefill that is not a prefix of
it, so a test cannot pass with a wrong one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import itertools
import json
import logging
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Api = Literal["anthropic", "openai"]

STATUS_FAULTS: dict[str, int] = {
    "status_429": 429,
    "status_529": 529,
    "status_500": 500,
    "status_400": 400,
}
STREAM_FAULTS = frozenset({"drop", "stall", "malformed", "overloaded"})
FAULTS = frozenset({*STATUS_FAULTS, *STREAM_FAULTS, "slow_first"})

# A prime-sized list so the index walk below does not repeat with a short period; the odd
# entries (quotes, backslash, newline, non-BMP) make sure a proxy's re-encoding is exercised.
_WORDS = (
    "The",
    "relay",
    "streams",
    "tokens",
    "while",
    "upstream",
    "models",
    "think",
    "about",
    "latency,",
    "budgets",
    "and",
    "cancellation.",
    "Every",
    "byte",
    "arrives",
    "in",
    "order;",
    "nothing",
    "is",
    "lost",
    "when",
    "clients",
    "reconnect",
    "quickly.",
    "café",
    "naïve",
    '"quoted"',
    "back\\slash",
    "日本語",
    "🙂",
    "line\nbreak",
    "tab\there",
    "<html>",
    "&amp;",
    "progress",
    "estimates",
    "settle",
    "as",
    "throughput",
    "stabilises",
    "under",
    "load.",
    "Meanwhile",
    "the",
    "fake",
    "server",
    "keeps",
    "count",
    "of",
    "everything",
    "it",
    "sent.",
)
_ESCAPED = tuple(json.dumps(w + " ")[1:-1].encode() for w in _WORDS)
_MAX_LISTED_BODY = 64 * 1024


def _seed_offset(seed: str) -> int:
    return zlib.crc32(seed.encode()) % len(_WORDS) if seed else 0


def _word_index(i: int, offset: int) -> int:
    n = len(_WORDS)
    return (i * 17 + i // n + offset) % n


def token_at(i: int, seed: str = "") -> str:
    """The i-th streamed token, so tests can reason about partial streams."""
    return _WORDS[_word_index(i, _seed_offset(seed))] + " "


def expected_text(n_tokens: int, seed: str = "") -> str:
    """Exactly what a complete stream of `n_tokens` tokens carries, to compare byte-for-byte."""
    offset = _seed_offset(seed)
    return "".join(_WORDS[_word_index(i, offset)] + " " for i in range(n_tokens))


def _escaped_run(start: int, stop: int, offset: int) -> bytes:
    # JSON escaping is per character, so escaped pieces concatenate into a valid string body.
    return b"".join(_ESCAPED[_word_index(i, offset)] for i in range(start, stop))


def _plain_run(start: int, stop: int, offset: int) -> str:
    return "".join(_WORDS[_word_index(i, offset)] + " " for i in range(start, stop))


def _cut(chars: int, tokens: int, offset: int) -> tuple[int, str | None]:
    """Where an answer of `tokens` tokens continues after its first `chars` characters: the
    token holding that position, and the rest of it when the cut falls inside it (None when
    the cut is on a token boundary, so that token goes out whole)."""
    start = 0
    for i in range(tokens):
        token = _WORDS[_word_index(i, offset)] + " "
        end = start + len(token)
        if end > chars:
            return i, (None if chars == start else token[chars - start :])
        start = end
    return max(0, tokens), None


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            t
            for b in content
            if isinstance(b, dict)
            for t in _texts(b.get("text")) + _texts(b.get("content"))
        ]
    return []


def count_input_tokens(body: Mapping[str, Any], tokenizer: str = "chars") -> int:
    """A cheap, deterministic stand-in for a tokenizer so usage numbers can be asserted.

    `chars`: four characters a token. `words`: like a real BPE on short words, every word
    is at least one token (a prompt of one-letter words is a token per two bytes)."""
    texts = _texts(body.get("system"))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            texts += _texts(m.get("content"))
    if tokenizer == "words":
        return max(1, sum(max(1, (len(w) + 3) // 4) for t in texts for w in t.split()))
    return max(1, sum(len(t) for t in texts) // 4)


@dataclass
class Behaviour:
    """How one response is shaped; `tokens_per_second=0` means as fast as possible.

    Stream faults fire once `fault_after` tokens are out; a value >= the token count fires
    them just before the terminal events, e.g. to drop a stream that only lacks its ending.
    """

    ttft_ms: float = 0
    tokens: int = 20
    tokens_per_second: float = 0
    tokens_per_chunk: int = 1
    events_per_write: int = 1
    fault: str | None = None
    fault_after: int = 0
    retry_after_s: float | None = None
    seed: str = ""
    tokenizer: str = "chars"
    prefill: str = "continue"
    """A request ending with an assistant message (a prefill): `continue` it, as Claude
    and vLLM do, or `refuse` it, as models without prefill support do."""


_ALIASES = {"tps": "tokens_per_second", "chunk": "tokens_per_chunk", "batch": "events_per_write"}
_CASTS: dict[str, Callable[[Any], Any]] = {
    "ttft_ms": float,
    "tokens": int,
    "tokens_per_second": float,
    "tokens_per_chunk": int,
    "events_per_write": int,
    "fault": str,
    "fault_after": int,
    "retry_after_s": float,
    "seed": str,
    "tokenizer": str,
    "prefill": str,
}


def _overrides(raw: Mapping[str, Any] | Behaviour) -> dict[str, Any]:
    """Normalise a partial behaviour so it can be merged over the defaults (ValueError if bad)."""
    if isinstance(raw, Behaviour):
        base = Behaviour()
        return {
            f.name: getattr(raw, f.name)
            for f in dataclasses.fields(raw)
            if getattr(raw, f.name) != getattr(base, f.name)
        }
    if not isinstance(raw, Mapping):
        raise ValueError(f"fault entry must be an object, got {raw!r}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = _ALIASES.get(key, key)
        if name not in _CASTS:
            raise ValueError(f"unknown behaviour key {key!r}")
        out[name] = None if value is None else _CASTS[name](value)
    if out.get("fault") is not None and out["fault"] not in FAULTS:
        raise ValueError(f"unknown fault {out['fault']!r}; expected one of {sorted(FAULTS)}")
    if out.get("tokenizer", "chars") not in ("chars", "words"):
        raise ValueError("tokenizer must be chars or words")
    if out.get("prefill", "continue") not in ("continue", "refuse"):
        raise ValueError("prefill must be continue or refuse")
    if out.get("tokens_per_chunk", 1) < 1:
        raise ValueError("tokens_per_chunk must be >= 1")
    if out.get("events_per_write", 1) < 1:
        raise ValueError("events_per_write must be >= 1")
    return out


@dataclass
class RequestRecord:
    """What the upstream saw and how the exchange ended; times are `time.time()` seconds."""

    id: int
    api: Api
    model: str
    body: dict[str, Any]
    headers: dict[str, str]
    started_at: float
    behaviour: Behaviour
    tokens_sent: int = 0
    completed: bool = False
    client_closed: bool = False
    ended_at: float | None = None
    status: int = 200
    body_size: int = 0
    prefill: str | None = None
    """The answer's start the request asked to continue (a final assistant message); None
    for a fresh answer."""

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.body_size > _MAX_LISTED_BODY:
            data["body"] = None
        return data


class _AbortConnection(Exception):
    """Raised out of the ASGI app so uvicorn closes the socket mid-chunked-body."""


class _QuietAborts(logging.Filter):
    # Deliberate aborts (and shutdown cancellation) are not errors worth a traceback.
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _AbortConnection | asyncio.CancelledError)


_QUIET = _QuietAborts()


def _quiet_uvicorn() -> None:
    logging.getLogger("uvicorn.error").addFilter(_QUIET)


_ERRORS: dict[int, tuple[str, str, str | None, str]] = {
    # status: (anthropic type, openai type, openai code, message)
    400: ("invalid_request_error", "invalid_request_error", None, "Invalid request"),
    429: ("rate_limit_error", "requests", "rate_limit_exceeded", "Rate limited"),
    500: ("api_error", "server_error", None, "Internal server error"),
    503: ("overloaded_error", "server_error", None, "Overloaded"),
    529: ("overloaded_error", "server_error", None, "Overloaded"),
}


def _error_body(api: Api, status: int, message: str | None = None) -> dict[str, Any]:
    anth_type, oai_type, code, default = _ERRORS[status]
    if api == "anthropic":
        return {"type": "error", "error": {"type": anth_type, "message": message or default}}
    return {"error": {"message": message or default, "type": oai_type, "code": code}}


async def _send_json(
    send: Send, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(data)),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _guard(rec: RequestRecord, receive: Receive, job: Coroutine[Any, Any, None]) -> None:
    """Run a response while watching receive() for the client hanging up.

    uvicorn's send() silently drops writes once the peer is gone, so receive() is the only
    prompt signal, and the only one at all while we are stalled and writing nothing.
    """
    work = asyncio.ensure_future(job)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutdown
        work.cancel()
        watch.cancel()
        rec.ended_at = rec.ended_at or time.time()
        raise
    watch.cancel()
    if not work.done():
        rec.client_closed = True
        rec.ended_at = time.time()
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        return
    rec.ended_at = rec.ended_at or time.time()
    work.result()


_PREFILL_REFUSED = (
    "This model does not support assistant message prefill. "
    "The conversation must end with a user message."
)


def _prefill(api: Api, body: Mapping[str, Any], beh: Behaviour) -> tuple[str | None, str | None]:
    """(the prefill if the request continues an answer else None, why it is refused or None).

    Anthropic: a final assistant message is always a prefill. OpenAI-compatible servers
    (vLLM, SGLang): only with `continue_final_message`; without it a final assistant
    message is just history and a fresh answer follows."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    is_assistant = isinstance(last, dict) and last.get("role") == "assistant"
    if api == "openai":
        if not body.get("continue_final_message"):
            return None, None
        if not is_assistant:
            return None, "continue_final_message is set but the last message is not assistant"
        if body.get("add_generation_prompt"):
            return None, "Cannot set both continue_final_message and add_generation_prompt"
    elif not is_assistant:
        return None, None
    assert isinstance(last, dict)
    prefill = "".join(_texts(last.get("content")))
    if beh.prefill == "refuse":
        return prefill, _PREFILL_REFUSED
    if api == "anthropic" and prefill != prefill.rstrip():
        return prefill, "messages: final assistant content cannot end with trailing whitespace"
    if not expected_text(beh.tokens, beh.seed).startswith(prefill):
        return prefill, "fake upstream: the prefill is not a prefix of this answer"
    return prefill, None


_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
]
_A_BLOCK_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: ping\ndata: {"type":"ping"}\n\n'
)
_A_DELTA = (
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"'
)
_A_BLOCK_STOP = b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
_A_OVERLOADED = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
    b'"message":"Overloaded"}}\n\n'
)
_O_OVERLOADED = b'data: {"error":{"message":"Overloaded","type":"server_error"}}\n\n'


class _Exchange:
    """One model request: plans the response once, then writes pre-encoded byte pieces."""

    def __init__(self, rec: RequestRecord, beh: Behaviour, body: dict[str, Any], send: Send):
        self.rec, self.beh, self.send, self.api = rec, beh, send, rec.api
        self.offset = _seed_offset(beh.seed)
        rec.prefill, self.rejection = _prefill(self.api, body, beh)
        # A continuation streams "pieces": `head` (the rest of the token the prefill ends
        # inside, if it does) then whole tokens; piece i > 0 is token `base + i`, as is
        # piece 0 when there is no head. A fresh answer is base 0, no head.
        self.base, self.head = 0, None
        if rec.prefill and self.rejection is None:
            self.base, self.head = _cut(len(rec.prefill), beh.tokens, self.offset)
        limit = body.get("max_tokens")
        if self.api == "openai":
            limit = body.get("max_completion_tokens", limit)
        wanted = max(0, beh.tokens - self.base)
        self.n = wanted if limit is None else max(0, min(wanted, int(limit)))
        self.truncated = self.n < wanted
        self.stream = bool(body.get("stream"))
        self.usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.input_tokens = count_input_tokens(body, beh.tokenizer)
        self.id = f"{'msg' if self.api == 'anthropic' else 'chatcmpl'}_fake{rec.id:08d}"
        self.created = int(rec.started_at)
        self.oai_prefix = (
            b'data: {"id":"%s","object":"chat.completion.chunk","created":%d,'
            b'"model":%s,"choices":'
            % (self.id.encode(), self.created, json.dumps(rec.model).encode())
        )

    @property
    def reason(self) -> str:
        if self.api == "anthropic":
            return "max_tokens" if self.truncated else "end_turn"
        return "length" if self.truncated else "stop"

    async def _ttft(self) -> None:
        if self.beh.ttft_ms > 0:
            await asyncio.sleep(self.beh.ttft_ms / 1000)

    async def _write(self, data: bytes, more: bool = True) -> None:
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    def _text(self) -> str:
        if self.n == 0:
            return ""
        if self.head is None:
            return _plain_run(self.base, self.base + self.n, self.offset)
        return self.head + _plain_run(self.base + 1, self.base + self.n, self.offset)

    async def run(self) -> None:
        if self.rejection is not None:
            # The request itself is invalid: rejected before any fault or pacing applies.
            self.rec.status = 400
            await _send_json(self.send, 400, _error_body(self.api, 400, self.rejection))
            self.rec.completed = True
            return
        fault = self.beh.fault
        status = STATUS_FAULTS.get(fault or "")
        if status is None and fault == "overloaded" and not self.stream:
            status = 529
        if status is not None:
            await self._ttft()
            status = 503 if status == 529 and self.api == "openai" else status
            retry = self.beh.retry_after_s
            headers = [] if retry is None else [(b"retry-after", f"{retry:g}".encode())]
            self.rec.status = status
            await _send_json(self.send, status, _error_body(self.api, status), headers)
            self.rec.completed = True
        elif self.stream:
            await self._stream()
        else:
            await self._whole()

    async def _stream(self) -> None:
        rec, beh, anth = self.rec, self.beh, self.api == "anthropic"
        headers = [*_SSE_HEADERS, (b"request-id", f"req_fake{rec.id:08d}".encode())]
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._write(
            self._anthropic_head()
            if anth
            else self.oai_prefix
            + (b'[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n')
        )
        await self._ttft()
        fault = beh.fault if beh.fault in STREAM_FAULTS else None
        fault_at = min(max(0, beh.fault_after), self.n) if fault else -1
        chunk = max(1, beh.tokens_per_chunk)
        interval = chunk / beh.tokens_per_second if beh.tokens_per_second > 0 else 0.0
        # Several events per write, as a fast server's TCP stream delivers them anyway;
        # one write per event would make this server, not the proxy, the bottleneck.
        batch = max(1, beh.events_per_write)
        base, offset = self.base, self.offset
        head = None if self.head is None else json.dumps(self.head)[1:-1].encode()
        pending: list[bytes] = []
        loop = asyncio.get_running_loop()
        t0, i, k = loop.time(), 0, 0

        async def flush() -> None:
            await self._write(b"".join(pending))
            pending.clear()
            rec.tokens_sent = i  # what actually went out

        while i != fault_at and i < self.n:
            j = min(i + chunk, self.n, fault_at if fault_at > i else self.n)
            delay = t0 + k * interval - loop.time() if interval else 0.0
            if delay > 0 and pending:
                await flush()
            if delay > 0 or batch == 1 or k % batch == 0:
                await asyncio.sleep(delay if delay > 0 else 0)  # also a cancellation point
            text = (
                _escaped_run(base + i, base + j, offset)
                if i or head is None
                else head + _escaped_run(base + 1, base + j, offset)
            )
            pending.append(
                _A_DELTA + text + b'"}}\n\n'
                if anth
                else self.oai_prefix
                + b'[{"index":0,"delta":{"content":"'
                + text
                + b'"},"finish_reason":null}]}\n\n'
            )
            i, k = j, k + 1
            if len(pending) >= batch:
                await flush()
        if pending:
            await flush()
        if fault is not None:
            await self._fault(fault, anth)
            return
        await self._write(self._anthropic_tail() if anth else self._openai_tail(), more=False)
        rec.completed = True

    async def _fault(self, fault: str, anth: bool) -> None:
        if fault == "drop":
            self.rec.ended_at = time.time()
            raise _AbortConnection(f"drop after {self.rec.tokens_sent} tokens")
        if fault == "stall":
            await asyncio.get_running_loop().create_future()  # until the client goes away
        elif fault == "malformed":
            junk = b"data: {not json\n\n"
            await self._write(b"event: content_block_delta\n" + junk if anth else junk, more=False)
        else:  # overloaded
            await self._write(_A_OVERLOADED if anth else _O_OVERLOADED, more=False)

    def _anthropic_head(self) -> bytes:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.rec.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 1},
        }
        start = json.dumps({"type": "message_start", "message": message}).encode()
        return b"event: message_start\ndata: " + start + b"\n\n" + _A_BLOCK_START

    def _anthropic_tail(self) -> bytes:
        return _A_BLOCK_STOP + (
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"%s",'
            b'"stop_sequence":null},"usage":{"output_tokens":%d}}\n\n'
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
            % (self.reason.encode(), self.n)
        )

    def _openai_tail(self) -> bytes:
        out = self.oai_prefix + b'[{"index":0,"delta":{},"finish_reason":"%s"}]}\n\n' % (
            self.reason.encode()
        )
        if self.usage:
            usage = {
                "prompt_tokens": self.input_tokens,
                "completion_tokens": self.n,
                "total_tokens": self.input_tokens + self.n,
            }
            out += self.oai_prefix + b'[],"usage":' + json.dumps(usage).encode() + b"}\n\n"
        return out + b"data: [DONE]\n\n"

    async def _whole(self) -> None:
        await self._ttft()
        if self.beh.tokens_per_second > 0:
            await asyncio.sleep(self.n / self.beh.tokens_per_second)
        if self.beh.fault == "stall":
            await asyncio.get_running_loop().create_future()
        if self.beh.fault == "drop":
            await self.send({"type": "http.response.start", "status": 200, "headers": []})
            await self._fault("drop", True)
        text = self._text()
        payload: dict[str, Any] = (
            {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.rec.model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": self.reason,
                "stop_sequence": None,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.n},
            }
            if self.api == "anthropic"
            else {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.rec.model,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": self.reason,
                        "message": {"role": "assistant", "content": text},
                    }
                ],
                "usage": {
                    "prompt_tokens": self.input_tokens,
                    "completion_tokens": self.n,
                    "total_tokens": self.input_tokens + self.n,
                },
            }
        )
        if self.beh.fault == "malformed":
            await self.send({"type": "http.response.start", "status": 200, "headers": []})
            await self._write(b"{not json", more=False)
        else:
            await _send_json(self.send, 200, payload)
        self.rec.tokens_sent, self.rec.completed = self.n, True


class FakeUpstream:
    """The ASGI app. Behaviour precedence: queued fault > model-name overrides > defaults."""

    def __init__(self, *, defaults: Behaviour | None = None) -> None:
        self.defaults = defaults or Behaviour()
        self.records: list[RequestRecord] = []
        self._faults: deque[dict[str, Any]] = deque()
        self._ids = itertools.count(1)

    def push_faults(self, faults: Iterable[Mapping[str, Any] | Behaviour]) -> None:
        """Queue one-shot behaviours, each consumed by the next model request (thread-safe)."""
        self._faults.extend([_overrides(f) for f in faults])

    def clear(self) -> None:
        self.records.clear()
        self._faults.clear()

    def resolve(self, model: str) -> Behaviour:
        merged: dict[str, Any] = {}
        _, sep, query = model.partition("?")
        if sep:
            merged.update(_overrides(dict(parse_qsl(query, keep_blank_values=True))))
        try:
            merged.update(self._faults.popleft())
        except IndexError:
            pass
        return dataclasses.replace(self.defaults, **merged)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/_control/"):
            await self._control(scope["method"], path[len("/_control/") :], receive, send)
            return
        api: Api
        if path == "/v1/messages":
            api = "anthropic"
        elif path == "/v1/chat/completions":
            api = "openai"
        else:
            await _send_json(send, 404, {"error": {"type": "not_found", "message": path}})
            return
        if scope["method"] != "POST":
            await _send_json(send, 405, {"error": {"type": "method_not_allowed", "message": path}})
            return
        raw = await _read_body(receive)
        if raw is None:
            return
        try:
            body = json.loads(raw)
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            model = str(body.get("model", ""))
            rec = RequestRecord(
                id=next(self._ids),
                api=api,
                model=model,
                body=body,
                started_at=time.time(),
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
                behaviour=self.resolve(model),
                body_size=len(raw),
            )
            exchange = _Exchange(rec, rec.behaviour, body, send)
        except (ValueError, TypeError) as exc:
            await _send_json(send, 400, _error_body(api, 400, str(exc)))
            return
        self.records.append(rec)
        await _guard(rec, receive, exchange.run())

    async def _control(self, method: str, route: str, receive: Receive, send: Send) -> None:
        result: Any = None
        try:
            if route == "health":
                result = {"ok": True}
            elif route == "requests" and method == "GET":
                result = [r.to_json() for r in list(self.records)]
            elif route == "requests" and method == "DELETE":
                result = {"cleared": len(self.records)}
                self.records.clear()
            elif route == "faults" and method == "POST":
                payload = json.loads(await _read_body(receive) or b"{}")
                self.push_faults(payload["faults"] if isinstance(payload, dict) else payload)
                result = {"queued": len(self._faults)}
            elif route == "faults" and method in ("GET", "DELETE"):
                result = list(self._faults)
                if method == "DELETE":
                    self._faults.clear()
            elif route == "defaults" and method in ("GET", "PUT"):
                if method == "PUT":
                    changes = _overrides(json.loads(await _read_body(receive) or b"{}"))
                    self.defaults = dataclasses.replace(self.defaults, **changes)
                result = dataclasses.asdict(self.defaults)
        except (ValueError, KeyError, TypeError) as exc:
            await _send_json(send, 400, {"error": {"type": "invalid_request", "message": str(exc)}})
            return
        if result is None:
            await _send_json(send, 404, {"error": {"type": "not_found", "message": route}})
        else:
            await _send_json(send, 200, result)


class FakeUpstreamServer:
    """Runs a FakeUpstream under uvicorn in a daemon thread, on a pre-bound free port."""

    def __init__(
        self,
        app: FakeUpstream | None = None,
        *,
        defaults: Behaviour | None = None,
        host: str = "127.0.0.1",
        loop: Literal["asyncio", "uvloop"] = "asyncio",
    ) -> None:
        self.app = app or FakeUpstream(defaults=defaults)
        self.host, self.port, self._loop = host, 0, loop
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> FakeUpstreamServer:
        if self._thread is not None:
            return self
        # Binding port 0 ourselves and handing uvicorn the socket avoids a pick-then-bind race.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            loop=self._loop,
            ws="none",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        _quiet_uvicorn()
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [sock]},
            name=f"fake-upstream-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake upstream did not become healthy")
            time.sleep(0.01)
        return self

    def _healthy(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=1)
        try:
            conn.request("GET", "/_control/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop at once: stalled streams are cancelled rather than waited for."""
        if self._server is not None:
            self._server.should_exit = self._server.force_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> FakeUpstreamServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Anthropic/OpenAI streaming upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--tps", type=float, default=0.0, help="tokens/second, 0 = unpaced")
    parser.add_argument("--ttft-ms", type=float, default=0.0)
    parser.add_argument("--chunk", type=int, default=1, help="tokens per SSE event")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    defaults = Behaviour(
        ttft_ms=args.ttft_ms,
        tokens=args.tokens,
        tokens_per_second=args.tps,
        tokens_per_chunk=max(1, args.chunk),
    )
    config = uvicorn.Config(
        FakeUpstream(defaults=defaults),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        lifespan="off",
        loop=args.loop,
        ws="none",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    _quiet_uvicorn()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
