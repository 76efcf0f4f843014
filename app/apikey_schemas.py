"""The body of `POST /v1/admin/apikeys`, validated as strictly as every other body
(see `app.schemas`): unknown fields are errors and no type is coerced."""

from __future__ import annotations

import re

from pydantic import BaseModel, Field, field_validator, model_validator

from .schemas import STRICT

MAX_EXPIRY_S = 10 * 365 * 86400
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]*")


class ApiKeyGrant(BaseModel):
    model_config = STRICT

    sub: str = Field(min_length=1, max_length=256)
    plan: str = Field(min_length=1, max_length=200)
    name: str | None = Field(default=None, max_length=200)
    expires_in_s: int | None = Field(default=None, ge=1, le=MAX_EXPIRY_S)
    expires: str | None = Field(default=None, pattern=r"^[0-9]{1,9}[smhd]$")
    """A duration: `90d`, `12h`, `15m`, `30s`."""

    @field_validator("sub", "name")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and not _PRINTABLE.fullmatch(value):
            raise ValueError("must not contain control characters")
        return value

    @model_validator(mode="after")
    def _one_expiry(self) -> ApiKeyGrant:
        if self.expires_in_s is not None and self.expires is not None:
            raise ValueError("give at most one of `expires_in_s` or `expires`")
        ttl = self.ttl_s()
        if ttl is not None and ttl > MAX_EXPIRY_S:
            raise ValueError("`expires` must be at most ten years")
        if ttl is not None and ttl <= 0:
            raise ValueError("`expires` must be in the future")
        return self

    def ttl_s(self) -> int | None:
        """Seconds until the key expires; None for a key that does not."""
        if self.expires is not None:
            return int(self.expires[:-1]) * _UNITS[self.expires[-1]]
        return self.expires_in_s
