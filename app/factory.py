"""The composition root: `create_app(settings)` wires every package together.

Nothing is built at import time; the lifespan builds the services and keeps them on
`app.state`, and closes them in reverse on the way out.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

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
from .routes import admin, auth, events, meta, streams
from .settings import Settings
from .wiring import build_services


def create_app(settings: Settings | None = None, config: Config | None = None) -> Starlette:
    settings = settings or Settings()
    problem = settings.serving_problem()
    if problem is not None:
        raise ValueError(problem)
    config = config or load_config(settings.config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            services = await build_services(settings, config, stack)
            app.state.services = services
            await services.manager.start()
            background = [
                asyncio.create_task(services.accounting.keep_leases(), name="lease-keeper")
            ]
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

    routes: list[BaseRoute] = [
        *streams.routes,
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
                allow_headers=["authorization", "content-type", "last-event-id", "x-request-id"],
                expose_headers=["x-request-id", "retry-after", "location"],
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
    return create_app(settings)
