"""Prometheus metrics. One registry per daemon (not the global one) so tests can build several.

The families touched on every request (HTTP counts and latency, cache hits and misses, the
embedding stages) are loop-only families without locks (``citadeld.loopmetrics``); the rest
are prometheus-client's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from citadeld.loopmetrics import LoopCounterFamily, LoopHistogramFamily

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LAG = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = LoopCounterFamily(
            "citadel_http_requests", "HTTP requests answered", ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = LoopHistogramFamily(
            "citadel_http_request_duration_seconds", "HTTP request latency", ["route"],
            buckets=_LATENCY, registry=r,
        )
        self.embed_stage = LoopHistogramFamily(
            "citadel_embed_stage_seconds",
            "Time per embedding stage: queue (waiting for a batch slot), batch (actor round trip),"
            " backend (model call), cache (lookup)",
            ["model", "stage"], buckets=_LATENCY, registry=r,
        )
        self.batch_size = Histogram(
            "citadel_embed_batch_size", "Inputs per backend batch", ["model"],
            buckets=_BATCH, registry=r,
        )
        self.embed_items = Counter(
            "citadel_embed_items", "Embedded inputs by outcome", ["model", "outcome"], registry=r,
        )
        self.queue_depth = Gauge(
            "citadel_embed_queue_depth", "Inputs waiting for a batch", ["model"], registry=r,
        )
        self.inflight_batches = Gauge(
            "citadel_embed_inflight_batches", "Batches being computed", ["model"], registry=r,
        )
        self.backend_errors = Counter(
            "citadel_embed_backend_errors", "Failed backend calls", ["model", "endpoint", "kind"],
            registry=r,
        )
        self.rejected = Counter(
            "citadel_embed_rejected", "Requests refused by admission control", ["model"],
            registry=r,
        )
        self.cache_hits = LoopCounterFamily("citadel_cache_hits", "Embedding cache hits",
                                            registry=r)
        self.cache_misses = LoopCounterFamily("citadel_cache_misses", "Embedding cache misses",
                                              registry=r)
        self.cache_errors = Counter(
            "citadel_cache_errors", "Cache operations that failed (served as misses)", registry=r,
        )
        self.actor_restarts = Counter(
            "citadel_actor_restarts", "Actor restarts by the supervisor", ["actor"], registry=r,
        )
        self.loop_lag = Histogram(
            "citadel_event_loop_lag_seconds", "Event-loop scheduling lag", buckets=_LAG,
            registry=r,
        )
        self.dependency_up = Gauge(
            "citadel_dependency_up", "1 when a dependency answers its probe", ["dependency"],
            registry=r,
        )
        self.ready = Gauge("citadel_ready", "1 when every model can embed", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
