"""Who is calling: access-token verification (pinned keys, JWKS) and issuing, refresh
tokens with rotation and reuse detection, and stream tickets."""

from ._exceptions import AuthError, NotAuthenticated, PermissionDenied
from .keys import (
    ALGORITHMS,
    HMAC_ALGS,
    JWKSKeys,
    VerificationKey,
    load_key_specs,
    parse_key_specs,
    public_key,
    secret_key,
)
from .refresh import (
    MemoryRefreshStore,
    RedisRefreshStore,
    RefreshConflict,
    RefreshStore,
    RefreshStoreUnavailable,
    RefreshTokens,
    TokenPair,
)
from .tickets import TicketService
from .tokens import MAX_TOKEN_BYTES, Claims, Principal, SigningKey, TokenIssuer, TokenVerifier

__all__ = [
    "ALGORITHMS",
    "HMAC_ALGS",
    "MAX_TOKEN_BYTES",
    "AuthError",
    "Claims",
    "JWKSKeys",
    "MemoryRefreshStore",
    "NotAuthenticated",
    "PermissionDenied",
    "Principal",
    "RedisRefreshStore",
    "RefreshConflict",
    "RefreshStore",
    "RefreshStoreUnavailable",
    "RefreshTokens",
    "SigningKey",
    "TicketService",
    "TokenIssuer",
    "TokenPair",
    "TokenVerifier",
    "VerificationKey",
    "load_key_specs",
    "parse_key_specs",
    "public_key",
    "secret_key",
]
