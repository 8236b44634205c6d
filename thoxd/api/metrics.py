"""Prometheus metrics: one CollectorRegistry per app, never prometheus-client's global REGISTRY.

    thoxd_http_requests_total{route,method,status}   counter    HTTP requests and WS handshakes
    thoxd_http_request_duration_seconds{route}       histogram  until the response (stream) ends
    thoxd_http_requests_in_flight                    gauge
    thoxd_prompt_tokens_total{model}                 counter    prompt tokens of generations
    thoxd_prompt_cached_tokens_total{model}          counter    ... of them reused from the cache
    thoxd_generated_tokens_total{model}              counter
    thoxd_generations_total{model,finish_reason}     counter
    thoxd_time_to_first_token_seconds{model}         histogram  submission -> first token
    thoxd_time_per_output_token_seconds{model}       histogram  mean gap between tokens
    thoxd_queue_depth, thoxd_running_sequences, thoxd_slots {model}            gauges
    thoxd_model_loaded, thoxd_model_memory_bytes {model}                       gauges
    process_resident_memory_bytes, process_cpu_seconds_total, ...   prometheus-client's own

Every label takes its values from a bounded set, never from what a client sends: routes are
templates (paths that match none share `unmatched`), methods are GET, POST, PUT, PATCH, DELETE,
HEAD, OPTIONS or WEBSOCKET (any other token is `other`), statuses are the app's own three-digit
codes, models the catalog's ids (never an alias a request named).

Request counts come from `MetricsMiddleware`; token counts and latencies from the engine's
`on_finished` hook (one observation per finished generation, on the engine thread: the client is
thread-safe). Engine gauges are read at scrape time from `Engine.loaded()` and `stats()`, which
never load or wake a model.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from thoxd.engine import Engine, Finished

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
# Every label value comes from a known set, so no client can grow the series: 404s share one
# route label, and the method is one of these (or "other": a method is any token a client sends).
_UNMATCHED = "unmatched"
_OTHER = "other"
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "WEBSOCKET"})


def method_label(method: str) -> str:
    return method if method in METHODS else _OTHER


def status_label(status: int) -> str:
    # The app chooses the status, but a three-digit code is all the label may ever hold.
    return str(status) if 100 <= status <= 599 else _OTHER


class Metrics:
    """Everything /metrics shows, and the request counters /system/info repeats."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "thoxd_http_requests",
            "HTTP requests (and WebSocket handshakes) by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "thoxd_http_request_duration_seconds",
            "Time until the response ended (a stream counts until its last byte).",
            ["route"],
            registry=r,
        )
        self.in_flight = Gauge(
            "thoxd_http_requests_in_flight", "Requests being answered now.", registry=r
        )
        self.prompt_tokens = Counter(
            "thoxd_prompt_tokens", "Prompt tokens of finished generations.", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "thoxd_prompt_cached_tokens",
            "Prompt tokens served from the prefix cache instead of prefilled.",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "thoxd_generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.draft_tokens = Counter(
            "thoxd_draft_tokens",
            "Tokens drafted by prompt lookup and checked (speculative decoding).",
            ["model"],
            registry=r,
        )
        self.draft_accepted_tokens = Counter(
            "thoxd_draft_accepted_tokens",
            "Drafted tokens the model's own sampling picked: tokens gained without a step.",
            ["model"],
            registry=r,
        )
        self.generations = Counter(
            "thoxd_generations",
            "Finished generations by finish reason (stop, length, cancelled).",
            ["model", "finish_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "thoxd_time_to_first_token_seconds",
            "From submission to the first generated token, queueing included.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "thoxd_time_per_output_token_seconds",
            "Mean time between generated tokens, one observation per generation.",
            ["model"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))
        ProcessCollector(registry=r)
        # Plain tallies for /system/info, kept beside the Prometheus series.
        self.status_classes: Tally[str] = Tally()
        self.total_requests = 0
        self.current = 0

    def observe_finished(self, model: str, finished: Finished) -> None:
        """The engine hook: runs on the engine thread for every finished generation."""
        t = finished.timings
        self.generations.labels(model, finished.finish_reason).inc()
        self.prompt_tokens.labels(model).inc(finished.prompt_tokens)
        self.cached_tokens.labels(model).inc(t.cache_n)
        self.generated_tokens.labels(model).inc(finished.completion_tokens)
        self.draft_tokens.labels(model).inc(t.draft_n)
        self.draft_accepted_tokens.labels(model).inc(t.draft_n_accepted)
        if finished.completion_tokens > 0 or finished.finish_reason != "cancelled":
            self.ttft.labels(model).observe((t.queue_ms + t.prompt_ms) / 1000.0)
        if t.predicted_n > 0:
            self.tpot.labels(model).observe(t.predicted_ms / 1000.0 / t.predicted_n)

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        label = status_label(status)
        self.requests.labels(route, method_label(method), label).inc()
        self.request_seconds.labels(route).observe(seconds)
        self.total_requests += 1
        self.status_classes[f"{label[0]}xx" if label != _OTHER else _OTHER] += 1

    def request_counts(self) -> dict[str, object]:
        return {
            "total": self.total_requests,
            "in_flight": self.current,
            "by_status": dict(sorted(self.status_classes.items())),
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """Scrape-time gauges from the engine. Reads state only: never loads or wakes a model."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> Iterable[Metric]:
        return [*self._families(), *self._budget()]

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        loaded, memory, slots, running, waiting = families
        budget, used, gpu_budget, gpu_used = self._budget()
        budget.add_metric([], float(self.engine.budget))
        used.add_metric([], float(self.engine.used()))
        gpu_budget.add_metric([], float(self.engine.gpu_budget))
        gpu_used.add_metric([], float(self.engine.gpu_used()))
        models = {m.spec.id: m for m in self.engine.loaded()}
        for spec in self.engine.catalog:
            model = models.get(spec.id)
            loaded.add_metric([spec.id], 1.0 if model else 0.0)
            memory.add_metric([spec.id], float(model.memory.total if model else 0))
        for model_id, model in models.items():
            stats = model.stats()
            slots.add_metric([model_id], stats.slots)
            running.add_metric([model_id], stats.running)
            waiting.add_metric([model_id], stats.waiting)
        return [*families, budget, used, gpu_budget, gpu_used]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["model"])

        return [
            gauge("thoxd_model_loaded", "1 when the model is loaded and serving."),
            gauge(
                "thoxd_model_memory_bytes",
                "Estimated memory of the loaded model: weights, KV cache, compute buffers.",
            ),
            gauge("thoxd_slots", "Sequence slots of the model."),
            gauge("thoxd_running_sequences", "Sequences being decoded now."),
            gauge("thoxd_queue_depth", "Requests waiting for a slot."),
        ]

    @staticmethod
    def _budget() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("thoxd_memory_budget_bytes", "What loaded models may use together."),
            GaugeMetricFamily(
                "thoxd_memory_used_bytes", "Estimated memory of loaded models and loads under way."
            ),
            GaugeMetricFamily(
                "thoxd_gpu_memory_budget_bytes", "GPU memory loaded models may use together."
            ),
            GaugeMetricFamily(
                "thoxd_gpu_memory_used_bytes", "Estimated GPU memory of loaded models and loads."
            ),
        ]


def route_label(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The route template that matches `scope` ("/v1/models/{model_id:path}"), bounded."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is not Match.NONE:
            return str(getattr(route, "path", _UNMATCHED))
    return _UNMATCHED


class MetricsMiddleware:
    """Counts every HTTP request and WebSocket handshake by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        websocket = scope["type"] == "websocket"
        method = "WEBSOCKET" if websocket else str(scope["method"])
        route = route_label(self.routes, scope)
        status = 500
        started = time.monotonic()

        async def watching_send(message: Message) -> None:
            nonlocal status
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                status = int(message["status"])
            elif kind == "websocket.accept":
                status = 101
            elif kind == "websocket.close" and status == 500:
                status = 403  # closed before accept: the server answers 403
            await send(message)

        self.metrics.current += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, watching_send)
        finally:
            self.metrics.current -= 1
            self.metrics.in_flight.dec()
            self.metrics.record(route, method, status, time.monotonic() - started)
