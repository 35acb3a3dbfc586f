"""RouterActor: the supervised owner of the LLM servers' background work.

Every `probes.interval_s` it probes all servers at once (Ollama `GET /api/tags`, OpenAI
`GET /v1/models`) on a private event loop in its own thread (so a slow probe never touches the
front's loop), records each result in the registry (consecutive failures open a CLOSED
breaker; a failure re-opens a HALF_OPEN one), publishes it to HealthState for /health/detailed
and to metrics, and advances the breakers' timed OPEN -> HALF_OPEN transitions so gauges move
even without traffic. Routing decisions themselves are made on the loop through the registry
(see `router.py` for why); the registry outlives this actor, so a restart loses no breaker state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import Any

import aiohttp
import orjson

from citadeld.health import HealthState
from citadeld.llm.breaker import STATE_CODE
from citadeld.llm.config import ProbeConfig, canonical_model
from citadeld.llm.metrics import LLMMetrics
from citadeld.llm.registry import Registry
from citadeld.llm.upstream import ServerInfo
from citadeld.metrics import Metrics
from citadeld.supervision import ChildLink, SupervisedActor

log = logging.getLogger("citadeld.llm")


class _Tick:
    pass


def probe_path(kind: str) -> str:
    return "/api/tags" if kind == "ollama" else "/v1/models"


def listed_models(kind: str, body: bytes) -> set[str] | None:
    """Model names a probe answer lists, canonicalized; None if the body is not the shape."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    items = obj.get("models") if kind == "ollama" else obj.get("data")
    if not isinstance(items, list):
        return None
    key = "name" if kind == "ollama" else "id"
    out = set()
    for item in items:
        if isinstance(item, dict) and isinstance(item.get(key), str):
            out.add(canonical_model(item[key]))
            if kind == "ollama" and isinstance(item.get("model"), str):
                out.add(canonical_model(item["model"]))
    return out


async def probe_server(
    session: aiohttp.ClientSession, info: ServerInfo, limit_s: float
) -> tuple[bool, float | None, str | None, list[str]]:
    """(ok, latency_ms, error, configured models the server does not list)."""
    headers = {"Authorization": f"Bearer {info.api_key}"} if info.api_key else {}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(limit_s):
            async with session.get(info.url + probe_path(info.kind), headers=headers) as resp:
                body = await resp.read()
                status = resp.status
    except TimeoutError:
        return False, None, f"probe timed out after {limit_s:g}s", []
    except aiohttp.ClientError as exc:
        return False, None, f"{type(exc).__name__}: {exc}", []
    latency = (time.perf_counter() - t0) * 1000
    if status >= 500 or status in (401, 403, 429):
        return False, None, f"HTTP {status}", []
    if status != 200:  # the server is up; the probe path is not what we expected
        return True, latency, None, []
    listed = listed_models(info.kind, body)
    if listed is None:
        return False, None, "probe answer is not the expected JSON", []
    upstream = {canonical_model(u) for u in info.served.values()}
    missing = sorted(upstream - listed)
    return True, latency, None, missing


class RouterActor(SupervisedActor):
    def __init__(
        self,
        registry: Registry,
        probes: ProbeConfig,
        llm_metrics: LLMMetrics,
        metrics: Metrics | None = None,
        health: HealthState | None = None,
        *,
        link: ChildLink | None = None,
    ) -> None:
        super().__init__(link=link)
        self.registry = registry
        self.cfg = probes
        self.llm_metrics = llm_metrics
        self.metrics = metrics
        self.health = health
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._timer: threading.Timer | None = None
        self.rounds = 0

    def on_start_supervised(self) -> None:
        self._loop = asyncio.new_event_loop()
        self.actor_ref.tell(_Tick())

    def on_receive_supervised(self, message: Any) -> Any:
        if isinstance(message, _Tick):
            self.run_probes()
            self._timer = threading.Timer(self.cfg.interval_s, self._tick)
            self._timer.daemon = True
            self._timer.start()
            return None
        return super().on_receive_supervised(message)

    def _tick(self) -> None:
        if self.actor_ref.is_alive():
            self.actor_ref.tell(_Tick())

    def run_probes(self) -> None:
        loop = self._loop
        assert loop is not None
        servers = list(self.registry.servers.values())
        results = loop.run_until_complete(self._probe_all([s.info for s in servers]))
        for server, (ok, latency, error, missing) in zip(servers, results, strict=True):
            state = self.registry.record_probe(server.name, ok, latency, error, missing)
            if missing:
                log.warning("llm server does not list configured models",
                            extra={"server": server.name, "missing": missing})
            if self.health is not None:
                self.health.set(
                    f"llm:{server.name}", ok, latency, error, url=server.info.url,
                    kind=server.info.kind, breaker=state.value, missing_models=missing,
                )
            if self.metrics is not None:
                self.metrics.dependency_up.labels(f"llm:{server.name}").set(1 if ok else 0)
        for name, state in self.registry.states().items():
            self.llm_metrics.breaker_state.labels(name).set(STATE_CODE[state])
        self.rounds += 1

    async def _probe_all(
        self, infos: list[ServerInfo]
    ) -> list[tuple[bool, float | None, str | None, list[str]]]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.timeout_s),
            )
        session = self._session
        return list(await asyncio.gather(
            *(probe_server(session, info, self.cfg.timeout_s) for info in infos)
        ))

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        super().on_failure(exception_type, exception_value, traceback)
        self._close()

    def on_stop(self) -> None:
        self._close()
        super().on_stop()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop, self._loop = self._loop, None
        session, self._session = self._session, None
        if loop is None:
            return
        with contextlib.suppress(Exception):
            if session is not None:
                loop.run_until_complete(session.close())
            loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
