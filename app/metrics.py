"""Prometheus metrics, on a registry owned by the app (never the global one).

Names: `sserelay_` prefix, base units, `_total` counters, no per-user labels. Per-token
paths never look labels up: a stream binds its label children once (`for_stream`).

Every series a configured plan or model can produce exists at zero from startup
(`prime`, again after each plan reload). `rate()` and `increase()` only count what grew
between two samples of a series: one born holding its first increment (the first
stream's tokens, say) reads as no increase at all.

With several worker processes (`sserelay serve --workers N`), the CLI sets
`PROMETHEUS_MULTIPROC_DIR` before any worker starts: every worker writes its values
there, `/metrics` on any worker shows the sum, gauges count only live workers, and a
worker that starts clears what dead ones left behind.
"""

from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as mp
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ratelimit import Decision
from streaming import Outcome, Pacer
from streaming.log import STREAM_STATUSES

if TYPE_CHECKING:
    from .config import Config

CONTENT_TYPE = CONTENT_TYPE_LATEST
VERSION = "0.1.0"

_LLM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60)
_GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_EVENTS = ("start", "delta", "progress", "done", "error", "continued")
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_CONTINUATION_REASONS = (
    "takeover",
    "upstream_dropped",
    "upstream_timeout",
    "upstream_overloaded",
    "upstream_unavailable",
    "upstream_rate_limited",
    "upstream_unreachable",
)

# What `prime` creates children for. Values outside these lists (a new error code, say)
# still work: their series just appear with their first increment.
ROUTES = ("streams", "chat")
OUTCOMES = tuple(status for status in STREAM_STATUSES if status != "running")
_DIRECTIONS = ("input", "output")
_UPSTREAM_KINDS = (
    "upstream_auth_failed",
    "upstream_dropped",
    "upstream_overloaded",
    "upstream_protocol_error",
    "upstream_rate_limited",
    "upstream_rejected",
    "upstream_timeout",
    "upstream_unavailable",
    "upstream_unreachable",
)
_AUTH_REASONS = (
    "missing_credentials",
    "invalid_token",
    "token_expired",
    "unknown_key",
    "unknown_plan",
    "insufficient_scope",
    "forbidden",
    "invalid_ticket",
    "ticket_expired",
    "cross_origin_rejected",
    "invalid_client",
    "invalid_refresh_token",
    "refresh_token_reused",
    "refresh_token_revoked",
    "refresh_conflict",
    "auth_store_unavailable",
    "invalid_api_key",
    "api_key_expired",
)
_RATINGS = ("up", "down", "1", "2", "3", "4", "5")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def clear_dead_workers(directory: str) -> None:
    """Live gauges of workers that died (a crash, a restart) must stop counting."""
    for path in Path(directory).glob("*.db"):
        match = re.search(r"_(\d+)\.db$", path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mp.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass


@dataclass
class StreamMetrics:
    """One stream's label children, bound once; the pipeline calls these per chunk."""

    requests: Counter
    gaps: Histogram
    ttft: Histogram
    errors: Counter
    provider: str
    model: str
    continuations: Counter

    def attempt(self) -> None:
        self.requests.inc()

    def failed(self, code: str) -> None:
        self.errors.labels(self.provider, self.model, code).inc()

    def gap(self, seconds: float) -> None:
        self.gaps.observe(seconds)

    def first_token(self, seconds: float) -> None:
        """Observed as the first text is relayed, not when the stream ends: a long
        stream's time to first token is on the dashboard at once."""
        self.ttft.observe(seconds)

    def continued(self, reason: str) -> None:
        self.continuations.labels(reason).inc()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_dir()
        if self.multiprocess:
            clear_dead_workers(self.multiprocess)
        r = self.registry
        self.http_requests = Counter(
            "sserelay_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.http_duration = Histogram(
            "sserelay_http_request_duration_seconds",
            "HTTP request duration (for SSE routes: the whole stream)",
            ["route", "method"],
            buckets=_HTTP_BUCKETS,
            registry=r,
        )
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
            "Streams generating now",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
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
        self.gaps = Histogram(
            "sserelay_inter_token_gap_seconds",
            "Time between consecutive text chunks from the provider",
            ["model"],
            buckets=_GAP_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "sserelay_tokens", "Tokens billed", ["plan", "model", "direction"], registry=r
        )
        self.cost = Counter(
            "sserelay_cost_usd", "Cost billed in USD", ["plan", "model"], registry=r
        )
        self.events = Counter(
            "sserelay_sse_events_sent", "SSE events written to clients", ["event"], registry=r
        )
        self.event_children = {name: self.events.labels(name) for name in _EVENTS}
        self.upstream_requests = Counter(
            "sserelay_upstream_requests",
            "Requests sent to providers (each attempt)",
            ["provider", "model"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "sserelay_upstream_errors",
            "Provider failures, by kind",
            ["provider", "model", "kind"],
            registry=r,
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
        self.auth_failures = Counter(
            "sserelay_auth_failures", "Refused credentials, by reason", ["reason"], registry=r
        )
        self.feedback = Counter(
            "sserelay_feedback", "User feedback on answers, by rating", ["rating"], registry=r
        )
        self.resumes = Counter(
            "sserelay_stream_resumes",
            "Readers resuming a stream after Last-Event-ID",
            registry=r,
        )
        self.queue_depth = Gauge(
            "sserelay_queue_depth",
            "Generation jobs waiting for a worker (queued, not yet claimed)",
            registry=r,
            multiprocess_mode="max",
        )
        self.queue_wait = Histogram(
            "sserelay_queue_wait_seconds",
            "Time a generation job waited in the queue before a worker claimed it",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.coalesce_window = Gauge(
            "sserelay_coalesce_window_seconds",
            "How long text may be held to merge it into one event now: the configured "
            "window when idle, wider as the process gets busy",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.process_busy = Gauge(
            "sserelay_process_busy_ratio",
            "Share of one CPU this process used over the last pacing sample",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.generations_active = Gauge(
            "sserelay_generations_active",
            "Generations this process is running now (its worker role)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.takeovers = Counter(
            "sserelay_takeovers",
            "Generations taken over from a worker that stopped renewing its lease",
            registry=r,
        )
        self.continuations = Counter(
            "sserelay_continuations",
            "Answers continued in a new attempt, by what ended the previous one",
            ["reason"],
            registry=r,
        )
        self.fenced = Counter(
            "sserelay_fenced_writes",
            "Generations stopped because another worker had taken them over",
            registry=r,
        )
        self.stepped_back = Counter(
            "sserelay_generations_stepped_back",
            "Generations stopped because their events could not be written (the store "
            "failed or this process stalled); their next owner continues them",
            registry=r,
        )
        self.cache_hits = Counter(
            "sserelay_cache_hits",
            "Requests answered from the response cache (admitted lookups that found one)",
            ["model"],
            registry=r,
        )
        self.cache_misses = Counter(
            "sserelay_cache_misses",
            "Requests to a caching model that the response cache did not answer "
            "(not found, expired, or bypassed with Cache-Control: no-cache)",
            ["model"],
            registry=r,
        )
        self.cache_stores = Counter(
            "sserelay_cache_stores",
            "Answers stored in the response cache",
            ["model"],
            registry=r,
        )
        self.build = Gauge(
            "sserelay_build_info",
            "Version information",
            ["version", "python"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build.labels(VERSION, platform.python_version()).set(1)

    def prime(self, config: Config) -> None:
        """Create, at zero, the label children of everything `config` makes possible:
        each plan with each model it allows, on both stream routes, with every way a
        stream can end; each model with its provider; each plan's limits. Idempotent:
        called at startup and after every plan reload (new plans and models get their
        children; those of removed ones stay until the process restarts)."""
        for model, spec in config.models.items():
            self.ttft.labels(model)
            self.gaps.labels(model)
            self.upstream_retries.labels(model)
            self.upstream_requests.labels(spec.provider, model)
            for kind in _UPSTREAM_KINDS:
                self.upstream_errors.labels(spec.provider, model, kind)
            for outcome in OUTCOMES:
                self.duration.labels(model, outcome)
            if spec.cache is not None:
                for counter in (self.cache_hits, self.cache_misses, self.cache_stores):
                    counter.labels(model)
        for route in ROUTES:
            self.streams_active.labels(route)
        for name, plan in config.plans.items():
            self.limiter_decisions.labels(name, "all", "allowed")
            limits = [window.name for window in plan.windows()]
            if plan.concurrent_streams is not None:
                limits.append("concurrent_streams")
            for limit in limits:
                self.limiter_decisions.labels(name, limit, "refused")
            for model in config.models:
                if not plan.allows_model(model):
                    continue
                self.cost.labels(name, model)
                for direction in _DIRECTIONS:
                    self.tokens.labels(name, model, direction)
                for route in ROUTES:
                    self.streams_started.labels(route, name, model)
                    for outcome in OUTCOMES:
                        self.streams_finished.labels(route, name, model, outcome)
        for reason in _AUTH_REASONS:
            self.auth_failures.labels(reason)
        for reason in _CONTINUATION_REASONS:
            self.continuations.labels(reason)
        for rating in _RATINGS:
            self.feedback.labels(rating)

    def for_stream(self, provider: str, model: str) -> StreamMetrics:
        return StreamMetrics(
            self.upstream_requests.labels(provider, model),
            self.gaps.labels(model),
            self.ttft.labels(model),
            self.upstream_errors,
            provider,
            model,
            self.continuations,
        )

    def paced(self, pacer: Pacer) -> None:
        self.coalesce_window.set(pacer.window_s())
        self.process_busy.set(round(pacer.busy, 3))

    def sent(self, event: str) -> None:
        child = self.event_children.get(event)
        (child or self.events.labels(event)).inc()

    def stream_started(self, route: str, plan: str, model: str, *, active: bool = True) -> None:
        """`active`: it runs here now (a queued stream is counted active by the worker
        that runs it)."""
        self.streams_started.labels(route, plan, model).inc()
        if active:
            self.streams_active.labels(route).inc()

    def stream_finished(
        self, route: str, plan: str, model: str, outcome: Outcome, *, live: bool = True
    ) -> None:
        """`live`: the stream ran in this process (a lost one, ended here for a process
        that died, was never counted active here). Time to first token is not here: the
        stream observed it when its first text went out (`StreamMetrics.first_token`)."""
        if live:
            self.streams_active.labels(route).dec()
        self.streams_finished.labels(route, plan, model, outcome.status).inc()
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
        if self.multiprocess:
            collected = CollectorRegistry()
            mp.MultiProcessCollector(collected, path=self.multiprocess)  # type: ignore[no-untyped-call]
            return generate_latest(collected)
        return generate_latest(self.registry)

    def close(self) -> None:
        """A worker leaving takes its live gauges with it."""
        if self.multiprocess:
            mp.mark_process_dead(os.getpid(), self.multiprocess)  # type: ignore[no-untyped-call]
