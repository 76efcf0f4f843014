"""Process settings from `SSERELAY_*` environment variables.

Everything tunable lives here, explicitly, and is passed down as plain values: no
module reads the environment on its own.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

RecordsContent = Literal["omit", "hash", "store"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSERELAY_", extra="ignore", env_ignore_empty=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    config: Path | None = None
    """YAML file of providers, models and plans; None = the built-in default."""

    redis_url: str | None = None
    """Redis for all shared state; None = in-memory stores (one process)."""
    redis_prefix: str = "sserelay:"
    redis_max_connections: int = Field(default=200, ge=2)
    redis_multiplex: bool = True
    """The shared Redis client carries every command on one connection, pipelined (a
    fraction of the CPU per command); False: a pool of `redis_max_connections`, one
    command per checkout."""
    redis_timeout_s: float = Field(default=1.0, gt=0)
    """How long one Redis command (or connecting, or waiting for a free connection) may
    take: a hung Redis costs a request this long, not a client's patience."""
    redis_breaker_open_s: float = Field(default=1.0, gt=0)
    """After a Redis timeout or connection failure, commands fail at once for this long
    (then one is let through to probe)."""

    jwt_secret: SecretStr | None = None
    """HS256 key for access tokens; None = a random development key and the demo's
    self-service token route."""
    jwt_algorithm: Literal["HS256", "HS384", "HS512"] = "HS256"
    """The algorithm of `jwt_secret`."""
    jwt_keys: str | None = None
    """More verification keys, as JSON: [{kid?, alg, secret | public_key | public_key_file}]."""
    jwt_keys_file: Path | None = None
    jwks_url: str | None = None
    """Your identity provider's JWKS; keys cached `jwks_cache_s`, refetched on an unknown
    kid at most every `jwks_min_refetch_s`."""
    jwks_cache_s: float = Field(default=300, gt=0)
    jwks_min_refetch_s: float = Field(default=30, ge=0)
    jwt_private_key_file: Path | None = None
    """PEM private key the built-in issuer signs with (instead of `jwt_secret`)."""
    jwt_signing_alg: str = "EdDSA"
    jwt_signing_kid: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_plan_claim: str = "plan"
    jwt_leeway_s: float = Field(default=30, ge=0, le=300)
    jwt_max_lifetime_s: float = Field(default=86400, gt=0)
    access_token_ttl_s: float = Field(default=900, gt=0)
    refresh_token_ttl_s: float = Field(default=30 * 86400, gt=0)
    refresh_grace_s: float = Field(default=10, ge=0)
    auth_client_secret: SecretStr | None = None
    """What a trusted backend presents to POST /v1/auth/token (Authorization: Bearer)."""
    ticket_secret: SecretStr | None = None
    """Signs stream tickets; defaults to a key derived from the signing key."""
    auth_cookie_name: str = "sserelay_access"
    refresh_cookie_name: str = "sserelay_refresh"
    cookie_secure: bool = True
    admin_scope: str = "sserelay:admin"
    cors_origins: str | None = None
    allowed_hosts: str | None = None
    """Comma-separated Host names this server answers to (`*.example.com` matches
    subdomains); unset = any. A request for another host gets 400 `invalid_host`."""
    hsts: bool = False
    """Send Strict-Transport-Security on every response (it is always sent over TLS):
    for a server behind a TLS-terminating proxy."""
    hsts_max_age_s: int = Field(default=31_536_000, ge=0)

    drain_timeout_s: float = Field(default=25, ge=0)
    """On SIGTERM, how long running streams may finish before they are ended."""
    limiter_fail_mode: Literal["closed", "open"] = "closed"
    """What to do when Redis cannot be reached to check limits: refuse (503) or admit."""
    concurrency_lease_s: float = Field(default=30, ge=3)
    config_poll_s: float = Field(default=2, gt=0)
    """How often the config file is checked for changes (plans reload without restart)."""

    records_content: RecordsContent = "omit"
    """Prompt and output text in request records: left out, SHA-256 only, or kept."""
    records_max: int = Field(default=100_000, ge=100)
    records_ttl_s: float = Field(default=30 * 86400, gt=0)
    cache_max_chars: int = Field(default=100_000, ge=1)
    """The longest answer the response cache keeps (characters); a longer one is not
    stored (models cache only when their config says `cache:`)."""

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    stream_ttl_s: float = Field(default=3600, gt=0)
    max_stream_duration_s: float = Field(default=900, gt=0)
    max_stream_events: int = Field(default=100_000, ge=100)
    orphan_grace_s: float = Field(default=15, gt=0)
    generation_lease_s: float = Field(default=10, gt=0)
    """A running generation's lease: a worker that stops renewing it (dead, paused, cut
    off) for this long has its generations taken over by another worker."""
    worker_concurrency: int = Field(default=1000, ge=1)
    """The most generations one process runs at once; it claims jobs only up to it."""
    max_takeovers: int = Field(default=5, ge=0)
    """A stream taken over more often than this (every worker running it died) ends with
    a retryable `stream_lost` error instead of being continued again."""
    supervisor_tick_s: float = Field(default=1.0, gt=0)
    progress_interval_ms: int = Field(default=250, ge=10)
    ratelimit_report_reuse_s: float = Field(default=1.0, ge=0, le=60)
    """How long an admission's rate-limit state stands in for the limiter's answer on
    this caller's next requests that only report it (0: always ask)."""
    coalesce_ms: float = Field(default=10, ge=0)
    """How long text may be held to merge it with what follows, when the process is idle."""
    coalesce_max_ms: float | None = Field(default=None, ge=0)
    """How long at most, when the process is busy: the window widens from
    `coalesce_ms` to this as the process's CPU use rises (equal to `coalesce_ms`: fixed).
    Unset: 50, or 0 when `coalesce_ms` is 0 (coalescing off stays off)."""

    @property
    def coalesce_ceiling_ms(self) -> float:
        if self.coalesce_max_ms is None:
            return max(50.0, self.coalesce_ms) if self.coalesce_ms > 0 else 0.0
        return max(self.coalesce_max_ms, self.coalesce_ms)

    coalesce_max_chars: int = Field(default=2048, ge=1)
    ping_interval_s: float = Field(default=15, gt=0)
    retry_ms: int = Field(default=1000, ge=0)
    ticket_ttl_s: float = Field(default=300, gt=0)
    dev_token_ttl_s: float = Field(default=86400, gt=0)

    upstream_connect_timeout_s: float = Field(default=5, gt=0)
    upstream_first_token_timeout_s: float = Field(default=60, gt=0)
    upstream_idle_timeout_s: float = Field(default=30, gt=0)
    upstream_max_attempts: int = Field(default=3, ge=1, le=10)
    upstream_backoff_base_s: float = Field(default=0.25, ge=0)
    upstream_backoff_max_s: float = Field(default=8, ge=0)

    send_timeout_s: float = Field(default=30, gt=0)
    """A reader whose connection has not drained for this long is disconnected (on the
    direct route that cancels upstream; a resumable stream goes on for its other
    readers, and this one may resume)."""
    send_buffer_bytes: int = Field(default=1_048_576, ge=16_384)
    """The most a stream may hold for one slow connection (events produced but not yet
    written); past it, the producer waits, and upstream reading with it. It also bounds
    what a provider connection holds of bytes received but not yet read (the HTTP
    client's high water, at most 256 KiB; the Anthropic SDK's connections get it as
    their kernel receive buffer, at least 128 KiB)."""
    header_timeout_s: float = Field(default=10, gt=0)
    """A connection that has not sent a whole request head in this long is closed."""
    body_timeout_s: float = Field(default=30, gt=0)
    """A request body that stalls (no byte for this long) ends the request."""
    max_header_bytes: int = Field(default=32_768, ge=1024)
    """The largest request head (request line and headers) accepted; larger: 431."""
    max_connections: int = Field(default=0, ge=0)
    """Open connections one process accepts (0: derived from the open-file limit, leaving
    room for upstream and Redis connections); past it, new ones are refused at once."""
    keepalive_timeout_s: float = Field(default=5, gt=0)
    """How long an idle keep-alive connection is kept open."""
    max_idle_connections: int = Field(default=1000, ge=1)
    """Idle keep-alive connections kept per process; past it the oldest idle are closed."""

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_messages: int = Field(default=200, ge=1)
    max_content_chars: int = Field(default=400_000, ge=1)

    allow_development_mode: bool = False
    """Development mode (no key: anyone may mint tokens) is refused unless bound to
    loopback without Redis, or allowed explicitly here."""

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss:// or unix:// "
                f"(e.g. redis://{value.split('://')[-1]})"
            )
        return value

    @field_validator("jwt_secret", "auth_client_secret", "ticket_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (256 bits)")
        return value

    def serving_problem(self) -> str | None:
        """Why this configuration must not serve, if it must not: development mode lets
        anyone mint tokens, so it is for a laptop (loopback, no Redis) unless allowed."""
        local = self.host in ("127.0.0.1", "localhost", "::1") and not self.redis_url
        if self.development and not local and not self.allow_development_mode:
            return (
                "no signing or verification key is configured, and development mode (which "
                "lets anyone mint tokens) is only allowed on 127.0.0.1 without Redis: set "
                "SSERELAY_JWT_SECRET (or another key), or SSERELAY_ALLOW_DEVELOPMENT_MODE=true"
            )
        return None

    @property
    def development(self) -> bool:
        """No key of any kind configured: the embedded default, with a random key and the
        demo's self-service token route."""
        return not (
            self.jwt_secret
            or self.jwt_keys
            or self.jwt_keys_file
            or self.jwks_url
            or self.jwt_private_key_file
        )

    @property
    def signs(self) -> bool:
        """This server may issue tokens (it holds a signing key, or is in development)."""
        return self.development or bool(self.jwt_secret or self.jwt_private_key_file)

    @property
    def allowed_host_list(self) -> list[str]:
        if not self.allowed_hosts:
            return []
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        if not self.cors_origins:
            return []
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per `SSERELAY_*` variable no setting reads (a typo leaves its setting at
    the default, e.g. a misspelled key starting development mode), with the closest
    known name."""
    known = {name.upper() for name in Settings.model_fields}
    lines = []
    for name in sorted(environ):
        if name.startswith("SSERELAY_") and name[9:] not in known:
            close = difflib.get_close_matches(name[9:], known, n=1, cutoff=0.8)
            hint = f"; did you mean SSERELAY_{close[0]}?" if close else ""
            lines.append(f"unknown setting {name} is ignored{hint}")
    return lines
