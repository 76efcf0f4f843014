"""Where credentials come from, per route: a Bearer header everywhere; on the events
URL also a stream ticket, because EventSource cannot send headers."""

from __future__ import annotations

from starlette.requests import Request

from auth import NotAuthenticated, Principal

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


def stream_reader(request: Request, stream_id: str) -> str:
    """The subject allowed to read `stream_id`: from its ticket, or from a Bearer token."""
    ticket = request.query_params.get("ticket")
    services: Services = request.app.state.services
    if ticket is not None:
        return services.tickets.verify(ticket, stream_id)
    return principal(request).subject
