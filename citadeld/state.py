"""What the HTTP routes (and later the admin socket) reach of the running daemon."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from citadeld.actors.cache import EmbeddingCache
    from citadeld.actors.embedder_pool import EmbedderPool
    from citadeld.config import Config
    from citadeld.embedding import EmbeddingService
    from citadeld.events.hub import BusBase
    from citadeld.health import HealthState
    from citadeld.llm.router import LLMRouter
    from citadeld.metrics import Metrics
    from citadeld.storage.wiring import Storage
    from citadeld.supervision import Supervisor


@dataclass
class DaemonState:
    config: Config
    metrics: Metrics
    embedding: EmbeddingService
    pools: dict[str, EmbedderPool]
    cache: EmbeddingCache
    health: HealthState
    supervisor: Supervisor | None = None
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    llm: LLMRouter | None = None  # None when no LLM servers are configured
    storage: Storage | None = None  # vector store + persistence (issue 4)
    events: BusBase | None = None  # workflow event bus (issue 5); always set by the daemon


STATE: web.AppKey[DaemonState] = web.AppKey("citadel_state", DaemonState)
