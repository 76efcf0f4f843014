"""The development token route: present only when no signing key is configured, so the
demo works on a laptop with zero setup and cannot exist in production."""

from __future__ import annotations

import json
import re

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ProblemError
from ..services import Services

_SUBJECT = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


async def dev_token(request: Request) -> Response:
    services: Services = request.app.state.services
    assert services.issuer is not None
    raw = await request.body()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ProblemError(400, "invalid_json", "the body is not valid JSON") from exc
    if not isinstance(body, dict) or set(body) - {"sub", "plan"}:
        raise ProblemError(422, "invalid_request", "the body may only have `sub` and `plan`")
    subject = body.get("sub", "demo-user")
    plan = body.get("plan", services.config.default_plan)
    if not isinstance(subject, str) or not _SUBJECT.match(subject):
        raise ProblemError(422, "invalid_request", "`sub` must be 1-64 of A-Z a-z 0-9 . _ @ -")
    if plan not in services.config.plans:
        raise ProblemError(422, "unknown_plan", f"no plan named {plan!r}")
    ttl = services.settings.dev_token_ttl_s
    token, _ = services.issuer.issue(subject, plan, ttl_s=ttl)
    return JSONResponse(
        {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": int(ttl),
            "sub": subject,
            "plan": plan,
        }
    )


dev_routes = [Route("/v1/auth/dev-token", dev_token, methods=["POST"])]
