"""From a validated body and a caller to a ready-to-run `Generation`: the model, the
plan's rules, the provider's request, the prices. Shared by both streaming routes."""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

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
    Target,
    estimate_tokens,
)

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
            metadata=body.metadata,
            request_id=request_id,
            headers={"x-request-id": request_id},
        ),
    )


@dataclass(frozen=True, slots=True)
class Started:
    info: StreamInfo
    request: GenerationRequest
    decision: Decision | None
    """The admission (None: admitted without the limiter, which is down, fail-open)."""


async def start(
    services: Services, caller: Principal, body: CompletionRequest, request_id: str, prefix: str
) -> Started:
    """Check the request against the model and plan and admit it; raises problems
    before any stream exists, so every refusal is a plain HTTP error. What runs the
    generation (this process or a worker) builds it with `build_generation`."""
    if services.drain.draining.is_set():
        raise ProblemError("draining", "this server is shutting down; retry")
    prepared = prepare(body, caller, services, request_id)
    decision = await admit(services, caller, services.config.plans[caller.plan], demand(prepared))
    spec = prepared.spec
    reservation = decision.reservation if decision is not None else None
    request = prepared.request
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
    )
    return Started(info, request, decision)


def build_generation(
    services: Services, info: StreamInfo, request: GenerationRequest, resume: Resume | None = None
) -> Generation:
    """The generation of a stream, with the targets its model's configuration gives it:
    the model itself, then its fallbacks (those the plan may use), each with its prices
    and whether it can continue a partial answer."""
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
        start_data={
            "stream_id": info.id,
            "model": info.model,
            "provider": info.provider,
            "plan": info.plan,
            "max_tokens": info.max_tokens,
            "created_at": info.created_at,
        },
        pricing=Pricing(info.input_usd_per_mtok, info.output_usd_per_mtok),
        options=services.options,
        observer=services.metrics.for_stream(provider.name, info.model),
        keep_text=services.settings.records_content != "omit",
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
