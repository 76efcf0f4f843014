"""The response cache as the app uses it: which models cache and how (their config),
the key of a request, lookups that never fail a request, and keeping finished answers.

What is kept: only an answer whose stream ended `done` (never a partial or failed one),
no longer than `SSERELAY_CACHE_MAX_CHARS`, with its usage and stop reason, for the
model's `cache.ttl_s`. A lookup or a write that fails (Redis down) is logged and counts
as a miss or as nothing stored: the cache never fails a request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from auth import Principal
from streaming import GenerationRequest, Outcome, StreamInfo

from ..config import CacheConfig, Config
from ..metrics import Metrics
from .base import CacheEntry, CacheStoreError, ResponseStore
from .key import cache_key

logger = logging.getLogger("sserelay.cache")


def directives(cache_control: str | None) -> frozenset[str]:
    """The directive names of a `Cache-Control` request header, lowercased
    (`no-cache`, `no-store`, ...); arguments (`max-age=0`) are dropped."""
    if not cache_control:
        return frozenset()
    names = (part.split("=", 1)[0].strip().lower() for part in cache_control.split(","))
    return frozenset(name for name in names if name)


class ResponseCache:
    def __init__(
        self,
        store: ResponseStore,
        *,
        config: Callable[[], Config],
        metrics: Metrics,
        max_chars: int,
    ) -> None:
        """`config`: the configuration in force (models say whether and how they cache);
        `max_chars`: the longest answer kept."""
        self.store = store
        self._config = config
        self._metrics = metrics
        self.max_chars = max_chars

    def policy(self, model: str) -> CacheConfig | None:
        """How `model` caches; None: it does not."""
        spec = self._config().models.get(model)
        return spec.cache if spec is not None else None

    @staticmethod
    def key(policy: CacheConfig, caller: Principal, model: str, request: GenerationRequest) -> str:
        value = {"subject": caller.subject, "plan": caller.plan, "global": ""}[policy.scope]
        return cache_key(policy.scope, value, model, request)

    async def lookup(self, key: str) -> CacheEntry | None:
        try:
            return await self.store.get(key)
        except CacheStoreError as exc:
            logger.warning("response cache lookup failed (a miss): %s", exc)
            return None

    def counted(self, model: str, *, hit: bool) -> None:
        """Count an admitted request's lookup."""
        (self._metrics.cache_hits if hit else self._metrics.cache_misses).labels(model).inc()

    async def keep(self, info: StreamInfo, text: str | None, outcome: Outcome) -> bool:
        """Store a finished stream's answer under its `cache_key`, if it has one, ended
        `done`, and is not too long; True if stored."""
        if not info.cache_key or outcome.status != "done" or text is None:
            return False
        policy = self.policy(info.model)
        if policy is None:  # this process's config does not cache the model
            return False
        if len(text) > self.max_chars:
            logger.info(
                "stream %s: answer of %d characters not cached (longer than %d)",
                info.id,
                len(text),
                self.max_chars,
            )
            return False
        entry = CacheEntry(
            text=text,
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            stop_reason=outcome.stop_reason,
            model=info.model,
            stored_at=time.time(),
        )
        try:
            await self.store.put(info.cache_key, entry, policy.ttl_s)
        except CacheStoreError as exc:
            logger.warning("stream %s: cannot cache its answer: %s", info.id, exc)
            return False
        self._metrics.cache_stores.labels(info.model).inc()
        return True
