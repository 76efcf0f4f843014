"""Plans meet the limiter: admission, the RateLimit headers, and the usage report.

Headers follow the IETF httpapi ratelimit-headers draft (09): one `RateLimit-Policy`
item per limit (`"tokens_per_minute";q=20000;w=60;qu="tokens"`) and the live
`RateLimit` item per limit (`"tokens_per_minute";r=19000;t=42`). Budgets are counted in
micro-dollars in headers (`qu="usd-micros"`), in dollars in JSON.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from starlette.types import Scope

from auth import Principal
from ratelimit import NANO_USD, Decision, Demand, LimiterUnavailable, Plan, WindowState

from .errors import ProblemError
from .services import Services

logger = logging.getLogger("sserelay.limits")

STATE_KEY = "ratelimit_headers"
_UNITS = {"requests": "requests", "tokens": "tokens", "cost_usd": "usd-micros"}


def _amount(state: WindowState, value: int) -> int:
    return value // 1000 if state.limit.resource == "cost_usd" else value  # nano -> micro


def headers(decision: Decision) -> dict[str, str]:
    policies, current = [], []
    for s in decision.windows:
        name = s.limit.name
        policies.append(
            f'"{name}";q={_amount(s, s.limit.limit)};w={s.limit.window_ms // 1000}'
            f';qu="{_UNITS[s.limit.resource]}"'
        )
        remaining = _amount(s, s.remaining)
        wait = s.retry_after_ms if s.retry_after_ms else s.reset_ms
        reservation = decision.reservation
        if reservation is not None:  # what is left after this request
            weight = reservation.demand.weight(s.limit)
            remaining = _amount(s, max(0, s.remaining - weight))
            if weight and not wait:  # the first weight counted: it leaves with its bucket
                bucket = reservation.buckets[reservation.windows.index(s.limit)]
                wait = (bucket + 1) * s.limit.bucket_ms + s.limit.window_ms - decision.now_ms
        current.append(f'"{name}";r={remaining};t={math.ceil((wait or 0) / 1000)}')
    if decision.concurrency_limit is not None:
        taken = decision.concurrency_in_use + (1 if decision.reservation is not None else 0)
        policies.append(
            f'"concurrent_streams";q={decision.concurrency_limit};qu="concurrent-requests"'
        )
        current.append(f'"concurrent_streams";r={max(0, decision.concurrency_limit - taken)}')
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(current)}


def stash(scope: Scope, decision: Decision | None) -> None:
    """The middleware adds these to whatever response this request gets."""
    if decision is not None:
        scope.setdefault("state", {})[STATE_KEY] = headers(decision)


async def report(services: Services, caller: Principal) -> Decision | None:
    """The caller's current state; None if the limiter is down (the headers are then
    left out, and the request goes on: reporting must not fail a request). Within
    `SSERELAY_RATELIMIT_REPORT_REUSE_S` of an admission of the same caller here, that
    admission's decision (`ratelimit.recent`)."""
    recent = services.recent.get(caller.subject, caller.plan)
    if recent is not None:
        return recent
    try:
        return await current(services, caller)
    except LimiterUnavailable as exc:
        logger.warning("cannot read usage: %s", exc)
        return None


async def current(services: Services, caller: Principal) -> Decision:
    """The caller's current state, consuming nothing; raises `LimiterUnavailable`."""
    plan = services.config.plans[caller.plan]
    try:
        return await services.limiter.usage(
            caller.subject, plan.windows(), concurrency_limit=plan.concurrent_streams
        )
    except LimiterUnavailable:
        services.metrics.limiter_errors.inc()
        raise


async def admit(
    services: Services, caller: Principal, plan: Plan, demand: Demand
) -> Decision | None:
    """Admit a request or raise 429; None means admitted without a reservation because
    the limiter is down and the configured fail mode is open (closed: the
    `LimiterUnavailable` propagates, and `errors` answers 503)."""
    try:
        decision = await services.limiter.acquire(
            caller.subject, plan.windows(), demand, concurrency_limit=plan.concurrent_streams
        )
    except LimiterUnavailable as exc:
        services.metrics.limiter_errors.inc()
        if services.settings.limiter_fail_mode == "open":
            logger.error("rate limiter unavailable, admitting anyway (fail-open): %s", exc)
            return None
        logger.error("rate limiter unavailable, refusing (fail-closed): %s", exc)
        raise
    services.metrics.limiter_decision(caller.plan, decision)
    services.recent.put(caller.subject, caller.plan, decision)
    if decision.allowed:
        return decision
    raise refusal(decision)


def refusal(decision: Decision) -> ProblemError:
    """The refusal, carrying the caller's RateLimit fields like any other answer."""
    retry_ms = decision.retry_after_ms
    violated = decision.violated
    if retry_ms is None:
        return ProblemError(
            "exceeds_plan_limit",
            f"this request alone exceeds the plan's {', '.join(violated)}: "
            "lower max_tokens or shorten the prompt",
            headers=headers(decision),
            extra={"violated": violated},
        )
    retry_s = max(1, math.ceil(retry_ms / 1000))
    return ProblemError(
        "rate_limited",
        f"limit reached: {', '.join(violated)}; retry in {retry_s} s",
        headers={**headers(decision), "Retry-After": str(retry_s)},
        extra={"violated": violated, "retry_after_s": retry_s},
    )


def usage_body(caller: Principal, decision: Decision) -> dict[str, Any]:
    limits: list[dict[str, Any]] = []
    budget: dict[str, Any] | None = None
    for s in decision.windows:
        if s.limit.name == "daily_budget_usd":
            budget = {
                "daily_usd": s.limit.limit / NANO_USD,
                "spent_usd": round(s.used / NANO_USD, 9),
                "remaining_usd": round(s.remaining / NANO_USD, 9),
                "reset_s": math.ceil(s.reset_ms / 1000),
            }
            continue
        scale = NANO_USD if s.limit.resource == "cost_usd" else 1
        limits.append(
            {
                "name": s.limit.name,
                "resource": s.limit.resource,
                "window_s": s.limit.window_ms // 1000,
                "limit": s.limit.limit / scale if scale > 1 else s.limit.limit,
                "used": s.used / scale if scale > 1 else s.used,
                "remaining": s.remaining / scale if scale > 1 else s.remaining,
                "reset_s": math.ceil(s.reset_ms / 1000),
            }
        )
    body: dict[str, Any] = {
        "plan": caller.plan,
        "subject": caller.subject,
        "limits": limits,
        "budget": budget,
    }
    if decision.concurrency_limit is not None:
        body["concurrent_streams"] = {
            "limit": decision.concurrency_limit,
            "in_use": decision.concurrency_in_use,
            "remaining": max(0, decision.concurrency_limit - decision.concurrency_in_use),
        }
    return body
