"""The OpenAI- and Anthropic-compatible front doors, driven by the official `openai` and
`anthropic` SDKs against a real server, each door against both upstream kinds (the fake
upstream speaking Anthropic and OpenAI) and the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from auth import SigningKey, TokenIssuer
from streaming import GenerationRequest, Message, simulated_text
from testkit.fake_upstream import expected_text
from testkit.servers import ServerThread
from tests.support import SECRET, relay_settings, token, write_config

UPSTREAM_MODELS = ("claude", "gpt")  # each 40 tokens of the fake upstream's text


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory, upstream: Any) -> Iterator[ServerThread]:
    path = write_config(tmp_path_factory.mktemp("compat"), upstream.url, name="compat")
    raw = yaml.safe_load(path.read_text())
    raw["models"].update(
        {
            # Fails after 5 tokens and may not continue: the SDK must raise.
            "gpt-drop": {
                "provider": "openai",
                "upstream": "fake?tokens=40&fault=drop&fault_after=5",
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
            },
            "claude-drop": {
                "provider": "anthropic",
                "upstream": "fake?tokens=40&fault=drop&fault_after=5",
                "continuation": "none",
                "input_usd_per_mtok": 3.0,
                "output_usd_per_mtok": 15.0,
            },
            "gpt-cached": {
                "provider": "openai",
                "upstream": "fake?tokens=40",
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
                "cache": {"ttl_s": 600, "scope": "subject"},
            },
            "gpt-slow": {
                "provider": "openai",
                "upstream": "fake?tokens=400&tps=20",
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
            },
            "claude-busy": {
                "provider": "anthropic",
                "upstream": "fake?fault=status_529",
                "input_usd_per_mtok": 3.0,
                "output_usd_per_mtok": 15.0,
            },
        }
    )
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(relay_settings(path, upstream_max_attempts=1))
    yield server
    server.stop()


Make = Callable[..., Any]


@pytest.fixture
async def oai(relay: ServerThread) -> AsyncIterator[Make]:
    """OpenAI SDK clients on the relay (closed after the test)."""
    made: list[openai.AsyncOpenAI] = []

    def make(key: str | None = None) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=relay.url + "/v1", api_key=key or token("sdk-user"), max_retries=0
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


@pytest.fixture
async def ant(relay: ServerThread) -> AsyncIterator[Make]:
    """Anthropic SDK clients on the relay (closed after the test)."""
    made: list[anthropic.AsyncAnthropic] = []

    def make(key: str | None = None) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(
            base_url=relay.url, api_key=key or token("sdk-user"), max_retries=0
        )
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def _sim_text(prompt: str, tokens: int) -> str:
    return simulated_text(
        GenerationRequest("sim-fast", (Message("user", prompt),), max_tokens=tokens), tokens
    )


# OpenAI door


@pytest.mark.parametrize("model", UPSTREAM_MODELS)
async def test_openai_sdk_streams_exact_text_and_usage(
    relay: ServerThread, oai: Make, ant: Make, model: str
) -> None:
    client = oai()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(40)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].object == "chat.completion.chunk"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 40
    assert last.usage.prompt_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + 40
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


@pytest.mark.parametrize("model", UPSTREAM_MODELS)
async def test_openai_sdk_without_streaming(
    relay: ServerThread, oai: Make, ant: Make, model: str
) -> None:
    client = oai()
    completion = await client.chat.completions.create(
        model=model,
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ],
        max_completion_tokens=200,
    )
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected_text(40)
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 40


async def test_openai_sdk_on_the_simulator_with_stop_and_max_tokens(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    client = oai()
    whole = _sim_text("sim stop", 20)
    stop = whole.split()[5]
    completion = await client.chat.completions.create(
        model="sim-fast", messages=[{"role": "user", "content": "sim stop"}], stop=[stop]
    )
    assert completion.choices[0].message.content == whole[: whole.index(stop)]
    assert completion.choices[0].finish_reason == "stop"
    short = await client.chat.completions.create(
        model="sim-fast", messages=[{"role": "user", "content": "sim stop"}], max_tokens=5
    )
    assert short.choices[0].message.content == _sim_text("sim stop", 5)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 5


async def test_openai_sdk_raises_on_a_mid_stream_failure(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    client = oai()
    stream = await client.chat.completions.create(
        model="gpt-drop", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    text = []
    with pytest.raises(openai.APIError) as raised:
        async for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == expected_text(5)
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["code"] == "upstream_dropped"


async def test_openai_sdk_gets_http_errors_before_the_stream(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    client = oai()
    with pytest.raises(openai.AuthenticationError):
        await oai("not-a-token").models.list()
    with pytest.raises(openai.AuthenticationError) as auth:
        await oai("sk-wrong").chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as unsupported:
        await client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert unsupported.value.code == "unsupported_parameter"
    assert "n is not supported" in unsupported.value.message
    with pytest.raises(openai.BadRequestError) as tools:
        await client.chat.completions.create(
            model="gpt",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="gpt",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                }
            ],
        )
    with pytest.raises(openai.InternalServerError) as busy:
        await client.chat.completions.create(
            model="claude-busy", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    assert busy.value.status_code == 529
    assert busy.value.response.headers["retry-after"] == "1"
    # What OpenAI itself refuses with 400, and the SDK raises as BadRequestError.
    for bad in (
        {"max_tokens": 0},
        {"temperature": 3},
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
        {"extra_body": {"n": True}},
        {"extra_body": {"seed": 7}},
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": "t"}]},
    ):
        args: dict[str, Any] = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(**{**args, **bad})


async def test_openai_sdk_lists_models_with_prices(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    page = await oai().models.list()
    models = {m.id: m for m in page.data}
    assert {"sim-fast", "claude", "gpt"} <= set(models)
    gpt = models["gpt"]
    assert gpt.object == "model" and gpt.owned_by == "openai"
    assert gpt.model_extra is not None and gpt.model_extra["output_usd_per_mtok"] == 8.0


# Anthropic door


@pytest.mark.parametrize("model", UPSTREAM_MODELS)
async def test_anthropic_sdk_streams_exact_text_and_usage(
    relay: ServerThread, oai: Make, ant: Make, model: str
) -> None:
    client = ant()
    async with client.messages.stream(
        model=model, max_tokens=200, messages=[{"role": "user", "content": "hello"}]
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        message = await stream.get_final_message()
    assert "".join(pieces) == expected_text(40)
    assert len(pieces) > 1
    assert message.content[0].type == "text" and message.content[0].text == expected_text(40)
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 40 and message.usage.input_tokens > 0
    assert message.id.startswith("msg_") and message.role == "assistant"


async def test_anthropic_sdk_raw_event_sequence(ant: Make) -> None:
    client = ant()
    stream = await client.messages.create(
        model="claude",
        max_tokens=200,
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
    )
    kinds = [event.type async for event in stream]
    assert kinds[:2] == ["message_start", "content_block_start"]  # the SDK drops `ping`
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


@pytest.mark.parametrize("model", UPSTREAM_MODELS)
async def test_anthropic_sdk_without_streaming(
    relay: ServerThread, oai: Make, ant: Make, model: str
) -> None:
    message = await ant().messages.create(
        model=model,
        max_tokens=200,
        system="be brief",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
    )
    assert message.content[0].text == expected_text(40)  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 40


async def test_anthropic_sdk_on_the_simulator_with_stop_sequences(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    whole = _sim_text("sim anthropic", 20)
    stop = whole.split()[4]
    message = await ant().messages.create(
        model="sim-fast",
        max_tokens=20,
        messages=[{"role": "user", "content": "sim anthropic"}],
        stop_sequences=[stop],
    )
    assert message.content[0].text == whole[: whole.index(stop)]  # type: ignore[union-attr]
    assert message.stop_reason == "stop_sequence"


async def test_anthropic_sdk_raises_on_a_mid_stream_failure(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    client = ant()
    text = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async with client.messages.stream(
            model="claude-drop", max_tokens=200, messages=[{"role": "user", "content": "hello"}]
        ) as stream:
            async for piece in stream.text_stream:
                text.append(piece)
    assert "".join(text) == expected_text(5)
    body = raised.value.body
    assert isinstance(body, dict) and body["error"]["code"] == "upstream_dropped"


async def test_anthropic_sdk_errors_before_the_stream(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await ant("sk-wrong").messages.create(
            model="claude", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    client = ant()
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(
            model="nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(anthropic.BadRequestError) as tools:
        await client.messages.create(
            model="claude",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    assert tools.value.body["error"]["code"] == "unsupported_parameter"  # type: ignore[index]
    with pytest.raises(anthropic.InternalServerError) as busy:
        await client.messages.create(
            model="claude-busy", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert busy.value.status_code == 529
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


async def _eventually(check: Callable[[], bool]) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("never happened")


async def test_a_streaming_client_leaving_cancels_upstream(oai: Make, upstream: Any) -> None:
    stream = await oai().chat.completions.create(
        model="gpt-slow", messages=[{"role": "user", "content": "leave early"}], stream=True
    )
    seen = 0
    async for chunk in stream:
        seen += bool(chunk.choices and chunk.choices[0].delta.content)
        if seen == 2:
            break
    await stream.close()
    record = upstream.app.records[-1]
    assert record.model == "fake?tokens=400&tps=20"
    await _eventually(lambda: record.client_closed)
    assert not record.completed


async def test_a_waiting_client_leaving_cancels_upstream(
    relay: ServerThread, upstream: Any
) -> None:
    """Not streaming, the answer is built whole before anything is sent: a client that
    gives up meanwhile still stops the upstream call."""
    body = {
        "model": "gpt-slow",
        "messages": [{"role": "user", "content": "leave while waiting"}],
        "max_tokens": 400,
    }
    async with httpx.AsyncClient(timeout=httpx.Timeout(1.0)) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                relay.url + "/v1/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {token('waiter')}"},
            )
    record = upstream.app.records[-1]
    assert record.body["messages"][-1]["content"] == "leave while waiting"
    await _eventually(lambda: record.client_closed)
    assert not record.completed


async def test_both_sdks_with_an_api_key(relay: ServerThread, oai: Make, ant: Make) -> None:
    """A server-side caller with an API key: the SDKs send it as a Bearer token, and a
    client may send it in `x-api-key` (Anthropic's own header); either way the caller is
    the key's subject, on its plan."""
    issuer = TokenIssuer(SigningKey("HS256", SECRET.encode()))
    access, _ = issuer.issue("ops", "pro", ttl_s=600, scopes=["sserelay:admin"])
    async with httpx.AsyncClient(timeout=10) as http:
        created = await http.post(
            relay.url + "/v1/admin/apikeys",
            json={"sub": "batch-job", "plan": "free"},
            headers={"authorization": f"Bearer {access}"},
        )
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        completion = await oai(key).chat.completions.create(
            model="sim-fast", messages=[{"role": "user", "content": "key"}], max_tokens=5
        )
        assert completion.choices[0].message.content == _sim_text("key", 5)
        headers = {"x-api-key": key}
        async with anthropic.AsyncAnthropic(
            base_url=relay.url, api_key=None, default_headers=headers, max_retries=0
        ) as by_header:
            message = await by_header.messages.create(
                model="sim-fast", max_tokens=5, messages=[{"role": "user", "content": "key"}]
            )
        assert message.content[0].text == _sim_text("key", 5)  # type: ignore[union-attr]
        # The key's plan (free) may not use `gpt`: refused as the plan says.
        with pytest.raises(openai.PermissionDeniedError):
            await oai(key).chat.completions.create(
                model="gpt", messages=[{"role": "user", "content": "key"}]
            )
        usage = await http.get(relay.url + "/v1/usage", headers={"x-api-key": key})
        assert usage.json()["subject"] == "batch-job"
        revoked = await http.delete(
            relay.url + f"/v1/admin/apikeys/{created.json()['id']}",
            headers={"authorization": f"Bearer {access}"},
        )
        assert revoked.status_code == 200
    with pytest.raises(anthropic.AuthenticationError):
        await ant(key).messages.create(
            model="sim-fast", max_tokens=5, messages=[{"role": "user", "content": "key"}]
        )


async def test_cached_answers_replay_through_both_doors(
    oai: Make, ant: Make, upstream: Any
) -> None:
    """A model with the cache on: the first answer is generated (MISS), the same request
    again replays it (HIT) in either API's shape, identical, with no upstream call."""
    who = token("cache-user")
    ask = [{"role": "user", "content": "cache me"}]
    first = await oai(who).chat.completions.with_raw_response.create(
        model="gpt-cached", messages=ask, max_tokens=100
    )
    assert first.headers["x-cache"] == "MISS"
    calls = len(upstream.app.records)
    again = await oai(who).chat.completions.with_raw_response.create(
        model="gpt-cached", messages=ask, max_tokens=100
    )
    assert again.headers["x-cache"] == "HIT"
    hit = again.parse()
    assert hit.choices[0].message.content == first.parse().choices[0].message.content
    assert hit.choices[0].message.content == expected_text(40)
    assert hit.model_extra is not None and hit.model_extra["sserelay"]["cached"] is True
    assert hit.model_extra["sserelay"]["cost_usd"] == 0
    stream = await oai(who).chat.completions.create(
        model="gpt-cached", messages=ask, max_tokens=100, stream=True
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == expected_text(40) and len(pieces) > 3
    async with ant(who).messages.stream(model="gpt-cached", max_tokens=100, messages=ask) as s:
        assert "".join([t async for t in s.text_stream]) == expected_text(40)
    assert len(upstream.app.records) == calls  # every one a replay


async def test_an_answer_ending_before_any_text_is_settled_once(
    relay: ServerThread, oai: Make, ant: Make
) -> None:
    """A stop sequence that matches at the very start: an empty answer, streamed, through
    both doors. Each stream is counted and settled once, and none stays open."""
    services = relay.app.state.services
    first_word = _sim_text("empty", 5).split()[0]
    before = services.metrics.streams_finished.labels(
        "chat", "pro", "sim-fast", "done"
    )._value.get()
    stream = await oai().chat.completions.create(
        model="sim-fast",
        messages=[{"role": "user", "content": "empty"}],
        stop=[first_word],
        stream=True,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "stop"
    async with ant().messages.stream(
        model="sim-fast",
        max_tokens=5,
        messages=[{"role": "user", "content": "empty"}],
        stop_sequences=[first_word],
    ) as empty:
        message = await empty.get_final_message()
    assert message.stop_reason == "stop_sequence" and message.content[0].text == ""  # type: ignore[union-attr]
    await _eventually(lambda: services.drain.direct_streams == 0)
    after = services.metrics.streams_finished.labels("chat", "pro", "sim-fast", "done")._value.get()
    assert after - before == 2
    assert services.drain.direct_streams == 0
    assert services.metrics.streams_active.labels("chat")._value.get() == 0
