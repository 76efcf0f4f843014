"""The OpenAI provider's one-generator reader: lines split across reads, a last line
without its newline, a body that ends without `[DONE]`, whatever the network's cuts."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from streaming import GenerationRequest, Message, Stop, TextDelta, UpstreamError, Usage
from streaming.providers.openai import OpenAIProvider


def _line(text: str) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n"


class _Response:
    status = 200
    headers: dict[str, str] = {}

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    async def aiter(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def _provider(pieces: list[bytes]) -> OpenAIProvider:
    provider = OpenAIProvider("x", base_url="http://127.0.0.1:1/v1", api_key=None)

    class Pool:
        @asynccontextmanager
        async def stream(self, *args: Any, **kwargs: Any) -> AsyncIterator[_Response]:
            yield _Response(pieces)

    provider._pool = Pool()  # type: ignore[assignment]
    return provider


def _cuts(body: bytes, size: int) -> Iterator[bytes]:
    for at in range(0, len(body), size):
        yield body[at : at + size]


async def _read(pieces: list[bytes]) -> list[Any]:
    request = GenerationRequest(model="m", messages=(Message("user", "hi"),), max_tokens=10)
    return [chunk async for chunk in _provider(pieces).stream(request)]


BODY = (
    b": comment\n\n"
    + _line("Hel")
    + _line('lo "there"\n')
    + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
    + b'"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
    + b"data: [DONE]"
)


@pytest.mark.parametrize("size", [1, 2, 7, 64, len(BODY)])
async def test_any_cut_of_the_body_reads_the_same(size: int) -> None:
    chunks = await _read(list(_cuts(BODY, size)))
    assert chunks == [
        Usage(),
        TextDelta("Hel", 1),
        TextDelta('lo "there"\n', 1),
        Usage(3, 2),
        Stop("max_tokens"),  # [DONE] on a last line without its newline counts
    ]


async def test_a_body_that_ends_without_done_is_a_drop() -> None:
    with pytest.raises(UpstreamError) as info:
        await _read([_line("a"), _line("b")[:-3]])
    assert info.value.code == "upstream_dropped"


async def test_a_line_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamError):
        await _read([_line("a"), b"data: {nope\n\n"])
