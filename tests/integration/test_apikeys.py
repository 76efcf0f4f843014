"""API keys end to end: made by the CLI or the admin routes, used over real HTTP against
real servers sharing one Redis, revoked everywhere within a second, never logged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
import redis.asyncio as aioredis

from auth import ApiKeyRecord, RedisApiKeyStore, SigningKey, TokenIssuer
from auth.apikeys import digest
from testkit.fake_upstream import FakeUpstreamServer
from tests.support import (
    ROOT,
    SECRET,
    RedisServer,
    ServerProcess,
    ServerThread,
    relay_settings,
    token,
    write_config,
)

pytestmark = pytest.mark.redis

KEY = re.compile(r"sk-[A-Za-z0-9_-]{40}")
# A plan only keys use here: small and easy to tell apart from the JWT callers' `pro`.
KEY_PLAN = {"requests_per_minute": 5, "max_tokens": 50, "models": ["sim-fast"]}


def admin() -> dict[str, str]:
    issuer = TokenIssuer(SigningKey("HS256", SECRET.encode()))
    access, _ = issuer.issue("ops", "pro", ttl_s=600, scopes=["sserelay:admin"])
    return {"authorization": f"Bearer {access}"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def x_api_key(key: str) -> dict[str, str]:
    return {"x-api-key": key}


@pytest.fixture(scope="module")
def key_config(tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer) -> Path:
    return write_config(
        tmp_path_factory.mktemp("apikeys"), upstream.url, extra_plans={"keyplan": KEY_PLAN}
    )


@pytest.fixture(scope="module")
def env(redis_url: str, key_config: Path) -> dict[str, str]:
    return {
        "SSERELAY_REDIS_URL": redis_url,
        "SSERELAY_REDIS_PREFIX": f"t-keys-{uuid.uuid4().hex[:6]}:",
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(key_config),
    }


@dataclass
class Pair:
    a: ServerProcess
    b: ServerProcess


@pytest.fixture(scope="module")
def pair(env: dict[str, str]) -> Iterator[Pair]:
    """Two server processes sharing one Redis (two replicas)."""
    a = ServerProcess(env)
    try:
        b = ServerProcess(env)
    except BaseException:
        a.stop()
        raise
    try:
        yield Pair(a, b)
    finally:
        a.stop()
        b.stop()


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "apikeys", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def create(client: httpx.AsyncClient, url: str, **body: Any) -> dict[str, Any]:
    r = await client.post(url + "/v1/admin/apikeys", headers=admin(), json=body)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def refused_within(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], limit_s: float
) -> httpx.Response:
    """Ask until the server answers 401; fail if it still accepts after `limit_s`."""
    start = time.monotonic()
    while True:
        r = await client.get(url + "/v1/usage", headers=headers)
        if r.status_code == 401:
            return r
        assert r.status_code == 200, r.text
        if time.monotonic() - start > limit_s:
            pytest.fail(f"{url} still accepts the revoked key after {limit_s} s")
        await asyncio.sleep(0.01)


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    return body


async def test_cli_creates_lists_and_revokes_keys_the_servers_accept(
    pair: Pair, env: dict[str, str]
) -> None:
    made = cli(env, "create", "--sub", "svc-cli", "--plan", "keyplan", "--name", "nightly")
    assert made.returncode == 0, made.stderr
    first, *rest = made.stdout.splitlines()
    assert KEY.fullmatch(first), made.stdout
    key = first
    record = json.loads(rest[0])
    assert (record["sub"], record["plan"], record["name"]) == ("svc-cli", "keyplan", "nightly")
    assert record["expires_at"] is None and re.fullmatch(r"key_[0-9a-f]{12}", record["id"])
    assert key not in made.stderr and "not shown again" in made.stderr

    expiring = cli(env, "create", "--sub", "svc-cli", "--plan", "keyplan", "--expires", "90d")
    assert expiring.returncode == 0, expiring.stderr
    expires_at = json.loads(expiring.stdout.splitlines()[1])["expires_at"]
    assert abs(expires_at - (time.time() + 90 * 86400)) < 60

    async with httpx.AsyncClient(timeout=30) as client:
        for server in (pair.a, pair.b):
            for headers in (bearer(key), x_api_key(key)):
                r = await client.get(server.url + "/v1/usage", headers=headers)
                assert r.status_code == 200, r.text
                assert (r.json()["subject"], r.json()["plan"]) == ("svc-cli", "keyplan")
                r = await client.post(
                    server.url + "/v1/streams",
                    headers=headers,
                    json={"model": "sim-fast", "prompt": "hi", "max_tokens": 5},
                )
                assert r.status_code == 201, r.text

        listed = cli(env, "list")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if record["id"] in line)
        assert "svc-cli" in row and "keyplan" in row and "nightly" in row
        assert key not in listed.stdout and digest(key) not in listed.stdout
        as_json = json.loads(cli(env, "list", "--json").stdout)
        mine = next(r for r in as_json if r["id"] == record["id"])
        assert mine["last_used_at"] is not None  # it was used above

        revoked = cli(env, "revoke", record["id"])
        assert revoked.returncode == 0 and record["id"] in revoked.stdout, revoked.stderr
        for server in (pair.a, pair.b):
            r = await refused_within(client, server.url, x_api_key(key), 1.0)
            _problem(r, 401, "invalid_api_key")
        again = cli(env, "revoke", record["id"])
        assert again.returncode == 1 and "no such API key" in again.stderr


async def test_the_cli_refuses_without_redis_and_names_the_admin_routes(
    env: dict[str, str],
) -> None:
    no_redis = {k: v for k, v in env.items() if k != "SSERELAY_REDIS_URL"}
    for args in (
        ("create", "--sub", "a", "--plan", "keyplan"),
        ("list",),
        ("revoke", "key_0123456789ab"),
    ):
        result = cli(no_redis, *args)
        assert result.returncode == 2, result
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1
        assert "SSERELAY_REDIS_URL" in result.stderr and "/v1/admin/apikeys" in result.stderr
    unknown = cli(env, "create", "--sub", "a", "--plan", "gold")
    assert unknown.returncode == 2 and "no plan named 'gold'" in unknown.stderr
    assert unknown.stdout == ""


async def test_admin_routes_create_list_and_revoke(pair: Pair) -> None:
    url = pair.a.url + "/v1/admin/apikeys"
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            url, headers=admin(), json={"sub": "svc-admin", "plan": "keyplan", "expires": "90d"}
        )
        assert r.status_code == 201, r.text
        assert r.headers["cache-control"] == "no-store"
        created = r.json()
        key = created["key"]
        assert KEY.fullmatch(key)
        assert r.headers["location"] == f"/v1/admin/apikeys/{created['id']}"
        assert created["sub"] == "svc-admin" and created["plan"] == "keyplan"
        assert abs(created["expires_at"] - (time.time() + 90 * 86400)) < 60
        with_seconds = await create(client, pair.a.url, sub="svc-admin", plan="pro", name="x")
        assert with_seconds["expires_at"] is None and with_seconds["name"] == "x"

        r = await client.get(pair.b.url + "/v1/admin/apikeys", headers=admin())
        assert r.status_code == 200
        listed = {k["id"]: k for k in r.json()["keys"]}
        assert created["id"] in listed and with_seconds["id"] in listed
        assert listed[created["id"]]["sub"] == "svc-admin"
        assert key not in r.text and digest(key) not in r.text
        assert with_seconds["key"] not in r.text

        # Only the admin scope manages keys, and a key never carries it.
        for headers in ({"authorization": f"Bearer {token('alice', 'pro')}"}, bearer(key)):
            r = await client.get(url, headers=headers)
            _problem(r, 403, "insufficient_scope")
            r = await client.post(url, headers=headers, json={"sub": "x", "plan": "pro"})
            _problem(r, 403, "insufficient_scope")
            r = await client.delete(f"{url}/{created['id']}", headers=headers)
            _problem(r, 403, "insufficient_scope")
        _problem(await client.get(url), 401, "missing_credentials")

        for body, code in (
            ({"sub": "a", "plan": "gold"}, "unknown_plan"),
            ({"sub": "a", "plan": "pro", "scopes": ["sserelay:admin"]}, "invalid_request"),
            ({"sub": "a", "plan": "pro", "expires": "90d", "expires_in_s": 60}, "invalid_request"),
            ({"sub": "a", "plan": "pro", "expires": "soon"}, "invalid_request"),
            ({"sub": "a", "plan": "pro", "expires_in_s": "60"}, "invalid_request"),
            ({"sub": "a\nb", "plan": "pro"}, "invalid_request"),
            ({"plan": "pro"}, "invalid_request"),
        ):
            r = await client.post(url, headers=admin(), json=body)
            _problem(r, 422, code)

        r = await client.delete(f"{url}/{created['id']}", headers=admin())
        assert r.status_code == 200, r.text
        assert r.json()["revoked"] is True and r.json()["id"] == created["id"]
        _problem(
            await client.delete(f"{url}/{created['id']}", headers=admin()), 404, "api_key_not_found"
        )
        _problem(await client.delete(f"{url}/{key}", headers=admin()), 404, "api_key_not_found")
        r = await client.get(url, headers=admin())
        assert created["id"] not in {k["id"] for k in r.json()["keys"]}
        r = await client.delete(f"{url}/{with_seconds['key']}", headers=admin())  # by the key
        assert r.status_code == 200 and r.json()["id"] == with_seconds["id"]


async def test_a_revoke_on_one_server_is_refused_by_the_other_within_a_second(
    pair: Pair,
) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        key = (await create(client, pair.a.url, sub="svc-revoke", plan="keyplan"))["key"]
        for _ in range(5):  # the other server has just verified it (and may cache it)
            r = await client.get(pair.b.url + "/v1/usage", headers=bearer(key))
            assert r.status_code == 200, r.text
        r = await client.delete(f"{pair.a.url}/v1/admin/apikeys/{key}", headers=admin())
        assert r.status_code == 200, r.text
        r = await client.get(pair.a.url + "/v1/usage", headers=bearer(key))
        _problem(r, 401, "invalid_api_key")  # where it was revoked: at once
        r = await refused_within(client, pair.b.url, bearer(key), 1.0)
        body = _problem(r, 401, "invalid_api_key")
        assert key not in body["detail"]
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
        for headers in (bearer(key), x_api_key(key)):  # and it stays refused
            for server in (pair.a, pair.b):
                r = await client.post(
                    server.url + "/v1/streams",
                    headers=headers,
                    json={"model": "sim-fast", "prompt": "hi"},
                )
                _problem(r, 401, "invalid_api_key")


async def test_an_expired_key_is_refused(pair: Pair, env: dict[str, str]) -> None:
    # A key that expired a minute ago, written straight into the store the servers use.
    client = aioredis.Redis.from_url(env["SSERELAY_REDIS_URL"])
    key = "sk-" + uuid.uuid4().hex + "abcdefgh"
    now = time.time()
    try:
        await RedisApiKeyStore(client, prefix=env["SSERELAY_REDIS_PREFIX"]).create(
            digest(key),
            ApiKeyRecord("key_00000000e0e0", "svc-old", "keyplan", "", now - 3600, now - 60),
        )
    finally:
        await client.aclose()
    async with httpx.AsyncClient(timeout=30) as http:
        for server in (pair.a, pair.b):
            r = await http.get(server.url + "/v1/usage", headers=x_api_key(key))
            _problem(r, 401, "api_key_expired")

        # One made through the route, living two seconds: accepted, then refused.
        short = await create(http, pair.a.url, sub="svc-short", plan="keyplan", expires_in_s=2)
        r = await http.get(pair.b.url + "/v1/usage", headers=bearer(short["key"]))
        assert r.status_code == 200, r.text
        await asyncio.sleep(max(0.0, short["expires_at"] + 1 - time.time()))
        r = await http.get(pair.b.url + "/v1/usage", headers=bearer(short["key"]))
        _problem(r, 401, "api_key_expired")
        r = await http.get(pair.a.url + "/v1/admin/apikeys", headers=admin())
        listed = {k["id"]: k for k in r.json()["keys"]}
        assert listed["key_00000000e0e0"]["expired"] is True
        assert listed[short["id"]]["expired"] is True


async def test_a_keys_caller_is_charged_against_the_keys_plan(pair: Pair) -> None:
    sub = f"svc-plan-{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(timeout=30) as client:
        key = (await create(client, pair.a.url, sub=sub, plan="keyplan"))["key"]

        def used(body: dict[str, Any]) -> int:
            [rpm] = [w for w in body["limits"] if w["name"] == "requests_per_minute"]
            assert rpm["limit"] == 5
            return int(rpm["used"])

        r = await client.get(pair.a.url + "/v1/usage", headers=bearer(key))
        assert r.json()["plan"] == "keyplan" and r.json()["subject"] == sub
        assert used(r.json()) == 0
        streams = pair.b.url + "/v1/streams"
        r = await client.post(
            streams, headers=x_api_key(key), json={"model": "claude", "prompt": "hi"}
        )
        _problem(r, 403, "model_not_allowed")  # keyplan allows sim-fast only
        r = await client.post(
            streams,
            headers=x_api_key(key),
            json={"model": "sim-fast", "prompt": "hi", "max_tokens": 51},
        )
        _problem(r, 422, "max_tokens_too_large")  # keyplan's max_tokens is 50
        for _ in range(2):
            r = await client.post(
                streams, headers=bearer(key), json={"model": "sim-fast", "prompt": "hi"}
            )
            assert r.status_code == 201, r.text
        r = await client.get(pair.a.url + "/v1/usage", headers=x_api_key(key))
        assert used(r.json()) == 2
        # The same subject under a JWT of another plan is a different account of limits.
        jwt_usage = await client.get(
            pair.a.url + "/v1/usage", headers={"authorization": f"Bearer {token(sub, 'pro')}"}
        )
        assert jwt_usage.json()["plan"] == "pro"


async def test_x_api_key_carries_keys_and_tokens_and_wrong_ones_are_401(pair: Pair) -> None:
    url = pair.a.url + "/v1/usage"
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(url, headers=x_api_key(token("alice", "pro")))  # a JWT there too
        assert r.status_code == 200 and r.json()["subject"] == "alice", r.text
        unknown = "sk-" + "Z" * 40
        for headers in (x_api_key(unknown), bearer(unknown), x_api_key("sk-nope")):
            r = await client.get(url, headers=headers)
            _problem(r, 401, "invalid_api_key")
            assert "www-authenticate" in r.headers
        r = await client.get(url, headers=[("x-api-key", unknown), ("x-api-key", unknown)])
        _problem(r, 401, "invalid_token")
        _problem(await client.get(url, headers=x_api_key("sk-a sk-b")), 401, "invalid_token")
        _problem(await client.get(url), 401, "missing_credentials")
        # Authorization wins when both are sent.
        r = await client.get(
            url, headers={**bearer(token("bob", "pro")), **x_api_key("sk-" + "Y" * 40)}
        )
        assert r.status_code == 200 and r.json()["subject"] == "bob"


async def test_the_anthropic_sdk_reaches_the_server_with_a_key(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's `api_key` goes out as `Authorization: Bearer` (this SDK version) or as
    `x-api-key` (older versions, and what Anthropic's own API expects): both work."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    async with httpx.AsyncClient(timeout=30) as http:
        created = await create(http, pair.a.url, sub="svc-sdk", plan="keyplan")
    key = created["key"]
    by_api_key = anthropic.AsyncAnthropic(base_url=pair.b.url, api_key=key, max_retries=0)
    by_header = anthropic.AsyncAnthropic(
        base_url=pair.b.url, max_retries=0, default_headers={"x-api-key": key}
    )
    async with by_api_key, by_header:
        r = await by_api_key.get("/v1/usage", cast_to=httpx2.Response)
        assert r.status_code == 200 and r.json()["subject"] == "svc-sdk"
        sent = r.request.headers
        assert key in (sent.get("x-api-key"), sent.get("authorization", "").removeprefix("Bearer "))
        r = await by_header.get("/v1/usage", cast_to=httpx2.Response)
        assert r.status_code == 200 and r.json()["subject"] == "svc-sdk"
        assert r.request.headers["x-api-key"] == key
        assert "authorization" not in r.request.headers

        async with httpx.AsyncClient(timeout=30) as http:
            await http.delete(f"{pair.a.url}/v1/admin/apikeys/{created['id']}", headers=admin())
            await refused_within(http, pair.b.url, x_api_key(key), 1.0)
        for sdk in (by_api_key, by_header):
            with pytest.raises(anthropic.AuthenticationError) as refused:
                await sdk.get("/v1/usage", cast_to=httpx2.Response)
            assert refused.value.status_code == 401


async def test_without_redis_keys_live_in_the_servers_memory(relay: ServerThread) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        created = await create(client, relay.url, sub="svc-memory", plan="free", name="m")
        key = created["key"]
        r = await client.post(
            relay.url + "/v1/streams",
            headers=x_api_key(key),
            json={"model": "sim-fast", "prompt": "hi", "max_tokens": 5},
        )
        assert r.status_code == 201, r.text
        r = await client.get(relay.url + "/v1/admin/apikeys", headers=admin())
        assert created["id"] in {k["id"] for k in r.json()["keys"]}
        r = await client.delete(f"{relay.url}/v1/admin/apikeys/{created['id']}", headers=admin())
        assert r.status_code == 200
        _problem(
            await client.get(relay.url + "/v1/usage", headers=bearer(key)), 401, "invalid_api_key"
        )


async def test_a_key_store_that_is_down_answers_503(key_config: Path) -> None:
    redis = RedisServer()
    server = ServerThread(
        relay_settings(key_config, redis_url=redis.url, redis_prefix="t-keys-down:")
    )
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            created = await create(client, server.url, sub="svc-down", plan="pro")
            redis.stop()
            r = await client.get(server.url + "/v1/usage", headers=x_api_key("sk-" + "Q" * 40))
            _problem(r, 503, "auth_store_unavailable")
            assert r.headers["retry-after"] == "1"
            await asyncio.sleep(0.6)  # past the verified-key cache: the store is asked
            r = await client.get(server.url + "/v1/usage", headers=bearer(created["key"]))
            _problem(r, 503, "auth_store_unavailable")
    finally:
        server.stop()
        if redis.proc.poll() is None:
            redis.stop()


async def test_no_key_reaches_the_server_output(env: dict[str, str]) -> None:
    server = ServerProcess({**env, "SSERELAY_LOG_FORMAT": "json", "SSERELAY_LOG_LEVEL": "debug"})
    seen: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            for name in ("by-path", "by-id"):
                created = await create(client, server.url, sub="svc-log", plan="keyplan", name=name)
                seen.append(created["key"])
            for key in seen:
                for headers in (bearer(key), x_api_key(key)):
                    r = await client.post(
                        "/v1/streams",
                        headers=headers,
                        json={"model": "sim-fast", "prompt": "x", "max_tokens": 3},
                    )
                    assert r.status_code == 201, r.text
                    assert (await client.get("/v1/usage", headers=headers)).status_code == 200
            r = await client.delete(f"/v1/admin/apikeys/{seen[0]}", headers=admin())
            assert r.status_code == 200
            r = await client.delete(f"/v1/admin/apikeys/{seen[0]}", headers=admin())
            assert r.status_code == 404
            listed = await client.get("/v1/admin/apikeys", headers=admin())
            by_id = next(k["id"] for k in listed.json()["keys"] if k["name"] == "by-id")
            assert (await client.delete(f"/v1/admin/apikeys/{by_id}", headers=admin())).is_success
            for key in seen:
                r = await client.get("/v1/usage", headers=x_api_key(key))
                assert r.status_code == 401
            wrong = seen[0][:-1] + ("A" if seen[0][-1] != "A" else "B")
            seen.append(wrong)
            assert (await client.get("/v1/usage", headers=bearer(wrong))).status_code == 401
    finally:
        output = server.stop()
    assert "/v1/admin/apikeys/sk-[redacted]" in output  # the access log is there...
    for key in seen:
        assert key not in output  # ...with no key in it
        assert key.removeprefix("sk-") not in output
