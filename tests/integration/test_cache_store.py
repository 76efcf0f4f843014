"""The response cache's parts: one store contract for memory and Redis, the key (what
is in it and what is not), and how a cached answer is cut into deltas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from app.cache import (
    NOT_IN_KEY,
    CacheEntry,
    CacheStoreError,
    MemoryResponseStore,
    RedisResponseStore,
    ResponseStore,
    cache_key,
    directives,
    pieces,
    request_fields,
)
from app.jobs import decode_job, encode_job
from app.redis_client import redis_clients
from streaming import GenerationRequest, Message, StreamInfo
from testkit.servers import free_port

ENTRY = CacheEntry(
    text='Grüße, "naïve" café 😀\nline two\\',
    input_tokens=12,
    output_tokens=9,
    stop_reason="end_turn",
    model="claude",
    stored_at=1.5,
)


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ResponseStore]:
    if request.param == "memory":
        yield MemoryResponseStore()
        return
    client, tail, _ = redis_clients(request.getfixturevalue("redis_url"), max_connections=5)
    try:
        yield RedisResponseStore(client, prefix=f"t-{uuid.uuid4().hex[:6]}:")
    finally:
        await client.aclose()
        await tail.aclose()


async def test_an_entry_round_trips_exactly(store: ResponseStore) -> None:
    assert await store.get("k1") is None
    await store.put("k1", ENTRY, 60)
    assert await store.get("k1") == ENTRY
    assert await store.get("k2") is None
    none_stop = dataclasses.replace(ENTRY, stop_reason=None, text="")
    await store.put("k2", none_stop, 60)
    assert await store.get("k2") == none_stop


async def test_a_put_replaces_the_entry(store: ResponseStore) -> None:
    await store.put("k", ENTRY, 60)
    newer = dataclasses.replace(ENTRY, text="another answer", output_tokens=2)
    await store.put("k", newer, 60)
    assert await store.get("k") == newer


async def test_entries_expire_after_their_ttl(store: ResponseStore) -> None:
    await store.put("short", ENTRY, 0.2)
    await store.put("long", ENTRY, 60)
    assert await store.get("short") == ENTRY
    for _ in range(100):
        if await store.get("short") is None:
            break
        await asyncio.sleep(0.05)
    assert await store.get("short") is None
    assert await store.get("long") == ENTRY


async def test_memory_store_expiry_follows_its_clock() -> None:
    now = [100.0]
    store = MemoryResponseStore(clock=lambda: now[0])
    await store.put("k", ENTRY, 10)
    now[0] = 109.9
    assert await store.get("k") == ENTRY
    now[0] = 110.0
    assert await store.get("k") is None


async def test_memory_store_is_bounded_least_recently_used_first() -> None:
    store = MemoryResponseStore(max_entries=2, max_chars=100)
    small = dataclasses.replace(ENTRY, text="x" * 10)
    await store.put("a", small, 60)
    await store.put("b", small, 60)
    assert await store.get("a") == small  # a is now the most recently used
    await store.put("c", small, 60)  # three entries: b, the least recently used, goes
    assert await store.get("b") is None
    assert await store.get("a") == small and await store.get("c") == small
    big = dataclasses.replace(ENTRY, text="y" * 95)
    await store.put("d", big, 60)  # 105 characters with c (a left by count): c goes
    assert await store.get("d") == big
    assert await store.get("a") is None and await store.get("c") is None
    await store.put("e", dataclasses.replace(ENTRY, text="z" * 101), 60)  # never fits
    assert await store.get("e") is None and await store.get("d") == big


async def test_redis_store_failures_are_cache_errors() -> None:
    client = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5
    )
    store = RedisResponseStore(client, prefix="t:")
    try:
        with pytest.raises(CacheStoreError):
            await store.get("k")
        with pytest.raises(CacheStoreError):
            await store.put("k", ENTRY, 1)
    finally:
        await client.aclose()


async def test_an_unreadable_redis_entry_is_a_miss(redis_client: aioredis.Redis) -> None:
    prefix = f"t-{uuid.uuid4().hex[:6]}:"
    store = RedisResponseStore(redis_client, prefix=prefix)
    await redis_client.set(f"{prefix}cache:bad", b"{not json")
    await redis_client.set(f"{prefix}cache:partial", b'{"text": "x"}')
    assert await store.get("bad") is None
    assert await store.get("partial") is None
    await store.put("good", ENTRY, 60)
    assert 0 < await redis_client.pttl(f"{prefix}cache:good") <= 60_000


def test_entries_written_by_a_newer_version_are_read() -> None:
    raw = ENTRY.to_json()[:-1] + ',"later_field":[1,2]}'
    assert CacheEntry.from_json(raw) == ENTRY
    with pytest.raises(ValueError):
        CacheEntry.from_json('{"text": 3, "input_tokens": 1, "output_tokens": 1, "model": "m"}')


# The key.

BASE = GenerationRequest(
    model="claude-haiku-4-5",
    messages=(Message("user", "hello"), Message("assistant", "hi"), Message("user", "more")),
    max_tokens=100,
    system="be brief",
    temperature=0.5,
    stop=("END",),
    metadata={"trace": "a"},
    request_id="r1",
    headers={"x-request-id": "r1"},
)


def key(request: GenerationRequest = BASE, scope: str = "subject", value: str = "alice") -> str:
    return cache_key(scope, value, "claude", request)


def _changed(value: Any) -> Any:
    """A different value of the same shape, for any field type a request may have."""
    if value is None:
        return "set"
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple):
        return (*value, value[0]) if value else ("added",)
    if isinstance(value, dict):
        return {**value, "added": 1}
    raise AssertionError(f"no way to change a {type(value).__name__}")


def test_every_field_that_shapes_the_answer_changes_the_key() -> None:
    fields = [f.name for f in dataclasses.fields(GenerationRequest)]
    assert {"model", "messages", "max_tokens", "system", "temperature", "stop"} <= set(fields)
    assert set(request_fields(BASE)) == set(fields) - NOT_IN_KEY
    for name in set(fields) - NOT_IN_KEY:
        other = dataclasses.replace(BASE, **{name: _changed(getattr(BASE, name))})
        assert key(other) != key(BASE), name
    # A message's role and its content both count; so does their order.
    swapped = dataclasses.replace(BASE, messages=BASE.messages[::-1])
    assert key(swapped) != key(BASE)
    role = dataclasses.replace(BASE, messages=(Message("system", "hello"), *BASE.messages[1:]))
    assert key(role) != key(BASE)
    no_system = dataclasses.replace(BASE, system=None)
    empty_system = dataclasses.replace(BASE, system="")
    assert key(no_system) != key(empty_system)


def test_what_only_identifies_a_request_is_not_in_the_key() -> None:
    other = dataclasses.replace(
        BASE, request_id="r2", headers={"x-request-id": "r2"}, metadata={"trace": "b"}
    )
    assert key(other) == key(BASE)
    assert key(dataclasses.replace(BASE, prefill="partial answer")) == key(BASE)
    assert key(dataclasses.replace(BASE, temperature=1.0)) == key(
        dataclasses.replace(BASE, temperature=1)  # type: ignore[arg-type]
    )


def test_the_key_depends_on_the_scope_and_the_model() -> None:
    keys = {
        key(scope="subject", value="alice"),
        key(scope="subject", value="bob"),
        key(scope="plan", value="alice"),  # a plan named like a subject: still apart
        key(scope="global", value=""),
        cache_key("subject", "alice", "claude-2", BASE),
    }
    assert len(keys) == 5
    assert key() == key() and len(key()) == 64 and int(key(), 16) >= 0


def test_cache_control_directives() -> None:
    assert directives(None) == frozenset()
    assert directives("No-Cache") == {"no-cache"}
    assert directives("max-age=0, no-store ,no-cache") == {"max-age", "no-store", "no-cache"}
    assert directives(" , ") == frozenset()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "one",
        "The relay streams tokens while upstream models think about latency, budgets.",
        "x" * 200,
        "  leading and trailing spaces  \n\n new paragraph 😀 café\ttab",
    ],
)
def test_replay_pieces_are_small_and_join_to_the_text(text: str) -> None:
    parts = pieces(text)
    assert "".join(parts) == text
    assert all(part for part in parts)
    assert all(len(part) <= 64 for part in parts)
    if len(text) > 40:
        assert len(parts) >= len(text) // 64 + 1 and len(parts) > 1


def test_the_cache_key_travels_with_the_job_and_old_jobs_still_read() -> None:
    info = StreamInfo("s_1", "alice", "claude", "anthropic", "pro", 100, 1.0, cache_key="ab" * 32)
    decoded, request = decode_job(encode_job(info, BASE))
    assert decoded.cache_key == "ab" * 32 and request.stop == BASE.stop
    assert "cache_key" not in info.as_dict()  # never shown to clients
    old = json.loads(encode_job(info, BASE))
    del old["info"]["cache_key"]  # a job queued by a version before the cache
    decoded, _ = decode_job(json.dumps(old).encode())
    assert decoded.cache_key == ""
