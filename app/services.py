"""Everything a request needs, built once in the lifespan and kept on `app.state`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from auth import TicketService, TokenVerifier
from ratelimit import (
    NANO_USD,
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    Reservation,
)
from streaming import (
    AnthropicProvider,
    Generation,
    MemoryStreamLog,
    OpenAIProvider,
    Outcome,
    PipelineOptions,
    Provider,
    RedisStreamLog,
    SimulatedProvider,
    StreamInfo,
    StreamingError,
    StreamLog,
    StreamManager,
    UpstreamPolicy,
)

from .authn import Auth, build_auth
from .config import Config, ProviderConfig
from .metrics import Metrics
from .records import MemoryRecordStore, RecordStore, RedisRecordStore, content
from .settings import Settings

logger = logging.getLogger("sserelay")
stream_log = logging.getLogger("sserelay.stream")


@dataclass
class Services:
    settings: Settings
    config: Config
    auth: Auth
    log: StreamLog
    manager: StreamManager
    providers: dict[str, Provider]
    options: PipelineOptions
    metrics: Metrics
    redis: aioredis.Redis | None
    limiter: Limiter
    records: RecordStore
    reservations: dict[str, Reservation] = field(default_factory=dict)
    """Admissions of the streams running in this process, by stream id, until settled."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on SIGTERM: not ready, no new streams; running ones may finish."""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    """Set at the drain deadline: open SSE responses say their last word and close."""
    direct_streams: int = 0
    """Responses of POST /v1/chat/stream in flight (they are not in the manager)."""

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: refuse new streams at once, let running ones finish for up
        to `timeout_s`, then end the rest with a retryable `shutdown` error (written to
        the stream log, so a client resuming elsewhere sees it) and close every reader
        with a `reconnect` event (a reader following a stream that another replica
        generates resumes there)."""
        self.draining.set()
        logger.info(
            "draining: %d resumable and %d direct streams running",
            self.manager.active,
            self.direct_streams,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (self.manager.active or self.direct_streams) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.manager.active or self.direct_streams:
            logger.warning(
                "drain deadline: ending %d resumable and %d direct streams",
                self.manager.active,
                self.direct_streams,
            )
        await self.manager.aclose()
        await asyncio.sleep(0.2)  # readers relay the `shutdown` errors just written
        self.stopping.set()
        # Direct streams say their last word and settle their usage before Redis closes.
        settle_by = loop.time() + 5
        while self.direct_streams and loop.time() < settle_by:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)

    @property
    def verifier(self) -> TokenVerifier:
        return self.auth.verifier

    @property
    def tickets(self) -> TicketService:
        return self.auth.tickets

    def apply_plans(self, config: Config) -> None:
        """Take new plans (and default plan) from a reloaded file. Providers and models
        keep their running connections: changing those needs a restart. The verifier
        reads plans through `self.config`, so it follows at once."""
        self.config = Config.model_validate(
            {**self.config.model_dump(), "plans": config.plans, "default_plan": config.default_plan}
        )

    async def settle(self, stream_id: str, outcome: Outcome) -> None:
        """Bill what the stream actually used against its admission, once."""
        reservation = self.reservations.pop(stream_id, None)
        if reservation is None:
            return
        try:
            await self.limiter.settle(
                reservation,
                tokens=outcome.input_tokens + outcome.output_tokens,
                cost_nano_usd=round(outcome.cost_usd * NANO_USD),
            )
        except LimiterUnavailable as exc:
            # The reservation stays counted at its worst case (the safe side) and its
            # lease expires by itself.
            self.metrics.limiter_errors.inc()
            logger.error("stream %s: cannot settle usage: %s", stream_id, exc)

    async def keep_leases(self) -> None:
        """Renew the concurrency leases of running streams until cancelled."""
        interval = self.limiter.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.limiter.renew(list(self.reservations.values()))
            except LimiterUnavailable as exc:
                self.metrics.limiter_errors.inc()
                logger.warning("cannot renew concurrency leases: %s", exc)

    async def stream_finished(self, route: str, info: StreamInfo, generation: Generation) -> None:
        """Runs exactly once per stream, however it ended."""
        outcome = generation.outcome
        await self.settle(info.id, outcome)
        self.metrics.stream_finished(route, info.plan, info.model, outcome)
        record = self._record(route, info, generation)
        try:
            await self.records.add(record)
        except StreamingError as exc:
            logger.error("stream %s: cannot store its record: %s", info.id, exc)
        stream_log.info(
            "stream %s %s",
            info.id,
            outcome.status,
            extra={k: v for k, v in record.items() if k not in ("input", "output")},
        )

    def _record(self, route: str, info: StreamInfo, generation: Generation) -> dict[str, Any]:
        outcome, request = generation.outcome, generation.request
        mode = self.settings.records_content
        prompt = json.dumps(
            {"system": request.system, "messages": [[m.role, m.content] for m in request.messages]}
        )
        return {
            "id": info.id,
            "request_id": request.request_id,
            "subject": info.owner,
            "plan": info.plan,
            "model": info.model,
            "provider": info.provider,
            "route": route,
            "created_at": info.created_at,
            "finished_at": time.time(),
            "outcome": outcome.status,
            "stop_reason": outcome.stop_reason,
            "error_code": outcome.error_code,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
            "cost_usd": outcome.cost_usd,
            "ttft_ms": outcome.ttft_ms,
            "duration_ms": outcome.duration_ms,
            "retries": outcome.retries,
            "input": content(prompt, mode),
            "output": content(generation.text(), mode),
        }

    async def aclose(self) -> None:
        await self.manager.aclose()
        await self.auth.aclose()
        self.metrics.close()
        for provider in self.providers.values():
            await provider.aclose()
        await self.log.aclose()
        if self.redis is not None:
            await self.redis.aclose()


def build_provider(name: str, spec: ProviderConfig, settings: Settings) -> Provider:
    if spec.kind == "simulated":
        return SimulatedProvider(
            name,
            tokens_per_second=spec.tokens_per_second,
            response_tokens=spec.response_tokens,
            ttft_ms=spec.ttft_ms,
        )
    if spec.kind == "openai":
        assert spec.base_url is not None
        return OpenAIProvider(
            name,
            base_url=spec.base_url,
            api_key=spec.api_key(),
            connect_timeout_s=settings.upstream_connect_timeout_s,
            max_connections=spec.max_connections,
        )
    return AnthropicProvider(
        name,
        base_url=spec.url(),
        api_key=spec.api_key(),
        connect_timeout_s=settings.upstream_connect_timeout_s,
        max_connections=spec.max_connections,
    )


def redis_clients(url: str, max_connections: int) -> tuple[aioredis.Redis, aioredis.Redis]:
    """The shared client (a bounded pool that waits for a free connection rather than
    failing) and the dedicated connection readers share to wait for new events."""
    client = aioredis.Redis.from_pool(  # from_pool: closing the client closes the pool
        aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,
            socket_connect_timeout=5,
            socket_timeout=10,
        )
    )
    tail = aioredis.Redis.from_url(
        url, single_connection_client=True, socket_connect_timeout=5, socket_timeout=15
    )
    return client, tail


async def build_services(settings: Settings, config: Config) -> Services:
    client: aioredis.Redis | None = None
    limiter: Limiter
    log: StreamLog
    ttl, duration = settings.stream_ttl_s, settings.max_stream_duration_s
    lease_ms = int(settings.concurrency_lease_s * 1000)
    if settings.redis_url:
        client, tail = redis_clients(settings.redis_url, settings.redis_max_connections)
        log = RedisStreamLog(
            client,
            tail=tail,
            prefix=settings.redis_prefix,
            ttl_s=ttl,
            max_duration_s=duration,
            max_events=settings.max_stream_events,
        )
        limiter = RedisLimiter(client, prefix=settings.redis_prefix, lease_ttl_ms=lease_ms)
        records: RecordStore = RedisRecordStore(
            client,
            prefix=settings.redis_prefix,
            max_records=settings.records_max,
            ttl_s=settings.records_ttl_s,
        )
    else:
        log = MemoryStreamLog(
            ttl_s=ttl, max_duration_s=duration, max_events=settings.max_stream_events
        )
        limiter = MemoryLimiter(lease_ttl_ms=lease_ms)
        records = MemoryRecordStore(max_records=min(settings.records_max, 10_000))

    services_ref: list[Services] = []

    async def on_finish(info: StreamInfo, generation: Generation) -> None:
        await services_ref[0].stream_finished("streams", info, generation)

    manager = StreamManager(
        log,
        orphan_grace_s=settings.orphan_grace_s,
        lease_s=settings.lease_s,
        tick_s=settings.supervisor_tick_s,
        on_finish=on_finish,
    )
    options = PipelineOptions(
        coalesce_window_s=settings.coalesce_ms / 1000,
        coalesce_max_chars=settings.coalesce_max_chars,
        progress_interval_s=settings.progress_interval_ms / 1000,
        upstream=UpstreamPolicy(
            first_token_timeout_s=settings.upstream_first_token_timeout_s,
            idle_timeout_s=settings.upstream_idle_timeout_s,
            max_attempts=settings.upstream_max_attempts,
            backoff_base_s=settings.upstream_backoff_base_s,
            backoff_max_s=settings.upstream_backoff_max_s,
        ),
    )
    services = Services(
        settings=settings,
        config=config,
        auth=build_auth(
            settings,
            plans=lambda: services_ref[0].config.plans.keys(),
            default_plan=lambda: services_ref[0].config.default_plan,
            redis=client,
        ),
        log=log,
        manager=manager,
        providers={n: build_provider(n, p, settings) for n, p in config.providers.items()},
        options=options,
        metrics=Metrics(),
        redis=client,
        limiter=limiter,
        records=records,
    )
    services_ref.append(services)
    return services
