"""Plans: what a caller may use. A limit left out is unlimited."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .windows import NANO_USD, WindowLimit

Resource = Literal["requests", "tokens", "cost_usd"]


class CustomLimit(BaseModel):
    """Any window length: `{name: burst, resource: requests, limit: 5, window_s: 10}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,40}$")
    resource: Resource
    limit: float = Field(ge=0)
    window_s: int = Field(ge=1, le=31 * 86400)
    buckets: int = Field(default=60, ge=1, le=1000)


class Plan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: int | None = Field(default=None, ge=0)
    requests_per_day: int | None = Field(default=None, ge=0)
    tokens_per_minute: int | None = Field(default=None, ge=0)
    tokens_per_day: int | None = Field(default=None, ge=0)
    concurrent_streams: int | None = Field(default=None, ge=0)
    daily_budget_usd: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    models: tuple[str, ...] | None = None
    """Model names the plan may use; None = all configured models."""
    limits: tuple[CustomLimit, ...] = ()
    """More windows, of any length, on top of the named ones."""

    @model_validator(mode="after")
    def _unique_names(self) -> Plan:
        names = [w.name for w in self.windows()]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"limit names must be unique: {', '.join(duplicates)}")
        return self

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def windows(self) -> tuple[WindowLimit, ...]:
        """Every window limit of the plan, in a stable order."""
        named: list[tuple[str, Resource, float | None, int]] = [
            ("requests_per_minute", "requests", self.requests_per_minute, 60),
            ("requests_per_day", "requests", self.requests_per_day, 86400),
            ("tokens_per_minute", "tokens", self.tokens_per_minute, 60),
            ("tokens_per_day", "tokens", self.tokens_per_day, 86400),
            ("daily_budget_usd", "cost_usd", self.daily_budget_usd, 86400),
        ]
        out = [
            WindowLimit(name, resource, _units(resource, limit), window_s * 1000)
            for name, resource, limit, window_s in named
            if limit is not None
        ]
        out += [
            WindowLimit(
                c.name, c.resource, _units(c.resource, c.limit), c.window_s * 1000, c.buckets
            )
            for c in self.limits
        ]
        return tuple(out)


def _units(resource: Resource, amount: float) -> int:
    """Limits are counted in integers: requests, tokens, or nano-dollars."""
    return round(amount * NANO_USD) if resource == "cost_usd" else int(amount)
