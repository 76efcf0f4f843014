"""Who is calling: access-token verification (pinned keys, JWKS) and issuing, refresh
tokens with rotation and reuse detection, stream tickets, and API keys."""

from ._exceptions import AuthError, NotAuthenticated, PermissionDenied
from .apikeys import (
    API_KEY_PREFIX,
    ApiKeyRecord,
    ApiKeys,
    ApiKeyStore,
    ApiKeyStoreUnavailable,
    MemoryApiKeyStore,
    RedisApiKeyStore,
    is_api_key,
)
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
    "API_KEY_PREFIX",
    "HMAC_ALGS",
    "MAX_TOKEN_BYTES",
    "ApiKeyRecord",
    "ApiKeyStore",
    "ApiKeyStoreUnavailable",
    "ApiKeys",
    "AuthError",
    "Claims",
    "JWKSKeys",
    "MemoryApiKeyStore",
    "MemoryRefreshStore",
    "NotAuthenticated",
    "PermissionDenied",
    "Principal",
    "RedisApiKeyStore",
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
    "is_api_key",
    "load_key_specs",
    "parse_key_specs",
    "public_key",
    "secret_key",
]
