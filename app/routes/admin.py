"""Operator routes: need the admin scope (`SSERELAY_ADMIN_SCOPE`) in the access token.

- `POST /v1/admin/plans/reload`: reload plans from the config file;
- `POST /v1/admin/apikeys`, `GET /v1/admin/apikeys`, `DELETE /v1/admin/apikeys/{id}`:
  create (the key is in this one response and nowhere else), list, revoke API keys.
  An API key never carries scopes, so no key can manage keys.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auth import Principal, is_api_key

from .. import reload
from ..apikey_schemas import ApiKeyGrant
from ..body import read_body
from ..errors import ProblemError
from ..security import principal
from ..services import Services

MAX_ADMIN_BODY = 16_384


async def _admin(request: Request) -> tuple[Services, Principal]:
    services: Services = request.app.state.services
    caller = await principal(request)
    caller.require(services.settings.admin_scope)
    return services, caller


async def reload_plans(request: Request) -> Response:
    services, _ = await _admin(request)
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


async def create_api_key(request: Request) -> Response:
    services, _ = await _admin(request)
    body = await read_body(request, ApiKeyGrant, max_bytes=MAX_ADMIN_BODY)
    if body.plan not in services.config.plans:
        raise ProblemError("unknown_plan", f"no plan named {body.plan!r}")
    try:
        key, record = await services.apikeys.create(
            body.sub, body.plan, name=body.name or "", ttl_s=body.ttl_s()
        )
    except ValueError as exc:  # the plan went away meanwhile (a reload)
        raise ProblemError("invalid_request", str(exc)) from exc
    return JSONResponse(
        {"key": key, **record.as_json()},
        status_code=201,
        headers={"Cache-Control": "no-store", "Location": f"/v1/admin/apikeys/{record.id}"},
    )


async def list_api_keys(request: Request) -> Response:
    services, _ = await _admin(request)
    records = await services.apikeys.list()
    return JSONResponse({"keys": [r.as_json() for r in records]})


async def revoke_api_key(request: Request) -> Response:
    key_or_id: str = request.path_params["key_id"]
    if is_api_key(key_or_id):
        # The access log writes the request path when the response ends: name the key
        # there by a placeholder, never by itself.
        for field in ("path", "raw_path"):
            value = request.scope.get(field)
            if isinstance(value, str):
                request.scope[field] = value.replace(key_or_id, "sk-[redacted]")
            elif isinstance(value, bytes):
                request.scope[field] = value.replace(key_or_id.encode(), b"sk-[redacted]")
    services, _ = await _admin(request)
    record = await services.apikeys.revoke(key_or_id)
    if record is None:
        raise ProblemError("api_key_not_found", "no such API key (or it was revoked already)")
    return JSONResponse({"revoked": True, **record.as_json()})


routes = [
    Route("/v1/admin/plans/reload", reload_plans, methods=["POST"]),
    Route("/v1/admin/apikeys", create_api_key, methods=["POST"]),
    Route("/v1/admin/apikeys", list_api_keys, methods=["GET"]),
    Route("/v1/admin/apikeys/{key_id}", revoke_api_key, methods=["DELETE"]),
]
