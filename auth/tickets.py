"""Stream tickets: what lets an EventSource, which cannot send headers, read a stream.

A ticket names one stream and one subject and lives for minutes, so a URL that leaks into
a log or a browser history opens nothing else and nothing for long. It is signed with a
key derived from (never equal to) the access-token key, so a ticket is never an access
token and an access token is never a ticket.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import jwt

from ._exceptions import NotAuthenticated
from .tokens import Principal

_AUDIENCE = "sserelay:stream"


class TicketService:
    def __init__(self, secret: bytes, *, ttl_s: float = 300.0) -> None:
        self._key = hmac.new(secret, b"sserelay stream tickets", hashlib.sha256).digest()
        self.ttl_s = ttl_s

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
        return jwt.encode(claims, self._key, algorithm="HS256"), expires

    def verify(self, ticket: str, stream_id: str) -> Principal:
        """Who the ticket was issued to, if it is valid for `stream_id`."""
        try:
            claims = jwt.decode(
                ticket,
                self._key,
                algorithms=["HS256"],
                audience=_AUDIENCE,
                options={"require": ["exp", "sub", "sid", "plan"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise NotAuthenticated("the stream ticket has expired", code="ticket_expired") from exc
        except jwt.PyJWTError as exc:
            raise NotAuthenticated("the stream ticket is not valid", code="invalid_ticket") from exc
        if claims["sid"] != stream_id:
            raise NotAuthenticated("the stream ticket is for another stream", code="invalid_ticket")
        return Principal(str(claims["sub"]), str(claims["plan"]))
