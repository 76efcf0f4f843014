"""A caller's latest decision stands in for a usage report for a moment, no longer, for
that caller under that plan only, and the memory it takes is bounded."""

from __future__ import annotations

from ratelimit import Decision, RecentDecisions


def _decision(now_ms: int, allowed: bool = True) -> Decision:
    return Decision(allowed, now_ms, ())


def test_a_decision_is_reused_until_it_is_too_old() -> None:
    now = [0.0]
    recent = RecentDecisions(max_age_s=1.0, clock=lambda: now[0])
    assert recent.get("alice", "free") is None
    first = _decision(1)
    recent.put("alice", "free", first)
    now[0] = 0.9
    assert recent.get("alice", "free") is first
    assert recent.get("bob", "free") is None  # someone else's state is never lent
    assert recent.get("alice", "pro") is None  # nor another plan's (a key and a token)
    refused = _decision(2, allowed=False)
    recent.put("alice", "free", refused)  # the newest decision wins, and its age restarts
    now[0] = 1.8
    assert recent.get("alice", "free") is refused
    now[0] = 2.0
    assert recent.get("alice", "free") is None
    assert len(recent) == 0  # an expired entry is dropped when found


def test_the_oldest_callers_are_dropped_past_the_bound() -> None:
    recent = RecentDecisions(max_entries=3)
    for name in "abcd":
        recent.put(name, "p", _decision(0))
    assert len(recent) == 3 and recent.get("a", "p") is None
    recent.put("b", "p", _decision(1))  # refreshed: now the newest
    recent.put("e", "p", _decision(0))
    assert recent.get("b", "p") is not None and recent.get("c", "p") is None


def test_a_zero_age_keeps_nothing() -> None:
    recent = RecentDecisions(max_age_s=0)
    recent.put("alice", "p", _decision(0))
    assert recent.get("alice", "p") is None and len(recent) == 0
