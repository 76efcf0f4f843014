"""Helpers for the test suite only: its settings, tokens and config files, and a retry
for changes that take effect asynchronously. The servers and the SSE reader are shared with
the benchmark and live in `testkit`; they are re-exported here for existing imports."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from app import Settings
from auth import SigningKey, TokenIssuer
from testkit.servers import (
    JSONServer,
    RedisServer,
    ServerProcess,
    ServerThread,
    free_port,
    free_socket,
    wait_http,
)
from testkit.sse import Collected, SSEEvent, collect, sse_events

__all__ = [
    "ROOT",
    "SECRET",
    "Collected",
    "JSONServer",
    "RedisServer",
    "SSEEvent",
    "ServerProcess",
    "ServerThread",
    "auth",
    "collect",
    "free_port",
    "free_socket",
    "relay_settings",
    "sse_events",
    "token",
    "until_ok",
    "wait_http",
    "write_config",
]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-that-is-long-enough-for-hs256!"


async def until_ok(
    request: Callable[[], Awaitable[httpx.Response]], attempts: int = 100, pause_s: float = 0.05
) -> httpx.Response:
    """Repeat `request` until it answers 200 (a reload, a recovery taking effect);
    returns the last response, for the caller to assert on."""
    response = await request()
    for _ in range(attempts):
        if response.status_code == 200:
            break
        await asyncio.sleep(pause_s)
        response = await request()
    return response


def relay_settings(config_path: Path, **overrides: Any) -> Settings:
    """Test settings: a known key, fast backoff, short upstream timeouts."""
    values: dict[str, Any] = {
        "config": config_path,
        "jwt_secret": SECRET,
        "upstream_backoff_base_s": 0.01,
        "upstream_backoff_max_s": 0.2,
        "upstream_first_token_timeout_s": 3,
        "upstream_idle_timeout_s": 1.5,
        **overrides,
    }
    return Settings(**values)


def token(sub: str = "alice", plan: str = "pro", secret: str = SECRET) -> str:
    return TokenIssuer(SigningKey("HS256", secret.encode())).issue(sub, plan, ttl_s=600)[0]


def auth(sub: str = "alice", plan: str = "pro") -> dict[str, str]:
    return {"authorization": f"Bearer {token(sub, plan)}"}


def write_config(
    tmp: Path,
    upstream_url: str,
    default_plan: str = "free",
    extra_plans: dict[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """A config with every provider kind: the simulator, and the fake upstream speaking
    both the Anthropic and the OpenAI protocol; plans `free`, `pro` and any extra."""
    raw: dict[str, Any] = {
        "providers": {
            "sim": {
                "kind": "simulated",
                "tokens_per_second": 400,
                "response_tokens": 30,
                "ttft_ms": 5,
            },
            "sim-slow": {
                "kind": "simulated",
                "tokens_per_second": 20,
                "response_tokens": 400,
                "ttft_ms": 5,
            },
            "anthropic": {
                "kind": "anthropic",
                "base_url": upstream_url,
                "api_key_env": "FAKE_UPSTREAM_KEY",
            },
            "openai": {
                "kind": "openai",
                "base_url": upstream_url + "/v1",
                "api_key_env": "FAKE_UPSTREAM_KEY",
            },
        },
        "models": {
            "sim-fast": {"provider": "sim", "input_usd_per_mtok": 1.0, "output_usd_per_mtok": 5.0},
            "sim-slow": {
                "provider": "sim-slow",
                "input_usd_per_mtok": 1.0,
                "output_usd_per_mtok": 5.0,
            },
            "claude": {
                "provider": "anthropic",
                "upstream": "fake?tokens=40",
                "input_usd_per_mtok": 3.0,
                "output_usd_per_mtok": 15.0,
            },
            "gpt": {
                "provider": "openai",
                "upstream": "fake?tokens=40",
                "input_usd_per_mtok": 2.0,
                "output_usd_per_mtok": 8.0,
            },
        },
        "plans": {
            "free": {"max_tokens": 100, "models": ["sim-fast"]},
            "pro": {"max_tokens": 4096},
            **(extra_plans or {}),
        },
        "default_plan": default_plan,
    }
    path = tmp / f"sserelay-{name or default_plan}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
