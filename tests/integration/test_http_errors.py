"""Bad input gets a clear RFC 9457 problem with a stable code; nothing starts."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from testkit.servers import ServerThread
from tests.support import SECRET, auth, relay_settings, token


def _is_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["code"] == code
    assert {"type", "title", "detail"} <= set(body)
    assert "Traceback" not in r.text
    return body


BAD_BODIES: list[tuple[str, Any, int, str]] = [
    ("unknown field", {"model": "sim-fast", "prompt": "x", "stream": True}, 422, "invalid_request"),
    ("no input", {"model": "sim-fast"}, 422, "invalid_request"),
    (
        "both inputs",
        {"model": "sim-fast", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
        422,
        "invalid_request",
    ),
    ("empty messages", {"model": "sim-fast", "messages": []}, 422, "invalid_request"),
    (
        "bad role",
        {"model": "sim-fast", "messages": [{"role": "system", "content": "y"}]},
        422,
        "invalid_request",
    ),
    (
        "assistant first",
        {"model": "sim-fast", "messages": [{"role": "assistant", "content": "y"}]},
        422,
        "invalid_request",
    ),
    (
        "zero max_tokens",
        {"model": "sim-fast", "prompt": "x", "max_tokens": 0},
        422,
        "invalid_request",
    ),
    ("temperature", {"model": "sim-fast", "prompt": "x", "temperature": 3}, 422, "invalid_request"),
    (
        "only control characters",
        {"model": "sim-fast", "prompt": "\x01\x02"},
        422,
        "invalid_request",
    ),
    ("not an object", [1, 2], 422, "invalid_request"),
    ("unknown model", {"model": "gpt-99", "prompt": "x"}, 404, "model_not_found"),
    (
        "max_tokens over plan",
        {"model": "sim-fast", "prompt": "x", "max_tokens": 5000},
        422,
        "max_tokens_too_large",
    ),
]


@pytest.mark.parametrize("route", ["/v1/streams", "/v1/chat/stream"])
@pytest.mark.parametrize(
    ("name", "body", "status", "code"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES]
)
async def test_invalid_bodies(
    relay: ServerThread,
    client: httpx.AsyncClient,
    route: str,
    name: str,
    body: Any,
    status: int,
    code: str,
) -> None:
    r = await client.post(relay.url + route, json=body, headers=auth())
    _is_problem(r, status, code)


async def test_model_outside_the_plan(relay: ServerThread, client: httpx.AsyncClient) -> None:
    r = await client.post(
        relay.url + "/v1/streams",
        json={"model": "claude", "prompt": "x"},
        headers=auth(plan="free"),
    )
    _is_problem(r, 403, "model_not_allowed")


async def test_transport_level_errors(relay: ServerThread, client: httpx.AsyncClient) -> None:
    url = relay.url + "/v1/streams"
    r = await client.post(
        url, content=b"{not json", headers={**auth(), "content-type": "application/json"}
    )
    _is_problem(r, 400, "invalid_json")
    r = await client.post(
        url,
        content=b"model=x",
        headers={**auth(), "content-type": "application/x-www-form-urlencoded"},
    )
    _is_problem(r, 415, "unsupported_media_type")
    huge = {"model": "sim-fast", "prompt": "x" * 1_100_000}
    _is_problem(await client.post(url, json=huge, headers=auth()), 413, "body_too_large")


async def test_limits_on_messages_and_content(config_path: Any, client: httpx.AsyncClient) -> None:
    server = ServerThread(relay_settings(config_path, max_messages=3, max_content_chars=50))
    try:
        url = server.url + "/v1/streams"
        many = {"model": "sim-fast", "messages": [{"role": "user", "content": "hi"}] * 4}
        _is_problem(await client.post(url, json=many, headers=auth()), 422, "too_many_messages")
        long = {"model": "sim-fast", "prompt": "x" * 51}
        _is_problem(await client.post(url, json=long, headers=auth()), 422, "content_too_long")
    finally:
        server.stop()


async def test_control_characters_are_stripped(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    from app.schemas import CompletionRequest

    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "a\x00b\x1b[31mc\td\ne\r\x7f\x85"}
    )
    assert body.prompt == "ab[31mc\td\ne"


CREDENTIALS: list[tuple[str, dict[str, str], str]] = [
    ("no header", {}, "missing_credentials"),
    ("basic scheme", {"authorization": "Basic YWxpY2U6cHc="}, "invalid_token"),
    ("garbage", {"authorization": "Bearer not.a.jwt"}, "invalid_token"),
    ("wrong key", {"authorization": "Bearer " + token(secret="x" * 40)}, "invalid_token"),
    ("two tokens", {"authorization": f"Bearer {token()} {token()}"}, "invalid_token"),
]


@pytest.mark.parametrize(("name", "headers", "code"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS])
async def test_bad_credentials_get_401_with_a_challenge(
    relay: ServerThread, client: httpx.AsyncClient, name: str, headers: dict[str, str], code: str
) -> None:
    r = await client.get(relay.url + "/v1/models", headers=headers)
    _is_problem(r, 401, code)
    assert r.headers["www-authenticate"].startswith("Bearer error=")


async def test_unknown_plan_is_403(relay: ServerThread, client: httpx.AsyncClient) -> None:
    r = await client.get(relay.url + "/v1/models", headers=auth(plan="platinum"))
    _is_problem(r, 403, "unknown_plan")


async def test_expired_ticket(config_path: Any, client: httpx.AsyncClient) -> None:
    from auth import TicketService

    ticket, _ = TicketService(SECRET.encode(), ttl_s=-120).issue("s_x", "alice", "pro")
    server = ServerThread(relay_settings(config_path, ticket_secret=SECRET))
    try:
        r = await client.get(server.url + "/v1/streams/s_x/events", params={"ticket": ticket})
        _is_problem(r, 401, "ticket_expired")
    finally:
        server.stop()


async def test_bad_last_event_id(relay: ServerThread, client: httpx.AsyncClient) -> None:
    r = await client.post(
        relay.url + "/v1/streams",
        json={"model": "sim-fast", "prompt": "x", "max_tokens": 3},
        headers=auth(),
    )
    url = relay.url + r.json()["events_url"]
    _is_problem(
        await client.get(url, headers={"last-event-id": "abc"}), 400, "invalid_last_event_id"
    )


async def test_models_health_and_unknown_routes(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    r = await client.get(relay.url + "/v1/models", headers=auth(plan="free"))
    assert r.status_code == 200
    assert r.json() == {
        "object": "list",
        "plan": "free",
        "data": [
            {
                "id": "sim-fast",
                "object": "model",
                "created": 0,
                "owned_by": "sim",
                "provider": "sim",
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 5.0,
                "max_output_tokens": 100,
            }
        ],
    }
    pro = (await client.get(relay.url + "/v1/models", headers=auth(plan="pro"))).json()
    assert {m["id"] for m in pro["data"]} == {"sim-fast", "sim-slow", "claude", "gpt"}
    assert (await client.get(relay.url + "/healthz")).status_code == 200
    ready = await client.get(relay.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    _is_problem(await client.get(relay.url + "/v1/nope"), 404, "not_found")
    _is_problem(await client.put(relay.url + "/v1/streams"), 405, "method_not_allowed")
    r = await client.get(relay.url + "/healthz", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assert len((await client.get(relay.url + "/healthz")).headers["x-request-id"]) == 32
    metrics = await client.get(relay.url + "/metrics")
    assert metrics.status_code == 200 and "sserelay_streams_started_total" in metrics.text


async def test_dev_token_route_exists_only_without_a_key(
    relay: ServerThread, config_path: Any, client: httpx.AsyncClient
) -> None:
    r = await client.post(relay.url + "/v1/auth/dev-token", json={})
    _is_problem(r, 404, "not_found")
    server = ServerThread(relay_settings(config_path, jwt_secret=None))
    try:
        r = await client.post(server.url + "/v1/auth/dev-token", json={"sub": "bob"})
        assert r.status_code == 200
        dev = r.json()
        assert dev["plan"] == "free" and dev["sub"] == "bob"
        models = await client.get(
            server.url + "/v1/models", headers={"authorization": f"Bearer {dev['access_token']}"}
        )
        assert models.status_code == 200
        bad = await client.post(server.url + "/v1/auth/dev-token", json={"plan": "gold"})
        _is_problem(bad, 422, "unknown_plan")
    finally:
        server.stop()


async def test_openapi_document_describes_every_route(
    relay: ServerThread, client: httpx.AsyncClient
) -> None:
    r = await client.get(relay.url + "/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    served = {
        getattr(route, "path", "")
        for route in relay.app.routes
        if hasattr(route, "methods") and route.path not in ("/", "/openapi.json")
    }
    assert served <= set(doc["paths"])
    body = doc["components"]["schemas"]["CompletionRequest"]
    assert body["additionalProperties"] is False and "model" in body["required"]
    post = doc["paths"]["/v1/streams"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/CompletionRequest"
    )
