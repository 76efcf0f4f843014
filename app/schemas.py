"""Request bodies, validated strictly: unknown fields are errors, not ignored, and no
type is coerced into another (`true` is not a rating, `"5"` is not a number).

`app.body.read_body` reads every body into one of these."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

STRICT = ConfigDict(extra="forbid", strict=True)

# C0 controls except tab and newline, DEL, and C1 controls: they carry no meaning in a
# prompt and have been used to smuggle instructions past filters and into logs.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    return _CONTROL.sub("", text)


def clean_nonempty(text: str) -> str:
    cleaned = clean(text)
    if not cleaned.strip():
        raise ValueError("must contain text (control characters are removed)")
    return cleaned


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["user", "assistant"]
    content: str = Field(min_length=1)

    @field_validator("content")
    @classmethod
    def _clean(cls, value: str) -> str:
        return clean_nonempty(value)


class CompletionRequest(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] | None = None
    prompt: str | None = Field(default=None, min_length=1)
    system: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=4
    )
    """Stop sequences (at most 4, as the providers accept)."""
    metadata: dict[str, str | int | float | bool] | None = Field(default=None, max_length=16)

    @field_validator("prompt")
    @classmethod
    def _clean_prompt(cls, value: str | None) -> str | None:
        return clean_nonempty(value) if value is not None else None

    @field_validator("system")
    @classmethod
    def _clean_system(cls, value: str | None) -> str | None:
        return clean(value) if value is not None else None

    @model_validator(mode="after")
    def _one_input(self) -> CompletionRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give exactly one of `messages` or `prompt`")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("`messages` must not be empty")
            if self.messages[0].role != "user":
                raise ValueError("the first message must have role `user`")
        return self

    def chat(self) -> list[ChatMessage]:
        if self.messages is not None:
            return self.messages
        assert self.prompt is not None
        return [ChatMessage(role="user", content=self.prompt)]


class Feedback(BaseModel):
    """A user's judgement of an answer."""

    model_config = STRICT

    rating: Literal["up", "down"] | Annotated[int, Field(ge=1, le=5)]
    correct: bool | None = None
    comment: str | None = Field(default=None, max_length=2000)

    @field_validator("comment")
    @classmethod
    def _clean_comment(cls, value: str | None) -> str | None:
        return clean(value) or None if value is not None else None


Subject = Annotated[str, Field(pattern=r"^[A-Za-z0-9._@:|-]{1,128}$")]
Scope = Annotated[str, Field(pattern=r"^[A-Za-z0-9._:/-]{1,64}$")]


class TokenGrant(BaseModel):
    """What a trusted backend asks `/v1/auth/token` for."""

    model_config = STRICT

    sub: Subject
    plan: str | None = Field(default=None, max_length=200)
    scopes: list[Scope] = Field(default_factory=list, max_length=32)
    cookie: bool = False


class DevTokenGrant(BaseModel):
    model_config = STRICT

    sub: Subject = "demo-user"
    plan: str | None = Field(default=None, max_length=200)
    cookie: bool = False


class RefreshBody(BaseModel):
    model_config = STRICT

    refresh_token: str | None = Field(default=None, max_length=512)
