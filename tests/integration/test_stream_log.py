"""One contract, two stores: the memory and the Redis stream log must behave alike."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.services import redis_clients
from streaming import (
    Event,
    EventEncoder,
    MemoryStreamLog,
    RedisStreamLog,
    StreamInfo,
    StreamLog,
    StreamLogError,
)
from streaming.log import LogWriter

pytestmark = pytest.mark.redis


@pytest.fixture(params=["memory", "redis"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    if request.param == "memory":
        yield MemoryStreamLog(ttl_s=2, max_duration_s=2, max_events=1000)
        return
    url = request.getfixturevalue("redis_url")
    client, tail = redis_clients(url, max_connections=50)
    log = RedisStreamLog(
        client,
        tail=tail,
        prefix=f"t-{uuid.uuid4().hex[:6]}:",
        ttl_s=2,
        max_duration_s=2,
        max_events=1000,
    )
    try:
        yield log
    finally:
        await log.aclose()
        await client.aclose()


def _info(owner: str = "alice") -> StreamInfo:
    return StreamInfo(
        id=uuid.uuid4().hex,
        owner=owner,
        model="m",
        provider="p",
        plan="pro",
        max_tokens=10,
        created_at=time.time(),
    )


def _events(n: int, start: int = 0) -> list[Event]:
    encode = EventEncoder(start)
    return [encode("delta", {"text": f"t{i}", "index": i}) for i in range(n)]


async def test_create_and_info_round_trip(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    assert await log.info(info.id) == info
    assert await log.info("missing") is None


async def test_append_then_read_after_any_id(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    events = _events(10)
    await log.append(info.id, events[:4])
    await log.append(info.id, events[4:])
    assert await log.read(info.id, 0) == events
    assert await log.read(info.id, 7) == events[7:]
    assert await log.read(info.id, 10) == []
    assert await log.read(info.id, 2, limit=3) == events[2:5]


async def test_blocking_read_wakes_on_append(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    events = _events(2)
    reader = asyncio.create_task(log.read(info.id, 0, block_s=5))
    await asyncio.sleep(0.05)
    assert not reader.done()
    await log.append(info.id, events)
    assert await asyncio.wait_for(reader, 2) == events
    started = time.monotonic()
    assert await log.read(info.id, 2, block_s=0.1) == []
    assert time.monotonic() - started >= 0.09


async def test_finish_sets_status_and_expires_everything(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    await log.append(info.id, _events(3))
    await log.finish(info.id, "done")
    stored = await log.info(info.id)
    assert stored is not None and stored.status == "done"
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and liveness.status == "done"
    await asyncio.sleep(2.3)  # ttl_s = 2
    assert await log.info(info.id) is None
    assert await log.read(info.id, 0) == []


async def test_running_stream_keys_have_a_ttl(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    await log.append(info.id, _events(1))
    await asyncio.sleep(4.3)  # ttl_s + max_duration_s = 4
    assert await log.info(info.id) is None


async def test_reader_presence_and_cancel_flags(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=0.3, lease_s=5)
    controls = await log.renew([info.id], 5)
    assert controls[info.id].reader_attached and not controls[info.id].cancel_requested
    await asyncio.sleep(0.4)
    assert not (await log.renew([info.id], 5))[info.id].reader_attached
    await log.touch_reader(info.id, 0.5)
    assert (await log.renew([info.id], 5))[info.id].reader_attached
    await log.request_cancel(info.id)
    assert (await log.renew([info.id], 5))[info.id].cancel_requested


async def test_lease_lapses_when_not_renewed(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=0.2)
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and liveness.generating and liveness.status == "running"
    await asyncio.sleep(0.3)
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and not liveness.generating
    await log.renew([info.id], 5)
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and liveness.generating


async def test_writer_batches_in_order(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    writer = LogWriter(log, info.id)
    events = _events(200)
    for event in events:
        writer.add(event)
        if event.id % 17 == 0:
            await asyncio.sleep(0)
    await writer.close()
    assert writer.error is None
    assert await log.read(info.id, 0, limit=1000) == events


async def test_many_waiting_readers_all_wake(log: StreamLog) -> None:
    # More waiting readers than the Redis client has connections: they must share.
    infos = [_info() for _ in range(300)]
    for info in infos:
        await log.create(info, reader_grace_s=5, lease_s=5)
    readers = [asyncio.create_task(log.read(i.id, 0, block_s=10)) for i in infos]
    await asyncio.sleep(0.1)
    for info in infos:
        await log.append(info.id, _events(1))
    results = await asyncio.wait_for(asyncio.gather(*readers), 15)
    assert all(len(r) == 1 and r[0].id == 1 for r in results)


async def test_a_reader_joining_later_is_not_held_behind_another(log: StreamLog) -> None:
    quiet, busy = _info(), _info()
    for info in (quiet, busy):
        await log.create(info, reader_grace_s=5, lease_s=5)
    waiting = asyncio.create_task(log.read(quiet.id, 0, block_s=10))
    await asyncio.sleep(0.1)  # its wait is in flight and does not cover `busy`
    late = asyncio.create_task(log.read(busy.id, 0, block_s=10))
    await asyncio.sleep(0.05)
    await log.append(busy.id, _events(2))
    assert len(await asyncio.wait_for(late, 15)) == 2
    assert not waiting.done()  # `late` was woken by its event, not by a timeout
    await log.append(quiet.id, _events(1))
    assert len(await waiting) == 1


async def test_claim_end_only_when_nothing_came_after(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=5)
    await log.append(info.id, _events(3))
    late = EventEncoder(2)("error", {"code": "stream_lost"})  # id 3: taken already
    assert not await log.claim_end(info.id, late)
    end = EventEncoder(3)("error", {"code": "stream_lost"})
    assert await log.claim_end(info.id, end)
    assert (await log.read(info.id, 3)) == [end]
    stored = await log.info(info.id)
    assert stored is not None and stored.status == "lost"


async def test_a_waiter_behind_the_covered_id_gets_everything(redis_url: str) -> None:
    """Redis readers share one XREAD; one joining from an earlier id than it covers must
    still get every event after its own id."""
    client, tail = redis_clients(redis_url, max_connections=10)
    log = RedisStreamLog(
        client,
        tail=tail,
        prefix=f"t-{uuid.uuid4().hex[:6]}:",
        ttl_s=5,
        max_duration_s=5,
        max_events=1000,
    )
    try:
        info = _info()
        await log.create(info, reader_grace_s=5, lease_s=5)
        await log.append(info.id, _events(10))
        ahead = asyncio.create_task(log.read(info.id, 10, block_s=10))
        await asyncio.sleep(0.1)
        key = f"{log._prefix}s:{{{info.id}}}:ev"
        behind = await asyncio.wait_for(log._tailer.wait(key, 5, 10), 15)
        assert [e.id for e in behind] == [6, 7, 8, 9, 10]
        await log.append(info.id, _events(1, start=10))
        assert [e.id for e in await ahead] == [11]
    finally:
        await log.aclose()
        await client.aclose()


async def test_the_writer_stops_after_a_failed_append() -> None:
    class Failing(MemoryStreamLog):
        calls = 0

        async def append(self, stream_id: str, events: Any) -> None:
            self.calls += 1
            raise StreamLogError("down")

    log = Failing(ttl_s=5, max_duration_s=5, max_events=100)
    writer = LogWriter(log, "x")
    writer.add(_events(1)[0])
    await writer.close()
    assert writer.error is not None
    writer.add(_events(2)[1])
    await writer.close()
    assert log.calls == 1  # a later append would leave a gap in the ids
