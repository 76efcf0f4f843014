"""Operator routes: need the admin scope (`SSERELAY_ADMIN_SCOPE`) in the access token."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import reload
from ..errors import ProblemError
from ..security import principal
from ..services import Services


async def reload_plans(request: Request) -> Response:
    services: Services = request.app.state.services
    caller = await principal(request)
    caller.require(services.settings.admin_scope)
    path = services.settings.config
    if path is None:
        raise ProblemError("no_config_file", "this server runs the built-in config")
    if not reload.reload(services.plans, path):
        raise ProblemError(
            "config_invalid",
            "the config file is not valid; the running plans are kept (see log)",
        )
    return JSONResponse(
        {"plans": sorted(services.config.plans), "default_plan": services.config.default_plan}
    )


routes = [Route("/v1/admin/plans/reload", reload_plans, methods=["POST"])]
