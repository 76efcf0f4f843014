"""Fuzzing every route, authenticated and not.

Hostile bodies (deep nesting, huge numbers, NaN, duplicate keys, wrong types, lone
surrogates, control characters, invalid UTF-8, oversized), hostile headers (content
types, credentials, cookies, origins, Last-Event-ID, X-Request-ID), hostile stream ids,
tickets, methods, paths and lengths. Whatever arrives, the server:

- never answers 5xx, and never puts a traceback in a body;
- answers every 4xx as application/problem+json with a known, stable `code` (except the
  demo page's files and /metrics, which are not API answers);
- sends a sane `X-Request-ID` on every response;
- keeps its memory flat over 10,000 bad requests.

Requests the HTTP parser refuses before the application sees them (control characters
in a header, broken framing) are held to less: a 4xx, a closed connection, no traceback.

Every generated case is deterministic (`derandomize=True`), so a failure replays as is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import signal
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.errors import STATUS
from auth import SigningKey, TokenIssuer
from testkit.servers import ServerProcess, ServerThread
from tests.support import SECRET, auth, relay_settings

# The servers under test run in threads of this process and may use `random` (retry
# jitter) while Hypothesis draws a case; that is not the strategies' doing.
pytestmark = pytest.mark.filterwarnings("ignore:Do not use the `random` module inside strategies")

CLIENT_SECRET = "c" * 40
AUTH_BODY_LIMIT = 16_384
STREAM_BODY_LIMIT = 1_000_000
ADMIN_SCOPE = "sserelay:admin"
ACCESS_COOKIE = "sserelay_access"
REFRESH_COOKIE = "sserelay_refresh"
PROBLEM_JSON = "application/problem+json"
# The demo page and its files (Starlette's file responses answer a bad Range in plain
# text) and the Prometheus exposition are not API answers.
PLAIN_PATHS = frozenset({"/", "/metrics"})
PLAIN_PREFIX = "/static/"
TRACE_MARKERS = (b"Traceback", b'File "')
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# The codes the README's error table documents, and every code the app's status table has.
KNOWN_CODES = frozenset(STATUS) | {
    "invalid_api_key",
    "api_key_expired",
    "missing_credentials",
    "invalid_token",
    "token_expired",
    "unknown_key",
    "invalid_ticket",
    "ticket_expired",
    "invalid_client",
    "invalid_refresh_token",
    "refresh_token_reused",
    "refresh_token_revoked",
    "unknown_plan",
    "model_not_allowed",
    "insufficient_scope",
    "cross_origin_rejected",
    "refresh_conflict",
    "model_not_found",
    "stream_not_found",
    "not_found",
    "record_not_found",
    "auth_store_unavailable",
    # The connection guard's own refusals (head too large or too slow, no room).
    "headers_too_large",
    "request_timeout",
    "too_many_connections",
}

# Every route and its methods. `{id}` is a stream id: the module's real one or a hostile one.
EVERY_ROUTE: list[tuple[str, str]] = [
    ("GET", "/v1/events"),
    ("POST", "/v1/streams"),
    ("GET", "/v1/streams/{id}/events"),
    ("GET", "/v1/streams/{id}"),
    ("DELETE", "/v1/streams/{id}"),
    ("POST", "/v1/streams/{id}/ticket"),
    ("POST", "/v1/streams/{id}/feedback"),
    ("POST", "/v1/chat/stream"),
    ("GET", "/v1/events"),
    ("GET", "/v1/models"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/auth/token"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/logout"),
    ("POST", "/v1/admin/plans/reload"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/"),
    ("GET", "/openapi.json"),
]
ALLOWED: dict[str, set[str]] = {}
for _method, _path in EVERY_ROUTE:
    ALLOWED.setdefault(_path, set()).add(_method)
for _methods in ALLOWED.values():
    if "GET" in _methods:
        _methods.add("HEAD")

# A valid body per POST route: each hostile body is a mutation of one of these.
BASES: dict[str, dict[str, Any]] = {
    "/v1/streams": {"model": "sim-fast", "prompt": "hi"},
    "/v1/chat/stream": {"model": "sim-fast", "prompt": "hi"},
    "/v1/streams/{id}/feedback": {"rating": 4, "comment": "fine", "correct": True},
    "/v1/auth/token": {"sub": "alice", "plan": "pro", "scopes": ["read"], "cookie": False},
    "/v1/auth/refresh": {"refresh_token": "srt_abc.def"},
    "/v1/auth/logout": {"refresh_token": "srt_abc.def"},
    "/v1/streams/{id}/ticket": {},
    "/v1/admin/plans/reload": {},
    "/v1/auth/dev-token": {"sub": "demo", "plan": "pro", "cookie": False},
}
BODY_PATHS = [p for p in BASES if p != "/v1/auth/dev-token"]
# Routes that read their body (after their credential check), and their limits.
BODY_LIMITS = {
    "/v1/streams": STREAM_BODY_LIMIT,
    "/v1/chat/stream": STREAM_BODY_LIMIT,
    "/v1/streams/{id}/feedback": AUTH_BODY_LIMIT,
    "/v1/auth/token": AUTH_BODY_LIMIT,
    "/v1/auth/refresh": AUTH_BODY_LIMIT,
    "/v1/auth/logout": AUTH_BODY_LIMIT,
    "/v1/auth/dev-token": AUTH_BODY_LIMIT,
}

FIELDS = [
    "model",
    "prompt",
    "messages",
    "role",
    "content",
    "max_tokens",
    "temperature",
    "metadata",
    "system",
    "rating",
    "comment",
    "correct",
    "sub",
    "plan",
    "scopes",
    "cookie",
    "refresh_token",
]
TEXT_FIELDS = [
    "model",
    "prompt",
    "system",
    "comment",
    "sub",
    "plan",
    "refresh_token",
    "role",
    "content",
    "scopes",
    "metadata-key",
    "metadata-value",
]

# Raw JSON text spliced in as a field's value.
RAW_VALUES: list[bytes] = [
    b"1e999",
    b"-1e999",
    b"1E400",
    b"1e-999",
    b"1" + b"0" * 5000,
    b"-" + b"9" * 5000,
    b"1" * 4301,
    b"1" + b"0" * 400 + b".0",
    b"0." + b"0" * 5000 + b"1",
    b"-0",
    b"-0.0",
    b"0e0",
    b"NaN",
    b"-NaN",
    b"nan",
    b"Infinity",
    b"-Infinity",
    b"infinity",
    b"0x10",
    b"01",
    b"+1",
    b".5",
    b"1.",
    b"tru",
    b"nul",
    b"undefined",
    b"'single'",
    b'"\\x41"',
    b'"\\u12"',
    b'"unterminated',
    b'"\\ud800"',
    b'"\\udfff"',
    b'"a\\ud800b"',
    b'"\\udc00\\ud800"',
    b'"\\ud83d\\ude00"',
    b'"\\u0000"',
    b'"\x00"',
    b'"\x01\x1f\x7f"',
    b'"\xff\xfe"',
    b'"\xc0\x80"',
    b'"\xed\xa0\x80"',
    b"[" * 40 + b"]" * 40,
    b"{}",
    b"[]",
    b"null",
    b"true",
]
SURROGATES = [
    b"\\ud800",
    b"\\udfff",
    b"\\udc00",
    b"\\ud83d",
    b"\\uD800",
    b"\\udbff\\udbff",
    b"\\udfff\\ud800",
    b"\\ud800\\u0041",
]
INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\xc0\x80",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\x80",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc3",
]


def mostly(
    common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], percent: int = 65
) -> st.SearchStrategy[Any]:
    """`common` in about `percent` % of the cases, `rare` in the others."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


ODD_CONTENT_TYPES: list[bytes | None] = [
    b"application/json; charset=utf-8",
    b"Application/JSON",
    b"application/json;charset=latin-1",
    b"application/json; boundary=--x",
    b"application/json;;;",
    b"application/json; charset=\xff",
    b"text/plain",
    b"text/json",
    b"multipart/form-data; boundary=x",
    b"application/x-www-form-urlencoded",
    b"application/jsonx",
    b"*/*",
    b"",
    b"\xff\xfe",
    b"; application/json",
    None,
]
# Mostly the right one, so that the body is read.
content_types = mostly(st.just(b"application/json"), st.sampled_from(ODD_CONTENT_TYPES))
REQUEST_IDS: list[bytes | None] = [
    None,
    None,
    b"fuzz-1",
    b"a" * 128,
    b"a" * 129,
    b"a" * 10_000,
    b"a\tb",
    b"caf\xc3\xa9",
    b"\xff\xfe",
    b"\xb2",
    b"id with spaces",
    b"<script>",
    b"x-request-id: injected",
    b"",
]
LAST_EVENT_HEADERS: list[bytes] = [
    b"\xb2",
    "²".encode(),
    b"-1",
    b"1e3",
    b"99999999999999999999",
    b"999999999999999999",
    b"00000000000000000001",
    "\u0661".encode(),
    "\uff11".encode(),
    b"1" * 10_000,
    b"",
    b"0",
    b"3",
    b"+1",
    b"0x1",
    b"1.0",
    b"1\t2",
    b"\xff\xfe",
]
LAST_EVENT_QUERIES: list[str] = [
    "²",
    "-1",
    "1e3",
    " 1",
    "99999999999999999999",
    "\u0661",
    "\uff11",
    "1" * 10_000,
    "",
    "0",
    "3",
    "\x00",
    "1\n",
    "%",
]
HOSTILE_IDS: list[str] = [
    "s_0",
    "s_" + "a" * 5000,
    "%2e%2e",
    "%00",
    "%ff",
    "%ed%a0%80",
    "%c0%80",
    "a%2Fb",
    "s_%20x",
    "%20",
    "'; DROP TABLE streams; --",
    "{id}",
    "\u0661",
    "\U0001f600",
    "*",
    "s_" + "0" * 32,
    "c_" + "f" * 32,
    "\\",
    "..;",
    "$(id)",
    "%0d%0aX-Injected:%201",
]
ORIGINS: list[bytes] = [
    b"http://[",
    b"http://[::1",
    b"//[x",
    b"http://]",
    b"http://[v1.x",
    b"null",
    b"",
    b"http://evil.example",
    b"https://evil.example:443",
    b"\xff\xfe",
    b"http://" + b"a" * 5000,
    b"file://",
    b"http://a:b@[::1]:x",
    b"http://[::1]:99999",
    b"http://127.0.0.1:abc",
]
COOKIES: list[bytes] = [
    b"",
    b"=",
    b";;;",
    b"sserelay_access",
    b"sserelay_access=",
    b"sserelay_access=a.b.c",
    b'sserelay_access="quoted"',
    b"sserelay_access=\xff\xfe",
    b"sserelay_access=" + b"a" * 9000,
    b"sserelay_refresh=srt_abc.def",
    b"sserelay_refresh=srt_\xff.x",
    b"sserelay_refresh=" + b"srt_" + b"a" * 500 + b".b",
    b"a=1; a=2; sserelay_access=x; sserelay_access=y",
    b"$Version=1; sserelay_access=x",
]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned(header: bytes, payload: bytes = b"{}") -> bytes:
    return f"{_b64(header)}.{_b64(payload)}.c2ln".encode()


# A JWT whose header nests 2,000 levels deep: the JSON parser recurses on it.
DEEP_HEADER_TOKEN = b"Bearer " + _unsigned(
    b'{"alg":"HS256","a":' + b"[" * 2000 + b"]" * 2000 + b"}"
)
GARBAGE_AUTHORIZATION: list[bytes] = [
    b"",
    b"Bearer",
    b"bearer x y",
    b"Basic YWxpY2U6cHc=",
    b"Bearer \xff\xfe",
    b"Bearer " + b"a" * 9000,
    b"Bearer a.b.c",
    b"Bearer ....",
    b"Bearer null",
    b"Bearer \xc3\xa9.\xc3\xa9.\xc3\xa9",
    b"Bearer e30.e30.e30",
    b"Token abc",
    b"Bearer\tabc",
    b"BEARER " + CLIENT_SECRET.encode(),
    b"Bearer " + _unsigned(b'{"alg":"none"}'),
    b"Bearer " + _unsigned(b'{"alg":"HS256","kid":1}'),
    b"Bearer " + _unsigned(b'{"alg":["HS256"]}'),
    b"Bearer " + _unsigned(b'{"alg":"HS256","b64":false}'),
    b"Bearer " + _unsigned(b'{"alg":"HS256","kid":"\\ud800"}'),
    b"Bearer " + _unsigned(b'{"alg":"RS256","kid":"x"}'),
    DEEP_HEADER_TOKEN,
    b"Bearer " + _unsigned(b'{"alg":"HS256","alg":"none"}'),
    b"Bearer " + _unsigned(b"[1]"),
    b"Bearer " + _unsigned(b"\xff\xfe"),
]


# JSON values of every type, for "wrong type for every field".
json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
claim_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            float("inf"),
            float("-inf"),
            float("nan"),
            10**30,
            -1,
            0,
            1e308,
            True,
            "9999999999",
            "a\x00b",
            "\u202e",
            "x" * 300,
            ["pro"],
            {"plan": "pro"},
            "access",
            "refresh",
        ]
    ),
)
claims = st.dictionaries(
    st.sampled_from(["sub", "plan", "scope", "exp", "iat", "nbf", "typ", "aud", "iss"]),
    claim_values,
    max_size=3,
)
# A credential, resolved against the running server when the test runs (tokens expire).
# Mostly valid ones, so that what comes after the credential check is reached.
credentials = mostly(
    st.just(("valid", None)),
    st.one_of(
        st.sampled_from(
            [
                ("none", None),
                ("expired", None),
                ("other-user", None),
                ("unknown-plan", None),
                ("wrong-key", None),
                ("two-headers", None),
                ("cookie", None),
                ("admin", None),
                ("client-secret", None),
            ]
        ),
        st.tuples(st.just("garbage"), st.sampled_from(GARBAGE_AUTHORIZATION)),
        st.tuples(st.just("claims"), claims),
        st.tuples(st.just("cookie-header"), st.sampled_from(COOKIES)),
    ),
)


def _splice(base: dict[str, Any], name: str, raw: bytes) -> bytes:
    """`base` with `name` set to the raw JSON text `raw` (inside a message for role and
    content)."""
    if name in ("role", "content"):
        message = {"role": "user", "content": "hi"}
        message.pop(name)
        inner = json.dumps(message).encode()[:-1] + b', "' + name.encode() + b'": ' + raw + b"}"
        return b'{"model": "sim-fast", "messages": [' + inner + b"]}"
    rest = {k: v for k, v in base.items() if k != name}
    head = json.dumps(rest).encode()[:-1]
    return head + (b", " if rest else b"") + json.dumps(name).encode() + b": " + raw + b"}"


def _with_text(base: dict[str, Any], where: str, marker: str) -> bytes:
    """`base` with a string `marker` in the text field `where`, to be replaced in bytes."""
    target = dict(base)
    if where == "metadata-key":
        target["metadata"] = {marker: "v"}
    elif where == "metadata-value":
        target["metadata"] = {"k": marker}
    elif where == "scopes":
        target["scopes"] = [marker]
    elif where in ("role", "content"):
        target.pop("prompt", None)
        message = {"role": "user", "content": "hi", where: marker}
        target["messages"] = [message]
    else:
        target[where] = marker
    return json.dumps(target).encode()


MARKER = "@@MARK@@"


@st.composite
def valid_bodies(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    target = dict(base)
    if "prompt" in target and draw(st.booleans()):
        target.pop("prompt")
        target["messages"] = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ]
        target["system"] = draw(st.sampled_from(["be brief", "", "\u202e"]))
        target["max_tokens"] = draw(st.sampled_from([1, 50, 4096, 4097, 10**9]))
        target["temperature"] = draw(st.sampled_from([0, 0.0, -0.0, 2, 2.0000001, 1e-300]))
        target["metadata"] = draw(
            st.dictionaries(
                st.text(max_size=5), st.one_of(st.integers(), st.booleans()), max_size=20
            )
        )
        target["model"] = draw(st.sampled_from(["sim-fast", "SIM-FAST", "nope", "a" * 201]))
    return json.dumps(target, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def wrong_types(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    name = draw(st.sampled_from(FIELDS))
    value = draw(json_values)
    if name in ("role", "content"):
        message = {"role": "user", "content": "hi", name: value}
        target: Any = {"model": "sim-fast", "messages": [message]}
    else:
        target = {**base, name: value}
    if draw(st.integers(0, 9)) == 0:
        target = value  # not even an object
    return json.dumps(target, ensure_ascii=draw(st.booleans())).encode()


@st.composite
def raw_values(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    return _splice(base, draw(st.sampled_from(FIELDS)), draw(st.sampled_from(RAW_VALUES)))


@st.composite
def duplicate_keys(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    name = draw(st.sampled_from(sorted(base) or FIELDS))
    first = json.dumps(draw(json_values)).encode()
    second = json.dumps(draw(json_values)).encode()
    if draw(st.booleans()):
        return _splice(base, "metadata", b'{"a": ' + first + b', "a": ' + second + b"}")
    rest = {k: v for k, v in base.items() if k != name}
    head = json.dumps(rest).encode()[:-1] + (b", " if rest else b"")
    key = json.dumps(name).encode()
    return head + key + b": " + first + b", " + key + b": " + second + b"}"


@st.composite
def deep_nesting(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    levels = draw(st.one_of(st.integers(28, 40), st.integers(100, 1000), st.integers(1000, 10_000)))
    opener, middle, closer = draw(
        st.sampled_from([(b"[", b"", b"]"), (b'{"a":', b"0", b"}"), (b'[{"k":', b"0", b"}]")])
    )
    nested = opener * levels + middle + (closer * levels if draw(st.booleans()) else b"")
    where = draw(st.sampled_from(["top", "metadata", "messages", "field"]))
    if where == "top":
        return nested
    if where == "messages":
        return b'{"model": "sim-fast", "messages": ' + nested + b"}"
    name = "metadata" if where == "metadata" else draw(st.sampled_from(FIELDS))
    return _splice(base, name, nested)


@st.composite
def lone_surrogates(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    where = draw(st.sampled_from(TEXT_FIELDS))
    surrogate = draw(st.sampled_from(SURROGATES))
    text = draw(st.sampled_from([b"%s", b"a%sb", b"%s%s", b"\\ud83d\\ude00%s"]))
    return _with_text(base, where, MARKER).replace(MARKER.encode(), text.replace(b"%s", surrogate))


@st.composite
def control_chars(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    where = draw(st.sampled_from(TEXT_FIELDS))
    text = draw(
        st.text(
            alphabet=st.one_of(
                st.characters(min_codepoint=0, max_codepoint=0x1F),
                st.characters(min_codepoint=0x7F, max_codepoint=0x9F),
                st.sampled_from("ab \u200b\u202e\u2028\ufeff"),
            ),
            min_size=1,
            max_size=12,
        )
    )
    escaped = json.dumps(text)[1:-1].encode()
    raw = text.encode("utf-8")  # unescaped control characters: not JSON
    return _with_text(base, where, MARKER).replace(
        MARKER.encode(), escaped if draw(st.booleans()) else raw
    )


@st.composite
def invalid_utf8(draw: st.DrawFn, base: dict[str, Any]) -> bytes:
    bad = draw(st.sampled_from(INVALID_UTF8))
    how = draw(st.sampled_from(["in-string", "anywhere", "prefix", "utf16", "utf32", "bom"]))
    valid = json.dumps(base)
    if how == "in-string":
        where = draw(st.sampled_from(TEXT_FIELDS))
        return _with_text(base, where, MARKER).replace(MARKER.encode(), bad)
    if how == "anywhere":
        at = draw(st.integers(0, len(valid)))
        return valid[:at].encode() + bad + valid[at:].encode()
    if how == "prefix":
        return bad + valid.encode()
    if how == "bom":
        return b"\xef\xbb\xbf" + valid.encode()
    return valid.encode("utf-16" if how == "utf16" else "utf-32")


def bodies(base: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        valid_bodies(base),
        wrong_types(base),
        raw_values(base),
        duplicate_keys(base),
        deep_nesting(base),
        lone_surrogates(base),
        control_chars(base),
        invalid_utf8(base),
        st.binary(max_size=64),
        st.just(b""),
    )


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# --- the servers, the module's stream, and credentials -----------------------------------


@dataclass
class Kit:
    server: ServerThread
    http: httpx.Client
    stream_id: str
    ticket: str

    def url(self, path: str, stream: str = "@real") -> str:
        if "{id}" not in path:
            return path
        stream_id = self.stream_id if stream == "@real" else quote(stream, safe="%")
        return path.replace("{id}", stream_id)

    def refresh_token(self) -> str:
        r = self.http.post(
            "/v1/auth/token",
            json={"sub": "alice", "plan": "pro"},
            headers={"authorization": f"Bearer {CLIENT_SECRET}"},
        )
        assert r.status_code == 200, r.text
        token: str = r.json()["refresh_token"]
        return token


def _issuer(secret: str = SECRET) -> TokenIssuer:
    return TokenIssuer(SigningKey("HS256", secret.encode()))


def _hs256(payload: dict[str, Any], key: bytes) -> str:
    """An HS256 token over whatever claims, signed by hand: PyJWT refuses to encode some
    of them (a non-string `iss`), and the point is that the server sees them."""
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    signing_input = f"{header}.{_b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


def _signed(overrides: dict[str, Any], secret: str = SECRET) -> str:
    now = int(time.time())
    payload = {"sub": "alice", "plan": "pro", "iat": now, "exp": now + 600, **overrides}
    return _hs256(payload, secret.encode())


def credential_headers(
    kit: Kit, credential: tuple[str, Any], path: str
) -> list[tuple[bytes, bytes]]:
    kind, value = credential
    if kind == "valid":
        if path == "/v1/auth/token":
            kind = "client-secret"
        elif path == "/v1/admin/plans/reload":
            kind = "admin"
    bearer: str | None = None
    if kind == "valid":
        bearer = auth()["authorization"].removeprefix("Bearer ")
    elif kind == "expired":
        bearer = _signed({"iat": int(time.time()) - 1200, "exp": int(time.time()) - 600})
    elif kind == "other-user":
        bearer = auth("mallory")["authorization"].removeprefix("Bearer ")
    elif kind == "unknown-plan":
        bearer = auth(plan="nope")["authorization"].removeprefix("Bearer ")
    elif kind == "wrong-key":
        bearer = _issuer("another-secret-that-is-long-enough!!").issue("alice", "pro")[0]
    elif kind == "admin":
        bearer = _issuer().issue("root", "pro", ttl_s=600, scopes=[ADMIN_SCOPE])[0]
    elif kind == "client-secret":
        bearer = CLIENT_SECRET
    elif kind == "claims":
        bearer = _signed(value)
    elif kind == "two-headers":
        token = auth()["authorization"].encode()
        return [(b"authorization", token), (b"authorization", token)]
    elif kind == "cookie":
        token = auth()["authorization"].removeprefix("Bearer ")
        return [(b"cookie", f"{ACCESS_COOKIE}={token}".encode())]
    elif kind == "cookie-header":
        return [(b"cookie", value)]
    elif kind == "garbage":
        return [(b"authorization", value)]
    if bearer is None:
        return []
    return [(b"authorization", f"Bearer {bearer}".encode())]


@pytest.fixture(scope="module")
def server(config_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(relay_settings(config_path, auth_client_secret=CLIENT_SECRET))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def dev_server(config_path: Path) -> Iterator[ServerThread]:
    s = ServerThread(relay_settings(config_path, jwt_secret=None))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def kit(server: ServerThread) -> Iterator[Kit]:
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(30.0)) as http:
        r = http.post("/v1/streams", json={"model": "sim-fast", "prompt": "hi"}, headers=auth())
        assert r.status_code == 201, r.text
        created = r.json()
        with http.stream("GET", created["events_url"]) as events:
            assert events.status_code == 200
            for line in events.iter_lines():
                if line == "event: done":
                    break
        yield Kit(server, http, created["id"], created["ticket"])


@pytest.fixture(scope="module")
def dev_http(dev_server: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dev_server.url, timeout=httpx.Timeout(30.0)) as http:
        yield http


# --- sending and checking ------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    head_only: bool = False
    raw_headers: list[tuple[str, str]] = field(default_factory=list)


def send(
    http: httpx.Client,
    method: str,
    url: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    content: bytes | Iterator[bytes] | None = None,
    params: dict[str, str] | None = None,
) -> Answer:
    """One request; an event stream is read up to its head only, then closed. `url` is
    a path, sent as is (a relative `//x` would otherwise name a host)."""
    url = str(http.base_url).rstrip("/") + url
    with http.stream(method, url, headers=headers, content=content, params=params) as r:
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in r.headers.raw]
        head_only = r.headers.get("content-type", "").startswith("text/event-stream")
        body = b"" if head_only else r.read()
        return Answer(r.status_code, dict(pairs), body, head_only, pairs)


def check(answer: Answer, method: str, path: str, what: object) -> None:
    """What every answer owes its client, whatever was asked."""
    context = (
        f"{method} {path} {what!r:.600} -> {answer.status} "
        f"{answer.headers.get('content-type')} {answer.body[:400]!r}"
    )
    assert answer.status < 500, context
    for marker in TRACE_MARKERS:
        assert marker not in answer.body, context
    request_id = answer.headers.get("x-request-id")
    assert request_id is not None and SANE_REQUEST_ID.fullmatch(request_id), context
    if answer.head_only:
        assert answer.status == 200, context
    if answer.status >= 400 and path not in PLAIN_PATHS and not path.startswith(PLAIN_PREFIX):
        assert answer.headers.get("content-type") == PROBLEM_JSON, context
        if method == "HEAD":
            return
        problem = json.loads(answer.body)
        assert isinstance(problem, dict), context
        code = problem.get("code")
        assert isinstance(code, str) and code in KNOWN_CODES, context
        assert problem.get("status") == answer.status, context


def _chunks(body: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _header_list(**values: bytes | None) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v) for k, v in values.items() if v is not None]


# --- the fuzz tests --------------------------------------------------------------------------


@st.composite
def body_cases(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(st.sampled_from(BODY_PATHS))
    return {
        "path": path,
        "stream": draw(mostly(st.just("@real"), st.sampled_from(HOSTILE_IDS))),
        "body": draw(bodies(BASES[path])),
        "content_type": draw(content_types),
        "credential": draw(credentials),
        "request_id": draw(st.sampled_from(REQUEST_IDS)),
        "chunked": draw(st.integers(0, 3)) == 0,
        "refresh": draw(st.booleans()),
    }


@fuzz(500)
@given(case=body_cases())
def test_hostile_bodies_on_every_body_route(kit: Kit, case: dict[str, Any]) -> None:
    path, body = case["path"], case["body"]
    if case["refresh"] and path in ("/v1/auth/refresh", "/v1/auth/logout"):
        body = body.replace(b"srt_abc.def", kit.refresh_token().encode())
    headers = [
        *credential_headers(kit, case["credential"], path),
        *_header_list(content_type=case["content_type"], x_request_id=case["request_id"]),
    ]
    content = _chunks(body) if case["chunked"] else body
    answer = send(kit.http, "POST", kit.url(path, case["stream"]), headers=headers, content=content)
    check(answer, "POST", path, case)


@fuzz(80)
@given(
    body=bodies(BASES["/v1/auth/dev-token"]),
    content_type=content_types,
    credential=credentials,
    request_id=st.sampled_from(REQUEST_IDS),
)
def test_hostile_bodies_on_the_dev_token_route(
    kit: Kit,
    dev_http: httpx.Client,
    body: bytes,
    content_type: bytes | None,
    credential: tuple[str, Any],
    request_id: bytes | None,
) -> None:
    path = "/v1/auth/dev-token"
    headers = [
        *credential_headers(kit, credential, path),
        *_header_list(content_type=content_type, x_request_id=request_id),
    ]
    answer = send(dev_http, "POST", path, headers=headers, content=body)
    check(answer, "POST", path, (body, content_type, credential, request_id))


STREAM_ROUTES = [
    ("GET", "/v1/streams/{id}/events"),
    ("GET", "/v1/streams/{id}/events"),
    ("GET", "/v1/streams/{id}"),
    ("DELETE", "/v1/streams/{id}"),
    ("POST", "/v1/streams/{id}/ticket"),
    ("POST", "/v1/streams/{id}/feedback"),
]
ticket_values = mostly(
    st.sampled_from(["@real", "@real", "@forged"]),
    st.sampled_from(
        [
            "",
            "x",
            "a.b.c",
            "e30.e30.e30",
            "\x00",
            "\U0001f600",
            "t" * 9000,
            _unsigned(b'{"alg":"HS256","a":' + b"[" * 3000 + b"]" * 3000 + b"}").decode(),
            _unsigned(b'{"alg":"none"}').decode(),
        ]
    ),
)


@st.composite
def stream_cases(draw: st.DrawFn) -> dict[str, Any]:
    method, path = draw(st.sampled_from(STREAM_ROUTES))
    ticket = draw(mostly(ticket_values, st.none(), 60)) if path.endswith("/events") else None
    return {
        "method": method,
        "path": path,
        "stream": draw(
            mostly(
                st.just("@real"),
                st.one_of(
                    st.sampled_from(HOSTILE_IDS),
                    st.text(min_size=1, max_size=40).filter(lambda s: s not in (".", "..")),
                ),
                percent=50,
            )
        ),
        "credential": draw(credentials) if ticket is None or draw(st.booleans()) else ("none", 0),
        "ticket": ticket,
        "forged_claims": draw(claims),
        "last_event_header": draw(st.one_of(st.none(), st.sampled_from(LAST_EVENT_HEADERS))),
        "last_event_query": draw(st.one_of(st.none(), st.sampled_from(LAST_EVENT_QUERIES))),
        "request_id": draw(st.sampled_from(REQUEST_IDS)),
        "body": draw(bodies(BASES["/v1/streams/{id}/feedback"])),
    }


@fuzz(250)
@given(case=stream_cases())
def test_hostile_stream_ids_tickets_and_last_event_ids(kit: Kit, case: dict[str, Any]) -> None:
    method, path = case["method"], case["path"]
    params: dict[str, str] = {}
    ticket = case["ticket"]
    if ticket == "@real":
        ticket = kit.ticket
    elif ticket == "@forged":
        key = kit.server.services.tickets._key
        now = int(time.time())
        payload = {
            "sid": kit.stream_id,
            "sub": "alice",
            "plan": "pro",
            "iat": now,
            "exp": now + 60,
            "aud": "sserelay:stream",
            **case["forged_claims"],
        }
        ticket = _hs256(payload, key)
    if ticket is not None:
        params["ticket"] = ticket
    if case["last_event_query"] is not None:
        params["last_event_id"] = case["last_event_query"]
    headers = [
        *credential_headers(kit, case["credential"], path),
        *_header_list(last_event_id=case["last_event_header"], x_request_id=case["request_id"]),
    ]
    content = None
    if path.endswith("/feedback"):
        headers.append((b"content-type", b"application/json"))
        content = case["body"]
    url = kit.url(path, case["stream"])
    answer = send(kit.http, method, url, headers=headers, content=content, params=params)
    check(answer, method, path, case)


# `GET /v1/events?streams=a,b&tickets=t,u&last_event_id=a:3,b:1`: many streams on one
# connection. "@real" stands for the module's stream id, "@ticket" for its ticket.
STREAM_LISTS: list[str] = [
    "@real",
    "@real,@real",
    "@real,s_missing",
    "s_missing",
    "",
    ",",
    "@real,",
    ",".join(f"s_{i}" for i in range(33)),
    ",".join(["@real"] + [f"s_{i}" for i in range(31)]),
    "s_" + "a" * 65,
    "s_\u0661",
    "c_abc",
    "s_a%2Cs_b",
    "s_a s_b",
    "@real" + ",s_x" * 2000,
]
TICKET_LISTS: list[str] = [
    "@ticket",
    "@ticket,@ticket",
    "@ticket,",
    "",
    ",",
    "x",
    "a.b.c,e30.e30.e30",
    "t" * 17_000,
]
CURSORS: list[str] = [
    "@real:1",
    "@real:0",
    "@real:99999999999999999999",
    "@real:999999999999999999",
    "@real:\u00b2",
    "@real:-1",
    "@real:1,@real:2",
    "@real:1,s_missing:2",
    "s_missing:1",
    "@real",
    "@real:",
    ":1",
    "1",
    ",",
    "",
    "@real:1" + ",@real:1" * 40,
]


@st.composite
def multiplex_cases(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "streams": draw(mostly(st.just("@real"), st.sampled_from(STREAM_LISTS), 60)),
        "tickets": draw(st.one_of(st.none(), st.sampled_from(TICKET_LISTS))),
        "query_cursor": draw(st.one_of(st.none(), st.sampled_from(CURSORS))),
        "header_cursor": draw(st.one_of(st.none(), st.sampled_from(CURSORS))),
        "credential": draw(credentials),
        "repeat": draw(st.sampled_from([None, "streams", "tickets", "last_event_id"])),
        "request_id": draw(st.sampled_from(REQUEST_IDS)),
    }


@fuzz(150)
@given(case=multiplex_cases())
def test_hostile_multiplexed_event_requests(kit: Kit, case: dict[str, Any]) -> None:
    def real(value: str) -> str:
        return value.replace("@real", kit.stream_id).replace("@ticket", kit.ticket)

    params: list[tuple[str, str]] = [("streams", real(case["streams"]))]
    if case["tickets"] is not None:
        params.append(("tickets", real(case["tickets"])))
    if case["query_cursor"] is not None:
        params.append(("last_event_id", real(case["query_cursor"])))
    if case["repeat"] is not None:
        params.append((case["repeat"], real(case["streams"])))
    headers = [
        *credential_headers(kit, case["credential"], "/v1/events"),
        *_header_list(x_request_id=case["request_id"]),
    ]
    if case["header_cursor"] is not None:
        headers.append((b"last-event-id", real(case["header_cursor"]).encode()))
    url = "/v1/events?" + urlencode(params)
    answer = send(kit.http, "GET", url, headers=headers)
    check(answer, "GET", "/v1/events", case)


@st.composite
def header_cases(draw: st.DrawFn) -> dict[str, Any]:
    method, path = draw(st.sampled_from(EVERY_ROUTE))
    return {
        "method": method,
        "path": path,
        "credential": draw(credentials),
        "request_id": draw(st.sampled_from(REQUEST_IDS)),
        "cookie": draw(st.one_of(st.none(), st.sampled_from(COOKIES))),
        "accept": draw(st.sampled_from([None, b"*/*", b"text/event-stream", b"\xff", b"a" * 5000])),
        "host": draw(
            st.sampled_from([None, None, b"", b"evil.example", b"[::1", b"\xff", b"a:b:c"])
        ),
        "content_type": draw(content_types),
        "last_event_id": draw(st.one_of(st.none(), st.sampled_from(LAST_EVENT_HEADERS))),
        "extra": draw(
            st.lists(
                st.tuples(
                    st.sampled_from(
                        [b"x-forwarded-for", b"forwarded", b"x-real-ip", b"range", b"expect"]
                    ),
                    st.sampled_from([b"\xff", b"1.2.3.4, ::1", b"bytes=0-1", b"", b"a" * 3000]),
                ),
                max_size=2,
            )
        ),
    }


@fuzz(250)
@given(case=header_cases())
def test_hostile_headers_on_every_route(kit: Kit, case: dict[str, Any]) -> None:
    method, path = case["method"], case["path"]
    headers = [
        *credential_headers(kit, case["credential"], path),
        *_header_list(
            x_request_id=case["request_id"],
            cookie=case["cookie"],
            accept=case["accept"],
            host=case["host"],
            last_event_id=case["last_event_id"],
        ),
        *case["extra"],
    ]
    content = None
    if method == "POST":
        headers += _header_list(content_type=case["content_type"])
        content = json.dumps(BASES[path]).encode()
    answer = send(kit.http, method, kit.url(path), headers=headers, content=content)
    check(answer, method, path, case)


# Cookie-authenticated, state-changing requests compare the Origin with the Host.
COOKIE_ROUTES = [
    ("POST", "/v1/streams"),
    ("POST", "/v1/chat/stream"),
    ("POST", "/v1/streams/{id}/ticket"),
    ("POST", "/v1/streams/{id}/feedback"),
    ("DELETE", "/v1/streams/{id}"),
    ("POST", "/v1/admin/plans/reload"),
    ("GET", "/v1/usage"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/logout"),
]


@fuzz(80)
@given(
    route=st.sampled_from(COOKIE_ROUTES),
    origin=st.one_of(st.sampled_from(ORIGINS), st.just(b"@self")),
    cookie=st.sampled_from(["access", "refresh", "both", "garbage"]),
)
@example(route=("POST", "/v1/auth/refresh"), origin=b"http://[", cookie="refresh")
@example(route=("POST", "/v1/streams"), origin=b"http://[", cookie="access")
def test_cookie_sessions_with_hostile_origins(
    kit: Kit, route: tuple[str, str], origin: bytes, cookie: str
) -> None:
    method, path = route
    access = auth()["authorization"].removeprefix("Bearer ")
    jar = {
        "access": f"{ACCESS_COOKIE}={access}",
        "refresh": f"{REFRESH_COOKIE}=srt_abc.def",
        "both": f"{ACCESS_COOKIE}={access}; {REFRESH_COOKIE}=srt_abc.def",
        "garbage": f"{ACCESS_COOKIE}=x; {REFRESH_COOKIE}=y",
    }[cookie]
    if origin == b"@self":
        origin = kit.server.url.encode()
    headers = [(b"cookie", jar.encode()), (b"origin", origin)]
    content = None
    if method == "POST":
        headers.append((b"content-type", b"application/json"))
        fields = {k: v for k, v in BASES[path].items() if k != "refresh_token"}
        content = json.dumps(fields).encode()
    answer = send(kit.http, method, kit.url(path), headers=headers, content=content)
    check(answer, method, path, (origin, cookie))


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND"]
ODD_PATHS = [
    "/v1/streams/",
    "//v1/streams",
    "/v1//streams",
    "/V1/STREAMS",
    "/v1/streams;x",
    "/v1/streams%00",
    "/v1/streams/x/events/extra",
    "/v1/streams/%2e%2e/ticket",
    "/static/../app/settings.py",
    "/static/%2e%2e/%2e%2e/etc/passwd",
    "/static/",
    "/static/index.html",
    "/static/\u0661",
    "/" + "a" * 8000,
    "/v1/auth/dev-token",
    "/v1/admin",
    "/v1/admin/plans",
    "/%ff",
    "/%ed%a0%80",
    "/metrics/",
    "/healthz?x=%ff",
    "/?" + "q" * 8000,
    "/v2/streams",
    "/robots.txt",
    "/.env",
]
path_segments = st.lists(
    st.text(alphabet="abcxyz019._-~%/:@!$&'()*+,;=", min_size=1, max_size=12), max_size=5
)


@fuzz(150)
@given(
    method=st.sampled_from(METHODS),
    target=st.one_of(
        st.sampled_from([p for _, p in EVERY_ROUTE]),
        st.sampled_from(ODD_PATHS),
        path_segments.map(lambda parts: "/" + "/".join(parts)),
        path_segments.map(lambda parts: "/v1/" + "/".join(parts)),
    ),
    authenticated=st.booleans(),
)
def test_unknown_paths_and_wrong_methods(
    kit: Kit, method: str, target: str, authenticated: bool
) -> None:
    headers = credential_headers(kit, ("valid" if authenticated else "none", None), target)
    content = None
    if method in ("POST", "PUT", "PATCH"):
        headers.append((b"content-type", b"application/json"))
        content = b"{}"
    answer = send(kit.http, method, kit.url(target), headers=headers, content=content)
    check(answer, method, target, authenticated)
    if target in ALLOWED and method not in ALLOWED[target]:
        assert answer.status in (404, 405), (method, target, answer.status)


@fuzz(40)
@given(
    path=st.sampled_from(sorted(BODY_LIMITS)),
    over=st.one_of(st.integers(-2, 2), st.integers(3, 4096)),
    chunked=st.booleans(),
    filler=st.sampled_from([b" ", b"a", b"\xff", b"["]),
)
def test_bodies_just_over_their_limit(
    kit: Kit, dev_http: httpx.Client, path: str, over: int, chunked: bool, filler: bytes
) -> None:
    limit = BODY_LIMITS[path]
    size = limit + over
    body = b'{"prompt": "' + filler * (size - 14) + b'"}'
    assert len(body) == size
    http = dev_http if path == "/v1/auth/dev-token" else kit.http
    headers = [
        *credential_headers(kit, ("valid", None), path),
        (b"content-type", b"application/json"),
    ]
    content = _chunks(body, 65536) if chunked else body
    answer = send(http, "POST", kit.url(path), headers=headers, content=content)
    check(answer, "POST", path, (size, chunked, filler))
    if size > limit:
        assert answer.status == 413, (path, size, answer.status, answer.body[:200])
        assert json.loads(answer.body)["code"] == "body_too_large"
    else:
        assert answer.status != 413, (path, size, answer.body[:200])


def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> Answer:
    """Sends `request` as is and reads the first response: its head, then its
    Content-Length body (an event stream's head only)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        pairs = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        headers = dict(pairs)
        if headers.get("content-type", "").startswith("text/event-stream"):
            return Answer(status, headers, b"", True, pairs)
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Answer(status, headers, rest[:length], False, pairs)


@fuzz(80)
@given(
    path=st.sampled_from(sorted(BODY_LIMITS)),
    body=st.one_of(
        bodies(BASES["/v1/streams"]), st.sampled_from([b'{"model": "sim-fast", "prompt": "hi"}'])
    ),
    cut=st.floats(0, 1, exclude_max=True),
    credential=st.sampled_from([("valid", None), ("none", None)]),
)
def test_content_length_smaller_than_the_body(
    kit: Kit,
    dev_server: ServerThread,
    path: str,
    body: bytes,
    cut: float,
    credential: tuple[str, Any],
) -> None:
    """The declared length wins: the body is cut short (and the rest is not a request,
    since the connection closes after the answer)."""
    body = body or b"{}"
    declared = int(len(body) * cut)
    url = dev_server.url if path == "/v1/auth/dev-token" else kit.server.url
    head = [
        f"POST {kit.url(path)} HTTP/1.1",
        f"Host: {url.removeprefix('http://')}",
        "Content-Type: application/json",
        f"Content-Length: {declared}",
        "Connection: close",
    ]
    extra = b"".join(
        name + b": " + value + b"\r\n" for name, value in credential_headers(kit, credential, path)
    )
    request = "\r\n".join(head).encode() + b"\r\n" + extra + b"\r\n" + body
    answer = raw_exchange(url, request)
    check(answer, "POST", path, (declared, len(body), body[:200]))


# Requests the HTTP parser itself refuses never reach the application.
UNPARSEABLE: list[bytes] = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\x00b\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: \x01\x02\x1f\x7f\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rb\r\n\r\n",
    b"GET /v1/streams/x/events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 1\x00\r\n\r\n",
    b"GET /v1/usage HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x0bb\r\n\r\n",
    b"GET /v1/usage HTTP/1.1\r\nHost: x\r\nCookie: sserelay_access=\x1b[31m\r\n\r\n",
    b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\n{}{}{}",
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n{}",
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 2\r\n\r\n{}",
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    # Keep-alive, a short Content-Length: the rest is a second "request" that is garbage.
    b"POST /v1/auth/refresh HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 5\r\n\r\n" + b'{"refresh_token":"x"} garbage',
]


@pytest.mark.parametrize("request_bytes", UNPARSEABLE, ids=range(len(UNPARSEABLE)))
def test_requests_the_http_parser_refuses(kit: Kit, request_bytes: bytes) -> None:
    """Control characters in headers, unknown methods and broken framing: a 4xx, never a
    5xx or a traceback, and the connection is not left hanging."""
    answer = raw_exchange(kit.server.url, request_bytes)
    assert 400 <= answer.status < 500, (request_bytes, answer)
    assert answer.headers.get("connection") == "close", (request_bytes, answer)
    for marker in TRACE_MARKERS:
        assert marker not in answer.body, (request_bytes, answer)
    if "x-request-id" in answer.headers:  # it reached the application
        check(answer, "RAW", "", request_bytes)


RANGES: list[bytes] = [
    b"\xff",
    b"bytes=999999-",
    b"bytes=5-1",
    b"bytes=0-1",
    b"bytes=0-1,2-3," * 200,
    b"bytes=0-0,-1",
    b"items=0-1",
    b"bytes=-0",
    b"bytes=--1",
    b"bytes=" + b"9" * 5000 + b"-",
    b"bytes=0-" + b"9" * 5000,
    b"bytes=",
]


@fuzz(60)
@given(
    path=st.sampled_from(["/", "/static/index.html", "/static/app.js", "/static/style.css"]),
    range_header=st.one_of(st.none(), st.sampled_from(RANGES)),
    conditional=st.lists(
        st.tuples(
            st.sampled_from([b"if-range", b"if-none-match", b"if-modified-since", b"if-match"]),
            st.sampled_from(
                [b"*", b"garbage", b'"etag"', b"\xff", b"Thu, 01 Jan 1970 00:00:00 GMT"]
            ),
        ),
        max_size=3,
    ),
    method=st.sampled_from(["GET", "HEAD"]),
)
def test_demo_page_files_with_hostile_ranges(
    kit: Kit,
    path: str,
    range_header: bytes | None,
    conditional: list[tuple[bytes, bytes]],
    method: str,
) -> None:
    headers = [*_header_list(range=range_header), *conditional]
    answer = send(kit.http, method, path, headers=headers)
    check(answer, method, path, (range_header, conditional))


# --- every route, authenticated and not ------------------------------------------------------


def _valid_request(
    kit: Kit, method: str, path: str
) -> tuple[list[tuple[bytes, bytes]], bytes | None, dict[str, str]]:
    if path == "/v1/events":
        return [], None, {"streams": kit.stream_id}
    if method != "POST":
        return [], None, {}
    body = dict(BASES[path])
    if path in ("/v1/auth/refresh", "/v1/auth/logout"):
        body["refresh_token"] = kit.refresh_token()
    return [(b"content-type", b"application/json")], json.dumps(body).encode(), {}


def _served(server: ServerThread, template: str) -> bool:
    template = template.replace("{id}", "{stream_id}")
    return any(getattr(route, "path", None) == template for route in server.app.routes)


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "anonymous"])
@pytest.mark.parametrize(("method", "path"), EVERY_ROUTE, ids=[f"{m} {p}" for m, p in EVERY_ROUTE])
def test_every_route_answers_properly(
    kit: Kit, method: str, path: str, authenticated: bool
) -> None:
    headers, content, params = _valid_request(kit, method, path)
    headers += credential_headers(kit, ("valid" if authenticated else "none", None), path)
    answer = send(kit.http, method, kit.url(path), headers=headers, content=content, params=params)
    check(answer, method, path, authenticated)
    what = (path, answer.status, answer.body[:300])
    needs_caller = path.startswith("/v1/") and path not in ("/v1/auth/refresh", "/v1/auth/logout")
    if not _served(kit.server, path):  # a route this build does not have (yet)
        assert answer.status == 404, what
    elif authenticated or not needs_caller:
        assert 200 <= answer.status < 300, what
    else:
        assert answer.status == 401, what


@pytest.mark.parametrize("authenticated", [True, False], ids=["authenticated", "anonymous"])
def test_dev_token_route_answers_properly(
    kit: Kit, dev_http: httpx.Client, authenticated: bool
) -> None:
    headers = credential_headers(kit, ("valid" if authenticated else "none", None), "")
    headers.append((b"content-type", b"application/json"))
    answer = send(dev_http, "POST", "/v1/auth/dev-token", headers=headers, content=b"{}")
    check(answer, "POST", "/v1/auth/dev-token", authenticated)
    assert answer.status == 200
    for method in ("GET", "PUT", "PATCH", "DELETE"):
        wrong = send(dev_http, method, "/v1/auth/dev-token", headers=headers)
        check(wrong, method, "/v1/auth/dev-token", authenticated)
        assert wrong.status in (404, 405)


@pytest.mark.parametrize(
    "path", sorted({p for m, p in EVERY_ROUTE if m == "POST"} | {"/v1/auth/dev-token"})
)
@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
def test_wrong_methods_on_post_routes(kit: Kit, path: str, method: str) -> None:
    if method in ALLOWED.get(path, set()):
        pytest.skip(f"{method} {path} is a route")
    headers = [
        *credential_headers(kit, ("valid", None), path),
        (b"content-type", b"application/json"),
    ]
    answer = send(kit.http, method, kit.url(path), headers=headers, content=b"{}")
    check(answer, method, path, None)
    assert answer.status in (404, 405), (method, path, answer.status)


# --- memory over 10,000 bad requests ---------------------------------------------------------

MEGABYTE_BODY = b'{"refresh_token": "' + b"a" * 1_000_000 + b'"}'
DEEP_ARRAYS = b"[" * 10_000 + b"]" * 10_000


@dataclass(frozen=True)
class BadRequest:
    name: str
    method: str
    path: str
    expected: int
    body: bytes | None = None
    chunked: bool = False
    headers: tuple[tuple[bytes, bytes], ...] = ()
    params: tuple[tuple[str, str], ...] = ()


def bad_requests() -> list[BadRequest]:
    json_ct = (b"content-type", b"application/json")
    bearer = (b"authorization", auth()["authorization"].encode())
    secret = (b"authorization", f"Bearer {CLIENT_SECRET}".encode())
    return [
        BadRequest(
            "deep-arrays", "POST", "/v1/streams", 400, DEEP_ARRAYS, False, (json_ct, bearer)
        ),
        BadRequest("megabyte", "POST", "/v1/auth/refresh", 413, MEGABYTE_BODY, False, (json_ct,)),
        BadRequest(
            "megabyte-chunked", "POST", "/v1/auth/refresh", 413, MEGABYTE_BODY, True, (json_ct,)
        ),
        BadRequest(
            "surrogate",
            "POST",
            "/v1/chat/stream",
            400,
            b'{"model": "sim-fast", "prompt": "a\\ud800b"}',
            False,
            (json_ct, bearer),
        ),
        BadRequest(
            "garbage-token",
            "GET",
            "/v1/usage",
            401,
            None,
            False,
            ((b"authorization", b"Bearer a.b.c"),),
        ),
        BadRequest(
            "deep-token-header",
            "GET",
            "/v1/models",
            401,
            None,
            False,
            ((b"authorization", DEEP_HEADER_TOKEN),),
        ),
        BadRequest(
            "nan-and-duplicates",
            "POST",
            "/v1/streams",
            400,
            b'{"model": "sim-fast", "prompt": "x", "prompt": "y", "temperature": NaN}',
            False,
            (json_ct, bearer),
        ),
        BadRequest(
            "deep-objects",
            "POST",
            "/v1/auth/token",
            400,
            b'{"a":' * 2500 + b"0" + b"}" * 2500,
            False,
            (json_ct, secret),
        ),
        BadRequest(
            "last-event-id",
            "GET",
            "/v1/streams/s_missing/events",
            404,
            None,
            False,
            (bearer, (b"last-event-id", b"\xb2")),
            (("last_event_id", "\u0661"),),
        ),
        BadRequest(
            "wrong-types",
            "POST",
            "/v1/streams/s_missing/feedback",
            422,
            b'{"rating": true, "comment": [], "correct": "yes"}',
            False,
            (json_ct, bearer),
        ),
        BadRequest(
            "text-plain",
            "POST",
            "/v1/streams",
            415,
            b'{"model": "sim-fast", "prompt": "hi"}',
            False,
            ((b"content-type", b"text/plain"), bearer),
        ),
        BadRequest(
            "hostile-request-id",
            "GET",
            "/v1/usage",
            401,
            None,
            False,
            ((b"x-request-id", b"\xff" * 4000),),
        ),
    ]


def hammer(url: str, total: int, threads: int = 8) -> tuple[Counter[str], list[str]]:
    """`total` bad requests over `threads` keep-alive connections: statuses by kind, and
    every answer that was not what it should be."""
    kinds = bad_requests()
    seen: Counter[str] = Counter()
    wrong: list[str] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        try:
            with httpx.Client(base_url=url, timeout=httpx.Timeout(30.0)) as http:
                for i in range(offset, total, threads):
                    kind = kinds[i % len(kinds)]
                    content: bytes | Iterator[bytes] | None = kind.body
                    if kind.chunked and kind.body is not None:
                        content = _chunks(kind.body, 65536)
                    r = http.request(
                        kind.method,
                        kind.path,
                        headers=list(kind.headers),
                        content=content,
                        params=dict(kind.params),
                    )
                    ok = (
                        r.status_code == kind.expected
                        and b"Traceback" not in r.content
                        and "x-request-id" in r.headers
                    )
                    with lock:
                        seen[f"{kind.name} {r.status_code}"] += 1
                        if not ok and len(wrong) < 20:
                            wrong.append(f"{kind.name}: {r.status_code} {r.content[:200]!r}")
        except Exception as exc:  # reported by the test, not lost in a thread
            with lock:
                wrong.append(f"worker {offset}: {exc!r}")

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return seen, wrong


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


class OutputDrain:
    """Reads a child's output as it comes (a full pipe would stall the server); keeps
    the tail for failure messages."""

    def __init__(self, stream: Any) -> None:
        self.tail: deque[str] = deque(maxlen=50)
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream: Any) -> None:
        for line in iter(stream.readline, b""):
            self.tail.append(line.decode(errors="replace").rstrip())

    def text(self) -> str:
        return "\n".join(self.tail)


def test_rss_stays_flat_over_ten_thousand_bad_requests(config_path: Path) -> None:
    env = {
        "SSERELAY_JWT_SECRET": SECRET,
        "SSERELAY_CONFIG": str(config_path),
        "SSERELAY_AUTH_CLIENT_SECRET": CLIENT_SECRET,
        "SSERELAY_LOG_LEVEL": "warning",  # no access line per request
    }
    server = ServerProcess(env)
    drain = OutputDrain(server.proc.stdout)
    try:
        _, warm_wrong = hammer(server.url, 1_000)
        assert not warm_wrong, (warm_wrong, drain.text())
        before = rss_kib(server.proc.pid)
        seen, wrong = hammer(server.url, 10_000)
        after = rss_kib(server.proc.pid)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
        drain.thread.join(timeout=5)
        server.stop()
    print(f"\nRSS before {before / 1024:.1f} MiB, after {after / 1024:.1f} MiB; {dict(seen)}")
    assert not wrong, (wrong, drain.text())
    assert sum(seen.values()) == 10_000
    assert not any(int(key.rsplit(" ", 1)[1]) >= 500 for key in seen), seen
    assert after - before < 30 * 1024, f"RSS grew from {before} KiB to {after} KiB"
