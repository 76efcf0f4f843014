"""From a validated body and a caller to a ready-to-run `Generation`: the model, the
plan's rules, the provider's request, the prices. Shared by both streaming routes."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from auth import Principal
from ratelimit import Decision, Demand
from streaming import Generation, GenerationRequest, Message, Pricing, Provider, StreamInfo

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
    generation: Generation
    decision: Decision | None
    """The admission (None: admitted without the limiter, which is down, fail-open)."""


async def start(
    services: Services, caller: Principal, body: CompletionRequest, request_id: str, prefix: str
) -> Started:
    """Check the request against the model and plan, admit it, and build the
    generation; raises problems before any stream exists, so every refusal is a plain
    HTTP error."""
    if services.drain.draining.is_set():
        raise ProblemError("draining", "this server is shutting down; retry")
    prepared = prepare(body, caller, services, request_id)
    decision = await admit(services, caller, services.config.plans[caller.plan], demand(prepared))
    pricing = Pricing(prepared.spec.input_usd_per_mtok, prepared.spec.output_usd_per_mtok)
    generation = Generation(
        prepared.provider,
        prepared.request,
        start_data={},
        pricing=pricing,
        options=services.options,
        observer=services.metrics.for_stream(prepared.provider.name, prepared.model),
        keep_text=services.settings.records_content != "omit",
    )
    reservation = decision.reservation if decision is not None else None
    info = StreamInfo(
        id=prefix + uuid.uuid4().hex,
        owner=caller.subject,
        model=prepared.model,
        provider=prepared.provider.name,
        plan=caller.plan,
        max_tokens=prepared.request.max_tokens,
        created_at=time.time(),
        input_tokens=generation.meter.input_tokens,
        input_usd_per_mtok=pricing.input_usd_per_mtok,
        output_usd_per_mtok=pricing.output_usd_per_mtok,
        billing=reservation.to_json() if reservation is not None else "",
    )
    generation.start_data.update(
        stream_id=info.id,
        model=info.model,
        provider=info.provider,
        plan=info.plan,
        max_tokens=info.max_tokens,
        created_at=info.created_at,
    )
    if reservation is not None:
        services.accounting.hold(info.id, reservation)
    return Started(info, generation, decision)


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
