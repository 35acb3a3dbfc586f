"""Dependency health: the HealthActor probes every embedding endpoint from its own thread (so a
slow probe never touches the event loop) and writes a HealthState that /health, metrics and
readiness read without waiting on anything."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from citadeld.config import Config
from citadeld.metrics import Metrics
from citadeld.supervision import SupervisedActor


@dataclass
class Probe:
    name: str
    url: str
    kind: str  # ollama | openai


class HealthState:
    """Thread-safe latest result per dependency."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deps: dict[str, dict[str, Any]] = {}

    def set(self, name: str, ok: bool, latency_ms: float | None, error: str | None = None,
            **extra: Any) -> None:
        with self._lock:
            self._deps[name] = {
                "status": "ok" if ok else "down",
                "latency_ms": None if latency_ms is None else round(latency_ms, 2),
                "error": error,
                "checked_at": time.time(),
                **extra,
            }

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._deps.get(name)
            return dict(entry) if entry else None

    def all(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {k: dict(v) for k, v in self._deps.items()}

    def is_down(self, name: str) -> bool:
        entry = self.get(name)
        return entry is not None and entry["status"] == "down"


def endpoint_probes(cfg: Config) -> list[Probe]:
    seen: dict[str, Probe] = {}
    for m in cfg.embedding.models.values():
        if m.backend == "local":
            continue
        for ep in m.endpoints:
            name = f"endpoint:{ep.name or ep.url}"
            path = "/api/version" if m.backend == "ollama" else "/v1/models"
            seen.setdefault(name, Probe(name, ep.url + path, m.backend))
    return list(seen.values())


class _Tick:
    pass


class HealthActor(SupervisedActor):
    """Probes endpoints every `interval` seconds; one probe round at a time."""

    def __init__(self, probes: list[Probe], state: HealthState, metrics: Metrics,
                 interval: float = 5.0, timeout: float = 2.0, link: Any = None) -> None:
        super().__init__(link=link)
        self.probes = probes
        self.state = state
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self._timer: threading.Timer | None = None
        self._client: httpx.Client | None = None

    def on_start_supervised(self) -> None:
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout, connect=self.timeout))
        self.actor_ref.tell(_Tick())

    def on_receive_supervised(self, message: Any) -> Any:
        if isinstance(message, _Tick):
            self.run_probes()
            self._timer = threading.Timer(self.interval, self._tick)
            self._timer.daemon = True
            self._timer.start()
            return None
        return super().on_receive_supervised(message)

    def _tick(self) -> None:
        if self.actor_ref.is_alive():
            self.actor_ref.tell(_Tick())

    def run_probes(self) -> None:
        assert self._client is not None
        for probe in self.probes:
            t0 = time.perf_counter()
            try:
                resp = self._client.get(probe.url)
                ok = resp.status_code < 500
                err = None if ok else f"HTTP {resp.status_code}"
            except httpx.HTTPError as exc:
                ok, err = False, f"{type(exc).__name__}: {exc}"
            latency = (time.perf_counter() - t0) * 1000
            self.state.set(probe.name, ok, latency if ok else None, err, url=probe.url)
            self.metrics.dependency_up.labels(probe.name).set(1 if ok else 0)

    def on_stop(self) -> None:
        super().on_stop()
        if self._timer is not None:
            self._timer.cancel()
        if self._client is not None:
            self._client.close()
