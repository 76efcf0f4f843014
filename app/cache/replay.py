"""A cached answer played back as a stream, event for event what a live generation of
it produces: `start`, the text as `delta`s of a few tokens each (contiguous `index`es,
in UTF-16 code units), `progress` (with the first text, then at most every progress
interval, and at 100 % before the end), and `done`, which says `cached: true`, carries
the stored usage and costs nothing (`cost_usd: 0`)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from streaming import Event, EventEncoder, GenerationRequest, Outcome, StreamStatus
from streaming.pipeline import utf16_len

from .base import CacheEntry

PIECE_CHARS = 16
"""About four tokens of English: the size of a delta a fast provider produces."""
DELTAS_PER_BATCH = 8
"""Deltas written together (one socket write, one log append), as coalescing would."""
_WORDS = re.compile(r"\S+\s*|\s+")


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of about `size` characters, at word ends where it can be
    (a word longer than four pieces is cut anyway). Joined, they are `text`."""
    out: list[str] = []
    held = ""
    for word in _WORDS.findall(text):
        while len(word) > 4 * size:
            if held:
                out.append(held)
                held = ""
            out.append(word[:size])
            word = word[size:]
        held += word
        if len(held) >= size:
            out.append(held)
            held = ""
    if held:
        out.append(held)
    return out


class Replay:
    """What `Generation` is to the direct route, for an answer from the cache: the same
    `batches()`, `outcome`, `end()`, `abort()`, `parts`, `text()`,
    `request` and `attempts` (none: nothing was asked of a provider). Billed nothing:
    its outcome has no tokens and no cost, whatever the stored usage says."""

    cached = True

    def __init__(
        self,
        entry: CacheEntry,
        request: GenerationRequest,
        *,
        start_data: dict[str, Any],
        progress_interval_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.entry = entry
        self.request = request
        self.start_data = start_data
        self.interval = progress_interval_s
        self.clock = clock
        self.encode = EventEncoder()
        self.outcome = Outcome()
        self._sent: list[str] = []
        self.parts: list[str] | None = self._sent
        """The text sent so far, delta by delta (as `Generation.parts` with its text
        kept)."""
        self.attempts: list[dict[str, Any]] = []
        self.started = clock()
        self.first_at: float | None = None
        self.sent_tokens = 0

    async def batches(self) -> AsyncGenerator[list[Event], None]:
        encode, entry = self.encode, self.entry
        yield [encode("start", self.start_data)]
        total_chars = max(1, len(entry.text))
        index = chars = 0
        next_progress = 0.0
        all_pieces = pieces(entry.text)
        for at in range(0, len(all_pieces), DELTAS_PER_BATCH):
            batch: list[Event] = []
            now = self.clock()
            if self.first_at is None:
                self.first_at = now
            for piece in all_pieces[at : at + DELTAS_PER_BATCH]:
                chars += len(piece)
                self.sent_tokens = entry.output_tokens * chars // total_chars
                batch.append(encode.delta(piece, index, self.sent_tokens))
                index += utf16_len(piece)
                self._sent.append(piece)
            if now >= next_progress:
                next_progress = now + self.interval
                batch.append(encode("progress", self._progress(now)))
            yield batch
            await asyncio.sleep(0)  # no pacing, but no monopoly of the loop either
        self.sent_tokens = entry.output_tokens
        now = self.clock()
        self.end("done", stop_reason=entry.stop_reason)
        yield [
            encode("progress", self._progress(now, final=True)),
            encode(
                "done",
                {
                    "stop_reason": entry.stop_reason,
                    "usage": {
                        "input_tokens": entry.input_tokens,
                        "output_tokens": entry.output_tokens,
                    },
                    "cost_usd": 0.0,
                    "ttft_ms": self.outcome.ttft_ms,
                    "duration_ms": self.outcome.duration_ms,
                    "cached": True,
                },
            ),
        ]

    def _progress(self, now: float, *, final: bool = False) -> dict[str, Any]:
        out, expected = self.sent_tokens, max(1, self.entry.output_tokens)
        since_first = now - self.first_at if self.first_at is not None else 0.0
        tps = out / since_first if since_first > 0 else 0.0
        eta_ms: int | None = 0
        if final:
            percent = 100.0
        else:
            percent = min(99.0, round(out * 100 / expected, 1))
            eta_ms = round((expected - out) / tps * 1000) if tps > 0 else None
        return {
            "output_tokens": out,
            "max_tokens": self.request.max_tokens,
            "percent": percent,
            "tokens_per_second": round(tps, 2),
            "elapsed_ms": round((now - self.started) * 1000),
            "eta_ms": eta_ms,
            "cost_usd": 0.0,
            "projected_cost_usd": 0.0,
        }

    def text(self) -> str | None:
        return "".join(self._sent)

    def abort(
        self, code: str, message: str, *, retryable: bool = False, status: StreamStatus = "error"
    ) -> Event:
        """The terminal `error` event of a replay cut short (client gone, shutdown)."""
        self.end(status, error_code=code)
        return self.encode(
            "error",
            {
                "code": code,
                "message": message,
                "retryable": retryable,
                "usage": {"input_tokens": 0, "output_tokens": 0},
                "cost_usd": 0.0,
            },
        )

    def end(
        self,
        status: StreamStatus,
        *,
        stop_reason: str | None = None,
        error_code: str | None = None,
    ) -> None:
        o = self.outcome
        o.status, o.stop_reason, o.error_code = status, stop_reason, error_code
        o.input_tokens = o.output_tokens = 0
        o.cost_usd = 0.0
        first = self.first_at
        o.ttft_ms = round((first - self.started) * 1000) if first is not None else None
        o.duration_ms = round((self.clock() - self.started) * 1000)
