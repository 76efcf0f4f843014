"""Token routes of the built-in issuer.

- `POST /v1/auth/token`: a trusted backend (Bearer: the configured client secret)
  exchanges (sub, plan, scopes) for an access + refresh pair, optionally as cookies;
- `POST /v1/auth/refresh`: rotates a refresh token (JSON body or HttpOnly cookie);
- `POST /v1/auth/logout`: revokes the token's whole family;
- `POST /v1/auth/dev-token`: development mode only (no key configured), so the demo
  works on a laptop with zero setup; the route does not exist otherwise.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from auth import NotAuthenticated, TokenPair

from ..body import read_body
from ..errors import ProblemError
from ..schemas import DevTokenGrant, RefreshBody, TokenGrant
from ..security import bearer_token, require_same_origin
from ..services import Services
from ..settings import Settings

MAX_AUTH_BODY = 16_384


def _plan(services: Services, plan: str | None) -> str:
    plan = plan if plan is not None else services.config.default_plan
    if plan not in services.config.plans:
        raise ProblemError("unknown_plan", f"no plan named {plan!r}")
    return plan


def _cookies(settings: Settings, pair: TokenPair | None) -> list[tuple[str, str, str, int]]:
    """(name, value, path, max_age) of the session cookies; the refresh cookie only goes
    to the routes that use it."""
    return [
        (
            settings.auth_cookie_name,
            pair.access_token if pair else "",
            "/",
            int(settings.access_token_ttl_s),
        ),
        (
            settings.refresh_cookie_name,
            pair.refresh_token if pair else "",
            "/v1/auth",
            int(settings.refresh_token_ttl_s),
        ),
    ]


def _pair_response(
    services: Services, pair: TokenPair, cookies: bool, extra: dict[str, Any] | None = None
) -> Response:
    response = JSONResponse(
        {**pair.as_json(), **(extra or {})}, headers={"Cache-Control": "no-store"}
    )
    if cookies:
        s = services.settings
        for name, value, path, max_age in _cookies(s, pair):
            response.set_cookie(
                name,
                value,
                max_age=max_age,
                path=path,
                secure=s.cookie_secure,
                httponly=True,
                samesite="strict",
            )
    return response


async def issue_token(request: Request) -> Response:
    services: Services = request.app.state.services
    expected = services.settings.auth_client_secret
    presented = bearer_token(request)
    if (
        expected is None
        or presented is None
        or not hmac.compare_digest(presented.encode(), expected.get_secret_value().encode())
    ):
        raise NotAuthenticated(
            "this route needs the client secret as a Bearer token", code="invalid_client"
        )
    body = await read_body(request, TokenGrant, max_bytes=MAX_AUTH_BODY)
    plan = _plan(services, body.plan)
    assert services.auth.refresh is not None
    pair = await services.auth.refresh.issue(body.sub, plan, body.scopes)
    return _pair_response(services, pair, body.cookie)


def _refresh_token(request: Request, body: RefreshBody) -> tuple[str, bool]:
    services: Services = request.app.state.services
    if body.refresh_token is not None:
        return body.refresh_token, False
    cookie = request.cookies.get(services.settings.refresh_cookie_name)
    if cookie:
        require_same_origin(request, services)
        return cookie, True
    raise NotAuthenticated(
        "send the refresh token in the body or its cookie", code="missing_credentials"
    )


async def refresh(request: Request) -> Response:
    services: Services = request.app.state.services
    body = await read_body(request, RefreshBody, max_bytes=MAX_AUTH_BODY, empty_ok=True)
    token, from_cookie = _refresh_token(request, body)
    assert services.auth.refresh is not None
    pair = await services.auth.refresh.refresh(token)
    return _pair_response(services, pair, from_cookie)


async def logout(request: Request) -> Response:
    services: Services = request.app.state.services
    body = await read_body(request, RefreshBody, max_bytes=MAX_AUTH_BODY, empty_ok=True)
    token, _ = _refresh_token(request, body)
    assert services.auth.refresh is not None
    await services.auth.refresh.logout(token)
    response = Response(status_code=204)
    s = services.settings
    for name, _, path, _ in _cookies(s, None):
        response.delete_cookie(
            name, path=path, secure=s.cookie_secure, httponly=True, samesite="strict"
        )
    return response


async def dev_token(request: Request) -> Response:
    services: Services = request.app.state.services
    body = await read_body(request, DevTokenGrant, max_bytes=MAX_AUTH_BODY, empty_ok=True)
    plan = _plan(services, body.plan)
    assert services.auth.refresh is not None
    pair = await services.auth.refresh.issue(body.sub, plan)
    return _pair_response(services, pair, body.cookie, {"sub": body.sub, "plan": plan})


def routes(settings: Settings) -> list[Route]:
    """Only the routes this configuration supports exist at all."""
    out: list[Route] = []
    if settings.signs:
        out += [
            Route("/v1/auth/refresh", refresh, methods=["POST"]),
            Route("/v1/auth/logout", logout, methods=["POST"]),
        ]
        if settings.auth_client_secret is not None:
            out.append(Route("/v1/auth/token", issue_token, methods=["POST"]))
    if settings.development:
        out.append(Route("/v1/auth/dev-token", dev_token, methods=["POST"]))
    return out
