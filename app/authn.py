"""Builds the auth side from settings: which keys verify, which key signs, tickets,
refresh tokens. A bad key stops startup with a message naming the setting."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable, Collection
from dataclasses import dataclass

import httpx
import redis.asyncio as aioredis
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from auth import (
    Claims,
    JWKSKeys,
    MemoryRefreshStore,
    RedisRefreshStore,
    RefreshStore,
    RefreshTokens,
    SigningKey,
    TicketService,
    TokenIssuer,
    TokenVerifier,
    VerificationKey,
    load_key_specs,
    secret_key,
)

from .settings import Settings

logger = logging.getLogger("sserelay.auth")


class AuthConfigError(ValueError):
    """A key setting that cannot be used; the message names it."""


@dataclass
class Auth:
    verifier: TokenVerifier
    tickets: TicketService
    issuer: TokenIssuer | None
    """Present when this server may sign: a secret or a private key is configured (or
    development mode)."""
    refresh: RefreshTokens | None
    development: bool
    http: httpx.AsyncClient | None

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()


def _signing_key(settings: Settings) -> SigningKey | None:
    if settings.jwt_private_key_file is not None:
        try:
            key = load_pem_private_key(settings.jwt_private_key_file.read_bytes(), None)
            return SigningKey(settings.jwt_signing_alg, key, settings.jwt_signing_kid)
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise AuthConfigError(f"SSERELAY_JWT_PRIVATE_KEY_FILE: {exc}") from exc
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value().encode()
        return SigningKey(settings.jwt_algorithm, secret, settings.jwt_signing_kid)
    return None


def check_auth(settings: Settings) -> tuple[list[VerificationKey], SigningKey | None]:
    """The configured verification keys and signing key, or AuthConfigError naming the
    setting at fault. Run by `sserelay serve` before starting, so a bad key is one line."""
    try:
        keys = load_key_specs(settings.jwt_keys, settings.jwt_keys_file)
    except (OSError, ValueError, TypeError) as exc:
        raise AuthConfigError(f"SSERELAY_JWT_KEYS: {exc}") from exc
    signing = _signing_key(settings)
    if signing is not None:
        if signing.alg in ("HS256", "HS384", "HS512"):
            try:
                secret_key(signing.key, signing.alg)
            except ValueError as exc:
                raise AuthConfigError(f"SSERELAY_JWT_SECRET: {exc}") from exc
        keys.append(signing.verification_key())
    return keys, signing


def build_auth(
    settings: Settings,
    plans: Callable[[], Collection[str]],
    default_plan: Callable[[], str],
    redis: aioredis.Redis | None,
) -> Auth:
    development = settings.development
    keys, signing = check_auth(settings)
    if development:
        signing = SigningKey("HS256", secrets.token_bytes(32))
        keys.append(signing.verification_key())
        logger.warning(
            "development mode: no signing or verification key configured, so tokens are "
            "signed with a random key and the demo page may fetch one from /v1/auth/dev-token"
        )
    http = None
    jwks = None
    if settings.jwks_url and not settings.jwt_audience:
        logger.warning(
            "SSERELAY_JWKS_URL without SSERELAY_JWT_AUDIENCE: any token your identity "
            "provider signs, for any application, is accepted"
        )
    if settings.jwks_url:
        http = httpx.AsyncClient(timeout=httpx.Timeout(5.0))
        jwks = JWKSKeys(
            settings.jwks_url,
            http,
            cache_s=settings.jwks_cache_s,
            min_refetch_s=settings.jwks_min_refetch_s,
        )
    claims = Claims(
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        plan_claim=settings.jwt_plan_claim,
        leeway_s=settings.jwt_leeway_s,
        max_lifetime_s=settings.jwt_max_lifetime_s,
    )
    verifier = TokenVerifier(keys, plans=plans, default_plan=default_plan, claims=claims, jwks=jwks)
    issuer = refresh = None
    if signing is not None:
        issuer = TokenIssuer(
            signing,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            plan_claim=settings.jwt_plan_claim,
        )
        store: RefreshStore = (
            RedisRefreshStore(redis, prefix=settings.redis_prefix)
            if redis is not None
            else MemoryRefreshStore()
        )
        refresh = RefreshTokens(
            store,
            issuer,
            plans=plans,
            access_ttl_s=settings.access_token_ttl_s,
            refresh_ttl_s=settings.refresh_token_ttl_s,
            grace_s=settings.refresh_grace_s,
        )
    return Auth(
        verifier,
        TicketService(_ticket_secret(settings, signing), ttl_s=settings.ticket_ttl_s),
        issuer,
        refresh,
        development,
        http,
    )


def _ticket_secret(settings: Settings, signing: SigningKey | None) -> bytes:
    """Tickets need a secret every replica shares: a dedicated one, or one derived from
    the signing key. With verification keys only (an outside identity provider) and no
    ticket secret, tickets are valid on the issuing process only."""
    if settings.ticket_secret is not None:
        return settings.ticket_secret.get_secret_value().encode()
    if signing is not None:
        material = (
            signing.key
            if isinstance(signing.key, bytes)
            else signing.key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
        )
        return hmac.new(material, b"sserelay tickets", hashlib.sha256).digest()
    logger.warning("no SSERELAY_TICKET_SECRET: stream tickets work on this process only")
    return secrets.token_bytes(32)
