"""A provider that drops, stalls or overloads after text went out: the answer is
continued (prefill on the same model, then the fallbacks), and the reader sees one
stream: one `start`, contiguous ids and `index`, no character lost or doubled, a
`continued` event, and every attempt's usage summed into `done`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from streaming import estimate_tokens
from testkit.fake_upstream import FakeUpstreamServer, count_input_tokens, expected_text
from testkit.servers import ServerThread
from testkit.sse import Collected, collect
from tests.support import auth, relay_settings, write_config


@pytest.fixture(scope="module")
def continuing(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """Both provider kinds, set up to continue (the OpenAI kind as vLLM is), a model
    that refuses prefill, and one whose fallback continues for it."""
    path = write_config(tmp_path_factory.mktemp("continuation"), upstream.url)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    raw["providers"]["vllm"] = {
        "kind": "openai",
        "base_url": upstream.url + "/v1",
        "continuation": "prefill",
    }
    models = raw["models"]
    models["vllm"] = {"provider": "vllm", "upstream": "fake?tokens=40"}
    models["claude-new"] = {
        "provider": "anthropic",
        "upstream": "fake?tokens=40&prefill=refuse",
        "continuation": "none",
    }
    models["primary"] = {
        "provider": "anthropic",
        "upstream": "fake?tokens=40",
        "fallbacks": ["claude-new", "backup"],
        "input_usd_per_mtok": 3.0,
        "output_usd_per_mtok": 15.0,
    }
    models["backup"] = {
        "provider": "vllm",
        "upstream": "fake?tokens=40",
        "input_usd_per_mtok": 1.0,
        "output_usd_per_mtok": 2.0,
    }
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(relay_settings(path, upstream_max_attempts=2))
    yield server
    server.stop()


async def _run(client: httpx.AsyncClient, relay: ServerThread, model: str) -> Collected:
    body = {"model": model, "prompt": "continue me", "max_tokens": 200}
    r = await client.post(relay.url + "/v1/streams", json=body, headers=auth())
    assert r.status_code == 201, r.text
    async with client.stream("GET", relay.url + r.json()["events_url"]) as response:
        collected = await collect(response)
    collected.stream_id = r.json()["id"]  # type: ignore[attr-defined]
    return collected


def _seamless(events: Collected) -> None:
    assert events.names.count("start") == 1
    ids = [e.id for e in events.events]
    assert ids == list(range(1, len(ids) + 1))
    index = 0
    for event in events.events:
        if event.event == "delta":
            assert event.data["index"] == index  # contiguous (ASCII here: UTF-16 = chars)
            index += len(event.data["text"].encode("utf-16-le")) // 2
    percents = [e.data["percent"] for e in events.events if e.event == "progress"]
    assert percents == sorted(percents)


@pytest.mark.parametrize("model", ["claude", "vllm"])
@pytest.mark.parametrize("fault", ["drop", "overloaded", "stall"])
async def test_a_fault_after_text_is_continued_exactly(
    continuing: ServerThread,
    upstream: FakeUpstreamServer,
    client: httpx.AsyncClient,
    model: str,
    fault: str,
) -> None:
    upstream.app.push_faults([{"fault": fault, "fault_after": 13}])
    events = await _run(client, continuing, model)
    assert events.names[-1] == "done", events.events[-1]
    assert events.text == expected_text(40)
    _seamless(events)
    continued = events.last("continued")
    reason = {"drop": "upstream_dropped", "stall": "upstream_timeout"}.get(
        fault, "upstream_overloaded" if model == "claude" else "upstream_unavailable"
    )
    assert continued == {
        "attempt": 2,
        "reason": reason,
        "model": model,
        "provider": "anthropic" if model == "claude" else "vllm",
    }
    records = upstream.app.records
    assert len(records) == 2
    first, second = records
    assert first.prefill is None
    prefill = expected_text(13).rstrip()
    assert second.prefill == prefill
    if model == "vllm":
        assert second.body["continue_final_message"] is True
        assert second.body["add_generation_prompt"] is False
    # Every attempt is billed: both prompts (the second with its prefill), all output.
    # (An OpenAI-kind stream reports its usage only at its end: the dropped attempt's
    # prompt is billed at the estimate.)
    done = events.last("done")
    dropped = (
        count_input_tokens(first.body) if model == "claude" else estimate_tokens(len("continue me"))
    )
    inputs = dropped + count_input_tokens(second.body)
    assert done["usage"]["input_tokens"] == inputs
    assert done["usage"]["output_tokens"] == 13 + second.tokens_sent


async def test_a_drop_on_every_attempt_ends_in_an_error_that_keeps_the_text(
    continuing: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    upstream.app.push_faults([{"fault": "drop", "fault_after": 5}] * 2)
    events = await _run(client, continuing, "claude")
    error = events.last("error")
    assert error["code"] == "upstream_dropped" and error["retryable"] is True
    # 5 tokens, then 5 more pieces of the same answer: the first is the space the
    # prefill left out (dropped: it went out already), then 4 words.
    assert events.text == expected_text(9)
    _seamless(events)
    assert len(upstream.app.records) == 2  # upstream_max_attempts, no more
    assert error["usage"]["output_tokens"] == 10


async def test_a_model_without_continuation_gets_no_prefill_request(
    continuing: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    upstream.app.push_faults([{"fault": "drop", "fault_after": 5}])
    events = await _run(client, continuing, "claude-new")
    assert events.last("error")["code"] == "upstream_dropped"
    assert events.text == expected_text(5)
    assert [r.prefill for r in upstream.app.records] == [None]


async def test_a_fallback_continues_once_the_primary_attempts_are_spent(
    continuing: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    upstream.app.push_faults([{"fault": "drop", "fault_after": 5}] * 2)
    events = await _run(client, continuing, "primary")
    assert events.names[-1] == "done"
    assert events.text == expected_text(40)
    _seamless(events)
    told = [e.data for e in events.events if e.event == "continued"]
    assert [(c["model"], c["attempt"]) for c in told] == [("primary", 2), ("backup", 3)]
    # The request record lists the attempts, each with what it used.
    record = None
    for _ in range(50):
        record = await continuing.services.records.get(events.stream_id)  # type: ignore[attr-defined]
        if record is not None:
            break
        await asyncio.sleep(0.02)
    assert record is not None
    assert [(a["model"], a["reason"], a["output_tokens"]) for a in record["attempts"]] == [
        ("primary", None, 5),
        ("primary", "upstream_dropped", 5),
        ("backup", "upstream_dropped", 32),
    ]
    records = upstream.app.records
    # claude-new cannot continue: never asked. backup continues from 10 tokens.
    assert [r.api for r in records] == ["anthropic", "anthropic", "openai"]
    assert records[2].prefill == expected_text(9).rstrip()
    done = events.last("done")
    assert done["usage"]["output_tokens"] == 5 + 5 + 32  # each continuation: " " + words
    # Each attempt at its own model's prices.
    ins = [count_input_tokens(r.body) for r in records]
    cost = ((ins[0] + ins[1]) * 3.0 + 10 * 15.0 + ins[2] * 1.0 + 32 * 2.0) / 1e6
    assert done["cost_usd"] == pytest.approx(cost, abs=1e-8)


async def test_a_fallback_is_used_before_the_first_token_too(
    continuing: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    upstream.app.push_faults([{"fault": "status_529"}] * 3)
    events = await _run(client, continuing, "primary")
    assert events.names[-1] == "done" and events.text == expected_text(40)
    told = [e.data["model"] for e in events.events if e.event == "continued"]
    assert told == ["claude-new", "backup"]  # primary twice, then each fallback once


async def test_the_direct_route_continues_too(
    continuing: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    upstream.app.push_faults([{"fault": "drop", "fault_after": 7}])
    body = {"model": "vllm", "prompt": "continue me", "max_tokens": 200}
    async with client.stream(
        "POST", continuing.url + "/v1/chat/stream", json=body, headers=auth()
    ) as response:
        events = await collect(response)
    assert events.names[-1] == "done" and events.text == expected_text(40)
    _seamless(events)
    assert events.last("continued")["reason"] == "upstream_dropped"
