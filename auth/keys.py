"""Verification keys, each pinned to exactly one algorithm.

A key never comes with "whatever algorithm the token names": an HMAC secret verifies
only HS*, an RSA public key only RS*/PS*, and so on, checked when the key is loaded. So
`alg: none` has no key to match and the HS256-signed-with-the-public-key confusion
cannot happen: a public key is never used as an HMAC secret.

Keys come from settings (shared secrets, PEM public keys, several at once for rotation)
or from a JWKS URL, fetched without blocking the event loop, cached, and refetched on an
unknown `kid` at most every `min_refetch_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

logger = logging.getLogger("sserelay.auth")

HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
ALGORITHMS = HMAC_ALGS | RSA_ALGS | frozenset(EC_CURVES) | {"EdDSA"}
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class VerificationKey:
    alg: str
    key: Any
    """bytes for HMAC; a `cryptography` public key otherwise."""
    kid: str | None = None


def secret_key(secret: bytes, alg: str = "HS256", kid: str | None = None) -> VerificationKey:
    if alg not in HMAC_ALGS:
        raise ValueError(f"a shared secret can only be used with HS256/384/512, not {alg}")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"an HMAC secret must be at least {MIN_SECRET_BYTES} bytes")
    return VerificationKey(alg, secret, kid)


def public_key(pem: str | bytes, alg: str, kid: str | None = None) -> VerificationKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise ValueError("not a PEM public key") from exc
    check_key_type(key, alg)
    return VerificationKey(alg, key, kid)


def check_key_type(key: Any, alg: str) -> None:
    """Refuse a key that does not belong to `alg` (the pin)."""
    if alg in RSA_ALGS:
        ok = isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey)
    elif alg in EC_CURVES:
        ok = isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
            key.curve.name == EC_CURVES[alg]
        )
    elif alg == "EdDSA":
        ok = isinstance(
            key,
            ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey
            | ed25519.Ed25519PrivateKey
            | ed448.Ed448PrivateKey,
        )
    else:
        ok = False
    if not ok:
        raise ValueError(f"this key cannot be used with {alg}")


def parse_key_specs(specs: Iterable[Mapping[str, Any]]) -> list[VerificationKey]:
    """`[{kid?, alg, secret | public_key | public_key_file}]`, the `SSERELAY_JWT_KEYS`
    format (JSON)."""
    keys = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"key {i}: must be an object")
        kid = spec.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise ValueError(f"key {i}: kid must be a string")
        where = f"key {i}" + (f" ({kid})" if kid else "")
        unknown = set(spec) - {"kid", "alg", "secret", "public_key", "public_key_file"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        alg = spec.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            raise ValueError(f"{where}: alg must be one of {sorted(ALGORITHMS)}")
        try:
            if "secret" in spec:
                keys.append(secret_key(str(spec["secret"]).encode(), alg, kid))
            elif "public_key" in spec:
                keys.append(public_key(spec["public_key"], alg, kid))
            elif "public_key_file" in spec:
                keys.append(public_key(Path(spec["public_key_file"]).read_bytes(), alg, kid))
            else:
                raise ValueError("needs secret, public_key or public_key_file")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc
    return keys


def load_key_specs(raw_json: str | None, path: Path | None) -> list[VerificationKey]:
    specs: list[Any] = []
    for source in (raw_json, path.read_text() if path else None):
        if source:
            value = json.loads(source)
            specs.extend(value if isinstance(value, list) else [value])
    return parse_key_specs(specs)


def _jwk_alg(jwk: Mapping[str, Any]) -> str | None:
    """The JWK's own `alg`, or the one its key type implies."""
    if isinstance(jwk.get("alg"), str):
        return str(jwk["alg"])
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC":
        return {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(str(crv))
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return "EdDSA"
    return None


class JWKSKeys:
    """Keys from a JWKS URL. Only asymmetric keys are taken (an `oct` key published in a
    JWKS would be a shared secret in public)."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        cache_s: float = 300.0,
        min_refetch_s: float = 30.0,
    ) -> None:
        self.url = url
        self._client = client
        self._cache_s = cache_s
        self._min_refetch_s = min_refetch_s
        self._keys: dict[str | None, VerificationKey] = {}
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def find(self, kid: str | None) -> VerificationKey | None:
        now = time.monotonic()
        if now - self._fetched_at > self._cache_s:
            await self._refresh(now)
        key = self._keys.get(kid)
        if key is None and time.monotonic() - self._fetched_at >= self._min_refetch_s:
            # An unknown kid may be a key the issuer just rotated in: look once more,
            # but not on every request (a flood of bogus kids must not flood the IdP).
            await self._refresh(time.monotonic())
            key = self._keys.get(kid)
        return key

    async def _refresh(self, started: float) -> None:
        async with self._lock:
            if self._fetched_at >= started:
                return  # another request refreshed while this one waited
            self._fetched_at = time.monotonic()
            try:
                response = await self._client.get(self.url)
                response.raise_for_status()
                document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning(
                    "cannot fetch JWKS from %s: %s (keeping %d cached keys)",
                    self.url,
                    exc,
                    len(self._keys),
                )
                return
            keys: dict[str | None, VerificationKey] = {}
            for jwk in document.get("keys", []) if isinstance(document, dict) else []:
                if not isinstance(jwk, dict) or jwk.get("kty") == "oct":
                    continue
                if jwk.get("use") not in (None, "sig"):
                    continue
                alg = _jwk_alg(jwk)
                if alg not in ALGORITHMS or alg in HMAC_ALGS:
                    continue
                try:
                    key = jwt.PyJWK(jwk, algorithm=alg).key
                    check_key_type(key, alg)
                except (jwt.PyJWTError, ValueError) as exc:
                    logger.warning("skipping JWKS key %s: %s", jwk.get("kid"), exc)
                    continue
                kid = jwk.get("kid") if isinstance(jwk.get("kid"), str) else None
                keys[kid] = VerificationKey(alg, key, kid)
            self._keys = keys
