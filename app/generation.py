"""From a validated body and a caller to a ready-to-run `Generation`: the model, the
plan's rules, the provider's request, the prices. Shared by both streaming routes."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request

from auth import Principal
from ratelimit import Demand
from streaming import Generation, GenerationRequest, Message, Pricing, Provider, StreamInfo
from streaming.providers import estimate_tokens

from .config import ModelConfig, describe
from .errors import ProblemError
from .limits import admit
from .middleware import request_id_of
from .schemas import CompletionRequest
from .services import Services


@dataclass(frozen=True, slots=True)
class Prepared:
    model: str
    spec: ModelConfig
    provider: Provider
    request: GenerationRequest


async def read_completion(request: Request, max_bytes: int) -> CompletionRequest:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ProblemError(415, "unsupported_media_type", "send the body as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise ProblemError(413, "body_too_large", f"the body is larger than {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise ProblemError(413, "body_too_large", f"the body is larger than {max_bytes} bytes")
    try:
        raw = json.loads(body)
    except ValueError as exc:
        raise ProblemError(400, "invalid_json", "the body is not valid JSON") from exc
    try:
        return CompletionRequest.model_validate(raw)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()
        ]
        raise ProblemError(422, "invalid_request", describe(exc), extra={"errors": errors}) from exc


def prepare(
    body: CompletionRequest, caller: Principal, services: Services, request_id: str
) -> Prepared:
    config, settings = services.config, services.settings
    spec = config.models.get(body.model)
    if spec is None:
        raise ProblemError(404, "model_not_found", f"no model named {body.model!r}")
    plan = config.plans[caller.plan]
    if not plan.allows_model(body.model):
        raise ProblemError(
            403, "model_not_allowed", f"plan {caller.plan!r} may not use model {body.model!r}"
        )
    ceiling = min(spec.max_output_tokens, plan.max_tokens or spec.max_output_tokens)
    if body.max_tokens is not None and body.max_tokens > ceiling:
        raise ProblemError(
            422,
            "max_tokens_too_large",
            f"max_tokens may be at most {ceiling} for this model and plan",
            extra={"max_tokens_limit": ceiling},
        )
    messages = body.chat()
    if len(messages) > settings.max_messages:
        raise ProblemError(
            422, "too_many_messages", f"at most {settings.max_messages} messages are accepted"
        )
    chars = sum(len(m.content) for m in messages) + len(body.system or "")
    if chars > settings.max_content_chars:
        raise ProblemError(
            422,
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


async def start(request: Request, caller: Principal, prefix: str) -> tuple[StreamInfo, Generation]:
    """Validate the body and build the generation; raises problems before any stream
    exists, so every refusal is a plain HTTP error."""
    services: Services = request.app.state.services
    if services.draining.is_set():
        raise ProblemError(
            503, "draining", "this server is shutting down; retry", headers={"Retry-After": "1"}
        )
    body = await read_completion(request, services.settings.max_body_bytes)
    prepared = prepare(body, caller, services, request_id_of(request.scope))
    decision = await admit(request, caller, services.config.plans[caller.plan], demand(prepared))
    info = StreamInfo(
        id=prefix + uuid.uuid4().hex,
        owner=caller.subject,
        model=prepared.model,
        provider=prepared.provider.name,
        plan=caller.plan,
        max_tokens=prepared.request.max_tokens,
        created_at=time.time(),
    )
    generation = Generation(
        prepared.provider,
        prepared.request,
        start_data={
            "stream_id": info.id,
            "model": info.model,
            "provider": info.provider,
            "plan": info.plan,
            "max_tokens": info.max_tokens,
            "created_at": info.created_at,
        },
        pricing=Pricing(prepared.spec.input_usd_per_mtok, prepared.spec.output_usd_per_mtok),
        options=services.options,
        observer=services.metrics.for_stream(info.provider, info.model),
        keep_text=services.settings.records_content != "omit",
    )
    if decision is not None and decision.reservation is not None:
        services.reservations[info.id] = decision.reservation
    return info, generation


def demand(prepared: Prepared) -> Demand:
    """The worst case: the whole prompt (estimated) and every token max_tokens allows."""
    inputs = estimate_tokens(prepared.request.prompt_chars())
    outputs = prepared.request.max_tokens
    spec = prepared.spec
    # USD per million tokens is nano-USD per token times 1000.
    cost = inputs * spec.input_usd_per_mtok * 1000 + outputs * spec.output_usd_per_mtok * 1000
    return Demand(requests=1, tokens=inputs + outputs, cost_nano_usd=round(cost))
