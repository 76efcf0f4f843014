"""Where credentials come from, per route.

- `Authorization: Bearer <access token or API key>`, everywhere;
- `x-api-key: <API key or access token>` when there is no Authorization header (where
  Anthropic's API, and clients written for it, send the key);
- the access-token cookie (HttpOnly, Secure, SameSite=Strict), for pages served from the
  same origin; state-changing requests that carry it must come from this origin;
- a stream ticket (`?ticket=`) on the events URL only, because EventSource cannot send
  headers. Nowhere else is a credential read from the URL.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from auth import NotAuthenticated, PermissionDenied, Principal, is_api_key

from .limits import report, stash
from .services import Services

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def bearer_token(request: Request) -> str | None:
    values = request.headers.getlist("authorization")
    if not values:
        return None
    if len(values) > 1:
        raise NotAuthenticated("send exactly one Authorization header")
    scheme, _, token = values[0].partition(" ")
    # RFC 6750 makes the scheme case-insensitive; be exact about everything else.
    if scheme.lower() != "bearer" or not token or " " in token.strip():
        raise NotAuthenticated("use the Bearer scheme with exactly one token")
    return token.strip()


def api_key_header(request: Request) -> str | None:
    values = request.headers.getlist("x-api-key")
    if not values:
        return None
    if len(values) > 1:
        raise NotAuthenticated("send exactly one x-api-key header")
    value = values[0].strip()
    if not value or " " in value:
        raise NotAuthenticated("the x-api-key header must hold exactly one key or token")
    return value


def header_credential(request: Request) -> str | None:
    """The credential in the request's headers: Authorization first, else x-api-key."""
    token = bearer_token(request)
    return token if token is not None else api_key_header(request)


async def verify(services: Services, token: str) -> Principal:
    """An API key (`sk-...`) or an access token (JWT), whichever it is."""
    if is_api_key(token):
        return await services.apikeys.verify(token)
    return await services.verifier.verify(token)


def same_origin(request: Request, services: Services) -> bool:
    """Whether a browser request comes from this server's own pages (or an allowed
    origin). Host and port are compared, not the scheme: behind a TLS-terminating proxy
    the server sees http while the browser's Origin says https."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a cross-site browser request (those always send Origin)
    if origin in services.settings.cors_origin_list:
        return True
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[": not a URL, so not this server's
        return False
    return netloc == request.headers.get("host", "")


def require_same_origin(request: Request, services: Services) -> None:
    """For state-changing requests authenticated by a cookie (CSRF defence in depth on
    top of SameSite=Strict)."""
    if request.method not in _SAFE_METHODS and not same_origin(request, services):
        raise PermissionDenied(
            "a cookie-authenticated request from another origin", code="cross_origin_rejected"
        )


async def principal(request: Request) -> Principal:
    services: Services = request.app.state.services
    token = header_credential(request)
    if token is None:
        token = request.cookies.get(services.settings.auth_cookie_name)
        if token is not None:
            require_same_origin(request, services)
            # The cookie holds an access token only: an API key belongs to a server.
            return await services.verifier.verify(token)
    if token is None:
        raise NotAuthenticated(
            "send an access token or API key: Authorization: Bearer <token>",
            code="missing_credentials",
        )
    return await verify(services, token)


async def authorize(request: Request) -> Principal:
    """The caller, with their current rate-limit state attached to the response."""
    caller = await principal(request)
    stash(request.scope, await report(request.app.state.services, caller))
    return caller


async def stream_reader(request: Request, stream_id: str) -> Principal:
    """Who may read `stream_id`: from its ticket, or else as any other route."""
    services: Services = request.app.state.services
    ticket = request.query_params.get("ticket")
    if ticket is None:
        caller = await principal(request)
    else:
        caller = services.tickets.verify(ticket, stream_id)
        token = header_credential(request)
        if token is not None and (await verify(services, token)).subject != caller.subject:
            raise NotAuthenticated(
                "the stream ticket was issued to someone else", code="invalid_ticket"
            )
    if caller.plan in services.config.plans:
        stash(request.scope, await report(services, caller))
    return caller
