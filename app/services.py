"""What a request needs, built once by `wiring.build_services` and kept on `app.state`.

A plain container: it holds the parts and does nothing itself. What each part does lives
with it: settling and recording streams in `accounting`, plan reloads in `plans`, the
shutdown sequence in `drain`, the choice of memory or Redis in `wiring`.
"""

from __future__ import annotations

from dataclasses import dataclass

from auth import ApiKeys, TicketService, TokenVerifier
from ratelimit import Limiter, RecentDecisions
from streaming import JobQueue, PipelineOptions, Provider, StreamLog, StreamManager

from .accounting import StreamAccounting
from .authn import Auth
from .cache import ResponseCache
from .config import Config
from .drain import Drain
from .metrics import Metrics
from .plans import PlansHolder
from .records import RecordStore
from .redis_client import Breaker
from .settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    plans: PlansHolder
    auth: Auth
    apikeys: ApiKeys
    log: StreamLog
    queue: JobQueue
    manager: StreamManager
    providers: dict[str, Provider]
    options: PipelineOptions
    metrics: Metrics
    limiter: Limiter
    recent: RecentDecisions
    """Each caller's latest admission here, for the rate-limit headers of a request
    that follows at once (a stream's reader after its POST)."""
    records: RecordStore
    accounting: StreamAccounting
    cache: ResponseCache
    """The response cache (models with `cache:` in the config)."""
    drain: Drain
    breaker: Breaker | None
    """The Redis circuit breaker, when Redis is configured (for /readyz and logs)."""

    @property
    def config(self) -> Config:
        """Providers, models and the plans in force right now."""
        return self.plans.current

    @property
    def verifier(self) -> TokenVerifier:
        return self.auth.verifier

    @property
    def tickets(self) -> TicketService:
        return self.auth.tickets
