"""One contract, two stores: the memory and the Redis stream log must behave alike."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.redis_client import redis_clients
from streaming import (
    Event,
    EventEncoder,
    MemoryStreamLog,
    RedisStreamLog,
    StreamFenced,
    StreamInfo,
    StreamLog,
    StreamLogError,
)
from streaming.log import LogWriter
from testkit.servers import free_port

pytestmark = pytest.mark.redis


class TwoProcesses(StreamLog):
    """Streams written through one Redis log and read through another, as when a reader
    reaches a process other than the one generating: reads go through the shared tailer,
    not the generating process's local wake-ups."""

    def __init__(self, writer: RedisStreamLog, reader: RedisStreamLog) -> None:
        super().__init__(ttl_s=writer.ttl_s, max_duration_s=2, max_events=writer.max_events)
        self.writer, self.reader = writer, reader

    async def create(
        self, info: StreamInfo, *, reader_grace_s: float, lease_s: float | None = None
    ) -> None:
        await self.writer.create(info, reader_grace_s=reader_grace_s, lease_s=lease_s)

    async def take(self, stream_id: str, lease_s: float) -> int:
        return await self.reader.take(stream_id, lease_s)

    async def release(self, stream_id: str, epoch: int) -> None:
        await self.writer.release(stream_id, epoch)

    async def waiting(self, stream_ids: Any) -> set[str]:
        return await self.reader.waiting(stream_ids)

    async def info(self, stream_id: str) -> StreamInfo | None:
        return await self.reader.info(stream_id)

    async def append(self, stream_id: str, events: Any, *, epoch: int = 1) -> None:
        await self.writer.append(stream_id, events, epoch=epoch)

    async def finish(self, stream_id: str, status: Any, *, epoch: int = 1) -> None:
        await self.writer.finish(stream_id, status, epoch=epoch)

    async def read(
        self, stream_id: str, after: int, *, block_s: float = 0.0, limit: int = 1000
    ) -> list[Event]:
        return await self.reader.read(stream_id, after, block_s=block_s, limit=limit)

    async def touch_reader(self, stream_id: str, grace_s: float) -> Any:
        return await self.reader.touch_reader(stream_id, grace_s)

    async def request_cancel(self, stream_id: str) -> None:
        await self.reader.request_cancel(stream_id)

    async def renew(self, stream_ids: Any, lease_s: float) -> Any:
        return await self.writer.renew(stream_ids, lease_s)

    async def ping(self) -> None:
        await self.reader.ping()


@pytest.fixture(params=["memory", "redis", "redis-two-processes"])
async def log(request: pytest.FixtureRequest) -> AsyncIterator[StreamLog]:
    if request.param == "memory":
        yield MemoryStreamLog(ttl_s=2, max_duration_s=2, max_events=1000)
        return
    url = request.getfixturevalue("redis_url")
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    logs: list[RedisStreamLog] = []
    clients = []
    for _ in range(1 if request.param == "redis" else 2):
        client, tail, _ = redis_clients(url, max_connections=50)
        clients.append(client)
        logs.append(
            RedisStreamLog(
                client, tail=tail, prefix=prefix, ttl_s=2, max_duration_s=2, max_events=1000
            )
        )
    try:
        yield logs[0] if len(logs) == 1 else TwoProcesses(*logs)
    finally:
        for each in logs:
            await each.aclose()
        for client in clients:
            await client.aclose()


@asynccontextmanager
async def _redis_log(
    redis_url: str, tail: aioredis.Redis | None = None
) -> AsyncIterator[RedisStreamLog]:
    """One Redis log (as one process has), on its own clients; `tail` replaces the
    connection its shared blocking reads use."""
    client, own_tail, _ = redis_clients(redis_url, max_connections=10)
    log = RedisStreamLog(
        client,
        tail=tail or own_tail,
        prefix=f"t-{uuid.uuid4().hex[:6]}:",
        ttl_s=5,
        max_duration_s=5,
        max_events=1000,
    )
    try:
        yield log
    finally:
        await log.aclose()
        for each in (own_tail, tail, client):
            if each is not None:
                await each.aclose()


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
    controls = await log.renew({info.id: 1}, 5)
    assert controls[info.id].reader_attached and not controls[info.id].cancel_requested
    await asyncio.sleep(0.4)
    assert not (await log.renew({info.id: 1}, 5))[info.id].reader_attached
    await log.touch_reader(info.id, 0.5)
    assert (await log.renew({info.id: 1}, 5))[info.id].reader_attached
    await log.request_cancel(info.id)
    assert (await log.renew({info.id: 1}, 5))[info.id].cancel_requested


async def test_lease_lapses_when_not_renewed(log: StreamLog) -> None:
    info = _info()
    await log.create(info, reader_grace_s=5, lease_s=0.2)
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and liveness.generating and liveness.status == "running"
    await asyncio.sleep(0.3)
    liveness = await log.touch_reader(info.id, 5)
    assert liveness is not None and not liveness.generating
    await log.renew({info.id: 1}, 5)
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


async def test_waiting_lists_the_streams_no_owner_has_taken_yet(log: StreamLog) -> None:
    queued, taken, ended = _info(), _info(), _info()
    for info in (queued, taken, ended):
        await log.create(info, reader_grace_s=5)
    await log.take(taken.id, 5)
    await log.take(ended.id, 5)
    await log.finish(ended.id, "done", epoch=1)
    ids = [queued.id, taken.id, ended.id, "missing"]
    assert await log.waiting(ids) == {queued.id}
    assert await log.waiting([]) == set()


async def test_one_owner_at_a_time_and_a_taken_over_owner_cannot_write(log: StreamLog) -> None:
    """The fencing epoch: a stream is taken only once its lease lapsed, each take raises
    the epoch, and the former owner's appends, renewals and finish are all refused, in
    the same atomic step as the write."""
    info = _info()
    await log.create(info, reader_grace_s=5)
    first = await log.take(info.id, 0.2)
    assert first == 1
    assert await log.take(info.id, 0.2) == -1  # its owner holds the lease
    await log.append(info.id, _events(2), epoch=first)
    await asyncio.sleep(0.3)  # the owner paused past its lease
    second = await log.take(info.id, 5)
    assert second == 2
    with pytest.raises(StreamFenced):
        await log.append(info.id, _events(1, start=2), epoch=first)
    assert not (await log.renew({info.id: first}, 5))[info.id].owned
    with pytest.raises(StreamFenced):
        await log.finish(info.id, "done", epoch=first)
    assert (await log.renew({info.id: second}, 5))[info.id].owned
    await log.append(info.id, _events(1, start=2), epoch=second)
    assert [e.id for e in await log.read(info.id, 0)] == [1, 2, 3]
    # Released on drain: taken over at once, not after the lease.
    await log.release(info.id, first)  # not the owner: nothing happens
    assert await log.take(info.id, 5) == -1
    await log.release(info.id, second)
    assert await log.take(info.id, 5) == 3
    await log.finish(info.id, "done", epoch=3)
    assert await log.take(info.id, 5) == 0  # ended: nothing to take
    stored = await log.info(info.id)
    assert stored is not None and stored.status == "done"


async def test_a_waiter_behind_the_covered_id_gets_everything(redis_url: str) -> None:
    """Redis readers share one XREAD; one joining from an earlier id than it covers must
    still get every event after its own id."""
    async with _redis_log(redis_url) as log:
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


async def test_the_writer_stops_after_a_failed_append() -> None:
    class Failing(MemoryStreamLog):
        calls = 0

        async def append(self, stream_id: str, events: Any, *, epoch: int = 1) -> None:
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


async def test_readers_on_the_generating_process_need_no_blocking_read(redis_url: str) -> None:
    """The process that appends wakes its own readers: with the tailer's connection
    unusable (a dead port), they still get every event, and at once."""
    async with _redis_log(
        redis_url, tail=aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
    ) as log:
        info = _info()
        await log.create(info, reader_grace_s=5, lease_s=5)
        first, second = _events(3), _events(2, start=3)
        readers = [asyncio.create_task(log.read(info.id, 0, block_s=10)) for _ in range(3)]
        await asyncio.sleep(0.05)
        await log.append(info.id, first)
        for reader in readers:
            assert await asyncio.wait_for(reader, 2) == first
        behind = asyncio.create_task(log.read(info.id, 1, block_s=10))  # catches up from Redis
        assert await asyncio.wait_for(behind, 2) == first[1:]
        waiting = asyncio.create_task(log.read(info.id, 3, block_s=10))
        await asyncio.sleep(0.05)
        await log.append(info.id, second)
        assert await asyncio.wait_for(waiting, 2) == second
        ending = asyncio.create_task(log.read(info.id, 5, block_s=10))
        await asyncio.sleep(0.05)
        await log.finish(info.id, "done")
        assert await asyncio.wait_for(ending, 2) == []  # woken to look again, not held


async def test_concurrent_appends_share_transactions_and_fail_alone(redis_url: str) -> None:
    async with _redis_log(redis_url) as log:
        sent: list[int] = []
        real_send = log._appender._send

        async def counting_send(batch: Any) -> None:
            sent.append(len(batch))
            await real_send(batch)

        log._appender._send = counting_send  # type: ignore[method-assign]
        infos = [_info() for _ in range(40)]
        for info in infos:
            await log.create(info, reader_grace_s=5, lease_s=5)
        await log.append(infos[0].id, _events(3))
        stale = _events(1)  # id 1 again: Redis refuses it
        results = await asyncio.gather(
            log.append(infos[0].id, stale),
            *(log.append(info.id, _events(3)) for info in infos[1:]),
            return_exceptions=True,
        )
        assert isinstance(results[0], StreamLogError)
        assert all(r is None for r in results[1:])
        for info in infos[1:]:
            assert await log.read(info.id, 0) == _events(3)
        assert await log.read(infos[0].id, 0) == _events(3)
        assert max(sent) > 1 and sum(sent) == 1 + 40 and len(sent) < 1 + 40


async def _script_checks(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_script|exists", {}).get("calls", 0))


async def test_scripts_are_checked_once_not_on_every_pipeline(redis_url: str) -> None:
    """redis-py checks a pipeline's scripts (SCRIPT EXISTS, a round trip) before every
    run; the log checks each once, and again only after Redis lost them."""
    async with _redis_log(redis_url) as log:
        admin = aioredis.Redis.from_url(redis_url)
        info = _info()
        await log.create(info, reader_grace_s=5, lease_s=5)
        await log.append(info.id, _events(1))
        await log.renew({info.id: 1}, 5)
        before = await _script_checks(admin)
        for i in range(2, 12):
            await log.append(info.id, _events(1, start=i - 1))
            await log.renew({info.id: 1}, 5)
        assert await _script_checks(admin) == before  # twenty pipelines, no check
        # Redis lost its scripts (a restart, SCRIPT FLUSH): the refused calls did not
        # run, and go again, loaded: every event once, in order, and the lease kept.
        await admin.script_flush()
        await log.append(info.id, _events(1, start=11))
        await admin.script_flush()
        assert (await log.renew({info.id: 1}, 5))[info.id].owned
        others = [_info() for _ in range(5)]
        for other in others:
            await log.create(other, reader_grace_s=5, lease_s=5)
        await admin.script_flush()
        await asyncio.gather(  # appends sharing a transaction, all refused, all sent again
            log.append(info.id, _events(2, start=12)),
            *(log.append(other.id, _events(3)) for other in others),
        )
        assert [e.id for e in await log.read(info.id, 0)] == list(range(1, 15))
        for other in others:
            assert await log.read(other.id, 0) == _events(3)
        await admin.aclose()
