"""The YAML file of providers, models and plans, validated as a whole at startup so a
mistake is reported once, with the path of the offending field."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ratelimit import Plan

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")

_DEFAULT_URLS = {"anthropic": "https://api.anthropic.com"}
_DEFAULT_CONTINUATION: dict[str, Continuation] = {
    "anthropic": "prefill",
    "simulated": "prefill",
    "openai": "none",
}

Continuation = Literal["prefill", "none"]
"""How an answer cut short is continued: `prefill` sends the text so far as a final
assistant message (Anthropic; vLLM and SGLang with `continue_final_message`); `none`
never continues (models that refuse prefill, plain OpenAI)."""
_DEFAULT_KEY_ENVS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field."""


class ProviderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["anthropic", "openai", "simulated"]
    base_url: str | None = None
    continuation: Continuation | None = None
    """Default for this provider's models; unset: `prefill` for anthropic and
    simulated, `none` for openai (plain OpenAI has no way to continue)."""
    api_key_env: str | None = None
    max_connections: int = Field(default=1000, ge=1)
    # simulator only
    tokens_per_second: float = Field(default=40.0, ge=0)
    response_tokens: int = Field(default=120, ge=1)
    ttft_ms: float = Field(default=150.0, ge=0)

    @model_validator(mode="after")
    def _needs_url(self) -> ProviderConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai provider needs base_url (e.g. http://host:8001/v1)")
        return self

    def continues(self) -> Continuation:
        return self.continuation or _DEFAULT_CONTINUATION[self.kind]

    def url(self) -> str | None:
        return self.base_url or _DEFAULT_URLS.get(self.kind)

    def api_key(self) -> str | None:
        env = self.api_key_env or _DEFAULT_KEY_ENVS.get(self.kind)
        return os.environ.get(env) if env else None


CacheScope = Literal["subject", "plan", "global"]
"""Who shares a cached answer: the caller alone, everyone on the caller's plan, or
everyone."""


class CacheConfig(BaseModel):
    """The response cache of one model: exact-match answers kept for `ttl_s`, shared
    within `scope`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl_s: float = Field(default=3600.0, gt=0)
    scope: CacheScope = "subject"


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    upstream: str | None = None
    """The provider's id for this model; defaults to the model's own name."""
    input_usd_per_mtok: float = Field(default=0.0, ge=0)
    output_usd_per_mtok: float = Field(default=0.0, ge=0)
    max_output_tokens: int = Field(default=4096, ge=1)
    continuation: Continuation | None = None
    """Overrides the provider's: e.g. `none` for a model that refuses prefill."""
    fallbacks: tuple[str, ...] = ()
    """Models to try, in order, once this one's attempts are spent: before the first
    token as after it (then only those that can continue)."""
    cache: CacheConfig | None = None
    """The response cache for this model; None (the default): answers are not cached."""


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    plans: dict[str, Plan]
    default_plan: str

    @model_validator(mode="after")
    def _references(self) -> Config:
        for name, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(f"models.{name}.provider: no provider named {model.provider!r}")
            for fallback in model.fallbacks:
                if fallback not in self.models:
                    raise ValueError(f"models.{name}.fallbacks: no model named {fallback!r}")
                if fallback == name:
                    raise ValueError(f"models.{name}.fallbacks: a model cannot fall back to itself")
        for name, plan in self.plans.items():
            for model_name in plan.models or ():
                if model_name not in self.models:
                    raise ValueError(f"plans.{name}.models: no model named {model_name!r}")
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan: no plan named {self.default_plan!r}")
        return self

    def continues(self, model: str) -> bool:
        """Whether `model` can continue a partial answer (prefill)."""
        spec = self.models[model]
        mode = spec.continuation or self.providers[spec.provider].continues()
        return mode == "prefill"


def load_config(path: Path | None) -> Config:
    source = path or DEFAULT_CONFIG
    try:
        raw = yaml.safe_load(source.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"config file {source} is not valid YAML{where}: {problem}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {source} must be a mapping of providers, models, plans")
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"config file {source}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """One line per problem, each naming the field by its dotted path."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)
