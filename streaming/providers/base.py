"""What a provider is, to the rest of sserelay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..chunks import Chunk


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request, already mapped to the provider's model id."""

    model: str
    messages: tuple[Message, ...]
    max_tokens: int
    system: str | None = None
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    """Stop sequences: the answer ends before the first one it would contain."""
    metadata: Mapping[str, Any] | None = None
    request_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    prefill: str = ""
    """The start of the answer, already relayed, that this request continues: sent as
    a final assistant message (Anthropic; OpenAI-compatible servers with
    `continue_final_message`), so the model writes what comes right after it. Never
    ends in whitespace (Anthropic refuses that). Empty: a fresh answer."""

    def prompt_chars(self) -> int:
        return (
            sum(len(m.content) for m in self.messages) + len(self.system or "") + len(self.prefill)
        )

    def input_token_bound(self) -> int:
        """At least as many tokens as any provider can count for this prompt.

        Tokenizers in use (Claude's, OpenAI's cl100k/o200k, Llama's) are byte-level BPE:
        every token covers at least one UTF-8 byte, so a text never has more tokens than
        bytes. Each message costs a few framing tokens on top (role markers, separators:
        3 to 4 for OpenAI, fewer than 8 for the others), and the request a few more."""
        size = sum(len(m.content.encode()) + _MESSAGE_OVERHEAD for m in self.messages)
        if self.system:
            size += len(self.system.encode()) + _MESSAGE_OVERHEAD
        return size + _REQUEST_OVERHEAD


_MESSAGE_OVERHEAD = 8
_REQUEST_OVERHEAD = 8


def estimate_tokens(chars: int) -> int:
    """About four characters a token for English text; good enough for a projection
    that the provider's reported usage corrects at the end."""
    return max(1, (chars + 3) // 4)


class Provider(Protocol):
    """A source of normalised chunks for one request.

    `stream` raises `UpstreamError` for every failure; closing the iterator early
    (the consumer went away) must close the upstream connection, so nobody pays for
    tokens nobody reads.
    """

    name: str

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]: ...

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        """How long the answer will probably be, for progress and ETA; None = unknown."""
        ...

    async def ready(self) -> bool: ...

    async def aclose(self) -> None: ...
