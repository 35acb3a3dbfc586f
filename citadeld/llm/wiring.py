"""Building the LLM router from the config, for `runtime.Daemon.build`."""

from __future__ import annotations

from typing import Any

from citadeld.config import Config
from citadeld.health import HealthState
from citadeld.llm.actor import RouterActor
from citadeld.llm.metrics import LLMMetrics
from citadeld.llm.registry import Registry
from citadeld.llm.router import LLMRouter
from citadeld.metrics import Metrics
from citadeld.supervision import ChildLink, ChildSpec


def build_llm(cfg: Config, metrics: Metrics, health: HealthState) -> LLMRouter | None:
    """The router (loop side) with its RouterActor spec in `router.child_spec`; None when no
    LLM server is configured (the LLM routes then answer 404 for every model)."""
    if not cfg.llm.servers:
        return None
    registry = Registry(cfg.llm)
    llm_metrics = LLMMetrics(metrics.registry)
    router = LLMRouter(cfg.llm, registry, llm_metrics)
    sc = cfg.supervision
    probes = cfg.llm.probes

    def start(link: ChildLink) -> Any:
        return RouterActor.start(registry, probes, llm_metrics, metrics, health, link=link)

    router.child_spec = ChildSpec(
        name="llm-router",
        start=start,
        ping_interval=sc.ping_interval_s,
        ping_timeout=max(sc.ping_timeout_s, probes.timeout_s + 2.0),
    )
    return router
