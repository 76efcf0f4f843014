"""Process settings from `SSERELAY_*` environment variables.

Everything tunable lives here, explicitly, and is passed down as plain values: no
module reads the environment on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSERELAY_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    config: Path | None = None
    """YAML file of providers, models and plans; None = the built-in default."""

    redis_url: str | None = None
    """Redis for all shared state; None = in-memory stores (one process)."""
    redis_prefix: str = "sserelay:"
    redis_max_connections: int = Field(default=200, ge=2)

    jwt_secret: SecretStr | None = None
    """HS256 key for access tokens; None = a random development key and the demo's
    self-service token route."""
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    cors_origins: str | None = None

    limiter_fail_mode: Literal["closed", "open"] = "closed"
    """What to do when Redis cannot be reached to check limits: refuse (503) or admit."""
    concurrency_lease_s: float = Field(default=30, ge=3)
    config_poll_s: float = Field(default=2, gt=0)
    """How often the config file is checked for changes (plans reload without restart)."""

    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    stream_ttl_s: float = Field(default=3600, gt=0)
    max_stream_duration_s: float = Field(default=900, gt=0)
    max_stream_events: int = Field(default=100_000, ge=100)
    orphan_grace_s: float = Field(default=15, gt=0)
    lease_s: float = Field(default=10, gt=0)
    supervisor_tick_s: float = Field(default=1.0, gt=0)
    progress_interval_ms: int = Field(default=250, ge=10)
    coalesce_ms: float = Field(default=10, ge=0)
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

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_messages: int = Field(default=200, ge=1)
    max_content_chars: int = Field(default=400_000, ge=1)

    @field_validator("jwt_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (256 bits) for HS256")
        return value

    @property
    def cors_origin_list(self) -> list[str]:
        if not self.cors_origins:
            return []
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
