"""How the daemon builds, starts and stops the vector store and persistence (one object, so the
runtime only gains a few lines)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from citadeld.actors.persistence import Persistence
from citadeld.actors.vector import VectorStore
from citadeld.storage.metrics import StorageMetrics
from citadeld.storage.service import VectorService
from citadeld.storage.spill import OutboxMarker
from citadeld.supervision import ChildSpec

if TYPE_CHECKING:
    from citadeld.config import Config
    from citadeld.embedding import EmbeddingService
    from citadeld.health import HealthState
    from citadeld.metrics import Metrics

log = logging.getLogger("citadeld.vectors")


class Storage:
    def __init__(self, cfg: Config, metrics: Metrics, health: HealthState) -> None:
        self.cfg = cfg
        self.daemon_metrics = metrics
        self.metrics = StorageMetrics(metrics.registry)
        vc, pc = cfg.vectors, cfg.persistence
        local_path = vc.local_path or os.path.join(cfg.state_dir, "qdrant")
        self.store = VectorStore(vc, local_path)
        self.persistence = (Persistence(pc, cfg.state_dir, self.metrics, health)
                            if pc.dsn else None)
        marker = OutboxMarker(os.path.join(cfg.state_dir, "outbox.pending"))
        self.service = VectorService(vc, self.store, self.persistence, self.metrics, marker,
                                     health=health, dependency_up=metrics.dependency_up)

    def child_specs(self) -> list[ChildSpec]:
        specs = [self.store.child_spec("vectors")]
        if self.persistence is not None:
            specs.insert(0, self.persistence.child_spec("persistence"))
        return specs

    def attach(self, embedding: EmbeddingService) -> None:
        self.service.embedding = embedding

    def start(self) -> None:
        """After the supervisor started the actors: background tasks on the daemon's loop."""
        if self.persistence is not None:
            self.persistence.start()
        self.service.start()
        log.info("storage started", extra={
            "qdrant": self.store.target,
            "persistence": "enabled" if self.persistence is not None else "disabled"})

    async def close(self) -> None:
        """After the HTTP front drained, before the actors stop."""
        await self.service.close()
        if self.persistence is not None:
            await self.persistence.close()
        await self.store.close()

    def summary(self) -> dict[str, str]:
        return self.service.summary()

    def detailed(self) -> dict[str, Any]:
        return self.service.detailed()

    def degraded(self) -> bool:
        s = self.summary()
        return s["vectors"] == "down" or s["persistence"] == "down"
