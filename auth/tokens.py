"""Access tokens: JWT verification (and issuing, for the built-in issuer).

Algorithms are pinned per key, never read from the token, so `alg: none` and
algorithm-confusion tokens fail by construction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import jwt

from ._exceptions import NotAuthenticated, PermissionDenied

MAX_TOKEN_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, and under which plan."""

    subject: str
    plan: str
    scopes: frozenset[str] = field(default_factory=frozenset)


class TokenVerifier:
    def __init__(
        self,
        secret: bytes,
        *,
        plans: Collection[str],
        default_plan: str,
        issuer: str | None = None,
        audience: str | None = None,
        plan_claim: str = "plan",
        leeway_s: float = 30.0,
        algorithms: Sequence[str] = ("HS256",),
    ) -> None:
        self._secret = secret
        self._plans = frozenset(plans)
        self._default_plan = default_plan
        self._issuer = issuer
        self._audience = audience
        self._plan_claim = plan_claim
        self._leeway = leeway_s
        self._algorithms = list(algorithms)

    def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_BYTES:
            raise NotAuthenticated("the token is too large")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub"], "verify_aud": self._audience is not None},
            )
        except jwt.ExpiredSignatureError as exc:
            raise NotAuthenticated("the token has expired", code="token_expired") from exc
        except jwt.PyJWTError as exc:
            raise NotAuthenticated(f"the token is not valid: {exc}") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise NotAuthenticated("the token has no subject")
        if claims.get("typ") not in (None, "access"):
            raise NotAuthenticated("the token is not an access token")
        plan = claims.get(self._plan_claim, self._default_plan)
        if plan not in self._plans:
            raise PermissionDenied(
                "the token names a plan that does not exist", code="unknown_plan"
            )
        scope = claims.get("scope", "")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset()
        return Principal(subject, plan, scopes)


class TokenIssuer:
    """Signs access tokens with the same key the verifier checks (HS256)."""

    def __init__(
        self,
        secret: bytes,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        plan_claim: str = "plan",
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._plan_claim = plan_claim

    def issue(
        self, subject: str, plan: str, *, ttl_s: float = 3600, scopes: Collection[str] = ()
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
        return jwt.encode(claims, self._secret, algorithm="HS256"), expires
