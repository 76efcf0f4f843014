"""Models, health, readiness, metrics and the demo page."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ratelimit import LimiterUnavailable
from streaming import StreamingError

from ..errors import ProblemError
from ..limits import report, usage_body
from ..metrics import CONTENT_TYPE
from ..security import authorize, principal
from ..services import Services

STATIC = Path(__file__).resolve().parent.parent / "static"


async def list_models(request: Request) -> Response:
    caller = await authorize(request)
    services: Services = request.app.state.services
    plan = services.config.plans[caller.plan]
    data = [
        {
            "id": name,
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
    return JSONResponse({"plan": caller.plan, "data": data})


async def usage(request: Request) -> Response:
    caller = await principal(request)
    decision = await report(request, caller)
    if decision is None:
        raise ProblemError(
            503,
            "limiter_unavailable",
            "usage cannot be read right now",
            headers={"Retry-After": "1"},
        )
    return JSONResponse(usage_body(caller, decision))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    services: Services = request.app.state.services
    if services.draining.is_set():
        return JSONResponse({"status": "draining"}, status_code=503)
    checks: dict[str, str] = {}
    try:
        await services.log.ping()
        checks["stream_log"] = "ok"
    except StreamingError as exc:
        checks["stream_log"] = exc.message
    try:
        await services.limiter.ping()
        checks["limiter"] = "ok"
    except LimiterUnavailable as exc:
        services.metrics.limiter_errors.inc()
        checks["limiter"] = str(exc)
    for name, provider in services.providers.items():
        checks[f"provider:{name}"] = "ok" if await provider.ready() else "unavailable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status_code=200 if ready else 503,
    )


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


routes = [
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/usage", usage, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/", index, methods=["GET"]),
    Mount("/static", StaticFiles(directory=STATIC), name="static"),
]
