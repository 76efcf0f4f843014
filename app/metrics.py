"""Prometheus metrics, on a registry owned by the app (never the global one), with
label children bound once per stream rather than looked up per token."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ratelimit import Decision
from streaming import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST

_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60)


class Metrics:
    def __init__(self, active_streams: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.streams_started = Counter(
            "sserelay_streams_started", "Streams started", ["route", "plan", "model"], registry=r
        )
        self.streams_finished = Counter(
            "sserelay_streams_finished",
            "Streams finished, by outcome",
            ["route", "plan", "model", "outcome"],
            registry=r,
        )
        self.streams_active = Gauge(
            "sserelay_streams_active",
            "Resumable streams generating in this process",
            registry=r,
        )
        self.streams_active.set_function(lambda: float(active_streams()))
        self.ttft = Histogram(
            "sserelay_time_to_first_token_seconds",
            "Time from request to first text",
            ["model"],
            buckets=_LLM_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "sserelay_stream_duration_seconds",
            "Stream duration",
            ["model", "outcome"],
            buckets=_LLM_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "sserelay_tokens", "Tokens billed", ["plan", "model", "direction"], registry=r
        )
        self.cost = Counter(
            "sserelay_cost_usd", "Cost billed in USD", ["plan", "model"], registry=r
        )
        self.upstream_retries = Counter(
            "sserelay_upstream_retries", "Upstream attempts retried", ["model"], registry=r
        )
        self.limiter_decisions = Counter(
            "sserelay_limiter_decisions",
            "Admission decisions, by the limit that refused",
            ["plan", "limit", "result"],
            registry=r,
        )
        self.limiter_errors = Counter(
            "sserelay_limiter_backend_errors", "Limiter backend (Redis) failures", registry=r
        )
        self.resumes = Counter(
            "sserelay_stream_resumes",
            "Readers resuming a stream after Last-Event-ID",
            registry=r,
        )

    def stream_started(self, route: str, plan: str, model: str) -> None:
        self.streams_started.labels(route, plan, model).inc()

    def stream_finished(self, route: str, plan: str, model: str, outcome: Outcome) -> None:
        self.streams_finished.labels(route, plan, model, outcome.status).inc()
        if outcome.ttft_ms is not None:
            self.ttft.labels(model).observe(outcome.ttft_ms / 1000)
        self.duration.labels(model, outcome.status).observe(outcome.duration_ms / 1000)
        self.tokens.labels(plan, model, "input").inc(outcome.input_tokens)
        self.tokens.labels(plan, model, "output").inc(outcome.output_tokens)
        self.cost.labels(plan, model).inc(outcome.cost_usd)
        if outcome.retries:
            self.upstream_retries.labels(model).inc(outcome.retries)

    def limiter_decision(self, plan: str, decision: Decision) -> None:
        if decision.allowed:
            self.limiter_decisions.labels(plan, "all", "allowed").inc()
        for name in decision.violated:
            self.limiter_decisions.labels(plan, name, "refused").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
