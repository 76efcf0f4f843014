"""Stream tickets are standard HS256 JWTs: what this service issues a JWT library
verifies, what a JWT library made with the same key this service verifies (tickets
issued before they were signed here stay valid), and anything else is refused with a
stable code."""

from __future__ import annotations

import time

import jwt
import pytest

from auth import TicketService
from auth._exceptions import NotAuthenticated

SECRET = b"s" * 32
AUDIENCE = "sserelay:stream"


@pytest.fixture
def tickets() -> TicketService:
    return TicketService(SECRET, ttl_s=60)


def refused(tickets: TicketService, ticket: str, stream_id: str = "s_1") -> str:
    with pytest.raises(NotAuthenticated) as caught:
        tickets.verify(ticket, stream_id)
    return caught.value.code


def test_an_issued_ticket_is_a_jwt_a_library_verifies(tickets: TicketService) -> None:
    ticket, expires = tickets.issue("s_1", "alice", "pro")
    claims = jwt.decode(ticket, tickets._key, algorithms=["HS256"], audience=AUDIENCE)
    assert claims["sid"] == "s_1" and claims["sub"] == "alice" and claims["plan"] == "pro"
    assert claims["exp"] == expires and 55 <= expires - time.time() <= 61
    assert jwt.get_unverified_header(ticket) == {"alg": "HS256", "typ": "JWT"}
    principal = tickets.verify(ticket, "s_1")
    assert (principal.subject, principal.plan) == ("alice", "pro")


def test_a_ticket_a_library_made_is_verified(tickets: TicketService) -> None:
    claims = {"sid": "s_1", "sub": "bob", "plan": "free", "aud": AUDIENCE}
    for headers in (None, {"kid": "k1"}):  # PyJWT's own header, and another one
        made = jwt.encode(
            {**claims, "iat": int(time.time()), "exp": int(time.time()) + 60},
            tickets._key,
            algorithm="HS256",
            headers=headers,
        )
        assert tickets.verify(made, "s_1").subject == "bob"


def test_what_is_not_a_valid_ticket_is_refused(tickets: TicketService) -> None:
    ticket, _ = tickets.issue("s_1", "alice", "pro")
    header, payload, signature = ticket.split(".")
    other_key = TicketService(b"o" * 32).issue("s_1", "alice", "pro")[0]
    unsigned = jwt.encode({"sid": "s_1", "sub": "a", "plan": "p", "aud": AUDIENCE}, None, "none")
    forged_alg = jwt.encode(  # the key, another algorithm
        {"sid": "s_1", "sub": "a", "plan": "p", "aud": AUDIENCE, "exp": int(time.time()) + 60},
        tickets._key * 2,
        algorithm="HS512",
    )

    def signed(claims: dict[str, object]) -> str:
        return jwt.encode(claims, tickets._key, algorithm="HS256")

    future = int(time.time()) + 60
    for bad in (
        f"{header}.{payload}.{signature[:-2]}AA",
        f"{header}.{payload}",
        f"{ticket}.x",
        other_key,
        unsigned,
        forged_alg,
        "",
        "é.é.é",
        "a.b.c",
        f"{header}.{payload}.!!!",
        signed({"sid": "s_1", "sub": "a", "plan": "p", "exp": future}),  # no audience
        signed({"sid": "s_1", "sub": "a", "plan": "p", "exp": future, "aud": "other"}),
        signed({"sid": "s_1", "plan": "p", "exp": future, "aud": AUDIENCE}),  # no subject
        signed({"sid": "s_1", "sub": "a", "plan": "p", "aud": AUDIENCE}),  # no expiry
        signed({"sid": "s_1", "sub": "a", "plan": "p", "exp": "soon", "aud": AUDIENCE}),
    ):
        assert refused(tickets, bad) == "invalid_ticket", bad
    assert refused(tickets, ticket, "s_2") == "invalid_ticket"  # another stream's


def test_an_expired_ticket_says_so() -> None:
    ticket, _ = TicketService(SECRET, ttl_s=-1).issue("s_1", "alice", "pro")
    assert refused(TicketService(SECRET), ticket) == "ticket_expired"
