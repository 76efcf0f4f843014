"""API keys for server-side callers: long-lived, opaque, revocable.

A key reads `sk-<40 url-safe characters>` (240 random bits) and is shown once, when it
is made. Only its SHA-256 digest is stored: a fast hash is enough for a secret this
long (nobody can try 2^240 guesses), and a stolen store holds nothing that
authenticates. Each key also gets a public id (`key_<12 hex>`) that lists and logs may
show.

A key stands for a subject and a plan, never for scopes: an admin scope cannot come
from a key. Verification reads the store, with a positive cache that lives at most
`cache_s` (under a second), so a key revoked on one replica is refused by every replica
within that time. The last-used time is written at most once per `touch_every_s` per
key, not on every request.

    ApiKeyStore           the storage interface (records by digest, ids to digests)
    ├── MemoryApiKeyStore one process (no Redis)
    └── RedisApiKeyStore  every process sharing one Redis
    ApiKeys               create, verify, list, revoke: what the app and the CLI use
"""

from __future__ import annotations

import abc
import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._exceptions import AuthError, NotAuthenticated, PermissionDenied
from .tokens import _SUBJECT, Principal

logger = logging.getLogger("sserelay.auth")

API_KEY_PREFIX = "sk-"
ID_PREFIX = "key_"
RETAIN_EXPIRED_S = 7 * 86400
"""How long an expired key's record stays (listed, and refused as expired rather than
unknown) before it is deleted."""

_KEY = re.compile(r"sk-[A-Za-z0-9_-]{20,128}")
_ID = re.compile(r"key_[0-9a-f]{12}")
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{0,200}")
_TOUCH = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then "
    "redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1]) end"
)


MAX_TTL_S = 10 * 365 * 86400
"""The longest a key may live: ten years."""


class ApiKeyStoreUnavailable(AuthError):
    """The key store cannot be read or written (Redis is down): retry shortly."""

    code = "auth_store_unavailable"


def is_api_key(token: str) -> bool:
    """Whether a presented credential is meant as an API key (rather than a JWT)."""
    return token.startswith(API_KEY_PREFIX)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """What is stored about a key; never the key itself. Times are Unix seconds."""

    id: str
    subject: str
    plan: str
    name: str
    created_at: float
    expires_at: float | None = None
    last_used_at: float | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        """The public view (admin routes, the CLI): no key, no digest."""

        def seconds(value: float | None) -> int | None:
            return None if value is None else int(value)

        return {
            "id": self.id,
            "sub": self.subject,
            "plan": self.plan,
            "name": self.name,
            "created_at": int(self.created_at),
            "expires_at": seconds(self.expires_at),
            "last_used_at": seconds(self.last_used_at),
            "expired": self.expired(time.time() if now is None else now),
        }

    def to_fields(self) -> dict[str, str]:
        fields = {
            "id": self.id,
            "sub": self.subject,
            "plan": self.plan,
            "name": self.name,
            "created_at": repr(self.created_at),
        }
        if self.expires_at is not None:
            fields["expires_at"] = repr(self.expires_at)
        if self.last_used_at is not None:
            fields["last_used_at"] = repr(self.last_used_at)
        return fields

    @classmethod
    def from_fields(cls, raw: dict[str, str]) -> ApiKeyRecord:
        def number(name: str) -> float | None:
            value = raw.get(name)
            return None if value in (None, "") else float(value)

        return cls(
            id=raw["id"],
            subject=raw["sub"],
            plan=raw["plan"],
            name=raw.get("name", ""),
            created_at=float(raw["created_at"]),
            expires_at=number("expires_at"),
            last_used_at=number("last_used_at"),
        )


class ApiKeyStore(abc.ABC):
    """Records by key digest, and key ids to digests. Backends implement the
    underscored methods; callers see `ApiKeyStoreUnavailable` for every backend
    failure, whatever the backend."""

    backend_errors: tuple[type[BaseException], ...] = ()

    async def create(self, key_digest: str, record: ApiKeyRecord) -> None:
        try:
            await self._create(key_digest, record)
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot store the API key: {exc}") from exc

    async def get(self, key_digest: str) -> ApiKeyRecord | None:
        """The record of a live (or recently expired) key; None if unknown or revoked."""
        try:
            return await self._get(key_digest)
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot read the API key: {exc}") from exc

    async def digest_of(self, key_id: str) -> str | None:
        try:
            return await self._digest_of(key_id)
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot read the API key: {exc}") from exc

    async def delete(self, key_digest: str) -> ApiKeyRecord | None:
        """Forget a key; its record, or None if there was none."""
        try:
            return await self._delete(key_digest)
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot revoke the API key: {exc}") from exc

    async def records(self) -> list[ApiKeyRecord]:
        """Every stored key, oldest first."""
        try:
            records = await self._load_all()
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot list the API keys: {exc}") from exc
        return sorted(records, key=lambda r: (r.created_at, r.id))

    async def touch(self, key_digest: str, at: float) -> None:
        """Set the last-used time of an existing key (a deleted one stays deleted)."""
        try:
            await self._touch(key_digest, at)
        except self.backend_errors as exc:
            raise ApiKeyStoreUnavailable(f"cannot update the API key: {exc}") from exc

    @abc.abstractmethod
    async def _create(self, key_digest: str, record: ApiKeyRecord) -> None: ...

    @abc.abstractmethod
    async def _get(self, key_digest: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def _digest_of(self, key_id: str) -> str | None: ...

    @abc.abstractmethod
    async def _delete(self, key_digest: str) -> ApiKeyRecord | None: ...

    @abc.abstractmethod
    async def _load_all(self) -> list[ApiKeyRecord]: ...

    @abc.abstractmethod
    async def _touch(self, key_digest: str, at: float) -> None: ...


class MemoryApiKeyStore(ApiKeyStore):
    """One process: keys live and die with it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._records: dict[str, ApiKeyRecord] = {}
        self._ids: dict[str, str] = {}

    def _purge(self) -> None:
        cutoff = self._clock() - RETAIN_EXPIRED_S
        for key_digest, record in list(self._records.items()):
            if record.expires_at is not None and record.expires_at <= cutoff:
                del self._records[key_digest]
                self._ids.pop(record.id, None)

    async def _create(self, key_digest: str, record: ApiKeyRecord) -> None:
        self._purge()
        self._records[key_digest] = record
        self._ids[record.id] = key_digest

    async def _get(self, key_digest: str) -> ApiKeyRecord | None:
        self._purge()
        return self._records.get(key_digest)

    async def _digest_of(self, key_id: str) -> str | None:
        self._purge()
        return self._ids.get(key_id)

    async def _delete(self, key_digest: str) -> ApiKeyRecord | None:
        record = self._records.pop(key_digest, None)
        if record is not None:
            self._ids.pop(record.id, None)
        return record

    async def _load_all(self) -> list[ApiKeyRecord]:
        self._purge()
        return list(self._records.values())

    async def _touch(self, key_digest: str, at: float) -> None:
        record = self._records.get(key_digest)
        if record is not None:
            self._records[key_digest] = replace(record, last_used_at=at)


class RedisApiKeyStore(ApiKeyStore):
    """Keys, all under one hash tag (so a transaction may touch several, on a cluster
    too): `{prefix}{apikeys}:k:<digest>` (a hash: the record),
    `{prefix}{apikeys}:id:<id>` (the digest) and `{prefix}{apikeys}:all` (a sorted set
    of digests by creation time, for listing). A key with an expiry is deleted
    `RETAIN_EXPIRED_S` after it."""

    backend_errors = (RedisError,)

    def __init__(self, client: aioredis.Redis, *, prefix: str = "sserelay:") -> None:
        self._r = client
        self._base = f"{prefix}{{apikeys}}:"

    def _record_key(self, key_digest: str) -> str:
        return f"{self._base}k:{key_digest}"

    def _id_key(self, key_id: str) -> str:
        return f"{self._base}id:{key_id}"

    @property
    def _all(self) -> str:
        return f"{self._base}all"

    async def _create(self, key_digest: str, record: ApiKeyRecord) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(self._record_key(key_digest), mapping=record.to_fields())  # type: ignore[arg-type]
            pipe.set(self._id_key(record.id), key_digest)
            pipe.zadd(self._all, {key_digest: record.created_at})
            if record.expires_at is not None:
                end_ms = int((record.expires_at + RETAIN_EXPIRED_S) * 1000)
                pipe.pexpireat(self._record_key(key_digest), end_ms)
                pipe.pexpireat(self._id_key(record.id), end_ms)
            await pipe.execute()

    async def _get(self, key_digest: str) -> ApiKeyRecord | None:
        raw: dict[Any, Any] = await self._r.hgetall(self._record_key(key_digest))
        return _decode(raw)

    async def _digest_of(self, key_id: str) -> str | None:
        value = await self._r.get(self._id_key(key_id))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def _delete(self, key_digest: str) -> ApiKeyRecord | None:
        record = await self._get(key_digest)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._record_key(key_digest))
            if record is not None:
                pipe.delete(self._id_key(record.id))
            pipe.zrem(self._all, key_digest)
            replies = await pipe.execute()
        # Another revoke may have deleted it between the read and the transaction.
        return record if replies[0] else None

    async def _load_all(self) -> list[ApiKeyRecord]:
        members = await self._r.zrange(self._all, 0, -1)
        digests = [m.decode() if isinstance(m, bytes) else str(m) for m in members]
        if not digests:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for key_digest in digests:
                pipe.hgetall(self._record_key(key_digest))
            replies = await pipe.execute()
        records: list[ApiKeyRecord] = []
        gone: list[str] = []
        for key_digest, raw in zip(digests, replies, strict=True):
            record = _decode(raw)
            if record is None:
                gone.append(key_digest)  # expired past retention: drop it from the index
            else:
                records.append(record)
        if gone:
            await self._r.zrem(self._all, *gone)
        return records

    async def _touch(self, key_digest: str, at: float) -> None:
        await self._r.eval(_TOUCH, 1, self._record_key(key_digest), repr(at))


def _decode(raw: dict[Any, Any]) -> ApiKeyRecord | None:
    if not raw:
        return None
    fields = {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }
    try:
        return ApiKeyRecord.from_fields(fields)
    except (KeyError, ValueError):
        logger.error("an API key record in Redis is damaged; it is treated as unknown")
        return None


class ApiKeys:
    """Creates, verifies, lists and revokes API keys over one store."""

    def __init__(
        self,
        store: ApiKeyStore,
        *,
        plans: Callable[[], Collection[str]],
        cache_s: float = 0.5,
        touch_every_s: float = 60.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`plans` is read on every call, so a plan reload applies at once. `cache_s`
        bounds how long a revoked key may still pass on this process: keep it under a
        second. `clock` gives Unix time (records), `monotonic` ages the cache."""
        if not 0 <= cache_s <= 1:
            raise ValueError("cache_s must be between 0 and 1 second")
        self.store = store
        self._plans = plans
        self._cache_s = cache_s
        self._touch_every_s = touch_every_s
        self._max_cached = max_cached
        self._clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, tuple[ApiKeyRecord, float]] = {}

    async def create(
        self, subject: str, plan: str, *, name: str = "", ttl_s: float | None = None
    ) -> tuple[str, ApiKeyRecord]:
        # A bound, so that every expiry is a time Redis and the clock can represent.
        """A new key and its record. The key is returned here and nowhere else."""
        if not _SUBJECT.fullmatch(subject):
            raise ValueError("the subject must be 1 to 256 printable characters")
        if plan not in self._plans():
            raise ValueError(f"no plan named {plan!r}")
        if not _NAME.fullmatch(name):
            raise ValueError("the name must be at most 200 printable characters")
        if ttl_s is not None and not (1 <= ttl_s <= MAX_TTL_S):  # NaN fails both
            raise ValueError("the expiry must be between 1 second and 10 years away")
        key = API_KEY_PREFIX + secrets.token_urlsafe(30)
        now = self._clock()
        record = ApiKeyRecord(
            id=ID_PREFIX + secrets.token_hex(6),
            subject=subject,
            plan=plan,
            name=name,
            created_at=now,
            expires_at=None if ttl_s is None else now + ttl_s,
        )
        await self.store.create(digest(key), record)
        return key, record

    async def verify(self, key: str) -> Principal:
        """The principal of a valid key: its subject and plan, no scopes."""
        if not _KEY.fullmatch(key):
            raise NotAuthenticated("not a well-formed API key", code="invalid_api_key")
        key_digest = digest(key)
        record = await self._lookup(key_digest)
        if record is None:
            raise NotAuthenticated("unknown or revoked API key", code="invalid_api_key")
        now = self._clock()
        if record.expired(now):
            raise NotAuthenticated("the API key has expired", code="api_key_expired")
        if record.plan not in self._plans():
            raise PermissionDenied("the API key's plan no longer exists", code="unknown_plan")
        if record.last_used_at is None or now - record.last_used_at >= self._touch_every_s:
            await self._touch(key_digest, record, now)
        return Principal(record.subject, record.plan)

    async def _lookup(self, key_digest: str) -> ApiKeyRecord | None:
        now = self._monotonic()
        cached = self._cache.get(key_digest)
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        record = await self.store.get(key_digest)
        if record is None:
            self._cache.pop(key_digest, None)
            return None
        if self._cache_s > 0:
            if len(self._cache) >= self._max_cached:
                self._cache = {
                    d: entry for d, entry in self._cache.items() if now - entry[1] < self._cache_s
                }
                if len(self._cache) >= self._max_cached:
                    self._cache.clear()
            self._cache[key_digest] = (record, now)
        return record

    async def _touch(self, key_digest: str, record: ApiKeyRecord, now: float) -> None:
        """Best effort: a failed write of the last-used time never refuses a caller."""
        cached = self._cache.get(key_digest)
        if cached is not None:
            # Other requests within the cache window see it as written already.
            self._cache[key_digest] = (replace(record, last_used_at=now), cached[1])
        try:
            await self.store.touch(key_digest, now)
        except ApiKeyStoreUnavailable as exc:
            logger.warning("could not record the last use of API key %s: %s", record.id, exc)

    async def list(self) -> list[ApiKeyRecord]:
        """Every stored key, oldest first (expired ones until they are deleted)."""
        return await self.store.records()

    async def revoke(self, key_or_id: str) -> ApiKeyRecord | None:
        """Revoke by the key itself or by its id; the record, or None if no such key.
        Refused on this process at once, on every other within `cache_s`."""
        key_digest: str | None
        if _KEY.fullmatch(key_or_id):
            key_digest = digest(key_or_id)
        elif _ID.fullmatch(key_or_id):
            key_digest = await self.store.digest_of(key_or_id)
        else:
            key_digest = None
        if key_digest is None:
            return None
        self._cache.pop(key_digest, None)
        record = await self.store.delete(key_digest)
        self._cache.pop(key_digest, None)  # a verify that raced the delete
        return record
