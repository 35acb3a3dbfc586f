"""Event bus and live-transport metrics, registered on the daemon's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# publish (event.ts) -> the frame handed to the client's socket
_FANOUT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)


class EventMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.subscribers = Gauge(
            "citadel_event_subscribers", "Open event subscriptions by scope (workflow or all)",
            ["scope"], registry=r,
        )
        self.published = Counter(
            "citadel_events_published", "Events published, by outcome (ok, buffered, failed)",
            ["outcome"], registry=r,
        )
        self.delivered = Counter(
            "citadel_events_delivered", "Events written to a client, by transport",
            ["transport"], registry=r,
        )
        self.dropped = Counter(
            "citadel_events_dropped",
            "Events a slow subscriber skipped (gap), or lost when disconnected",
            ["reason"], registry=r,
        )
        self.slow_disconnects = Counter(
            "citadel_event_slow_disconnects", "Subscribers disconnected for falling behind",
            registry=r,
        )
        self.fanout_lag = Histogram(
            "citadel_event_fanout_lag_seconds",
            "Event fan-out lag: publish time to the frame written to the client socket",
            ["transport"], buckets=_FANOUT, registry=r,
        )
        self.bus_up = Gauge(
            "citadel_event_bus_up", "1 when the event bus can record events", registry=r,
        )
        self.buffered = Gauge(
            "citadel_event_outage_buffered", "Events waiting for Redis to come back", registry=r,
        )
        self.reader_reconnects = Counter(
            "citadel_event_reader_reconnects", "Times the Redis stream reader reconnected",
            registry=r,
        )
        self._sub_children = {s: self.subscribers.labels(s) for s in ("workflow", "all")}
        # children resolved once: labels() takes a lock and hashes, per frame otherwise
        self._transport = {t: (self.delivered.labels(t), self.fanout_lag.labels(t))
                           for t in ("ws", "sse")}
        self.bus_up.set(1)

    def sub_gauge(self, scope: str) -> Gauge:
        return self._sub_children[scope]

    def transport(self, name: str) -> tuple[Counter, Histogram]:
        """(delivered counter, fan-out lag histogram) of one transport."""
        return self._transport[name]
