"""Building the event bus from the config, for ``runtime.Daemon.build``."""

from __future__ import annotations

from citadeld.config import Config
from citadeld.events.config import resolve_backend
from citadeld.events.hub import BusBase
from citadeld.events.memory_bus import MemoryBus
from citadeld.events.metrics import EventMetrics
from citadeld.metrics import Metrics


def build_bus(cfg: Config, metrics: Metrics) -> BusBase:
    """The bus the config asks for (validated already, so a redis backend has its URL).
    Nothing connects here: ``await bus.start()`` on the daemon's loop does."""
    em = EventMetrics(metrics.registry)
    backend, url = resolve_backend(cfg.events, cfg.cache.redis_url)
    if backend == "redis":
        assert url is not None
        from citadeld.events.redis_bus import RedisBus
        return RedisBus(cfg.events, url, em)
    return MemoryBus(cfg.events, em)
