"""A provider with no network: deterministic text at a configurable pace.

It is the embedded default so that sserelay runs with no keys at all, and its output is
a pure function of the request so tests can compare the relayed text byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

from ..chunks import Chunk, Stop, TextDelta, Usage
from .base import GenerationRequest, estimate_tokens

_WORDS = (
    "stream token relay browser event server latency budget model cost plan window "
    "progress signal reconnect resume proxy cache prompt answer user request replay "
    "bytes socket limit quota metric trace ticket delta ready simple fast careful "
    "honest clear small exact steady bright quiet gentle river mountain garden light"
).split()


def simulated_text(request: GenerationRequest, tokens: int) -> str:
    """The exact text the simulator streams for `request` when it produces `tokens`; a
    continuation streams what follows its prefill's length in this same text."""
    return "".join(_stopped(_tokens(request, tokens), request.stop)[0])


def _seed(request: GenerationRequest) -> int:
    last_user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    return int.from_bytes(hashlib.sha256(last_user.encode()).digest()[:8], "big")


def _tokens(request: GenerationRequest, count: int) -> list[str]:
    seed = _seed(request)
    words = _WORDS
    out: list[str] = []
    for i in range(count):
        word = words[(seed + i * 7919 + (i * i) % 13) % len(words)]
        if i % 12 == 0:  # sentences of twelve words
            word = word.capitalize()
        end = "." if (i + 1) % 12 == 0 or i == count - 1 else ""
        out.append(("" if i == 0 else " ") + word + end)
    return out


def _after(tokens: list[str], skip: int) -> list[str]:
    """The pieces of `tokens` that follow their first `skip` characters: the rest of the
    token that straddles the cut (when it does), then the whole tokens after it."""
    if skip <= 0:
        return tokens
    start = 0
    for i, token in enumerate(tokens):
        end = start + len(token)
        if end > skip:
            return [token[skip - start :], *tokens[i + 1 :]]
        start = end
    return []


def _stopped(tokens: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool]:
    """The tokens before the first stop sequence in their text (the token it starts in
    cut short), and whether one was found: what a model does with `stop`."""
    if not stop:
        return tokens, False
    text = "".join(tokens)
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    if cut < 0:
        return tokens, False
    out: list[str] = []
    size = 0
    for token in tokens:
        if size + len(token) >= cut:
            if cut > size:
                out.append(token[: cut - size])
            break
        out.append(token)
        size += len(token)
    return out, True


class SimulatedProvider:
    def __init__(
        self,
        name: str,
        *,
        tokens_per_second: float = 40.0,
        response_tokens: int = 120,
        ttft_ms: float = 150.0,
    ) -> None:
        self.name = name
        self.tokens_per_second = tokens_per_second
        self.response_tokens = response_tokens
        self.ttft_s = ttft_ms / 1000

    def _length(self, request: GenerationRequest) -> int:
        """The answer's length in tokens. A continuation's `max_tokens` counts only what
        is still to come, so the tokens its prefill already holds are added back: the
        continued answer is the same text (with the same last token) as a whole one."""
        done = 0
        if request.prefill:
            size = 0
            for token in _tokens(request, self.response_tokens):
                size += len(token)
                if size > len(request.prefill):
                    break
                done += 1
        return min(self.response_tokens, done + request.max_tokens)

    def _pieces(self, request: GenerationRequest, length: int) -> list[str]:
        # The seed comes from the last user message, so a continuation (a prefill) does not
        # change the answer: it streams whatever follows the prefill in the same text.
        tokens, _ = _stopped(_tokens(request, length), request.stop)
        return _after(tokens, len(request.prefill))

    def expected_output_tokens(self, request: GenerationRequest) -> int | None:
        length = self._length(request)
        return len(self._pieces(request, length)) if request.prefill else length

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        length = self._length(request)
        pieces = self._pieces(request, length)
        yield Usage(input_tokens=estimate_tokens(request.prompt_chars()))
        await asyncio.sleep(self.ttft_s)
        gap = 1 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        loop = asyncio.get_running_loop()
        due = loop.time()
        for i, token in enumerate(pieces):
            if i:
                # Pace against a schedule, not per sleep, so timer slack does not
                # accumulate into a slower stream than configured.
                due += gap
                delay = due - loop.time()
                await asyncio.sleep(delay if delay > 0 else 0)
            yield TextDelta(token, 1)
        yield Usage(output_tokens=len(pieces))
        if _stopped(_tokens(request, length), request.stop)[1]:
            yield Stop("stop_sequence")
        else:
            yield Stop("max_tokens" if length < self.response_tokens else "end_turn")

    async def ready(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
