"""The fake upstream must be faithful enough for the official SDKs, or proxy tests prove nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from testkit.fake_upstream import (
    Behaviour,
    FakeUpstreamServer,
    RequestRecord,
    count_input_tokens,
    expected_text,
    token_at,
)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer(defaults=Behaviour(tokens=20)) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: FakeUpstreamServer) -> Iterator[None]:
    server.app.clear()
    yield
    server.app.clear()


@pytest.fixture
async def http(server: FakeUpstreamServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5, trust_env=False) as client:
        yield client


@pytest.fixture
async def sdk(server: FakeUpstreamServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="test", max_retries=0) as c:
        yield c


async def wait_for_record(server: FakeUpstreamServer, tag: str, **want: Any) -> RequestRecord:
    """Poll instead of asserting timings: the server runs on another thread."""
    for _ in range(100):
        for rec in list(server.app.records):
            if rec.headers.get("x-test") == tag and all(
                getattr(rec, k) == v for k, v in want.items()
            ):
                return rec
        await asyncio.sleep(0.01)
    raise AssertionError(f"no record {tag} with {want}: {server.app.records}")


def anthropic_body(model: str, max_tokens: int = 100) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_expected_text_is_concatenated_tokens() -> None:
    text = expected_text(200, seed="s")
    assert text == "".join(token_at(i, "s") for i in range(200))
    assert expected_text(200) != text
    assert len(set(text.split(" "))) > 40  # not a trivial repetition
    body = {
        "system": "x" * 40,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}],
    }
    assert count_input_tokens(body) == 20
    assert count_input_tokens({"messages": []}) == 1


async def test_anthropic_sdk_stream(
    server: FakeUpstreamServer, sdk: anthropic.AsyncAnthropic
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Tell me something long, please."}]
    stream = await sdk.messages.create(
        model="fake?tokens=57&chunk=2",
        max_tokens=100,
        system="be brief",
        messages=messages,
        stream=True,
        extra_headers={"x-test": "sdk"},
    )
    text, types = "", []
    input_tokens = output_tokens = -1
    stop_reason = None
    async for event in stream:
        types.append(event.type)
        if event.type == "message_start":
            input_tokens = event.message.usage.input_tokens
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        elif event.type == "message_delta":
            output_tokens, stop_reason = event.usage.output_tokens, event.delta.stop_reason
    assert text == expected_text(57)
    expected_input = count_input_tokens({"system": "be brief", "messages": messages})
    assert (input_tokens, output_tokens, stop_reason) == (expected_input, 57, "end_turn")
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    rec = await wait_for_record(server, "sdk", completed=True)
    assert rec.api == "anthropic" and rec.tokens_sent == 57 and not rec.client_closed
    # Headers are recorded lower-cased; SDK 2.12 authenticates with a bearer token.
    assert "test" in (rec.headers.get("x-api-key"), rec.headers.get("authorization", "")[7:])
    assert "anthropic-version" in rec.headers


async def test_anthropic_max_tokens_truncates(sdk: anthropic.AsyncAnthropic) -> None:
    stream = await sdk.messages.create(
        model="fake?tokens=30",
        max_tokens=5,
        stream=True,
        messages=[{"role": "user", "content": "hi"}],
    )
    text, stop_reason = "", None
    async for event in stream:
        if event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        elif event.type == "message_delta":
            stop_reason = event.delta.stop_reason
    assert (text, stop_reason) == (expected_text(5), "max_tokens")


async def test_anthropic_non_stream(sdk: anthropic.AsyncAnthropic) -> None:
    message = await sdk.messages.create(
        model="fake?tokens=7",
        max_tokens=100,
        messages=[{"role": "user", "content": "hi"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == expected_text(7)
    assert message.usage.output_tokens == 7 and message.stop_reason == "end_turn"


@pytest.mark.parametrize(("max_tokens", "n", "finish"), [(None, 25, "stop"), (10, 10, "length")])
async def test_openai_stream(
    http: httpx.AsyncClient, max_tokens: int | None, n: int, finish: str
) -> None:
    body: dict[str, Any] = {
        "model": "gpt-fake?tokens=25&tps=2000&chunk=3",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hello there, model."}],
    }
    if max_tokens is not None:
        body["max_completion_tokens"] = max_tokens
    chunks: list[Any] = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                chunks.append(data if data == "[DONE]" else json.loads(data))
    assert chunks[-1] == "[DONE]"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:-3]]
    assert "".join(deltas) == expected_text(n)
    assert chunks[-3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": finish}
    prompt = count_input_tokens(body)
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": n,
        "total_tokens": prompt + n,
    }
    assert {c["object"] for c in chunks[:-1]} == {"chat.completion.chunk"}


async def test_queued_429_then_success(server: FakeUpstreamServer, http: httpx.AsyncClient) -> None:
    resp = await http.post(
        "/_control/faults", json={"faults": [{"fault": "status_429", "retry_after_s": 0.1}]}
    )
    assert resp.status_code == 200 and resp.json() == {"queued": 1}
    resp = await http.post("/v1/messages", json=anthropic_body("fake"))
    assert resp.status_code == 429 and resp.headers["retry-after"] == "0.1"
    assert resp.json() == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limited"},
    }
    async with http.stream("POST", "/v1/messages", json=anthropic_body("fake")) as ok:
        assert ok.status_code == 200
        assert "event: message_stop" in (await ok.aread()).decode()
    assert [r.status for r in server.app.records] == [429, 200]


@pytest.mark.parametrize(
    ("fault", "path", "status", "err_type"),
    [
        ("status_529", "/v1/messages", 529, "overloaded_error"),
        ("status_529", "/v1/chat/completions", 503, "server_error"),
        ("status_500", "/v1/messages", 500, "api_error"),
        ("status_400", "/v1/chat/completions", 400, "invalid_request_error"),
    ],
)
async def test_status_faults(
    server: FakeUpstreamServer,
    http: httpx.AsyncClient,
    fault: str,
    path: str,
    status: int,
    err_type: str,
) -> None:
    server.app.push_faults([Behaviour(fault=fault)])
    resp = await http.post(path, json=anthropic_body("fake"))
    assert resp.status_code == status and resp.json()["error"]["type"] == err_type
    assert "retry-after" not in resp.headers


async def test_overloaded_mid_stream_in_sdk(sdk: anthropic.AsyncAnthropic) -> None:
    stream = await sdk.messages.create(
        model="fake?tokens=10&fault=overloaded&fault_after=3",
        max_tokens=100,
        stream=True,
        messages=[{"role": "user", "content": "hi"}],
    )
    text = ""
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
    # SDK 2.x raises the base APIStatusError carrying the HTTP 200 of the stream itself.
    assert info.value.status_code == 200
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert text == expected_text(3)


async def test_openai_overloaded_and_malformed(http: httpx.AsyncClient) -> None:
    for fault, last in [
        ("overloaded", '{"error":{"message":"Overloaded","type":"server_error"}}'),
        ("malformed", "{not json"),
    ]:
        body = {
            "model": f"fake?tokens=5&fault={fault}&fault_after=2",
            "stream": True,
            "messages": [],
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = [ln async for ln in resp.aiter_lines() if ln.startswith("data: ")]
        assert len(lines) == 4 and lines[-1] == "data: " + last


@pytest.mark.parametrize(
    "model",
    [
        "fake?tokens=10&fault=stall&fault_after=2",
        "fake?tokens=10&ttft_ms=30000",
    ],
)
async def test_client_close_is_recorded(
    server: FakeUpstreamServer, http: httpx.AsyncClient, model: str
) -> None:
    tag = uuid.uuid4().hex
    async with http.stream(
        "POST", "/v1/messages", json=anthropic_body(model), headers={"x-test": tag}
    ) as resp:
        async for line in resp.aiter_lines():
            if line == "event: ping":
                break
    rec = await wait_for_record(server, tag, client_closed=True)
    assert not rec.completed and rec.ended_at is not None and rec.tokens_sent <= 2


async def test_drop_ends_without_message_stop(
    server: FakeUpstreamServer, http: httpx.AsyncClient
) -> None:
    events: list[str] = []
    with pytest.raises(httpx.RemoteProtocolError):
        async with http.stream(
            "POST",
            "/v1/messages",
            headers={"x-test": "drop"},
            json=anthropic_body("fake?tokens=10&fault=drop&fault_after=4"),
        ) as r:
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    events.append(line[len("event: ") :])
    assert events.count("content_block_delta") == 4 and "message_stop" not in events
    rec = await wait_for_record(server, "drop")
    assert (rec.tokens_sent, rec.completed, rec.client_closed) == (4, False, False)


async def test_control_api_and_precedence(
    server: FakeUpstreamServer, http: httpx.AsyncClient
) -> None:
    assert (await http.get("/_control/health")).status_code == 200
    assert (
        await http.post("/_control/faults", json={"faults": [{"fault": "nope"}]})
    ).status_code == 400
    server.app.push_faults([{"tokens": 3, "fault": None}])  # queued beats the model name
    resp = await http.post(
        "/v1/messages", json=anthropic_body("fake?tokens=9&fault=drop"), headers={"x-test": "ctl"}
    )
    assert resp.text.count("content_block_delta") == 3 * 2
    listed = (await http.get("/_control/requests")).json()
    assert listed[0]["headers"]["x-test"] == "ctl" and listed[0]["completed"] is True
    assert listed[0]["model"] == "fake?tokens=9&fault=drop"
    assert (await http.delete("/_control/requests")).json() == {"cleared": 1}
    assert server.app.records == []


async def test_batched_writes_keep_one_event_per_token(
    http: httpx.AsyncClient, server: FakeUpstreamServer
) -> None:
    # `batch` packs several SSE events into one write (the bench's saturation load);
    # the events themselves, and the text, are unchanged.
    body = {"model": "fake?tokens=50&batch=16", "stream": True, "messages": []}
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        reads = [raw async for raw in resp.aiter_raw()]
    events = b"".join(reads).split(b"\n\n")
    texts = [
        json.loads(e[6:])["choices"][0]["delta"].get("content", "")
        for e in events
        if e.startswith(b"data: {") and json.loads(e[6:])["choices"]
    ]
    assert "".join(texts) == expected_text(50)
    assert sum(1 for t in texts if t) == 50  # one event per token
    assert len(reads) < 50  # but far fewer writes than events
    assert server.app.records[-1].tokens_sent == 50
