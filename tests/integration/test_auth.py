"""Hostile and broken credentials against a real server: each gets its documented status
and code. Keys of every kind at once (HS256 secret, RS256, PS256, ES256 and EdDSA public
keys, a JWKS URL), issuer and audience checks, tickets, refresh-token rotation with reuse
detection (Redis), cookies, the admin scope."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from testkit.fake_upstream import FakeUpstreamServer
from testkit.servers import JSONServer, ServerThread
from tests.support import SECRET, relay_settings, write_config

ISS, AUD = "https://issuer.test", "sserelay-test"
CLIENT_SECRET = "client-secret-for-trusted-backends-0123456789"

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
EC_OTHER = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()
JWKS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROTATED_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(
        jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key())
    )
    return {**value, "kid": kid, "alg": alg, "use": "sig"}


@dataclass
class Env:
    server: ServerThread
    jwks: JSONServer


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstreamServer, redis_url: str
) -> Iterator[Env]:
    jwks = JSONServer({"keys": [jwk(JWKS_KEY, "jwks1", "RS256")]})
    keys = [
        {"kid": "rsa1", "alg": "RS256", "public_key": pem(RSA)},
        {"kid": "ps1", "alg": "PS256", "public_key": pem(RSA)},
        {"kid": "ec1", "alg": "ES256", "public_key": pem(EC)},
        {"kid": "ed1", "alg": "EdDSA", "public_key": pem(ED)},
    ]
    config = write_config(tmp_path_factory.mktemp("auth"), upstream.url, name="auth")
    server = ServerThread(
        relay_settings(
            config,
            jwt_keys=json.dumps(keys),
            jwks_url=jwks.url,
            jwks_min_refetch_s=0.5,
            jwt_issuer=ISS,
            jwt_audience=AUD,
            jwt_max_lifetime_s=3600,
            redis_url=redis_url,
            redis_prefix=f"t-{uuid.uuid4().hex[:6]}:",
            auth_client_secret=CLIENT_SECRET,
            refresh_grace_s=0.5,
            cookie_secure=False,
        )
    )
    yield Env(server, jwks)
    server.stop()
    jwks.stop()


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    value: dict[str, Any] = {
        "sub": "alice",
        "plan": "pro",
        "iat": now,
        "exp": now + 600,
        "iss": ISS,
        "aud": AUD,
    }
    for name, v in changes.items():
        if v is None:
            value.pop(name, None)
        else:
            value[name] = v
    return value


def sign(key: Any, alg: str, kid: str | None = None, **changes: Any) -> str:
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims(**changes), key, algorithm=alg, headers=headers)


def hs(**changes: Any) -> str:
    return sign(SECRET.encode(), "HS256", **changes)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def tamper_payload(token: str) -> str:
    head, _, sig = token.split(".")
    return f"{head}.{b64(json.dumps(claims(sub='mallory')).encode())}.{sig}"


def tamper_signature(token: str) -> str:
    head, body, sig = token.split(".")
    return f"{head}.{body}.{sig[:-4]}{'AAAA' if not sig.endswith('AAAA') else 'BBBB'}"


def alg_none() -> str:
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


def hs_with_public_key() -> str:
    # The classic confusion: HS256 keyed with the RSA public key's PEM text.
    body = b64(json.dumps(claims()).encode())
    head = b64(json.dumps({"alg": "HS256", "kid": "rsa1", "typ": "JWT"}).encode())
    import hashlib
    import hmac as _hmac

    mac = _hmac.new(pem(RSA).encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}"


Header = Callable[[], dict[str, str]]


def bearer(token_factory: Callable[[], str]) -> Header:
    return lambda: {"authorization": f"Bearer {token_factory()}"}


CASES: list[tuple[str, Header, int, str]] = [
    ("valid HS256", bearer(hs), 200, ""),
    ("valid RS256", bearer(lambda: sign(RSA, "RS256", "rsa1")), 200, ""),
    ("valid PS256", bearer(lambda: sign(RSA, "PS256", "ps1")), 200, ""),
    ("valid ES256", bearer(lambda: sign(EC, "ES256", "ec1")), 200, ""),
    ("valid EdDSA", bearer(lambda: sign(ED, "EdDSA", "ed1")), 200, ""),
    ("valid from JWKS", bearer(lambda: sign(JWKS_KEY, "RS256", "jwks1")), 200, ""),
    ("lower-case bearer", lambda: {"authorization": f"bearer {hs()}"}, 200, ""),
    ("alg none", bearer(alg_none), 401, "unknown_key"),
    ("HS256 keyed with the RSA public key", bearer(hs_with_public_key), 401, "invalid_token"),
    (
        "expired",
        bearer(lambda: hs(exp=int(time.time()) - 120, iat=int(time.time()) - 700)),
        401,
        "token_expired",
    ),
    ("nbf in the future", bearer(lambda: hs(nbf=int(time.time()) + 600)), 401, "invalid_token"),
    (
        "iat in the future",
        bearer(lambda: hs(iat=int(time.time()) + 600, exp=int(time.time()) + 900)),
        401,
        "invalid_token",
    ),
    ("wrong iss", bearer(lambda: hs(iss="https://evil.test")), 401, "invalid_token"),
    ("wrong aud", bearer(lambda: hs(aud="someone-else")), 401, "invalid_token"),
    ("no aud", bearer(lambda: hs(aud=None)), 401, "invalid_token"),
    (
        "tampered payload",
        bearer(lambda: tamper_payload(sign(RSA, "RS256", "rsa1"))),
        401,
        "invalid_token",
    ),
    (
        "tampered signature",
        bearer(lambda: tamper_signature(sign(EC, "ES256", "ec1"))),
        401,
        "invalid_token",
    ),
    ("missing sub", bearer(lambda: hs(sub=None)), 401, "invalid_token"),
    ("missing exp", bearer(lambda: hs(exp=None)), 401, "invalid_token"),
    ("missing iat", bearer(lambda: hs(iat=None)), 401, "invalid_token"),
    ("lives too long", bearer(lambda: hs(exp=int(time.time()) + 7200)), 401, "invalid_token"),
    ("unknown kid", bearer(lambda: sign(RSA_OTHER, "RS256", "nope")), 401, "unknown_key"),
    ("right kid, other key", bearer(lambda: sign(EC_OTHER, "ES256", "ec1")), 401, "invalid_token"),
    ("alg not the key's", bearer(lambda: sign(RSA, "RS512", "ec1")), 401, "unknown_key"),
    ("unknown plan", bearer(lambda: hs(plan="platinum")), 403, "unknown_plan"),
    ("oversized", bearer(lambda: hs(pad="x" * 9000)), 401, "invalid_token"),
    ("not base64", bearer(lambda: "###.###.###"), 401, "invalid_token"),
    ("not a JWT", bearer(lambda: "just-a-string"), 401, "invalid_token"),
    (
        "two tokens in one header",
        lambda: {"authorization": f"Bearer {hs()} {hs()}"},
        401,
        "invalid_token",
    ),
    ("Basic scheme", lambda: {"authorization": "Basic YWxpY2U6c2VjcmV0"}, 401, "invalid_token"),
    ("a refresh-typed JWT", bearer(lambda: hs(typ="refresh")), 401, "invalid_token"),
    ("nothing", lambda: {}, 401, "missing_credentials"),
]


@pytest.mark.parametrize(("name", "headers", "status", "code"), CASES, ids=[c[0] for c in CASES])
async def test_credentials(
    env: Env, client: httpx.AsyncClient, name: str, headers: Header, status: int, code: str
) -> None:
    r = await client.get(env.server.url + "/v1/models", headers=headers())
    assert r.status_code == status, r.text
    if status != 200:
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == code
    if status == 401:
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith("Bearer error=") and "error_description=" in challenge


async def test_two_authorization_headers(env: Env) -> None:
    async with httpx.AsyncClient() as c:
        request = c.build_request("GET", env.server.url + "/v1/models")
        request.headers = httpx.Headers(
            [
                ("host", request.url.netloc.decode()),
                ("authorization", f"Bearer {hs()}"),
                ("authorization", f"Bearer {hs()}"),
            ]
        )
        r = await c.send(request)
    assert r.status_code == 401 and r.json()["code"] == "invalid_token"


async def test_a_token_in_the_query_string_is_ignored(env: Env, client: httpx.AsyncClient) -> None:
    r = await client.get(
        env.server.url + "/v1/models", params={"access_token": hs(), "ticket": hs()}
    )
    assert r.status_code == 401 and r.json()["code"] == "missing_credentials"


async def _stream(env: Env, client: httpx.AsyncClient, token: str) -> dict[str, Any]:
    r = await client.post(
        env.server.url + "/v1/streams",
        json={"model": "sim-fast", "prompt": "x", "max_tokens": 3},
        headers={"authorization": f"Bearer {token}"},
    )
    assert r.status_code == 201
    created: dict[str, Any] = r.json()
    return created


async def test_tickets(env: Env, client: httpx.AsyncClient) -> None:
    url = env.server.url
    a = await _stream(env, client, hs(sub="alice"))
    b = await _stream(env, client, hs(sub="bob"))
    # a ticket for stream A used on stream B
    r = await client.get(f"{url}/v1/streams/{b['id']}/events", params={"ticket": a["ticket"]})
    assert r.status_code == 401 and r.json()["code"] == "invalid_ticket"
    # user A's ticket presented by user B (with B's own token)
    r = await client.get(
        f"{url}/v1/streams/{a['id']}/events",
        params={"ticket": a["ticket"]},
        headers={"authorization": f"Bearer {hs(sub='bob')}"},
    )
    assert r.status_code == 401 and r.json()["code"] == "invalid_ticket"
    # an access token is not a ticket
    r = await client.get(f"{url}/v1/streams/{a['id']}/events", params={"ticket": hs()})
    assert r.status_code == 401 and r.json()["code"] == "invalid_ticket"
    # and a ticket is not an access token
    r = await client.get(f"{url}/v1/models", headers={"authorization": f"Bearer {a['ticket']}"})
    assert r.status_code == 401
    # bob reading alice's stream with his own token: exactly like a missing stream
    r = await client.get(
        f"{url}/v1/streams/{a['id']}", headers={"authorization": f"Bearer {hs(sub='bob')}"}
    )
    missing = await client.get(
        f"{url}/v1/streams/s_nope", headers={"authorization": f"Bearer {hs(sub='bob')}"}
    )
    assert r.status_code == missing.status_code == 404 and r.json() == {
        **missing.json(),
        "detail": r.json()["detail"],
    }


async def _pair(env: Env, client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post(
        env.server.url + "/v1/auth/token",
        json={"sub": "carol", "plan": "pro", **body},
        headers={"authorization": f"Bearer {CLIENT_SECRET}"},
    )
    assert r.status_code == 200, r.text
    pair: dict[str, Any] = r.json()
    return pair


async def test_token_endpoint_needs_the_client_secret(env: Env, client: httpx.AsyncClient) -> None:
    r = await client.post(
        env.server.url + "/v1/auth/token",
        json={"sub": "x"},
        headers={"authorization": "Bearer wrong"},
    )
    assert r.status_code == 401 and r.json()["code"] == "invalid_client"
    pair = await _pair(env, client)
    assert pair["token_type"] == "Bearer" and pair["refresh_token"].startswith("srt_")
    models = await client.get(
        env.server.url + "/v1/models", headers={"authorization": f"Bearer {pair['access_token']}"}
    )
    assert models.status_code == 200


async def _refresh(env: Env, client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post(env.server.url + "/v1/auth/refresh", json={"refresh_token": token})


async def test_refresh_rotation_and_reuse_detection(env: Env, client: httpx.AsyncClient) -> None:
    first = (await _pair(env, client))["refresh_token"]
    r = await _refresh(env, client, first)
    assert r.status_code == 200
    second = r.json()["refresh_token"]
    assert second != first
    # Two tabs refreshing at once: within the grace window, a conflict, not a revocation.
    r = await _refresh(env, client, first)
    assert r.status_code == 409 and r.json()["code"] == "refresh_conflict"
    await asyncio.sleep(0.6)
    # After it: the rotated token came back, so someone stole it. Revoke the family...
    r = await _refresh(env, client, first)
    assert r.status_code == 401 and r.json()["code"] == "refresh_token_reused"
    # ...so the newer token is dead too.
    r = await _refresh(env, client, second)
    assert r.status_code == 401 and r.json()["code"] == "refresh_token_revoked"


async def test_refresh_after_logout(env: Env, client: httpx.AsyncClient) -> None:
    token = (await _pair(env, client))["refresh_token"]
    r = await client.post(env.server.url + "/v1/auth/logout", json={"refresh_token": token})
    assert r.status_code == 204
    r = await _refresh(env, client, token)
    assert r.status_code == 401 and r.json()["code"] == "refresh_token_revoked"
    for bad in ["srt_nope.nope", "garbage", "srt_" + "x" * 300]:
        r = await _refresh(env, client, bad)
        assert r.status_code == 401 and r.json()["code"] == "invalid_refresh_token"


async def test_cookies(env: Env, client: httpx.AsyncClient) -> None:
    url = env.server.url
    r = await client.post(
        url + "/v1/auth/token",
        json={"sub": "dave", "cookie": True},
        headers={"authorization": f"Bearer {CLIENT_SECRET}"},
    )
    cookies = {c.name: c for c in r.cookies.jar}
    access, refresh = cookies["sserelay_access"], cookies["sserelay_refresh"]
    assert access.path == "/" and refresh.path == "/v1/auth"
    raw = r.headers.get_list("set-cookie")
    assert all("HttpOnly" in h and "SameSite=strict" in h for h in raw)
    async with httpx.AsyncClient(base_url=url) as browser:
        browser.cookies.set("sserelay_access", access.value or "")
        assert (await browser.get("/v1/models")).status_code == 200
        body = {"model": "sim-fast", "prompt": "x", "max_tokens": 3}
        same = await browser.post("/v1/streams", json=body, headers={"origin": url})
        assert same.status_code == 201
        cross = await browser.post(
            "/v1/streams", json=body, headers={"origin": "https://evil.test"}
        )
        assert cross.status_code == 403 and cross.json()["code"] == "cross_origin_rejected"
        # Behind a TLS-terminating proxy the browser says https while the server sees
        # http: the same host is the same origin.
        host = url.removeprefix("http://")
        proxied = await browser.post(
            "/v1/streams", json=body, headers={"origin": f"https://{host}"}
        )
        assert proxied.status_code == 201
        # Rotating or revoking with the refresh cookie needs the same origin too.
        browser.cookies.set("sserelay_refresh", refresh.value or "", path="/v1/auth")
        forced = await browser.post("/v1/auth/logout", headers={"origin": "https://evil.test"})
        assert forced.status_code == 403 and forced.json()["code"] == "cross_origin_rejected"
        # EventSource with the cookie needs no ticket.
        events = await browser.get(f"/v1/streams/{same.json()['id']}/events")
        assert events.status_code == 200 and "event: done" in events.text
        # The refresh cookie rotates into new cookies.
        browser.cookies.set("sserelay_refresh", refresh.value or "", path="/v1/auth")
        rotated = await browser.post("/v1/auth/refresh")
        assert rotated.status_code == 200
        assert "sserelay_access=" in " ".join(rotated.headers.get_list("set-cookie"))


async def test_jwks_rotation(env: Env, client: httpx.AsyncClient) -> None:
    token = sign(ROTATED_KEY, "ES256", "rotated1")
    headers = {"authorization": f"Bearer {token}"}
    r = await client.get(env.server.url + "/v1/models", headers=headers)
    assert r.status_code == 401 and r.json()["code"] == "unknown_key"
    env.jwks.document = {
        "keys": [jwk(JWKS_KEY, "jwks1", "RS256"), jwk(ROTATED_KEY, "rotated1", "ES256")]
    }
    # An unknown kid refetches, but at most every jwks_min_refetch_s (0.5 s here).
    hits = env.jwks.hits
    for _ in range(5):
        await client.get(env.server.url + "/v1/models", headers=headers)
    assert env.jwks.hits - hits <= 1
    await asyncio.sleep(0.6)
    r = await client.get(env.server.url + "/v1/models", headers=headers)
    assert r.status_code == 200


async def test_admin_routes_need_the_admin_scope(
    env: Env, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    url = env.server.url + "/v1/admin/plans/reload"
    r = await client.post(url, headers={"authorization": f"Bearer {hs()}"})
    assert r.status_code == 403 and r.json()["code"] == "insufficient_scope"
    r = await client.post(url, headers={"authorization": f"Bearer {hs(scope='sserelay:admin')}"})
    assert r.status_code == 200 and "pro" in r.json()["plans"]
