"""Each upstream fault produces its documented outcome: retried and succeeded while
nothing was relayed, else one terminal `error` event and a truthful usage record."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from testkit.fake_upstream import FakeUpstreamServer, expected_text
from testkit.servers import ServerThread
from testkit.sse import Collected, collect
from tests.support import auth, relay_settings, write_config


async def run(client: httpx.AsyncClient, relay: ServerThread, model: str) -> Collected:
    body = {"model": model, "prompt": "faults", "max_tokens": 200}
    r = await client.post(relay.url + "/v1/streams", json=body, headers=auth())
    assert r.status_code == 201
    async with client.stream("GET", relay.url + r.json()["events_url"]) as response:
        return await collect(response)


@pytest.mark.parametrize("model", ["claude", "gpt"])
@pytest.mark.parametrize("fault", ["status_429", "status_529", "status_500"])
async def test_retryable_failures_before_the_stream_are_retried(
    relay: ServerThread,
    upstream: FakeUpstreamServer,
    client: httpx.AsyncClient,
    model: str,
    fault: str,
) -> None:
    upstream.app.push_faults([{"fault": fault, "retry_after_s": 0.05}])
    events = await run(client, relay, model)
    assert events.names[-1] == "done"
    assert events.text == expected_text(40)
    assert len(upstream.app.records) == 2


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_retries_are_bounded(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient, model: str
) -> None:
    upstream.app.push_faults([{"fault": "status_429"}] * 3)
    events = await run(client, relay, model)
    error = events.last("error")
    assert error["code"] == "upstream_rate_limited" and error["retryable"] is True
    assert len(upstream.app.records) == 3  # upstream_max_attempts
    assert events.names == ["start", "error"]


@pytest.mark.parametrize("model", ["claude", "gpt"])
async def test_client_errors_are_not_retried(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient, model: str
) -> None:
    upstream.app.push_faults([{"fault": "status_400"}])
    events = await run(client, relay, model)
    error = events.last("error")
    assert error["code"] == "upstream_rejected" and error["retryable"] is False
    assert len(upstream.app.records) == 1


MIDSTREAM: dict[str, tuple[str, bool]] = {
    "drop": ("upstream_dropped", True),
    "malformed": ("upstream_protocol_error", True),
    "overloaded": ("upstream_overloaded", True),
    "stall": ("upstream_timeout", True),
}


@pytest.fixture(scope="module")
def not_continuing(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer
) -> Iterator[ServerThread]:
    """Both provider kinds set up not to continue an answer (`continuation: none`):
    what a failure after text does then. (Continuation: test_continuation.py.)"""
    path = write_config(tmp_path_factory.mktemp("faults"), upstream.url)
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    for provider in raw["providers"].values():
        provider["continuation"] = "none"
    path.write_text(yaml.safe_dump(raw))
    server = ServerThread(relay_settings(path))
    yield server
    server.stop()


@pytest.mark.parametrize("model", ["claude", "gpt"])
@pytest.mark.parametrize("fault", sorted(MIDSTREAM))
async def test_failures_after_text_end_with_an_error_event_and_keep_the_text(
    not_continuing: ServerThread,
    upstream: FakeUpstreamServer,
    client: httpx.AsyncClient,
    model: str,
    fault: str,
) -> None:
    upstream.app.push_faults([{"fault": fault, "fault_after": 5}])
    events = await run(client, not_continuing, model)
    code, retryable = MIDSTREAM[fault]
    if model == "gpt" and fault == "overloaded":
        code = "upstream_unavailable"  # OpenAI's mid-stream error carries no overload type
    error = events.last("error")
    assert error["code"] == code and error["retryable"] is retryable
    assert events.names[-1] == "error" and "done" not in events.names
    # Nothing relayed is lost, and the partial usage is what was relayed.
    assert events.text == expected_text(5)
    assert error["usage"]["output_tokens"] == 5
    assert len(upstream.app.records) == 1  # never retried once text went out


async def test_first_token_timeout_is_retried_then_reported(
    relay: ServerThread, upstream: FakeUpstreamServer, client: httpx.AsyncClient
) -> None:
    # first-token timeout is 3 s in the test settings; the second attempt is prompt.
    upstream.app.push_faults([{"ttft_ms": 10_000}])
    events = await run(client, relay, "claude")
    assert events.names[-1] == "done"
    records: list[Any] = upstream.app.records
    assert len(records) == 2 and records[0].client_closed
