"""From a validated body and a caller to a ready-to-run `Generation`: the model, the
plan's rules, the provider's request, the prices, and the response cache. Shared by
every streaming route (`POST /v1/streams`, `POST /v1/chat/stream` and the compatible
front doors)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from auth import Principal
from ratelimit import Decision, Demand
from streaming import (
    Generation,
    GenerationRequest,
    Message,
    Pricing,
    Provider,
    Resume,
    StreamInfo,
    StreamingError,
    Target,
    estimate_tokens,
)

from .cache import CacheEntry, Replay, directives
from .config import ModelConfig
from .errors import ProblemError
from .limits import admit
from .schemas import CompletionRequest
from .services import Services


@dataclass(frozen=True, slots=True)
class Prepared:
    model: str
    spec: ModelConfig
    provider: Provider
    request: GenerationRequest


def prepare(
    body: CompletionRequest, caller: Principal, services: Services, request_id: str
) -> Prepared:
    config, settings = services.config, services.settings
    spec = config.models.get(body.model)
    if spec is None:
        raise ProblemError("model_not_found", f"no model named {body.model!r}")
    plan = config.plans[caller.plan]
    if not plan.allows_model(body.model):
        raise ProblemError(
            "model_not_allowed", f"plan {caller.plan!r} may not use model {body.model!r}"
        )
    ceiling = min(spec.max_output_tokens, plan.max_tokens or spec.max_output_tokens)
    if body.max_tokens is not None and body.max_tokens > ceiling:
        raise ProblemError(
            "max_tokens_too_large",
            f"max_tokens may be at most {ceiling} for this model and plan",
            extra={"max_tokens_limit": ceiling},
        )
    messages = body.chat()
    if len(messages) > settings.max_messages:
        raise ProblemError(
            "too_many_messages", f"at most {settings.max_messages} messages are accepted"
        )
    chars = sum(len(m.content) for m in messages) + len(body.system or "")
    if chars > settings.max_content_chars:
        raise ProblemError(
            "content_too_long",
            f"messages may hold at most {settings.max_content_chars} characters",
        )
    return Prepared(
        model=body.model,
        spec=spec,
        provider=services.providers[spec.provider],
        request=GenerationRequest(
            model=spec.upstream or body.model,
            messages=tuple(Message(m.role, m.content) for m in messages),
            max_tokens=body.max_tokens or ceiling,
            system=body.system,
            temperature=body.temperature,
            stop=tuple(body.stop or ()),
            metadata=body.metadata,
            request_id=request_id,
            headers={"x-request-id": request_id},
        ),
    )


CacheStatus = Literal["HIT", "MISS"]


@dataclass(frozen=True, slots=True)
class Started:
    info: StreamInfo
    """The stream; `info.cache_key` is where its answer is kept if it ends `done`
    (empty: not kept: the model does not cache, `Cache-Control: no-store`, or a hit)."""
    request: GenerationRequest
    decision: Decision | None
    """The admission (None: admitted without the limiter, which is down, fail-open)."""
    cache: CacheStatus | None = None
    """What the response cache said, for the `X-Cache` header; None: the model does not
    cache (then no header)."""
    cached: CacheEntry | None = None
    """The cached answer (a hit): replay it, generate nothing."""


async def start(
    services: Services,
    caller: Principal,
    body: CompletionRequest,
    request_id: str,
    prefix: str,
    *,
    cache_control: str | None = None,
) -> Started:
    """Check the request against the model and plan, look it up in the response cache
    and admit it; raises problems before any stream exists, so every refusal is a plain
    HTTP error. What runs the generation (this process or a worker) builds it with
    `build_generation`; a direct route uses `direct_generation`, which replays a hit.

    `cache_control`: the request's `Cache-Control` header. `no-cache` skips the lookup
    (the answer is generated, and kept, replacing what was there); `no-store` keeps the
    answer out of the cache. A hit is admitted as a request only (no tokens, no cost:
    it counts against `requests_per_*`, and its concurrency lease while it plays)."""
    if services.drain.draining.is_set():
        raise ProblemError("draining", "this server is shutting down; retry")
    prepared = prepare(body, caller, services, request_id)
    request = prepared.request
    cache = services.cache
    policy = cache.policy(prepared.model)
    key = ""
    cached: CacheEntry | None = None
    if policy is not None:
        asked = directives(cache_control)
        key = cache.key(policy, caller, prepared.model, request)
        if "no-cache" not in asked:
            cached = await cache.lookup(key)
        if "no-store" in asked or cached is not None:
            key = ""
    wanted = Demand(requests=1) if cached is not None else demand(prepared)
    decision = await admit(services, caller, services.config.plans[caller.plan], wanted)
    if policy is not None:
        cache.counted(prepared.model, hit=cached is not None)
    spec = prepared.spec
    reservation = decision.reservation if decision is not None else None
    info = StreamInfo(
        id=prefix + uuid.uuid4().hex,
        owner=caller.subject,
        model=prepared.model,
        provider=prepared.provider.name,
        plan=caller.plan,
        max_tokens=request.max_tokens,
        created_at=time.time(),
        input_tokens=estimate_tokens(request.prompt_chars()),
        input_usd_per_mtok=spec.input_usd_per_mtok,
        output_usd_per_mtok=spec.output_usd_per_mtok,
        billing=reservation.to_json() if reservation is not None else "",
        cache_key=key,
    )
    status: CacheStatus | None = None
    if policy is not None:
        status = "HIT" if cached is not None else "MISS"
    return Started(info, request, decision, status, cached)


def cache_headers(started: Started) -> dict[str, str]:
    """`X-Cache: HIT | MISS` for a model that caches; nothing for one that does not."""
    return {"X-Cache": started.cache} if started.cache is not None else {}


DirectGeneration = Generation | Replay
"""What a direct route streams: a live generation, or a cached answer played back."""


async def open_direct(services: Services, started: Started) -> DirectGeneration:
    """`direct_generation`, with what every direct route does next: the admission is
    held for the stream (or given back if it cannot be built, say its model was
    removed by a reload since admission) and the start is counted."""
    reservation = started.decision.reservation if started.decision is not None else None
    try:
        generation = direct_generation(services, started)
    except BaseException:
        if reservation is not None:  # nothing was used
            await asyncio.shield(services.accounting.refund(started.info.id, reservation))
        raise
    if reservation is not None:
        services.accounting.hold(started.info.id, reservation)
    services.metrics.stream_started("chat", started.info.plan, started.info.model)
    return generation


def direct_generation(services: Services, started: Started) -> DirectGeneration:
    """What a direct (non-resumable) route runs for `started`: the live `Generation`
    (as `build_generation` makes it), or for a cache hit a `Replay` of the cached
    answer. Both offer what such a route uses, alike:

    - `batches()`: async generator of `list[Event]`, `start` first, ending with `done`
      or `error` (closing it early cancels the upstream request, if any);
    - `outcome` (`.status` "running" until it ends), `end(status, error_code=...)`
      and `abort(code, message, retryable=, status=) -> Event` (the terminal `error`);
    - `parts` / `text()`: the text sent; `request`, `attempts`: for the record.

    A replay's `done` has `cached: true`, the stored usage and `cost_usd: 0`; its
    outcome bills nothing. Routes call it through `open_direct` (which holds the
    admission and counts the start), send `cache_headers(started)`, and once the
    response is over call `accounting.stream_finished(route, started.info, generation)` exactly
    once; that settles it, records it (`cached: true` for a replay) and keeps a live
    answer that ended `done` in the cache (when `started.info.cache_key` says so).
    Building has no side effect: nothing is held or counted yet."""
    if started.cached is not None:
        return replay(services, started.info, started.request, started.cached)
    return build_generation(services, started.info, started.request)


def start_data(info: StreamInfo) -> dict[str, Any]:
    """What a stream's `start` event says."""
    return {
        "stream_id": info.id,
        "model": info.model,
        "provider": info.provider,
        "plan": info.plan,
        "max_tokens": info.max_tokens,
        "created_at": info.created_at,
    }


def replay(
    services: Services, info: StreamInfo, request: GenerationRequest, entry: CacheEntry
) -> Replay:
    return Replay(
        entry,
        request,
        start_data=start_data(info),
        progress_interval_s=services.options.progress_interval_s,
    )


async def log_replay(services: Services, started: Started) -> None:
    """A resumable stream for a cache hit: created in the stream log with the replay's
    events already in it and finished `done`, so its readers replay it (resume,
    status) exactly as a live one, and no worker is needed. Then settled, counted and
    recorded like any stream. Raises if the log cannot be written (the stream is then
    ended, and the caller refunds the admission)."""
    assert started.cached is not None
    info, log = started.info, services.log
    played = replay(services, info, started.request, started.cached)
    events = [event async for batch in played.batches() for event in batch]
    settings = services.settings
    await log.create(
        info, reader_grace_s=settings.orphan_grace_s, lease_s=settings.generation_lease_s
    )
    try:
        for at in range(0, len(events), 500):
            await log.append(info.id, events[at : at + 500], epoch=1)
        await log.finish(info.id, played.outcome.status, epoch=1)
    except BaseException:
        try:  # no reader waits for a stream that will never end
            await asyncio.shield(log.finish(info.id, "error", epoch=1))
        except StreamingError:
            pass
        raise
    decision = started.decision
    if decision is not None and decision.reservation is not None:
        services.accounting.hold(info.id, decision.reservation)
    services.metrics.stream_started("streams", info.plan, info.model)
    await asyncio.shield(services.accounting.stream_finished("streams", info, played))


def build_generation(
    services: Services, info: StreamInfo, request: GenerationRequest, resume: Resume | None = None
) -> Generation:
    """The generation of a stream, with the targets its model's configuration gives it:
    the model itself, then its fallbacks (those the plan may use), each with its prices
    and whether it can continue a partial answer. Its text is kept when
    `info.cache_key` asks for the answer to be cached (`accounting.stream_finished`
    stores it if it ends `done`)."""
    config = services.config
    spec = config.models.get(info.model)
    if spec is None or spec.provider not in services.providers:
        raise ProblemError("model_not_found", f"no model named {info.model!r}")
    plan = config.plans.get(info.plan)
    fallbacks = []
    for name in spec.fallbacks:
        other = config.models[name]
        if plan is not None and not plan.allows_model(name):
            continue
        fallbacks.append(
            Target(
                services.providers[other.provider],
                dataclasses.replace(
                    request,
                    model=other.upstream or name,
                    max_tokens=min(request.max_tokens, other.max_output_tokens),
                ),
                name,
                Pricing(other.input_usd_per_mtok, other.output_usd_per_mtok),
                config.continues(name),
            )
        )
    provider = services.providers[spec.provider]
    generation = Generation(
        provider,
        request,
        start_data=start_data(info),
        pricing=Pricing(info.input_usd_per_mtok, info.output_usd_per_mtok),
        options=services.options,
        observer=services.metrics.for_stream(provider.name, info.model),
        # The text is kept for records that store it, and for the cache to keep.
        keep_text=services.settings.records_content != "omit" or bool(info.cache_key),
        model=info.model,
        continuation=config.continues(info.model),
        fallbacks=fallbacks,
        resume=resume,
    )
    return generation


def demand(prepared: Prepared) -> Demand:
    """The worst case: the most tokens any tokenizer can count for the prompt, and every
    token max_tokens allows. An upper bound, not an estimate: a strict limit must not
    admit a prompt crafted to tokenize badly (a request is then settled to what the
    provider reports)."""
    inputs = prepared.request.input_token_bound()
    outputs = prepared.request.max_tokens
    spec = prepared.spec
    # USD per million tokens is nano-USD per token times 1000.
    cost = inputs * spec.input_usd_per_mtok * 1000 + outputs * spec.output_usd_per_mtok * 1000
    return Demand(requests=1, tokens=inputs + outputs, cost_nano_usd=round(cost))
