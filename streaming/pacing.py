"""How long a stream may hold text before sending it, by how busy this process is.

Every event a stream sends costs the same CPU whatever it carries (meter, encode, log
append, socket write), and at real token rates (50 to 150 tokens/s) every token is its
own event. A process that relays more events than it has CPU for falls behind on all of
them, and the first token of a new stream waits behind that backlog. So the coalescing
window adapts: idle, text is held at most `floor_s` (the configured window, 10 ms by
default: nothing a reader notices); as the process gets busy, the window widens towards
`ceiling_s` and each event carries more text, so events per second fall as load rises.
The first text of a stream is never held (the coalescer sends it at once), the text is
the same whatever the window, and only how it is cut into events changes.

Busy is measured, not guessed: the share of wall time this process spent on the CPU
since the last sample, and how late the loop ran the sampler's own timer (a process
starved of CPU by its neighbours is late without being busy itself). The larger of the
two, smoothed, sets the window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Pacer:
    """The coalescing window now: `floor_s` when idle, up to `ceiling_s` when busy.

    `busy_low` and `busy_high` are shares of one CPU: below `busy_low` the window is the
    floor, at `busy_high` and above it is the ceiling, linear between. A loop that runs
    the sampler `lag_full_s` late counts as fully busy. `smoothing` is the weight of the
    newest sample (1: no smoothing), so one busy moment does not swing every stream."""

    __slots__ = (
        "floor_s",
        "ceiling_s",
        "busy_low",
        "busy_high",
        "lag_full_s",
        "smoothing",
        "pressure",
        "busy",
        "_clock",
        "_cpu",
        "_last_wall",
        "_last_cpu",
    )

    def __init__(
        self,
        floor_s: float,
        ceiling_s: float,
        *,
        busy_low: float = 0.5,
        busy_high: float = 0.9,
        lag_full_s: float = 0.05,
        smoothing: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        if ceiling_s < floor_s:
            raise ValueError("the coalescing ceiling must not be below its floor")
        if not 0 <= busy_low < busy_high:
            raise ValueError("busy_low must be below busy_high")
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing must be in (0, 1]")
        self.floor_s = floor_s
        self.ceiling_s = ceiling_s
        self.busy_low = busy_low
        self.busy_high = busy_high
        self.lag_full_s = lag_full_s
        self.smoothing = smoothing
        self.pressure = 0.0
        """0 (idle) to 1 (saturated), smoothed."""
        self.busy = 0.0
        """The share of one CPU the process used over the last sample."""
        self._clock = clock
        self._cpu = cpu
        self._last_wall = clock()
        self._last_cpu = cpu()

    def window_s(self) -> float:
        return self.floor_s + (self.ceiling_s - self.floor_s) * self.pressure

    def sample(self, lag_s: float = 0.0) -> float:
        """Take a sample (CPU used since the last one, and how late the loop ran it);
        returns the new window."""
        wall, cpu = self._clock(), self._cpu()
        elapsed = wall - self._last_wall
        if elapsed > 0:
            self.busy = (cpu - self._last_cpu) / elapsed
        self._last_wall, self._last_cpu = wall, cpu
        by_cpu = (self.busy - self.busy_low) / (self.busy_high - self.busy_low)
        by_lag = max(0.0, lag_s) / self.lag_full_s if self.lag_full_s > 0 else 0.0
        now = min(1.0, max(0.0, by_cpu, by_lag))
        self.pressure += self.smoothing * (now - self.pressure)
        if self.pressure < 0.01:
            self.pressure = 0.0
        return self.window_s()

    async def run(
        self, interval_s: float = 0.1, on_sample: Callable[[Pacer], None] | None = None
    ) -> None:
        """Sample every `interval_s` until cancelled (one task per process, whatever the
        number of streams); `on_sample` is told after each (metrics). A fixed window is
        sampled too: the process's load is still worth showing."""
        loop = asyncio.get_running_loop()
        self._last_wall, self._last_cpu = self._clock(), self._cpu()  # not startup's CPU
        while True:
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            self.sample(loop.time() - due)
            if on_sample is not None:
                on_sample(self)
