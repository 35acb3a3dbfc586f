"""The running daemon: builds the supervision tree and the HTTP front, serves, drains, exits.

Order matters: the config was validated before we get here; the HTTP site binds before the
actors start (so a busy port fails fast and /health/ready says "not yet" while models load);
on SIGTERM/SIGINT the site stops taking connections, in-flight requests finish within the drain
timeout while the actors still run, and only then is the tree stopped in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from citadeld import __version__
from citadeld.actors.backends.base import EmbeddingBackend
from citadeld.actors.cache import EmbeddingCache, RedisCache, build_cache
from citadeld.actors.embedder import EmbedderActor
from citadeld.actors.embedder_pool import EmbedderPool, pool_endpoints
from citadeld.admin.lifecycle import Lifecycle
from citadeld.config import Config, EndpointConfig, ModelConfig
from citadeld.embedding import EmbeddingService
from citadeld.errors import Unavailable
from citadeld.events.wiring import build_bus
from citadeld.health import HealthActor, HealthState, endpoint_probes
from citadeld.http.app import build_app
from citadeld.llm.wiring import build_llm
from citadeld.looplag import LoopLag
from citadeld.metrics import Metrics
from citadeld.state import DaemonState
from citadeld.storage.wiring import Storage
from citadeld.supervision import ChildLink, ChildSpec, Supervisor
from citadeld.workflows.service import WorkflowService

log = logging.getLogger("citadeld")

EX_SOFTWARE = 70  # the root supervisor gave up: systemd restarts us
EX_UNAVAILABLE = 69  # could not bind


def backend_factory(
    name: str, mcfg: ModelConfig, endpoint: EndpointConfig | None
) -> Callable[[], EmbeddingBackend]:
    """Deferred construction: each (re)started actor builds its backend in its own thread."""
    if mcfg.backend == "local":
        def make_local() -> EmbeddingBackend:
            from citadeld.actors.backends.local import LocalBackend
            return LocalBackend(mcfg, name)
        return make_local
    assert endpoint is not None
    if mcfg.backend == "ollama":
        def make_ollama() -> EmbeddingBackend:
            from citadeld.actors.backends.ollama import OllamaBackend
            return OllamaBackend(endpoint, mcfg, name)
        return make_ollama

    def make_openai() -> EmbeddingBackend:
        from citadeld.actors.backends.openai_compat import OpenAICompatBackend
        return OpenAICompatBackend(endpoint, mcfg, name)
    return make_openai


def _slot_endpoints(mcfg: ModelConfig) -> list[EndpointConfig | None]:
    if mcfg.backend == "local":
        return [None]
    return [ep for ep in mcfg.endpoints for _ in range(ep.slots)]


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None,
                 config_overrides: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.config_path, self.config_overrides = config_path, config_overrides  # for reload
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._signals = 0

    # ---- tree ------------------------------------------------------------------------------

    def _model_supervisor(self, name: str, mcfg: ModelConfig, pool: EmbedderPool) -> Supervisor:
        sc = self.cfg.supervision
        children = []
        for index, endpoint in enumerate(_slot_endpoints(mcfg)):
            factory = backend_factory(name, mcfg, endpoint)

            def start(link: ChildLink, factory: Callable[[], EmbeddingBackend] = factory
                      ) -> Any:
                return EmbedderActor.start(backend_factory=factory, link=link)

            children.append(ChildSpec(
                name=f"embedder:{name}:{index}",
                start=start,
                on_started=functools.partial(pool.slot_started, index),
                on_died=functools.partial(pool.slot_died, index),
                # the local model computes a batch for seconds under load: ping less eagerly
                ping_interval=sc.ping_interval_s,
                ping_timeout=max(sc.ping_timeout_s, mcfg.timeout_s + mcfg.connect_timeout_s),
            ))
        return Supervisor(
            f"pool:{name}", children,
            max_restarts=sc.max_restarts, period=sc.period_s,
            backoff_min=sc.backoff_min_s, backoff_max=sc.backoff_max_s,
            on_restart=self._on_restart,
        )

    def _on_restart(self, child: str) -> None:
        self.metrics.actor_restarts.labels(child).inc()

    def _on_escalate(self, reason: str) -> None:
        log.critical("root supervisor gave up; exiting", extra={"reason": reason})
        self.exit_code = EX_SOFTWARE
        self.loop.call_soon_threadsafe(self._stop.set)

    def build(self, loop: asyncio.AbstractEventLoop) -> DaemonState:
        cfg = self.cfg
        self.loop = loop
        self.metrics = metrics = Metrics()
        cc = cfg.cache
        cache: EmbeddingCache = build_cache(
            backend=cc.backend, redis_url=cc.redis_url, ttl_s=cc.ttl_s,
            max_entries=cc.max_entries, value_format=cc.value_format,
            key_prefix=cc.key_prefix, timeout_s=cc.timeout_s,
        )
        pools: dict[str, EmbedderPool] = {}
        children: list[ChildSpec] = []
        if isinstance(cache, RedisCache):
            children.append(cache.child_spec("cache"))
        for name, mcfg in cfg.embedding.models.items():
            pool = EmbedderPool(name, mcfg, pool_endpoints(mcfg), metrics, loop)
            pools[name] = pool
            children.append(self._model_supervisor(name, mcfg, pool).as_child_spec())
        health = HealthState()
        llm = build_llm(cfg, metrics, health)  # None without llm.servers
        if llm is not None and llm.child_spec is not None:
            children.append(llm.child_spec)
        probes = endpoint_probes(cfg)
        if probes:
            children.append(ChildSpec(
                name="health",
                start=lambda link: HealthActor.start(probes, health, metrics, link=link),
            ))
        storage = Storage(cfg, metrics, health)  # VectorActor, PersistenceActor (issue 4)
        children.extend(storage.child_specs())
        workflows = WorkflowService(cfg, metrics, storage, llm)  # runner after its services
        if cfg.workflows.enabled:
            children.append(workflows.child_spec())
        sc = cfg.supervision
        self.supervisor = Supervisor(
            "root", children,
            max_restarts=sc.max_restarts, period=sc.period_s,
            backoff_min=sc.backoff_min_s, backoff_max=sc.backoff_max_s,
            on_escalate=self._on_escalate, on_restart=self._on_restart,
        )
        service = EmbeddingService(cfg.embedding, pools, cache, metrics)
        self.state = DaemonState(
            config=cfg, metrics=metrics, embedding=service, pools=pools, cache=cache,
            health=health, supervisor=self.supervisor, llm=llm, storage=storage,
            events=build_bus(cfg, metrics),
        )
        storage.attach(service)
        if cfg.workflows.enabled:
            self.state.extra["workflows"] = workflows
            workflows.attach(self.state)
        return self.state

    # ---- run -------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        state = self.build(loop)
        app = build_app(state)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None,
            shutdown_timeout=self.cfg.server.drain_timeout_s,
            **self.cfg.limits.runner_kwargs(),  # header sizes, keep-alive/slow-client timeouts
        )
        await runner.setup()
        host, port = self.cfg.server.host, self.cfg.server.port
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True, backlog=1024)
            await site.start()
        except OSError as exc:
            log.critical("cannot listen", extra={"listen": self.cfg.server.listen,
                                                 "error": str(exc)})
            await runner.cleanup()
            return EX_UNAVAILABLE
        log.info("listening", extra={"listen": self.cfg.server.listen,
                                     "version": __version__, "pid": os.getpid()})
        self.lifecycle = Lifecycle(self, state, runner)  # admin socket, sd_notify, reload
        if not await self.lifecycle.start():
            await runner.cleanup()
            return EX_UNAVAILABLE
        assert state.events is not None
        await state.events.start()  # the Redis reader task (if any) runs on this loop
        started = self.supervisor.start()
        assert state.storage is not None
        state.storage.start()
        workflows = state.extra.get("workflows")
        if workflows is not None:
            workflows.start()
        lag = LoopLag(self.metrics)
        lag.start()
        state.extra["loop_lag"] = lag
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self.lifecycle.on_sighup)
        await self.lifecycle.ready(started)  # READY=1, watchdog; the tree's children are wired
        # only now: probing the cache before the supervisor wired its actor would start a stray
        # actor, whose replacement trips the cache's circuit for a second
        tasks = [loop.create_task(self._watch_cache(state))]
        await self._stop.wait()

        self.lifecycle.stopping()  # STOPPING=1
        log.info("draining", extra={"timeout_s": self.cfg.server.drain_timeout_s})
        state.draining = True
        t0 = time.monotonic()
        await runner.cleanup()  # stops accepting, waits for in-flight handlers (drain timeout)
        if workflows is not None:  # before the services its steps use go away
            await workflows.close()
        for pool in state.pools.values():
            pool.close(Unavailable("daemon is shutting down", retry_after=5))
        for t in tasks:
            t.cancel()
        await lag.stop()
        if state.storage is not None:
            await state.storage.close()  # flush buffered rows, stop the replayer
        stopping = self.supervisor.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.wrap_future(stopping), 15)
        await state.cache.close()
        if state.events is not None:
            await state.events.close()  # after the drain: workflows published until the end
        await self.lifecycle.stop()
        log.info("stopped", extra={"drain_s": round(time.monotonic() - t0, 3),
                                   "exit_code": self.exit_code})
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting at once", extra={"signal": sig.name})
            os._exit(self.exit_code)
        log.info("signal received", extra={"signal": sig.name})
        self._stop.set()

    async def _watch_cache(self, state: DaemonState) -> None:
        """Cache health is async (it may ask Redis), so it is polled here, not in HealthActor."""
        frozen = False
        while True:
            try:
                h = await state.cache.health()
            except Exception as exc:  # health must never take the daemon down
                h = {"status": "down", "error": repr(exc), "latency_ms": None}
            state.health.set("cache", h.get("status") == "ok", h.get("latency_ms"),
                             h.get("error"), backend=h.get("backend"))
            self.metrics.dependency_up.labels("cache").set(1 if h.get("status") == "ok" else 0)
            ready = all(p.can_embed() for p in state.pools.values())
            self.metrics.ready.set(1 if ready else 0)
            # freeze once every embedder has been built (the local model loads in its actor's
            # start); a down upstream does not matter here, only that the heap stopped growing
            if not frozen and all(s.alive for p in state.pools.values() for s in p.slots):
                frozen = True
                freeze_heap()
            await asyncio.sleep(2.0)


def freeze_heap() -> None:
    """Move everything alive once the models are loaded out of the garbage collector's sight.

    With torch, qdrant-client and pydantic loaded, one full collection walks ~500k objects and
    stops the event loop for 100-300 ms, the worst latency spike the daemon had. Nearly all of
    those objects live as long as the process, so after one last collection they are frozen
    (gc.freeze) and later full collections only walk what requests allocate."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("heap frozen for the garbage collector", extra={
        "objects": gc.get_freeze_count(), "ms": round((time.perf_counter() - t0) * 1000, 1)})
