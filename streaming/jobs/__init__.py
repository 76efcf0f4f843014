"""The generation job queue behind one interface: in memory (one process) or a Redis
Stream consumer group (many API processes, many workers)."""

from .base import Job, JobQueue, QueueError
from .memory import MemoryJobQueue
from .redis import RedisJobQueue

__all__ = ["Job", "JobQueue", "MemoryJobQueue", "QueueError", "RedisJobQueue"]
