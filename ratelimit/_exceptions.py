"""Errors raised by the ratelimit package.

RateLimitError           base
└── LimiterUnavailable   the backend (Redis) failed; the caller picks fail-open or closed
"""

from __future__ import annotations


class RateLimitError(Exception):
    code = "rate_limit_error"


class LimiterUnavailable(RateLimitError):
    code = "limiter_unavailable"
