"""The composition root: `create_app(settings)` wires every package together.

Nothing is built at import time; the lifespan builds the services and keeps them on
`app.state`, and closes them in reverse on the way out.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from . import reload
from .config import Config, load_config
from .errors import exception_handlers
from .logs import configure
from .middleware import RequestContextMiddleware
from .routes import admin, auth, meta, streams
from .services import build_services
from .settings import Settings


def create_app(settings: Settings | None = None, config: Config | None = None) -> Starlette:
    settings = settings or Settings()
    problem = settings.serving_problem()
    if problem is not None:
        raise ValueError(problem)
    config = config or load_config(settings.config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        services = await build_services(settings, config)
        app.state.services = services
        await services.manager.start()
        background = [asyncio.create_task(services.keep_leases(), name="lease-keeper")]
        if settings.config is not None:
            background.append(
                asyncio.create_task(
                    reload.watch(services, settings.config, settings.config_poll_s),
                    name="config-watch",
                )
            )
        # What is built by now (imports, config, clients) lives as long as the process.
        # Freezing it keeps full collections from rescanning it every time: unfrozen,
        # each paused the event loop (and every stream on it) for about 80 ms.
        gc.freeze()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await services.aclose()

    routes: list[BaseRoute] = [*streams.routes, *meta.routes, *admin.routes, *auth.routes(settings)]
    templates = {
        getattr(r, "endpoint", getattr(r, "app", None)): getattr(r, "path", "") for r in routes
    }
    middleware = [Middleware(RequestContextMiddleware, routes=templates)]
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
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=exception_handlers(),
        lifespan=lifespan,
    )


def app_from_env() -> Starlette:
    """Factory for `uvicorn --factory app.factory:app_from_env` (one per worker): each
    worker is a fresh process, so it sets up its own logging."""
    settings = Settings()
    configure(settings.log_format, settings.log_level)
    return create_app(settings)
