"""A caller's latest admission stands in for a usage report for a moment, no longer,
and the memory it takes is bounded."""

from __future__ import annotations

from ratelimit import Decision, RecentDecisions


def _decision(now_ms: int) -> Decision:
    return Decision(True, now_ms, ())


def test_a_decision_is_reused_until_it_is_too_old() -> None:
    now = [0.0]
    recent = RecentDecisions(max_age_s=1.0, clock=lambda: now[0])
    assert recent.get("alice") is None
    first = _decision(1)
    recent.put("alice", first)
    now[0] = 0.9
    assert recent.get("alice") is first
    assert recent.get("bob") is None  # someone else's state is never lent
    later = _decision(2)
    recent.put("alice", later)  # the newest decision wins, and its age restarts
    now[0] = 1.8
    assert recent.get("alice") is later
    now[0] = 2.0
    assert recent.get("alice") is None
    assert len(recent) == 0  # an expired entry is dropped when found


def test_the_oldest_callers_are_dropped_past_the_bound() -> None:
    recent = RecentDecisions(max_entries=3)
    for name in "abcd":
        recent.put(name, _decision(0))
    assert len(recent) == 3 and recent.get("a") is None
    recent.put("b", _decision(1))  # refreshed: now the newest
    recent.put("e", _decision(0))
    assert recent.get("b") is not None and recent.get("c") is None


def test_a_zero_age_keeps_nothing() -> None:
    recent = RecentDecisions(max_age_s=0)
    recent.put("alice", _decision(0))
    assert recent.get("alice") is None and len(recent) == 0
