"""One contract, two stores: API keys in memory and in Redis must behave alike."""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from app.redis_client import redis_clients
from auth import (
    ApiKeyRecord,
    ApiKeys,
    ApiKeyStore,
    ApiKeyStoreUnavailable,
    MemoryApiKeyStore,
    NotAuthenticated,
    PermissionDenied,
    Principal,
    RedisApiKeyStore,
)
from auth.apikeys import RETAIN_EXPIRED_S
from testkit.servers import free_port

pytestmark = pytest.mark.redis

PLANS = {"free", "pro"}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    kind: str
    store: ApiKeyStore
    prefix: str = ""
    client: aioredis.Redis | None = None

    def replica(self) -> ApiKeyStore:
        """The same stored keys as another process sees them."""
        if self.client is None:
            return self.store
        return RedisApiKeyStore(self.client, prefix=self.prefix)

    async def stored_text(self) -> str:
        """Everything the store holds, as text."""
        if self.client is None:
            return repr(vars(self.store))
        parts: list[str] = []
        async for name in self.client.scan_iter(match=self.prefix + "*"):
            parts.append(name.decode())
            kind = (await self.client.type(name)).decode()
            if kind == "hash":
                parts.append(repr(await self.client.hgetall(name)))  # type: ignore[misc]
            elif kind == "string":
                parts.append(repr(await self.client.get(name)))
            elif kind == "zset":
                parts.append(repr(await self.client.zrange(name, 0, -1)))
        assert parts, "nothing stored"
        return "\n".join(parts)


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        yield Backend("memory", MemoryApiKeyStore())
        return
    client, tail, _ = redis_clients(request.getfixturevalue("redis_url"), max_connections=10)
    prefix = f"t-ak-{uuid.uuid4().hex[:8]}:"
    try:
        yield Backend("redis", RedisApiKeyStore(client, prefix=prefix), prefix, client)
    finally:
        await client.aclose()
        await tail.aclose()


def keys_over(store: ApiKeyStore, **kwargs: object) -> ApiKeys:
    return ApiKeys(store, plans=lambda: PLANS, **kwargs)  # type: ignore[arg-type]


async def test_a_key_acts_as_its_subject_and_plan_and_never_has_scopes(backend: Backend) -> None:
    keys = keys_over(backend.store)
    key, record = await keys.create("billing-job", "pro", name="nightly")
    assert re.fullmatch(r"sk-[A-Za-z0-9_-]{40}", key)
    assert re.fullmatch(r"key_[0-9a-f]{12}", record.id)
    assert (record.subject, record.plan, record.name) == ("billing-job", "pro", "nightly")
    assert record.expires_at is None
    assert await keys.verify(key) == Principal("billing-job", "pro", frozenset())
    # Another process reads the same key from the same store.
    assert await keys_over(backend.replica()).verify(key) == Principal("billing-job", "pro")
    other, _ = await keys.create("billing-job", "pro")
    assert other != key


async def test_only_the_digest_is_stored(backend: Backend) -> None:
    key, record = await keys_over(backend.store).create("alice", "free")
    stored = await backend.stored_text()
    assert key not in stored and key.removeprefix("sk-") not in stored
    assert hashlib.sha256(key.encode()).hexdigest() in stored
    assert record.id in stored


@pytest.mark.parametrize(
    "presented",
    [
        "sk-" + "A" * 40,  # well-formed, never issued
        "sk-short",
        "sk-" + "A" * 200,
        "sk-" + "x" * 39 + "!",
        "sk-",
    ],
)
async def test_unknown_and_malformed_keys_are_refused(backend: Backend, presented: str) -> None:
    keys = keys_over(backend.store)
    await keys.create("alice", "free")
    with pytest.raises(NotAuthenticated) as refused:
        await keys.verify(presented)
    assert refused.value.code == "invalid_api_key"
    assert presented not in refused.value.message


async def test_revoke_by_id_or_by_key(backend: Backend) -> None:
    keys = keys_over(backend.store)
    first, first_record = await keys.create("alice", "free")
    second, second_record = await keys.create("bob", "pro")
    await keys.verify(first)
    revoked = await keys.revoke(first_record.id)
    assert revoked is not None and revoked.id == first_record.id
    with pytest.raises(NotAuthenticated, match="unknown or revoked"):
        await keys.verify(first)  # on this process: at once, whatever it cached
    assert await keys.revoke(first_record.id) is None
    assert await keys.revoke(first) is None
    assert (await keys.verify(second)).subject == "bob"  # the others are untouched
    revoked = await keys.revoke(second)
    assert revoked is not None and revoked.id == second_record.id
    with pytest.raises(NotAuthenticated):
        await keys.verify(second)
    assert await keys.list() == []
    for nothing in ("key_000000000000", "sk-" + "B" * 40, "", "key_", "whatever"):
        assert await keys.revoke(nothing) is None


async def test_list_is_oldest_first_and_never_shows_a_key_or_digest(backend: Backend) -> None:
    clock = Clock(time.time())
    keys = keys_over(backend.store, clock=clock)
    made: list[tuple[str, ApiKeyRecord]] = []
    for sub in ("carol", "alice", "bob"):
        made.append(await keys.create(sub, "pro", name=f"{sub}-key", ttl_s=3600))
        clock.now += 1
    listed = await keys.list()
    assert [r.id for r in listed] == [r.id for _, r in made]
    assert listed == [r for _, r in made]
    public = json.dumps([r.as_json() for r in listed])
    for key, _ in made:
        assert key not in public
        assert hashlib.sha256(key.encode()).hexdigest() not in public
    first = listed[0].as_json(now=clock.now)
    assert set(first) == {
        "id",
        "sub",
        "plan",
        "name",
        "created_at",
        "expires_at",
        "last_used_at",
        "expired",
    }
    assert first["sub"] == "carol" and first["expired"] is False
    assert first["expires_at"] == int(made[0][1].created_at + 3600)


async def test_an_expired_key_is_refused_and_listed_as_expired(backend: Backend) -> None:
    clock = Clock(time.time())
    keys = keys_over(backend.store, clock=clock)
    key, record = await keys.create("alice", "pro", ttl_s=90 * 86400)
    clock.now += 90 * 86400 - 1
    assert (await keys.verify(key)).subject == "alice"
    clock.now += 1
    with pytest.raises(NotAuthenticated) as refused:
        await keys.verify(key)
    assert refused.value.code == "api_key_expired"
    [listed] = await keys.list()
    assert listed.id == record.id and listed.as_json(now=clock.now)["expired"] is True


async def test_expired_records_are_deleted_after_the_retention(backend: Backend) -> None:
    now = time.time()
    old = ApiKeyRecord(
        "key_0123456789ab",
        "alice",
        "pro",
        "",
        now - RETAIN_EXPIRED_S - 100,
        now - RETAIN_EXPIRED_S - 1,
    )
    recent = ApiKeyRecord("key_ba9876543210", "bob", "pro", "", now - 100, now - 10)
    await backend.store.create("d" * 64, old)
    await backend.store.create("e" * 64, recent)
    assert await backend.store.get("d" * 64) is None
    assert await backend.store.digest_of(old.id) is None
    assert await backend.store.get("e" * 64) == recent
    assert [r.id for r in await backend.store.records()] == [recent.id]
    if backend.client is not None:
        assert "d" * 64 not in await backend.stored_text()  # the index is cleaned too
        ttl_s = await backend.client.pttl(backend.prefix + "{apikeys}:k:" + "e" * 64) / 1000
        assert abs(ttl_s - (RETAIN_EXPIRED_S - 10)) < 60


async def test_a_revoked_key_is_refused_by_another_replica_within_the_cache_time(
    backend: Backend,
) -> None:
    ticks = Clock(1000.0)
    here = keys_over(backend.store, cache_s=0.5, monotonic=ticks)
    there = keys_over(backend.replica(), cache_s=0.5)
    key, record = await here.create("alice", "pro")
    assert (await here.verify(key)).subject == "alice"  # cached here from now on
    assert await there.revoke(record.id) is not None
    ticks.now += 0.5
    with pytest.raises(NotAuthenticated) as refused:
        await here.verify(key)
    assert refused.value.code == "invalid_api_key"


def test_a_cache_longer_than_a_second_is_refused() -> None:
    with pytest.raises(ValueError, match="cache_s"):
        ApiKeys(MemoryApiKeyStore(), plans=lambda: PLANS, cache_s=5)


async def test_last_use_is_written_at_most_once_a_minute_across_replicas(
    backend: Backend,
) -> None:
    clock = Clock(time.time())
    ticks = Clock(0.0)
    here = keys_over(backend.store, clock=clock, monotonic=ticks)
    there = keys_over(backend.replica(), clock=clock, monotonic=ticks)
    key, record = await here.create("alice", "pro")
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert record.last_used_at is None
    start = clock.now

    async def use_at(keys: ApiKeys, offset_s: float) -> float | None:
        clock.now = start + offset_s
        ticks.now += 2  # past any cache: every call reads the store
        await keys.verify(key)
        stored = await backend.store.get(digest)
        assert stored is not None
        return stored.last_used_at

    assert await use_at(here, 0) == start
    assert await use_at(here, 30) == start
    assert await use_at(there, 45) == start
    assert await use_at(there, 61) == start + 61
    assert await use_at(here, 100) == start + 61
    assert await use_at(here, 121.5) == start + 121.5
    [listed] = await here.list()
    assert listed.as_json()["last_used_at"] == int(start + 121.5)


async def test_recording_a_use_never_brings_back_a_revoked_key(backend: Backend) -> None:
    keys = keys_over(backend.store)
    key, record = await keys.create("alice", "pro")
    digest = hashlib.sha256(key.encode()).hexdigest()
    await keys.revoke(record.id)
    await backend.store.touch(digest, time.time())
    assert await backend.store.get(digest) is None
    assert await backend.store.records() == []


async def test_a_key_whose_plan_was_removed_is_refused(backend: Backend) -> None:
    plans = {"free", "pro"}
    keys = ApiKeys(backend.store, plans=lambda: plans)
    key, _ = await keys.create("alice", "pro")
    plans.discard("pro")
    with pytest.raises(PermissionDenied) as refused:
        await keys.verify(key)
    assert refused.value.code == "unknown_plan"


@pytest.mark.parametrize(
    ("subject", "plan", "name", "ttl_s", "needle"),
    [
        ("", "pro", "", None, "subject"),
        ("a\nb", "pro", "", None, "subject"),
        ("x" * 257, "pro", "", None, "subject"),
        ("alice", "gold", "", None, "plan"),
        ("alice", "pro", "bad\x00name", None, "name"),
        ("alice", "pro", "", 0, "expiry"),
        ("alice", "pro", "", 0.0001, "expiry"),  # expired before it is shown
        ("alice", "pro", "", 11 * 365 * 86400, "expiry"),
        ("alice", "pro", "", float("inf"), "expiry"),  # `--expires 1000...0d`
        ("alice", "pro", "", float("nan"), "expiry"),
    ],
)
async def test_create_refuses_what_it_cannot_store(
    backend: Backend, subject: str, plan: str, name: str, ttl_s: float | None, needle: str
) -> None:
    keys = keys_over(backend.store)
    with pytest.raises(ValueError, match=needle):
        await keys.create(subject, plan, name=name, ttl_s=ttl_s)
    assert await keys.list() == []


async def test_a_store_that_cannot_be_reached_is_unavailable_never_unauthenticated() -> None:
    client, tail, _ = redis_clients(
        f"redis://127.0.0.1:{free_port()}/0",
        max_connections=2,
        command_timeout_s=0.5,
        connect_timeout_s=0.5,
        pool_timeout_s=0.5,
    )
    keys = keys_over(RedisApiKeyStore(client, prefix="t-ak-down:"))
    try:
        with pytest.raises(ApiKeyStoreUnavailable) as down:
            await keys.verify("sk-" + "A" * 40)
        assert down.value.code == "auth_store_unavailable"
        with pytest.raises(ApiKeyStoreUnavailable):
            await keys.create("alice", "pro")
        with pytest.raises(ApiKeyStoreUnavailable):
            await keys.list()
        with pytest.raises(ApiKeyStoreUnavailable):
            await keys.revoke("key_0123456789ab")
    finally:
        await client.aclose()
        await tail.aclose()
