"""The composition root: `create_app(settings)` wires every package together.

Nothing is built at import time; the lifespan builds the services and keeps them on
`app.state`, and closes them in reverse on the way out.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Literal

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route

from . import openapi, reload
from .config import Config, load_config
from .errors import exception_handlers
from .logs import configure
from .metrics import VERSION
from .middleware import (
    AllowedHostsMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from .routes import admin, auth, compat, events, meta, streams
from .settings import Settings
from .wiring import build_services
from .worker import Worker

Role = Literal["all", "api", "worker"]
"""What a process does: `all` serves HTTP and generates (the default); `api` serves HTTP
and queues generations for workers; `worker` only generates (its port serves health,
readiness and metrics)."""


def create_app(
    settings: Settings | None = None, config: Config | None = None, *, role: Role = "all"
) -> Starlette:
    settings = settings or Settings()
    problem = settings.serving_problem()
    if problem is not None:
        raise ValueError(problem)
    if role != "all" and not settings.redis_url:
        raise ValueError(f"the {role} role needs SSERELAY_REDIS_URL (workers share a queue)")
    config = config or load_config(settings.config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            services = await build_services(settings, config, stack)
            app.state.services = services
            app.state.role = role
            await services.manager.start()
            if role != "api":
                worker = Worker(services)
                services.drain.worker = worker
                app.state.worker = worker
                worker.start()
                # Registered after the manager's close, so it runs before it: the worker
                # stops claiming before the streams it runs are ended.
                stack.push_async_callback(worker.aclose)
            background = [
                asyncio.create_task(services.accounting.keep_leases(), name="lease-keeper")
            ]
            if services.options.pacer is not None:
                services.metrics.paced(services.options.pacer)
                background.append(
                    asyncio.create_task(
                        services.options.pacer.run(on_sample=services.metrics.paced),
                        name="pacer",
                    )
                )
            if settings.config is not None:
                background.append(
                    asyncio.create_task(
                        reload.watch(services.plans, settings.config, settings.config_poll_s),
                        name="config-watch",
                    )
                )

            async def stop_background() -> None:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)

            stack.push_async_callback(stop_background)
            # What is built by now (imports, config, clients) lives as long as the
            # process. Freezing it keeps full collections from rescanning it every time:
            # unfrozen, each paused the event loop (and every stream on it) for ~80 ms.
            gc.freeze()
            yield

    routes: list[BaseRoute]
    if role == "worker":
        routes = list(meta.health_routes)
    else:
        routes = [
            *streams.routes,
            *compat.routes,
            *events.routes,
            *meta.routes,
            *admin.routes,
            *auth.routes(settings),
        ]
    paths = {getattr(r, "path", "") for r in routes}
    routes.append(Route("/openapi.json", openapi.route(VERSION, paths), methods=["GET"]))
    templates = {
        getattr(r, "endpoint", getattr(r, "app", None)): getattr(r, "path", "") for r in routes
    }
    middleware = [
        Middleware(
            SecurityHeadersMiddleware, hsts=settings.hsts, hsts_max_age_s=settings.hsts_max_age_s
        ),
        Middleware(RequestContextMiddleware, routes=templates),
    ]
    if settings.allowed_host_list:
        middleware.append(
            Middleware(AllowedHostsMiddleware, allowed_hosts=settings.allowed_host_list)
        )
    if settings.cors_origin_list:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origin_list,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "last-event-id",
                    "x-request-id",
                    "cache-control",
                ],
                expose_headers=["x-request-id", "retry-after", "location", "x-cache"],
                allow_credentials=True,
                max_age=600,
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )
    # `/v1/models/` must not answer with a redirect built from the Host header (a forged
    # Host would pick the Location): a path either exists or is a 404.
    app.router.redirect_slashes = False
    return app


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory app.factory:app_from_env` (one per worker): each
    worker is a fresh process, so it sets up its own logging."""
    settings = Settings()
    configure(settings.log_format, settings.log_level)
    role: Role = "api" if os.environ.get("SSERELAY_ROLE") == "api" else "all"
    return create_app(settings, role=role)
