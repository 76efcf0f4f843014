"""Models, health, readiness, metrics and the demo page."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ratelimit import LimiterUnavailable
from streaming import StreamingError

from ..limits import current, stash, usage_body
from ..metrics import CONTENT_TYPE
from ..security import authorize, principal
from ..services import Services

STATIC = Path(__file__).resolve().parent.parent / "static"
READY_PROBE_S = 1.5


async def list_models(request: Request) -> Response:
    caller = await authorize(request)
    services: Services = request.app.state.services
    plan = services.config.plans[caller.plan]
    # OpenAI's list shape, so its SDK's `models.list()` reads it; prices are extra fields.
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": spec.provider,
            "provider": spec.provider,
            "input_usd_per_mtok": spec.input_usd_per_mtok,
            "output_usd_per_mtok": spec.output_usd_per_mtok,
            "max_output_tokens": min(
                spec.max_output_tokens, plan.max_tokens or spec.max_output_tokens
            ),
        }
        for name, spec in services.config.models.items()
        if plan.allows_model(name)
    ]
    return JSONResponse({"object": "list", "plan": caller.plan, "data": data})


async def usage(request: Request) -> Response:
    caller = await principal(request)
    decision = await current(request.app.state.services, caller)  # down: 503, by type
    stash(request.scope, decision)
    return JSONResponse(usage_body(caller, decision))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _check(name: str, probe: Awaitable[object]) -> tuple[str, str]:
    try:
        async with asyncio.timeout(READY_PROBE_S):
            result = await probe
    except TimeoutError:
        return name, "timed out"
    except StreamingError as exc:
        return name, exc.message
    except LimiterUnavailable as exc:
        return name, str(exc)
    if result is False:
        return name, "unavailable"
    return name, "ok"


async def readyz(request: Request) -> Response:
    """Every dependency probed at once, each within `READY_PROBE_S`: a hung Redis makes
    this answer 503 in about a second, never hang a probe."""
    services: Services = request.app.state.services
    if services.drain.draining.is_set():
        return JSONResponse({"status": "draining"}, status_code=503)
    probes = [
        _check("stream_log", services.log.ping()),
        *([_check("workers", _workers(services))] if request.app.state.role == "api" else []),
        _check("limiter", services.limiter.ping()),
        *(_check(f"provider:{n}", p.ready()) for n, p in services.providers.items()),
    ]
    checks = dict(await asyncio.gather(*probes))
    if checks["limiter"] != "ok":
        services.metrics.limiter_errors.inc()
    ready = all(v == "ok" for v in checks.values())
    body: dict[str, object] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if services.breaker is not None:
        body["redis_circuit"] = services.breaker.state
    return JSONResponse(body, status_code=200 if ready else 503)


async def _workers(services: Services) -> bool:
    """An API-only process is ready only if some worker is alive to run what it queues."""
    return await services.queue.consumers(services.settings.generation_lease_s) > 0


async def metrics(request: Request) -> Response:
    services: Services = request.app.state.services
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


async def index(request: Request) -> Response:
    return FileResponse(
        STATIC / "index.html",
        headers={
            "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
            "Cache-Control": "no-cache",
        },
    )


health_routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
"""All a worker's port serves."""

routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/usage", usage, methods=["GET"]),
    *health_routes,
    Route("/", index, methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]
