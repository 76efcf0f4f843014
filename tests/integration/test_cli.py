"""`sserelay serve` refuses bad settings and config with one line naming the field."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.servers import ServerProcess
from tests.support import ROOT


def serve(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"SSERELAY_PORT": "eighty"}, "SSERELAY_PORT"),
        ({"SSERELAY_JWT_SECRET": "short"}, "SSERELAY_JWT_SECRET"),
        ({"SSERELAY_LOG_FORMAT": "xml"}, "SSERELAY_LOG_FORMAT"),
        ({"SSERELAY_PING_INTERVAL_S": "0"}, "SSERELAY_PING_INTERVAL_S"),
    ],
)
def test_bad_settings_stop_startup_with_one_line(env: dict[str, str], field: str) -> None:
    result = serve(env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and field in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("providers: [", "not valid YAML"),
        ("- 1\n- 2\n", "must be a mapping"),
        (
            "providers: {}\nmodels: {m: {provider: nope}}\nplans: {p: {}}\ndefault_plan: p\n",
            "models.m.provider",
        ),
        (
            "providers: {s: {kind: simulated}}\nmodels: {}\nplans: {p: {max_tokens: -1}}\n"
            "default_plan: p\n",
            "plans.p.max_tokens",
        ),
        (
            "providers: {s: {kind: openai}}\nmodels: {}\nplans: {p: {}}\ndefault_plan: p\n",
            "providers.s",
        ),
        ("providers: {}\nmodels: {}\nplans: {p: {}}\ndefault_plan: q\n", "default_plan"),
        (
            "providers: {}\nmodels: {}\nplans: {p: {colour: red}}\ndefault_plan: p\n",
            "plans.p.colour",
        ),
    ],
)
def test_bad_config_files_stop_startup_with_one_line(
    tmp_path: Path, yaml_text: str, needle: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    result = serve({"SSERELAY_CONFIG": str(path)})
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and str(path) in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = serve({}, "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "cannot read config file" in result.stderr


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SSERELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
async def test_generated_keys_sign_tokens_the_server_accepts(tmp_path: Path, alg: str) -> None:
    import httpx

    from testkit.servers import ServerProcess

    generated = _cli({}, "keys", "generate", "--alg", alg, "--out", str(tmp_path))
    assert generated.returncode == 0, generated.stderr
    env = dict(line.split("=", 1) for line in generated.stdout.splitlines())
    env = {k: v.strip("'") for k, v in env.items()}
    assert set(env) == {
        "SSERELAY_JWT_PRIVATE_KEY_FILE",
        "SSERELAY_JWT_SIGNING_ALG",
        "SSERELAY_JWT_SIGNING_KID",
        "SSERELAY_JWT_KEYS",
    }
    issued = _cli(env, "token", "issue", "--sub", "alice", "--plan", "pro", "--ttl", "15m")
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()
    # A verifier that holds only the public key (SSERELAY_JWT_KEYS) accepts it.
    server = ServerProcess({"SSERELAY_JWT_KEYS": env["SSERELAY_JWT_KEYS"]})
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(
                server.url + "/v1/models", headers={"authorization": f"Bearer {token}"}
            )
        assert r.status_code == 200 and r.json()["plan"] == "pro"
    finally:
        server.stop()


def test_token_issue_needs_a_key_and_a_plan() -> None:
    result = _cli({}, "token", "issue", "--sub", "a", "--plan", "pro")
    assert result.returncode == 2 and "no signing key" in result.stderr
    result = _cli(
        {"SSERELAY_JWT_SECRET": "s" * 40}, "token", "issue", "--sub", "a", "--plan", "gold"
    )
    assert result.returncode == 2 and "no plan named 'gold'" in result.stderr
    result = _cli({"SSERELAY_JWT_KEYS": '[{"alg": "none"}]'}, "serve")
    assert result.returncode == 2 and "SSERELAY_JWT_KEYS" in result.stderr
    assert "Traceback" not in result.stderr


async def test_no_credential_reaches_the_log(tmp_path: Path) -> None:
    import httpx

    from testkit.servers import ServerProcess
    from tests.support import SECRET, token

    server = ServerProcess(
        {
            "SSERELAY_JWT_SECRET": SECRET,
            "SSERELAY_LOG_FORMAT": "json",
            "SSERELAY_LOG_LEVEL": "debug",
            "SSERELAY_AUTH_CLIENT_SECRET": "c" * 40,
        }
    )
    seen: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            access = token("alice", "pro")
            seen.append(access)
            headers = {"authorization": f"Bearer {access}"}
            created = (
                await client.post(
                    "/v1/streams",
                    headers=headers,
                    json={"model": "sim-fast", "prompt": "x", "max_tokens": 3},
                )
            ).json()
            seen.append(created["ticket"])
            await client.get(created["events_url"])
            await client.get("/v1/models", headers={"authorization": f"Bearer {access}x"})
            pair = (
                await client.post(
                    "/v1/auth/token",
                    json={"sub": "bob"},
                    headers={"authorization": "Bearer " + "c" * 40},
                )
            ).json()
            seen += [pair["access_token"], pair["refresh_token"]]
            await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
            await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
    finally:
        output = server.stop()
    assert "/v1/streams" in output  # the access log is there...
    for secret in seen:
        assert secret not in output  # ...with no credential in it
        assert secret.split(".")[-1] not in output


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SSERELAY_JWT_KEYS": "[1]"}, "SSERELAY_JWT_KEYS"),
        ({"SSERELAY_JWT_KEYS": '{"alg": ["HS256"], "secret": "x"}'}, "SSERELAY_JWT_KEYS"),
        (
            {"SSERELAY_JWT_KEYS": '[{"alg": "RS256", "secret": "' + "s" * 40 + '"}]'},
            "SSERELAY_JWT_KEYS",
        ),
        (
            {"SSERELAY_AUTH_CLIENT_SECRET": "short", "SSERELAY_JWT_SECRET": "s" * 40},
            "SSERELAY_AUTH_CLIENT_SECRET",
        ),
        ({"SSERELAY_HOST": "0.0.0.0"}, "development mode"),
        ({"SSERELAY_REDIS_URL": "redis://127.0.0.1:1/0"}, "development mode"),
    ],
)
def test_unsafe_or_broken_auth_settings_stop_startup(env: dict[str, str], needle: str) -> None:
    result = serve(env)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_a_private_key_is_not_an_hmac_secret(tmp_path: Path) -> None:
    key = tmp_path / "ed.pem"
    generated = _cli({}, "keys", "generate", "--alg", "EdDSA", "--out", str(tmp_path))
    key = next(tmp_path.glob("*.key.pem"))
    assert generated.returncode == 0
    result = serve({"SSERELAY_JWT_PRIVATE_KEY_FILE": str(key), "SSERELAY_JWT_SIGNING_ALG": "HS256"})
    assert result.returncode == 2 and "SSERELAY_JWT_PRIVATE_KEY_FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_redis_url_without_a_scheme_is_one_line() -> None:
    result = serve({"SSERELAY_REDIS_URL": "localhost:6379", "SSERELAY_JWT_SECRET": "s" * 40})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "SSERELAY_REDIS_URL" in result.stderr and "redis://localhost:6379" in result.stderr


def test_a_busy_port_is_one_line_and_nothing_claims_to_listen() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve({"SSERELAY_PORT": str(port)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "listening on" not in result.stderr


async def test_a_misspelled_setting_is_named_with_the_closest_one(config_path: Path) -> None:
    server = ServerProcess({"SSERELAY_JWT_SECRT": "s" * 40, "SSERELAY_CONFIG": str(config_path)})
    output = server.stop()
    assert (
        "unknown setting SSERELAY_JWT_SECRT is ignored; did you mean SSERELAY_JWT_SECRET?" in output
    )
    # and "listening" comes once the port is bound: the server answered on it
    assert "listening on" in output
