"""The stream log in process memory: the embedded default (one process, no setup)."""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from .._exceptions import StreamFenced
from ..events import Event
from .base import Control, Liveness, StreamInfo, StreamLog, StreamStatus


class _Entry:
    __slots__ = (
        "info",
        "events",
        "ids",
        "changed",
        "expires",
        "reader_until",
        "lease_until",
        "cancel",
        "epoch",
    )

    def __init__(self, info: StreamInfo, expires: float) -> None:
        self.info = info
        self.events: list[Event] = []
        self.ids: list[int] = []
        self.changed = asyncio.Event()
        self.expires = expires
        self.reader_until = 0.0
        self.lease_until = 0.0
        self.cancel = False
        self.epoch = 0


class MemoryStreamLog(StreamLog):
    def __init__(
        self,
        *,
        ttl_s: float,
        max_duration_s: float,
        max_events: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ttl_s=ttl_s, max_duration_s=max_duration_s, max_events=max_events)
        self._streams: dict[str, _Entry] = {}
        self._clock = clock
        self._next_sweep = 0.0

    def _get(self, stream_id: str) -> _Entry | None:
        entry = self._streams.get(stream_id)
        if entry is not None and entry.expires <= self._clock():
            del self._streams[stream_id]
            entry.changed.set()
            return None
        return entry

    def _sweep(self, now: float) -> None:
        # Expired streams nobody asks about again must not stay in memory forever.
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        for stream_id in [k for k, e in self._streams.items() if e.expires <= now]:
            self._streams.pop(stream_id).changed.set()

    async def create(
        self, info: StreamInfo, *, reader_grace_s: float, lease_s: float | None = None
    ) -> None:
        now = self._clock()
        self._sweep(now)
        entry = _Entry(replace(info), now + self.ttl_s + self.max_duration_s)
        entry.reader_until = now + reader_grace_s
        if lease_s is not None:
            entry.lease_until = now + lease_s
            entry.epoch = 1
        self._streams[info.id] = entry

    async def take(self, stream_id: str, lease_s: float) -> int:
        entry = self._get(stream_id)
        if entry is None:
            return -2
        if entry.info.status != "running":
            return 0
        now = self._clock()
        if entry.lease_until > now:
            return -1
        entry.epoch += 1
        entry.lease_until = now + lease_s
        return entry.epoch

    async def waiting(self, stream_ids: Collection[str]) -> set[str]:
        found = set()
        for stream_id in stream_ids:
            entry = self._get(stream_id)
            if entry is not None and entry.info.status == "running" and entry.epoch == 0:
                found.add(stream_id)
        return found

    async def release(self, stream_id: str, epoch: int) -> None:
        entry = self._get(stream_id)
        if entry is not None and entry.epoch == epoch:
            entry.lease_until = 0.0

    async def info(self, stream_id: str) -> StreamInfo | None:
        entry = self._get(stream_id)
        return replace(entry.info) if entry else None

    async def append(self, stream_id: str, events: Sequence[Event], *, epoch: int = 1) -> None:
        entry = self._get(stream_id)
        if entry is None:
            return
        if entry.epoch != epoch:
            raise StreamFenced(f"stream {stream_id} was taken over (epoch {entry.epoch})")
        entry.events.extend(events)
        entry.ids.extend(e.id for e in events)
        excess = len(entry.events) - self.max_events
        if excess > 0:
            del entry.events[:excess]
            del entry.ids[:excess]
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def finish(self, stream_id: str, status: StreamStatus, *, epoch: int = 1) -> None:
        entry = self._get(stream_id)
        if entry is None:
            return
        if entry.epoch != epoch:
            raise StreamFenced(f"stream {stream_id} was taken over (epoch {entry.epoch})")
        entry.lease_until = 0.0
        entry.info.status = status
        entry.expires = self._clock() + self.ttl_s
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def read(
        self, stream_id: str, after: int, *, block_s: float = 0.0, limit: int = 1000
    ) -> list[Event]:
        entry = self._get(stream_id)
        if entry is None:
            return []
        start = bisect.bisect_right(entry.ids, after)
        if start == len(entry.ids) and block_s > 0:
            try:
                async with asyncio.timeout(block_s):
                    await entry.changed.wait()
            except TimeoutError:
                return []
            start = bisect.bisect_right(entry.ids, after)
        return entry.events[start : start + limit]

    async def touch_reader(self, stream_id: str, grace_s: float) -> Liveness | None:
        entry = self._get(stream_id)
        if entry is None:
            return None
        now = self._clock()
        entry.reader_until = max(entry.reader_until, now + grace_s)
        return Liveness(entry.info.status, entry.lease_until > now)

    async def request_cancel(self, stream_id: str) -> None:
        entry = self._get(stream_id)
        if entry is not None:
            entry.cancel = True

    async def renew(self, streams: Mapping[str, int], lease_s: float) -> dict[str, Control]:
        now = self._clock()
        result: dict[str, Control] = {}
        for stream_id, epoch in streams.items():
            entry = self._get(stream_id)
            if entry is None:
                result[stream_id] = Control(cancel_requested=True, reader_attached=False)
                continue
            if entry.epoch != epoch:
                result[stream_id] = Control(False, False, owned=False)
                continue
            entry.lease_until = now + lease_s
            result[stream_id] = Control(entry.cancel, entry.reader_until > now)
        return result

    async def ping(self) -> None:
        return None
