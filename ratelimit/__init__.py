"""Plans and their limits."""

from .plans import Plan

__all__ = ["Plan"]
