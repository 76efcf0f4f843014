"""Stream log implementations behind one interface."""

from .base import Control, Liveness, LogWriter, StreamInfo, StreamLog
from .memory import MemoryStreamLog
from .redis import RedisStreamLog

__all__ = [
    "Control",
    "Liveness",
    "LogWriter",
    "MemoryStreamLog",
    "RedisStreamLog",
    "StreamInfo",
    "StreamLog",
]
