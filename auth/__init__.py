"""Who is calling: access-token verification and issuing, and stream tickets."""

from ._exceptions import AuthError, NotAuthenticated, PermissionDenied
from .tickets import TicketService
from .tokens import MAX_TOKEN_BYTES, Principal, TokenIssuer, TokenVerifier

__all__ = [
    "MAX_TOKEN_BYTES",
    "AuthError",
    "NotAuthenticated",
    "PermissionDenied",
    "Principal",
    "TicketService",
    "TokenIssuer",
    "TokenVerifier",
]
