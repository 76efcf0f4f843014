"""The limiter in Redis: every process shares one view, decided by Lua scripts.

Keys (the principal in a hash tag, so each script touches one Redis Cluster slot):

    {prefix}rl:{<subject>}:w:<limit>   hash: bucket index -> weight
    {prefix}rl:{<subject>}:c           sorted set: concurrency lease -> expiry ms
    {prefix}rl:{<subject>}:s:<id>      reservation <id>: "0" pending, "1" settled
                                        (exactly once; and a refund only for a
                                        reservation this Redis still holds)

The clock is Redis `TIME`, read inside the scripts, so replicas with skewed clocks still
agree. Every key expires.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._pipeliner import Pipeliner
from .base import SETTLED_TTL_MS, Decision, Demand, Limiter, Reservation, pending_ttl_ms
from .windows import WindowLimit, WindowState

_SAFE = re.compile(r"^[A-Za-z0-9._@:-]{1,63}$")


def _script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


class RedisLimiter(Limiter):
    backend_errors = (RedisError, OSError)

    def __init__(
        self,
        client: aioredis.Redis | Any,
        *,
        prefix: str = "sserelay:",
        lease_ttl_ms: int = 30_000,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """`clock` is for tests that must replay exact times; production leaves it None
        so the scripts read Redis `TIME`. `client` may be a Redis or a RedisCluster."""
        super().__init__(lease_ttl_ms=lease_ttl_ms)
        self._r = client
        self._prefix = prefix
        self._clock = clock
        self._acquire_script = client.register_script(_script("acquire.lua"))
        self._settle_script = client.register_script(_script("settle.lua"))
        self._renew_script = client.register_script(_script("renew.lua"))
        cluster = isinstance(client, aioredis.RedisCluster)
        # A multiplexed client (app/redis_mux.py) writes each call at once on its one
        # connection: concurrent calls already share the wire, with no batching task.
        multiplexed = getattr(client, "multiplexed", False)
        self._pipeliner = None if cluster or multiplexed else Pipeliner(client)

    async def _call(
        self, script: Any, keys: list[str], args: list[Any], *, droppable: bool = False
    ) -> Any:
        if self._pipeliner is None:
            return await script(keys=keys, args=args)
        return await self._pipeliner.evalsha(
            script.sha, script.script, keys, args, droppable=droppable
        )

    def _base(self, subject: str) -> str:
        # A subject with braces would break the hash tag: such subjects are hashed.
        # Hashed tags are 64 characters, which no verbatim tag can be: they never collide.
        tag = subject if _SAFE.match(subject) else hashlib.sha256(subject.encode()).hexdigest()
        return f"{self._prefix}rl:{{{tag}}}"

    def _now(self) -> int:
        return self._clock() if self._clock is not None else 0

    async def _acquire(
        self,
        subject: str,
        windows: tuple[WindowLimit, ...],
        demand: Demand,
        concurrency_limit: int | None,
        reservation_id: str,
        *,
        commit: bool,
    ) -> Decision:
        base = self._base(subject)
        keys = [f"{base}:c", f"{base}:s:{reservation_id}", *(f"{base}:w:{w.key}" for w in windows)]
        args: list[Any] = [
            self._now(),
            reservation_id if concurrency_limit is not None else "",
            self.lease_ttl_ms,
            -1 if concurrency_limit is None else concurrency_limit,
            1 if commit else 0,
            pending_ttl_ms(windows),
        ]
        for w in windows:
            args += [w.limit, w.window_ms, w.bucket_ms, demand.weight(w)]
        reply: list[int] = await self._call(self._acquire_script, keys, args, droppable=True)
        allowed, now, in_use = bool(reply[0]), int(reply[1]), int(reply[2])
        states = []
        for i, window in enumerate(windows):
            used, retry, reset = (int(v) for v in reply[3 + 3 * i : 6 + 3 * i])
            states.append(WindowState(window, used, None if retry < 0 else retry, reset))
        reservation = None
        if allowed and commit:
            reservation = Reservation(
                reservation_id,
                subject,
                windows,
                tuple(w.span(now)[1] for w in windows),
                demand,
                concurrency_limit is not None,
            )
        return Decision(allowed, now, tuple(states), concurrency_limit, in_use, reservation)

    async def _settle(self, reservation: Reservation, refunds: tuple[int, ...]) -> bool:
        base = self._base(reservation.subject)
        keys = [f"{base}:s:{reservation.id}", f"{base}:c"]
        keys += [f"{base}:w:{w.key}" for w in reservation.windows]
        args: list[Any] = [SETTLED_TTL_MS, reservation.id if reservation.lease else ""]
        for bucket, refund in zip(reservation.buckets, refunds, strict=True):
            args += [bucket, refund]
        return bool(await self._call(self._settle_script, keys, args))

    async def _renew(self, reservations: Sequence[Reservation]) -> None:
        # One script call per principal (each touches its own slot; cluster pipelines
        # cannot carry scripts), issued concurrently.
        by_subject: dict[str, list[str]] = {}
        for r in reservations:
            by_subject.setdefault(r.subject, []).append(r.id)
        await asyncio.gather(
            *(
                self._renew_script(
                    keys=[f"{self._base(subject)}:c"], args=[self._now(), self.lease_ttl_ms, *ids]
                )
                for subject, ids in by_subject.items()
            )
        )

    async def _ping(self) -> None:
        await self._r.ping()
