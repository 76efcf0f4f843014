"""Refresh tokens: opaque, stored only as hashes, rotated on every use.

Presenting a refresh token that was already rotated means two parties hold the same
token, one of them a thief: the whole family (every token descended from the same
login) is revoked and the caller gets 401 (RFC 9700, section 4.14.2). One exception: two
tabs of one browser refreshing at the same moment with the same cookie. Within a short
grace window after a rotation, reuse answers "conflict" (retry with the newer cookie)
instead of revoking.

A token reads `srt_<family>.<secret>`: the family id finds the record, the secret is
checked by its SHA-256. Nothing stored can be replayed.
"""

from __future__ import annotations

import abc
import hashlib
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._exceptions import AuthError, NotAuthenticated, PermissionDenied
from .tokens import TokenIssuer

PREFIX = "srt_"
_REVOKE = (
    "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'revoked', '1') end"
)


class RefreshConflict(AuthError):
    """A concurrent refresh already rotated this token moments ago: retry with the
    newer token (a browser's cookie jar already has it)."""

    code = "refresh_conflict"


class RefreshStoreUnavailable(AuthError):
    code = "auth_store_unavailable"


@dataclass(frozen=True, slots=True)
class Grant:
    subject: str
    plan: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Rotation:
    status: str
    """ok, unknown, revoked, reused or conflict."""
    grant: Grant | None = None
    remaining_s: float = 0.0
    """How long the family still lives (it keeps the end its login gave it)."""


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    access_expires_at: int
    refresh_token: str
    refresh_expires_at: int

    def as_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": max(0, self.access_expires_at - int(time.time())),
            "refresh_token": self.refresh_token,
            "refresh_expires_in": max(0, self.refresh_expires_at - int(time.time())),
        }


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _split(token: str) -> tuple[str, str]:
    body = token.removeprefix(PREFIX)
    family, _, secret = body.partition(".")
    if not token.startswith(PREFIX) or not family or not secret or len(token) > 200:
        raise NotAuthenticated("not a refresh token", code="invalid_refresh_token")
    if not all(c.isalnum() or c in "-_" for c in family + secret):
        raise NotAuthenticated("not a refresh token", code="invalid_refresh_token")
    return family, secret


class RefreshStore(abc.ABC):
    @abc.abstractmethod
    async def create(self, family: str, token_hash: str, grant: Grant, ttl_s: float) -> None: ...

    @abc.abstractmethod
    async def rotate(
        self, family: str, old_hash: str, new_hash: str, grace_s: float
    ) -> Rotation: ...

    @abc.abstractmethod
    async def revoke(self, family: str) -> None: ...


class MemoryRefreshStore(RefreshStore):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._families: dict[str, dict[str, Any]] = {}

    def _family(self, family: str) -> dict[str, Any] | None:
        record = self._families.get(family)
        if record is not None and record["expires"] <= self._clock():
            del self._families[family]
            return None
        return record

    async def create(self, family: str, token_hash: str, grant: Grant, ttl_s: float) -> None:
        now = self._clock()
        for key in [k for k, r in self._families.items() if r["expires"] <= now]:
            del self._families[key]
        self._families[family] = {
            "grant": grant,
            "revoked": False,
            "expires": now + ttl_s,
            "tokens": {token_hash: None},  # hash -> rotated at (None = active)
        }

    async def rotate(self, family: str, old_hash: str, new_hash: str, grace_s: float) -> Rotation:
        record = self._family(family)
        if record is None or old_hash not in record["tokens"]:
            return Rotation("unknown")
        if record["revoked"]:
            return Rotation("revoked")
        now = self._clock()
        rotated_at = record["tokens"][old_hash]
        if rotated_at is not None:
            if now - rotated_at <= grace_s:
                return Rotation("conflict")
            record["revoked"] = True
            return Rotation("reused")
        record["tokens"][old_hash] = now
        record["tokens"][new_hash] = None
        return Rotation("ok", record["grant"], record["expires"] - now)

    async def revoke(self, family: str) -> None:
        record = self._family(family)
        if record is not None:
            record["revoked"] = True


class RedisRefreshStore(RefreshStore):
    """Keys, under one hash tag per family: `{prefix}rt:{<family>}:f` (the grant and the
    revoked flag) and `{prefix}rt:{<family>}:t:<hash>` (one per token). All expire with
    the family."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "sserelay:") -> None:
        self._r = client
        self._prefix = prefix
        script = resources.files(__package__).joinpath("rotate.lua").read_text()
        self._rotate = client.register_script(script)

    def _key(self, family: str, suffix: str) -> str:
        return f"{self._prefix}rt:{{{family}}}:{suffix}"

    async def create(self, family: str, token_hash: str, grant: Grant, ttl_s: float) -> None:
        ttl_ms = int(ttl_s * 1000)
        try:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._key(family, "f"),
                    mapping={
                        "sub": grant.subject,
                        "plan": grant.plan,
                        "scopes": " ".join(sorted(grant.scopes)),
                        "revoked": "0",
                    },
                )
                pipe.pexpire(self._key(family, "f"), ttl_ms)
                pipe.hset(self._key(family, f"t:{token_hash}"), "status", "active")
                pipe.pexpire(self._key(family, f"t:{token_hash}"), ttl_ms)
                await pipe.execute()
        except RedisError as exc:
            raise RefreshStoreUnavailable(f"cannot store the refresh token: {exc}") from exc

    async def rotate(self, family: str, old_hash: str, new_hash: str, grace_s: float) -> Rotation:
        keys = [
            self._key(family, "f"),
            self._key(family, f"t:{old_hash}"),
            self._key(family, f"t:{new_hash}"),
        ]
        try:
            reply: list[Any] = await self._rotate(keys=keys, args=[int(grace_s * 1000)])
        except RedisError as exc:
            raise RefreshStoreUnavailable(f"cannot rotate the refresh token: {exc}") from exc
        status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
        if status != "ok":
            return Rotation(status)
        subject, plan, scopes = (v.decode() if isinstance(v, bytes) else str(v) for v in reply[1:4])
        grant = Grant(subject, plan, frozenset(scopes.split()))
        return Rotation("ok", grant, max(0, int(reply[4])) / 1000)

    async def revoke(self, family: str) -> None:
        try:
            # Only an existing family is marked (atomically), so a made-up id creates
            # nothing and a family expiring meanwhile is not resurrected without a TTL.
            await self._r.eval(_REVOKE, 1, self._key(family, "f"))
        except RedisError as exc:
            raise RefreshStoreUnavailable(f"cannot revoke the refresh token: {exc}") from exc


class RefreshTokens:
    """Issues access + refresh pairs, rotates, and revokes."""

    def __init__(
        self,
        store: RefreshStore,
        issuer: TokenIssuer,
        *,
        plans: Callable[[], Collection[str]],
        access_ttl_s: float = 900,
        refresh_ttl_s: float = 30 * 86400,
        grace_s: float = 10,
    ) -> None:
        self._store = store
        self._issuer = issuer
        self._plans = plans
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.grace_s = grace_s

    def _access(self, grant: Grant) -> tuple[str, int]:
        return self._issuer.issue(
            grant.subject, grant.plan, ttl_s=self.access_ttl_s, scopes=grant.scopes
        )

    async def issue(self, subject: str, plan: str, scopes: Collection[str] = ()) -> TokenPair:
        grant = Grant(subject, plan, frozenset(scopes))
        family, secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        await self._store.create(family, _hash(secret), grant, self.refresh_ttl_s)
        access, access_exp = self._access(grant)
        return TokenPair(
            access, access_exp, f"{PREFIX}{family}.{secret}", int(time.time() + self.refresh_ttl_s)
        )

    async def refresh(self, token: str) -> TokenPair:
        family, secret = _split(token)
        new_secret = secrets.token_urlsafe(32)
        rotation = await self._store.rotate(family, _hash(secret), _hash(new_secret), self.grace_s)
        if rotation.status == "conflict":
            raise RefreshConflict("this refresh token was just rotated by a concurrent request")
        if rotation.status == "reused":
            raise NotAuthenticated(
                "refresh token reuse detected: the session is revoked", code="refresh_token_reused"
            )
        if rotation.status == "revoked":
            raise NotAuthenticated("the session was revoked", code="refresh_token_revoked")
        if rotation.grant is None:
            raise NotAuthenticated("unknown or expired refresh token", code="invalid_refresh_token")
        if rotation.grant.plan not in self._plans():
            raise PermissionDenied("the session's plan no longer exists", code="unknown_plan")
        access, access_exp = self._access(rotation.grant)
        # The family keeps its original end: rotation does not extend a session.
        return TokenPair(
            access,
            access_exp,
            f"{PREFIX}{family}.{new_secret}",
            int(time.time() + rotation.remaining_s),
        )

    async def logout(self, token: str) -> None:
        family, _ = _split(token)
        await self._store.revoke(family)
