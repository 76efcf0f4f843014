"""Where credentials come from, per route: a Bearer header everywhere; on the events
URL also a stream ticket, because EventSource cannot send headers."""

from __future__ import annotations

from starlette.requests import Request

from auth import NotAuthenticated, Principal

from .limits import report
from .services import Services


def bearer_token(request: Request) -> str:
    values = request.headers.getlist("authorization")
    if not values:
        raise NotAuthenticated(
            "send an access token: Authorization: Bearer <token>", code="missing_credentials"
        )
    if len(values) > 1:
        raise NotAuthenticated("send exactly one Authorization header")
    scheme, _, token = values[0].partition(" ")
    # RFC 6750 makes the scheme case-insensitive; be exact about everything else.
    if scheme.lower() != "bearer" or not token or " " in token.strip():
        raise NotAuthenticated("use the Bearer scheme with exactly one token")
    return token.strip()


def principal(request: Request) -> Principal:
    services: Services = request.app.state.services
    return services.verifier.verify(bearer_token(request))


async def authorize(request: Request) -> Principal:
    """The caller, with their current rate-limit state attached to the response."""
    caller = principal(request)
    await report(request, caller)
    return caller


async def stream_reader(request: Request, stream_id: str) -> Principal:
    """Who may read `stream_id`: from its ticket, or from a Bearer token."""
    ticket = request.query_params.get("ticket")
    services: Services = request.app.state.services
    caller = (
        services.tickets.verify(ticket, stream_id) if ticket is not None else principal(request)
    )
    if caller.plan in services.config.plans:
        await report(request, caller)
    return caller
