"""Continuing an answer from a prefill: the providers send the answer's start as a final
assistant message and stream exactly what follows it, against the fake upstream over
real HTTP (which continues like Claude / vLLM do) and with the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from streaming import (
    AnthropicProvider,
    Chunk,
    GenerationRequest,
    Message,
    OpenAIProvider,
    SimulatedProvider,
    Stop,
    TextDelta,
    UpstreamError,
    Usage,
    simulated_text,
)
from streaming.providers import estimate_tokens
from testkit.fake_upstream import FakeUpstreamServer, count_input_tokens, expected_text, token_at

FULL = expected_text(20)
_T0, _T1 = len(token_at(0)), len(token_at(0)) + len(token_at(1))
# Cuts inside the first word, right after a token's word, inside a later word, and one
# that leaves only the final space.
CUTS = [1, 2, _T0 - 1, _T0, _T1, _T1 + 2, len(FULL) // 2, len(expected_text(19)), len(FULL)]


def request(prefill: str, model: str = "fake", max_tokens: int = 100) -> GenerationRequest:
    return GenerationRequest(
        model=model,
        messages=(Message("user", "continue please"),),
        max_tokens=max_tokens,
        prefill=prefill,
    )


def pieces_after(prefill: str, tokens: int = 20) -> int:
    """How many pieces a continuation streams: the tokens ending after the prefill."""
    return sum(1 for i in range(tokens) if len(expected_text(i + 1)) > len(prefill))


async def run(
    provider: AnthropicProvider | OpenAIProvider | SimulatedProvider, req: GenerationRequest
) -> list[Chunk]:
    return [chunk async for chunk in provider.stream(req)]


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks if isinstance(c, TextDelta))


def deltas(chunks: list[Chunk]) -> int:
    return sum(1 for c in chunks if isinstance(c, TextDelta))


def output_tokens(chunks: list[Chunk]) -> int | None:
    counts = [c.output_tokens for c in chunks if isinstance(c, Usage)]
    return [n for n in counts if n is not None][-1]


def input_tokens(chunks: list[Chunk]) -> int | None:
    return next(c.input_tokens for c in chunks if isinstance(c, Usage) and c.input_tokens)


def stop_of(chunks: list[Chunk]) -> str:
    last = chunks[-1]
    assert isinstance(last, Stop)
    return last.reason


@pytest.fixture
async def anthropic(upstream: FakeUpstreamServer) -> AsyncIterator[AnthropicProvider]:
    provider = AnthropicProvider("claude", base_url=upstream.url, api_key="test")
    yield provider
    await provider.aclose()


@pytest.fixture
async def openai(upstream: FakeUpstreamServer) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider("gpt", base_url=upstream.url + "/v1", api_key="test")
    yield provider
    await provider.aclose()


# Anthropic


@pytest.mark.parametrize("cut", CUTS)
async def test_anthropic_streams_exactly_what_follows_the_prefill(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer, cut: int
) -> None:
    prefill = FULL[:cut].rstrip()
    chunks = await run(anthropic, request(prefill))
    assert text_of(chunks) == FULL[len(prefill) :]
    assert deltas(chunks) == pieces_after(prefill) == output_tokens(chunks)
    assert stop_of(chunks) == "end_turn"
    (record,) = upstream.app.records
    assert record.prefill == prefill
    assert record.body["messages"][-1] == {"role": "assistant", "content": prefill}
    assert record.tokens_sent == deltas(chunks)
    for _ in range(100):  # set by the server just after its last write reached us
        if record.completed:
            break
        await asyncio.sleep(0.01)
    assert record.completed
    # Billed as prompt plus prefill.
    assert input_tokens(chunks) == count_input_tokens(record.body)


async def test_anthropic_without_prefill_sends_no_assistant_message(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    chunks = await run(anthropic, request(""))
    assert text_of(chunks) == FULL and output_tokens(chunks) == 20
    (record,) = upstream.app.records
    assert record.prefill is None
    assert [m["role"] for m in record.body["messages"]] == ["user"]


async def test_anthropic_continuation_counts_pieces_against_max_tokens(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    prefill = FULL[: _T1 + 2]
    chunks = await run(anthropic, request(prefill, max_tokens=3))
    # The rest of token 2, then tokens 3 and 4.
    assert text_of(chunks) == FULL[len(prefill) : len(expected_text(5))]
    assert deltas(chunks) == output_tokens(chunks) == 3
    assert stop_of(chunks) == "max_tokens"


async def test_anthropic_continuation_in_multi_token_chunks(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    prefill = FULL[: _T1 + 2]
    chunks = await run(anthropic, request(prefill, model="fake?chunk=3"))
    assert text_of(chunks) == FULL[len(prefill) :]
    assert output_tokens(chunks) == pieces_after(prefill)


async def test_anthropic_continuation_faults_count_pieces(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    prefill = FULL[: _T1 + 2]
    chunks: list[Chunk] = []
    with pytest.raises(UpstreamError) as caught:
        async for chunk in anthropic.stream(
            request(prefill, model="fake?fault=drop&fault_after=2")
        ):
            chunks.append(chunk)
    assert caught.value.code == "upstream_dropped"
    assert deltas(chunks) == 2
    assert text_of(chunks) == FULL[len(prefill) : len(expected_text(4))]
    assert upstream.app.records[0].tokens_sent == 2


async def test_anthropic_rejects_a_prefill_ending_in_whitespace(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    prefill = FULL[:_T0]
    assert prefill.endswith(" ")
    with pytest.raises(UpstreamError) as caught:
        await run(anthropic, request(prefill))
    assert caught.value.status == 400 and caught.value.retryable is False
    assert "trailing whitespace" in caught.value.message
    (record,) = upstream.app.records
    assert record.status == 400 and record.prefill == prefill and record.tokens_sent == 0


async def test_anthropic_model_that_refuses_prefill(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await run(anthropic, request(FULL[:10].rstrip(), model="fake?prefill=refuse"))
    assert caught.value.status == 400 and caught.value.retryable is False
    assert "does not support assistant message prefill" in caught.value.message
    # The same model still answers fresh requests.
    chunks = await run(anthropic, request("", model="fake?prefill=refuse"))
    assert text_of(chunks) == FULL


async def test_anthropic_prefill_that_is_not_the_answers_start_is_rejected(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await run(anthropic, request("Something else entirely"))
    assert caught.value.status == 400 and "not a prefix" in caught.value.message


async def test_anthropic_refusal_can_be_pushed_as_a_one_shot_fault(
    anthropic: AnthropicProvider, upstream: FakeUpstreamServer
) -> None:
    upstream.app.push_faults([{"prefill": "refuse"}])
    prefill = FULL[:10].rstrip()
    with pytest.raises(UpstreamError):
        await run(anthropic, request(prefill))
    chunks = await run(anthropic, request(prefill))
    assert text_of(chunks) == FULL[len(prefill) :]


async def test_anthropic_non_streaming_continuation(upstream: FakeUpstreamServer) -> None:
    prefill = FULL[: _T1 + 2]
    body = {
        "model": "fake",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "continue please"},
            {"role": "assistant", "content": [{"type": "text", "text": prefill}]},
        ],
    }
    async with httpx.AsyncClient() as client:
        r = await client.post(upstream.url + "/v1/messages", json=body)
    assert r.status_code == 200
    data = r.json()
    assert data["content"][0]["text"] == FULL[len(prefill) :]
    assert data["usage"]["output_tokens"] == pieces_after(prefill)
    assert upstream.app.records[0].prefill == prefill


# OpenAI-compatible


@pytest.mark.parametrize("cut", [_T0, _T1 + 2, len(FULL) // 2])
async def test_openai_continues_the_final_message(
    openai: OpenAIProvider, upstream: FakeUpstreamServer, cut: int
) -> None:
    prefill = FULL[:cut].rstrip()
    chunks = await run(openai, request(prefill))
    assert text_of(chunks) == FULL[len(prefill) :]
    assert output_tokens(chunks) == pieces_after(prefill)
    assert stop_of(chunks) == "end_turn"
    (record,) = upstream.app.records
    assert record.body["continue_final_message"] is True
    assert record.body["add_generation_prompt"] is False
    assert record.body["messages"][-1] == {"role": "assistant", "content": prefill}
    assert record.prefill == prefill
    assert input_tokens(chunks) == count_input_tokens(record.body)


async def test_openai_without_prefill_sends_no_continuation_flags(
    openai: OpenAIProvider, upstream: FakeUpstreamServer
) -> None:
    chunks = await run(openai, request(""))
    assert text_of(chunks) == FULL
    body = upstream.app.records[0].body
    assert "continue_final_message" not in body and "add_generation_prompt" not in body
    assert [m["role"] for m in body["messages"]] == ["user"]


async def test_openai_kind_accepts_a_prefill_ending_in_whitespace(
    openai: OpenAIProvider, upstream: FakeUpstreamServer
) -> None:
    prefill = FULL[:_T1]
    chunks = await run(openai, request(prefill))
    assert text_of(chunks) == FULL[_T1:]
    assert output_tokens(chunks) == 18


async def test_openai_model_that_refuses_prefill(
    openai: OpenAIProvider, upstream: FakeUpstreamServer
) -> None:
    with pytest.raises(UpstreamError) as caught:
        await run(openai, request(FULL[:10].rstrip(), model="fake?prefill=refuse"))
    assert caught.value.status == 400 and caught.value.retryable is False
    assert "does not support assistant message prefill" in caught.value.message


def _chat(messages: list[dict[str, str]], **extra: object) -> dict[str, object]:
    return {"model": "fake", "max_tokens": 100, "messages": messages, **extra}


async def test_openai_final_assistant_message_without_continuation_is_history(
    upstream: FakeUpstreamServer,
) -> None:
    messages = [
        {"role": "user", "content": "continue please"},
        {"role": "assistant", "content": FULL[:10].rstrip()},
    ]
    async with httpx.AsyncClient() as client:
        r = await client.post(upstream.url + "/v1/chat/completions", json=_chat(messages))
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == FULL
        assert upstream.app.records[-1].prefill is None

        # continue_final_message needs a final assistant message...
        r = await client.post(
            upstream.url + "/v1/chat/completions",
            json=_chat(messages[:1], continue_final_message=True),
        )
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"

        # ...and, when it has one, continues it (here without streaming).
        r = await client.post(
            upstream.url + "/v1/chat/completions",
            json=_chat(messages, continue_final_message=True, add_generation_prompt=False),
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == FULL[len(messages[1]["content"]) :]

        r = await client.post(
            upstream.url + "/v1/chat/completions",
            json=_chat(messages, model="fake?prefill=refuse", continue_final_message=True),
        )
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert "does not support assistant message prefill" in error["message"]


# Simulated


SIM_TOKENS = 30


@pytest.fixture
def simulated() -> SimulatedProvider:
    return SimulatedProvider("sim", tokens_per_second=0, response_tokens=SIM_TOKENS, ttft_ms=0)


SIM_FULL = simulated_text(request(""), SIM_TOKENS)


@pytest.mark.parametrize("cut", [1, 3, 5, 6, 7, len(SIM_FULL) // 2, len(SIM_FULL) - 1])
async def test_simulated_continues_its_own_text(simulated: SimulatedProvider, cut: int) -> None:
    req = request(SIM_FULL[:cut])
    chunks = await run(simulated, req)
    assert text_of(chunks) == SIM_FULL[cut:]
    assert deltas(chunks) == output_tokens(chunks) == simulated.expected_output_tokens(req)
    assert input_tokens(chunks) == estimate_tokens(req.prompt_chars())
    assert stop_of(chunks) == "end_turn"
    # Every piece after the first is a whole token of the fresh answer.
    fresh = [c.text for c in await run(simulated, request("")) if isinstance(c, TextDelta)]
    streamed = [c.text for c in chunks if isinstance(c, TextDelta)]
    assert streamed[1:] == fresh[len(fresh) - len(streamed) + 1 :]


async def test_simulated_prefill_of_the_whole_answer_streams_nothing(
    simulated: SimulatedProvider,
) -> None:
    req = request(SIM_FULL)
    chunks = await run(simulated, req)
    assert text_of(chunks) == "" and output_tokens(chunks) == 0
    assert simulated.expected_output_tokens(req) == 0
