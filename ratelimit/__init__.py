"""Plans and the limiter: strict sliding windows, reservations settled exactly once,
concurrency leases; one algorithm, a memory and a Redis backend."""

from ._exceptions import LimiterUnavailable, RateLimitError
from .base import Decision, Demand, Limiter, Reservation
from .memory import MemoryLimiter
from .plans import CustomLimit, Plan
from .recent import RecentDecisions
from .redis import RedisLimiter
from .windows import NANO_USD, WindowLimit, WindowState, evaluate

__all__ = [
    "NANO_USD",
    "CustomLimit",
    "Decision",
    "Demand",
    "Limiter",
    "LimiterUnavailable",
    "MemoryLimiter",
    "Plan",
    "RateLimitError",
    "RecentDecisions",
    "RedisLimiter",
    "Reservation",
    "WindowLimit",
    "WindowState",
    "evaluate",
]
