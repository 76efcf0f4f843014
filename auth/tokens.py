"""Access tokens: JWT verification, and signing for the built-in issuer.

The algorithm a token is checked with always comes from the key (see `keys`), never
from the token. Required claims: `exp`, `iat`, `sub`; `iss` and `aud` when configured;
a small leeway; a maximum lifetime; a size cap checked before any parsing.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from ._exceptions import NotAuthenticated, PermissionDenied
from .keys import HMAC_ALGS, JWKSKeys, VerificationKey, check_key_type

MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and under which plan."""

    subject: str
    plan: str
    scopes: frozenset[str] = field(default_factory=frozenset)

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"this needs the {scope!r} scope", code="insufficient_scope")


@dataclass(frozen=True, slots=True)
class Claims:
    """What the verifier checks besides the signature."""

    issuer: str | None = None
    audience: str | None = None
    plan_claim: str = "plan"
    leeway_s: float = 30.0
    max_lifetime_s: float = 86400.0


class TokenVerifier:
    def __init__(
        self,
        keys: Sequence[VerificationKey],
        *,
        plans: Callable[[], Collection[str]],
        default_plan: Callable[[], str],
        claims: Claims | None = None,
        jwks: JWKSKeys | None = None,
        cache_size: int = 10_000,
        cache_s: float = 300.0,
    ) -> None:
        """`plans` and `default_plan` are read on every call, so a plan reload applies
        to the next request without rebuilding the verifier.

        A token whose signature verified is remembered (by its SHA-256, at most
        `cache_size` of them, the oldest forgotten first) until it expires, or for
        `cache_s` at most: a client sends the same token with every request, and
        checking a signature costs twenty times more than everything else here. The
        claims are checked again on every use (expiry, the plan still existing); only
        the signature is not, so a verification key withdrawn (from the JWKS, say)
        stops accepting tokens already seen after `cache_s`, new ones at once."""
        self._verified: dict[bytes, tuple[dict[str, Any], float]] = {}
        self._cache_s = cache_s
        self._cache_size = cache_size
        self._keys = list(keys)
        self._jwks = jwks
        self._plans = plans
        self._default_plan = default_plan
        self._claims = claims or Claims()

    async def _candidates(self, kid: str | None, alg: str) -> list[VerificationKey]:
        keys = [k for k in self._keys if k.alg == alg and (kid is None or k.kid in (kid, None))]
        if not keys and self._jwks is not None and alg not in HMAC_ALGS:
            found = await self._jwks.find(kid)
            if found is not None and found.alg == alg:
                keys = [found]
        return keys

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise NotAuthenticated("the token is too large")
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(digest)
        if known is not None:
            claims, until = known
            now = time.time()
            if now <= until:
                if now > claims["exp"] + self._claims.leeway_s:
                    raise NotAuthenticated("the token has expired", code="token_expired")
                return self._principal(claims)
            del self._verified[digest]  # verified again below
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise NotAuthenticated("the token is not a well-formed JWT") from exc
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or (kid is not None and not isinstance(kid, str)):
            raise NotAuthenticated("the token header is not valid")
        candidates = await self._candidates(kid, alg)
        if not candidates:
            raise NotAuthenticated(
                "no key matches the token's key id and algorithm", code="unknown_key"
            )
        c = self._claims
        last_error: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.alg],
                    audience=c.audience,
                    issuer=c.issuer,
                    leeway=c.leeway_s,
                    options={
                        "require": ["exp", "iat", "sub"],
                        "verify_aud": c.audience is not None,
                    },
                )
                break
            except jwt.ExpiredSignatureError as exc:
                raise NotAuthenticated("the token has expired", code="token_expired") from exc
            except jwt.InvalidSignatureError as exc:
                last_error = exc  # maybe another key with this kid and alg
            except jwt.PyJWTError as exc:
                raise NotAuthenticated(f"the token is not valid: {exc}") from exc
        else:
            raise NotAuthenticated(f"the token is not valid: {last_error}")
        principal = self._principal(claims)
        if self._cache_size > 0:
            if len(self._verified) >= self._cache_size:
                del self._verified[next(iter(self._verified))]
            self._verified[digest] = (claims, time.time() + self._cache_s)
        return principal

    def _principal(self, claims: dict[str, Any]) -> Principal:
        c = self._claims
        now = time.time()
        iat, exp = claims["iat"], claims["exp"]
        # PyJWT accepts a numeric string for exp ("9999999999"); times must be numbers.
        if not (_is_time(iat) and _is_time(exp) and _is_time(claims.get("nbf", 0))):
            raise NotAuthenticated("the token's times (iat, exp, nbf) must be numbers")
        if iat > now + c.leeway_s:
            raise NotAuthenticated("the token was issued in the future")
        if exp - iat > c.max_lifetime_s:
            raise NotAuthenticated("the token lives longer than this server accepts")
        subject = claims.get("sub")
        if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
            raise NotAuthenticated("the token's subject is missing or not printable text")
        if claims.get("typ") not in (None, "access"):
            raise NotAuthenticated("the token is not an access token")
        plan = claims.get(c.plan_claim, self._default_plan())
        if not isinstance(plan, str) or plan not in self._plans():
            raise PermissionDenied(
                "the token names a plan that does not exist", code="unknown_plan"
            )
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Principal(subject, plan, scopes)


# A subject becomes a Redis key, a log field and a JSON value: 1 to 256 characters, none
# of them a control character or an unpaired surrogate (which nothing can encode).
_SUBJECT = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,256}")


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class SigningKey:
    alg: str
    key: Any
    """bytes for HS*, a `cryptography` private key otherwise."""
    kid: str | None = None

    def __post_init__(self) -> None:
        if self.alg in HMAC_ALGS:
            if not isinstance(self.key, bytes):
                raise ValueError(f"{self.alg} signs with a shared secret, not a private key")
        else:
            check_key_type(self.key, self.alg)

    def verification_key(self) -> VerificationKey:
        public = self.key if self.alg in HMAC_ALGS else self.key.public_key()
        return VerificationKey(self.alg, public, self.kid)


class TokenIssuer:
    """Signs access tokens that this server's verifier accepts."""

    def __init__(
        self,
        signing: SigningKey,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        plan_claim: str = "plan",
    ) -> None:
        self._signing = signing
        self._issuer = issuer
        self._audience = audience
        self._plan_claim = plan_claim

    def issue(
        self, subject: str, plan: str, *, ttl_s: float = 900, scopes: Collection[str] = ()
    ) -> tuple[str, int]:
        now = int(time.time())
        expires = now + int(ttl_s)
        claims: dict[str, object] = {
            "sub": subject,
            self._plan_claim: plan,
            "iat": now,
            "exp": expires,
            "typ": "access",
        }
        if scopes:
            claims["scope"] = " ".join(sorted(scopes))
        if self._issuer:
            claims["iss"] = self._issuer
        if self._audience:
            claims["aud"] = self._audience
        headers = {"kid": self._signing.kid} if self._signing.kid else None
        token = jwt.encode(claims, self._signing.key, algorithm=self._signing.alg, headers=headers)
        return token, expires
