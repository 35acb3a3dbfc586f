"""Metrics of the vector store and persistence, registered on the daemon's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class StorageMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.vector_writes = Counter(
            "citadel_vector_writes", "Vector write requests by outcome: applied (in Qdrant),"
            " queued (recorded in the outbox, 202) or refused (503, not acknowledged)",
            ["outcome"], registry=r)
        self.vector_op = Histogram(
            "citadel_vector_op_seconds", "Vector store round trips by operation", ["op"],
            buckets=_LATENCY, registry=r)
        self.outbox_depth = Gauge(
            "citadel_vector_outbox_depth", "Queued vector writes not yet applied in Qdrant",
            registry=r)
        self.replay_lag = Gauge(
            "citadel_vector_outbox_replay_lag_seconds",
            "Age of the oldest queued vector write (0 when the outbox is empty)", registry=r)
        self.outbox_ops = Counter(
            "citadel_vector_outbox_ops", "Outbox operations by outcome: queued, applied, failed",
            ["outcome"], registry=r)
        self.rows_written = Counter(
            "citadel_persistence_rows_written", "Rows written to PostgreSQL", ["table"],
            registry=r)
        self.buffered_rows = Gauge(
            "citadel_persistence_buffered_rows",
            "Audit/health/task rows waiting in memory for PostgreSQL", registry=r)
        self.spilled_rows = Gauge(
            "citadel_persistence_spilled_rows",
            "Rows waiting in the local spill file for PostgreSQL", registry=r)
        self.spill_total = Counter(
            "citadel_persistence_spill_rows", "Rows that overflowed the memory buffer to the"
            " spill file", registry=r)
        self.dropped_rows = Counter(
            "citadel_persistence_dropped_rows", "Rows lost: spill file full or unwritable, or"
            " torn lines in a spill file", ["reason"], registry=r)
        self.pool = Gauge(
            "citadel_persistence_pool_connections", "PostgreSQL pool connections by state",
            ["state"], registry=r)
        self.pool_max = Gauge(
            "citadel_persistence_pool_max", "PostgreSQL pool size limit", registry=r)
        self.pg_op = Histogram(
            "citadel_persistence_op_seconds", "PostgreSQL round trips by operation", ["op"],
            buckets=_LATENCY, registry=r)
        self.pruned_rows = Counter(
            "citadel_persistence_pruned_rows", "Rows removed by retention", ["table"],
            registry=r)
