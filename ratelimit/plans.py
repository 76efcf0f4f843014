"""Plans: what a caller may use. A limit left out is unlimited."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models
