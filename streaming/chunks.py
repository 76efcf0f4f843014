"""The normalised vocabulary every provider speaks.

Providers differ in wire format (Anthropic events, OpenAI chunks, the simulator), but the
pipeline only ever sees these three shapes, so each stage can be tested without any
provider at all. Failures are not chunks: they are raised as `UpstreamError`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TextDelta:
    """Generated text. `tokens` is the provider's count when it knows it, else an estimate
    (one upstream chunk is about one token), so progress can be shown before the
    provider reports usage at the end."""

    text: str
    tokens: int = 1


@dataclass(slots=True)
class Usage:
    """Token counts as reported by the provider; either side may be unknown (None). Any
    `Usage`, even with both unknown, also says the provider accepted the request (from
    then on it bills the prompt)."""

    input_tokens: int | None = None
    output_tokens: int | None = None


@dataclass(slots=True)
class Stop:
    """The provider finished normally; `reason` uses Anthropic's vocabulary
    (end_turn, max_tokens, stop_sequence, ...)."""

    reason: str


Chunk = TextDelta | Usage | Stop


@dataclass(slots=True)
class Attempt:
    """Not from a provider: the upstream reader's mark that a new attempt starts, so
    that usage is summed per attempt and the reader can be told the answer goes on.

    `target` indexes the generation's targets (0: the model asked for); `reason` is the
    code of what ended the previous attempt (`takeover`: another process ran it);
    `continued`: text went out already, so this attempt continues it (or it runs on
    another model): the reader is told with a `continued` event."""

    number: int
    target: int
    model: str
    provider: str
    reason: str
    input_estimate: int
    continued: bool
