"""Verified tokens are remembered, and what is remembered is checked again on every use:
expiry, the plan, and (after the cache time) the signature's key."""

from __future__ import annotations

import asyncio

import pytest

from auth import Claims, NotAuthenticated, PermissionDenied, SigningKey, TokenIssuer, TokenVerifier

KEY = SigningKey("HS256", b"k" * 48)


def _verifier(plans: set[str], **options: float) -> TokenVerifier:
    return TokenVerifier(
        [KEY.verification_key()],
        plans=lambda: plans,
        default_plan=lambda: "pro",
        claims=Claims(leeway_s=0),
        **options,  # type: ignore[arg-type]
    )


def _token(sub: str = "alice", plan: str = "pro", ttl_s: int = 600) -> str:
    return TokenIssuer(KEY).issue(sub, plan, ttl_s=ttl_s)[0]


async def test_a_remembered_token_still_expires() -> None:
    verifier = _verifier({"pro"})
    token = _token(ttl_s=1)
    assert (await verifier.verify(token)).subject == "alice"
    assert (await verifier.verify(token)).subject == "alice"  # from the cache
    await asyncio.sleep(2.1)
    with pytest.raises(NotAuthenticated) as raised:
        await verifier.verify(token)
    assert raised.value.code == "token_expired"


async def test_a_remembered_token_loses_a_removed_plan() -> None:
    plans = {"pro", "gold"}
    verifier = _verifier(plans)
    token = _token(plan="gold")
    assert (await verifier.verify(token)).plan == "gold"
    plans.discard("gold")
    with pytest.raises(PermissionDenied):
        await verifier.verify(token)


async def test_a_withdrawn_key_stops_remembered_tokens_after_the_cache_time() -> None:
    verifier = _verifier({"pro"}, cache_s=0.3)
    token = _token()
    await verifier.verify(token)
    verifier._keys.clear()  # the key is withdrawn
    await verifier.verify(token)  # still remembered
    await asyncio.sleep(0.4)
    with pytest.raises(NotAuthenticated) as raised:
        await verifier.verify(token)
    assert raised.value.code == "unknown_key"
    fresh = _token(sub="bob")
    with pytest.raises(NotAuthenticated):  # never seen: refused at once
        await verifier.verify(fresh)


async def test_only_verified_tokens_are_remembered_and_at_most_cache_size() -> None:
    verifier = _verifier({"pro"}, cache_size=2)
    tokens = [_token(sub=f"user-{i}") for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier._verified) == 2
    forged = tokens[0][:-4] + ("AAAA" if not tokens[0].endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(NotAuthenticated):
            await verifier.verify(forged)
    assert len(verifier._verified) == 2
