"""Providers, the event pipeline, SSE events and the stream log.

Knows nothing of HTTP routing, auth or plans: the app hands it validated requests and
collaborators (a log, providers, prices) and gets numbered events back.
"""

from ._exceptions import (
    StreamFenced,
    StreamingError,
    StreamLogError,
    StreamNotFound,
    UpstreamError,
)
from ._tasks import cancel_and_wait
from .chunks import Attempt, Chunk, Stop, TextDelta, Usage
from .events import PING_FRAME, Event, EventEncoder, encode_data, retry_frame
from .jobs import Job, JobQueue, MemoryJobQueue, QueueError, RedisJobQueue
from .log import LogWriter, MemoryStreamLog, RedisStreamLog, StreamInfo, StreamLog, StreamStatus
from .manager import StreamManager
from .pacing import Pacer
from .pipeline import Generation, Meter, Outcome, PipelineOptions, Resume, coalesce, meter
from .providers import (
    AnthropicProvider,
    GenerationRequest,
    Message,
    OpenAIProvider,
    Provider,
    SimulatedProvider,
    estimate_tokens,
    simulated_text,
)
from .reader import follow
from .targets import Pricing, Target
from .upstream import UpstreamObserver, UpstreamPolicy, normalise, pump

__all__ = [
    "estimate_tokens",
    "StreamFenced",
    "RedisJobQueue",
    "QueueError",
    "MemoryJobQueue",
    "JobQueue",
    "Job",
    "PING_FRAME",
    "AnthropicProvider",
    "Attempt",
    "Chunk",
    "Event",
    "EventEncoder",
    "Generation",
    "GenerationRequest",
    "LogWriter",
    "MemoryStreamLog",
    "Message",
    "Meter",
    "OpenAIProvider",
    "Outcome",
    "Pacer",
    "PipelineOptions",
    "Pricing",
    "Provider",
    "RedisStreamLog",
    "Resume",
    "SimulatedProvider",
    "Stop",
    "StreamInfo",
    "StreamLog",
    "StreamLogError",
    "StreamManager",
    "StreamNotFound",
    "StreamingError",
    "Target",
    "TextDelta",
    "StreamStatus",
    "UpstreamError",
    "UpstreamObserver",
    "UpstreamPolicy",
    "Usage",
    "cancel_and_wait",
    "coalesce",
    "encode_data",
    "follow",
    "meter",
    "normalise",
    "pump",
    "retry_frame",
    "simulated_text",
]
