"""Stream log implementations behind one interface."""

from .base import STREAM_STATUSES, Control, Liveness, LogWriter, StreamInfo, StreamLog, StreamStatus
from .memory import MemoryStreamLog
from .redis import RedisStreamLog

__all__ = [
    "STREAM_STATUSES",
    "Control",
    "Liveness",
    "LogWriter",
    "MemoryStreamLog",
    "RedisStreamLog",
    "StreamInfo",
    "StreamLog",
    "StreamStatus",
]
