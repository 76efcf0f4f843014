"""Stream tickets: what lets an EventSource, which cannot send headers, read a stream.

A ticket names one stream and one subject and lives for minutes, so a URL that leaks into
a log or a browser history opens nothing else and nothing for long. It is signed with a
key derived from (never equal to) the access-token key, so a ticket is never an access
token and an access token is never a ticket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

from ._exceptions import NotAuthenticated
from .tokens import Principal

_AUDIENCE = "sserelay:stream"
_HEADER = b"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # {"alg":"HS256","typ":"JWT"}, as PyJWT writes it


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class TicketService:
    """Issues and verifies tickets: HS256 JWTs (RFC 7519) with the claims `sid`, `sub`,
    `plan`, `iat`, `exp` and `aud`.

    Signed and checked here with `hmac` rather than through a JWT library: there is one
    algorithm, one header and one issuer (this service), and a resumable stream issues
    and verifies one ticket per start, where PyJWT's generality cost about a tenth of
    the start's CPU. The tickets stay standard JWTs (a JWT library verifies them, and
    this verifies one a JWT library made with the same key)."""

    def __init__(self, secret: bytes, *, ttl_s: float = 300.0) -> None:
        self._key = hmac.new(secret, b"sserelay stream tickets", hashlib.sha256).digest()
        self.ttl_s = ttl_s

    def _sign(self, signing_input: bytes) -> bytes:
        return hmac.new(self._key, signing_input, hashlib.sha256).digest()

    def issue(self, stream_id: str, subject: str, plan: str) -> tuple[str, int]:
        now = int(time.time())
        expires = now + int(self.ttl_s)
        claims = {
            "sid": stream_id,
            "sub": subject,
            "plan": plan,
            "iat": now,
            "exp": expires,
            "aud": _AUDIENCE,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = _HEADER + b"." + payload
        return (signing_input + b"." + _b64(self._sign(signing_input))).decode(), expires

    def verify(self, ticket: str, stream_id: str) -> Principal:
        """Who the ticket was issued to, if it is valid for `stream_id`."""
        claims = self._claims(ticket)
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise _invalid()
        if exp <= time.time():
            raise NotAuthenticated("the stream ticket has expired", code="ticket_expired")
        if claims["sid"] != stream_id:
            raise NotAuthenticated("the stream ticket is for another stream", code="invalid_ticket")
        return Principal(str(claims["sub"]), str(claims["plan"]))

    def _claims(self, ticket: str) -> dict[str, Any]:
        """The claims of a ticket signed with this service's key, for this audience and
        with every claim a ticket has; anything else is `invalid_ticket`."""
        try:
            header, payload, signature = ticket.encode("ascii").split(b".")
            if header != _HEADER and json.loads(_unb64(header)).get("alg") != "HS256":
                raise _invalid()
            if not hmac.compare_digest(_unb64(signature), self._sign(header + b"." + payload)):
                raise _invalid()
            claims = json.loads(_unb64(payload))
        except (ValueError, TypeError, AttributeError, binascii.Error):
            raise _invalid() from None
        if not isinstance(claims, dict) or claims.get("aud") != _AUDIENCE:
            raise _invalid()
        if any(claims.get(name) is None for name in ("sub", "sid", "plan")):
            raise _invalid()
        return claims


def _invalid() -> NotAuthenticated:
    return NotAuthenticated("the stream ticket is not valid", code="invalid_ticket")
