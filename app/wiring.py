"""What a process builds at startup, in one place: memory or Redis for every store.

`build_services` picks the in-memory implementations (the embedded default: one
process, no setup) or the Redis ones (`SSERELAY_REDIS_URL`: shared by every process) for
the stream log, the job queue, the limiter, the request records and the refresh tokens,
builds the
providers, and registers every close on one `AsyncExitStack`, so the lifespan tears down
in reverse order whatever was built, even when startup fails half-way.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial

from auth import ApiKeys, MemoryApiKeyStore, RedisApiKeyStore
from ratelimit import Limiter, MemoryLimiter, RecentDecisions, RedisLimiter
from streaming import (
    AnthropicProvider,
    JobQueue,
    MemoryJobQueue,
    MemoryStreamLog,
    OpenAIProvider,
    Pacer,
    PipelineOptions,
    Provider,
    RedisJobQueue,
    RedisStreamLog,
    SimulatedProvider,
    StreamLog,
    StreamManager,
    UpstreamPolicy,
)

from .accounting import StreamAccounting
from .authn import build_auth
from .cache import ResponseCache, build_store
from .config import Config, ProviderConfig
from .drain import Drain
from .metrics import Metrics
from .plans import PlansHolder
from .records import MemoryRecordStore, RecordStore, RedisRecordStore
from .redis_client import Breaker, blocking_client, redis_clients
from .services import Services
from .settings import Settings


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
            receive_buffer_bytes=settings.send_buffer_bytes,
        )
    return AnthropicProvider(
        name,
        base_url=spec.url(),
        api_key=spec.api_key(),
        connect_timeout_s=settings.upstream_connect_timeout_s,
        max_connections=spec.max_connections,
        receive_buffer_bytes=settings.send_buffer_bytes,
    )


def pipeline_options(settings: Settings) -> PipelineOptions:
    return PipelineOptions(
        coalesce_window_s=settings.coalesce_ms / 1000,
        pacer=Pacer(settings.coalesce_ms / 1000, settings.coalesce_ceiling_ms / 1000),
        coalesce_max_chars=settings.coalesce_max_chars,
        progress_interval_s=settings.progress_interval_ms / 1000,
        buffer_bytes=settings.send_buffer_bytes,
        upstream=UpstreamPolicy(
            first_token_timeout_s=settings.upstream_first_token_timeout_s,
            idle_timeout_s=settings.upstream_idle_timeout_s,
            max_attempts=settings.upstream_max_attempts,
            backoff_base_s=settings.upstream_backoff_base_s,
            backoff_max_s=settings.upstream_backoff_max_s,
        ),
    )


async def build_services(settings: Settings, config: Config, stack: AsyncExitStack) -> Services:
    ttl, duration = settings.stream_ttl_s, settings.max_stream_duration_s
    lease_ms = int(settings.concurrency_lease_s * 1000)
    metrics = Metrics()
    stack.callback(metrics.close)
    plans = PlansHolder(config)
    metrics.prime(config)  # every series at zero before its first increment
    plans.on_apply(metrics.prime)
    breaker: Breaker | None = None
    log: StreamLog
    queue: JobQueue
    limiter: Limiter
    records: RecordStore
    if settings.redis_url:
        client, tail, breaker = redis_clients(
            settings.redis_url,
            max_connections=settings.redis_max_connections,
            command_timeout_s=settings.redis_timeout_s,
            connect_timeout_s=settings.redis_timeout_s,
            pool_timeout_s=settings.redis_timeout_s,
            breaker_open_s=settings.redis_breaker_open_s,
            multiplex=settings.redis_multiplex,
        )
        stack.push_async_callback(client.aclose)
        stack.push_async_callback(tail.aclose)
        log = RedisStreamLog(
            client,
            tail=tail,
            prefix=settings.redis_prefix,
            ttl_s=ttl,
            max_duration_s=duration,
            max_events=settings.max_stream_events,
        )
        claims = blocking_client(
            settings.redis_url,
            breaker,
            connect_timeout_s=settings.redis_timeout_s,
            pool_timeout_s=settings.redis_timeout_s,
            multiplex=settings.redis_multiplex,
        )
        stack.push_async_callback(claims.aclose)
        queue = RedisJobQueue(client, blocking=claims, prefix=settings.redis_prefix)
        limiter = RedisLimiter(client, prefix=settings.redis_prefix, lease_ttl_ms=lease_ms)
        records = RedisRecordStore(
            client,
            prefix=settings.redis_prefix,
            max_records=settings.records_max,
            ttl_s=settings.records_ttl_s,
        )
    else:
        client = None
        log = MemoryStreamLog(
            ttl_s=ttl, max_duration_s=duration, max_events=settings.max_stream_events
        )
        queue = MemoryJobQueue()
        limiter = MemoryLimiter(lease_ttl_ms=lease_ms)
        records = MemoryRecordStore(max_records=min(settings.records_max, 10_000))
    stack.push_async_callback(log.aclose)

    providers: dict[str, Provider] = {}
    for name, spec in config.providers.items():
        providers[name] = provider = build_provider(name, spec, settings)
        stack.push_async_callback(provider.aclose)

    auth = build_auth(settings, plans=plans.names, default_plan=plans.default_plan, redis=client)
    stack.push_async_callback(auth.aclose)
    apikeys = ApiKeys(
        RedisApiKeyStore(client, prefix=settings.redis_prefix)
        if client is not None
        else MemoryApiKeyStore(),
        plans=plans.names,
    )

    accounting = StreamAccounting(
        limiter=limiter,
        metrics=metrics,
        records=records,
        records_content=settings.records_content,
    )

    accounting.still_waiting = log.waiting
    cache = ResponseCache(
        build_store(client, prefix=settings.redis_prefix),
        config=lambda: plans.current,
        metrics=metrics,
        max_chars=settings.cache_max_chars,
    )
    accounting.cache = cache
    manager = StreamManager(
        log,
        orphan_grace_s=settings.orphan_grace_s,
        lease_s=settings.generation_lease_s,
        tick_s=settings.supervisor_tick_s,
        on_finish=partial(accounting.stream_finished, "streams"),
    )
    stack.push_async_callback(manager.aclose)  # first to close: streams settle first
    return Services(
        settings=settings,
        plans=plans,
        auth=auth,
        apikeys=apikeys,
        log=log,
        queue=queue,
        manager=manager,
        providers=providers,
        options=pipeline_options(settings),
        metrics=metrics,
        limiter=limiter,
        recent=RecentDecisions(settings.ratelimit_report_reuse_s),
        records=records,
        accounting=accounting,
        cache=cache,
        drain=Drain(manager),
        breaker=breaker,
    )
