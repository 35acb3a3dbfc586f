"""WorkflowService: the loop-side facade the routes call, and the runner's way back into the
daemon (step execution, events, state) - everything here runs on the daemon's event loop.

Modes, chosen from the config:

* PostgreSQL (``persistence.dsn``) + Redis (``workflows.redis_url`` or the cache's Redis):
  durable, shared by every daemon on the same Redis and PostgreSQL (claim/reclaim);
* PostgreSQL only: durable, one daemon; unfinished workflows are resumed at start;
* Redis only: state and queue in Redis (survives a daemon crash, not a Redis loss);
* neither (the embedded default): in memory, NOT durable - a restart loses workflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from citadeld.errors import BadRequest, CitadelError, NotFound, Unavailable
from citadeld.events import model as ev
from citadeld.supervision import ChildSpec
from citadeld.workflows.metrics import WorkflowMetrics
from citadeld.workflows.queue import Job, LocalQueue, QueueFull, RedisSubmitter
from citadeld.workflows.record import TERMINAL, new_record, public
from citadeld.workflows.runner import Engine, WorkflowActor
from citadeld.workflows.spec import Limits, SpecError, parse
from citadeld.workflows.steps import Executors, StepContext, StepFailed
from citadeld.workflows.store import StoreUnavailable, WorkflowStore

if TYPE_CHECKING:
    from citadeld.config import Config
    from citadeld.metrics import Metrics
    from citadeld.security.principal import Principal
    from citadeld.state import DaemonState

log = logging.getLogger("citadeld.workflows")

STATUSES = ("pending", "running", "completed", "failed", "cancelled")


class Conflict(CitadelError):
    status = 409
    code = "conflict"


class WorkflowService:
    def __init__(self, cfg: Config, metrics: Metrics, storage: Any = None, llm: Any = None
                 ) -> None:
        self.cfg = cfg
        self.wcfg = wc = cfg.workflows
        self.metrics = WorkflowMetrics(metrics.registry)
        self.instance = wc.instance or f"{socket.gethostname()}:{cfg.server.port}"
        cache = cfg.cache
        self.redis_url = wc.redis_url or (cache.redis_url if cache.backend == "redis" else None)
        self.persistence = storage.persistence if storage is not None else None
        self.storage = storage
        self.llm = llm
        self.limits = Limits(wc.max_steps, wc.default_retries, wc.max_retries,
                             wc.default_step_timeout_s, wc.max_step_timeout_s,
                             wc.default_deadline_s, wc.max_deadline_s)
        self.redis: Any = None
        self.store = WorkflowStore(persistence=self.persistence, key_prefix=wc.key_prefix,
                                   hot_ttl_s=wc.hot_ttl_s, retention_s=wc.retention_days * 86400)
        self.local = LocalQueue(wc.max_queued) if self.redis_url is None else None
        self.submitter: RedisSubmitter | None = None
        self.executors: Executors | None = None
        self.state: DaemonState | None = None
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.front_loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.queue_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- wiring ------------------------------------------------------------------------------

    def child_spec(self) -> ChildSpec:
        return ChildSpec(name="workflows",
                         start=lambda link: WorkflowActor.start(self, link=link),
                         on_died=self._engine_died, ping_interval=None,
                         shutdown_timeout=self.wcfg.shutdown_grace_s + 10.0)

    def attach(self, state: DaemonState) -> None:
        self.state = state
        self.executors = Executors(state.embedding, self.storage, self.llm)

    def start(self) -> None:
        """On the daemon's loop, after the supervisor started the tree."""
        self.front_loop = asyncio.get_running_loop()
        if self.redis_url is not None:
            import redis.asyncio as aredis
            self.redis = aredis.Redis.from_url(self.redis_url, socket_timeout=5.0,
                                               socket_connect_timeout=3.0)
            self.store.redis = self.redis
            self.submitter = RedisSubmitter(self.redis, self.wcfg.key_prefix)
        self._tasks = [self.front_loop.create_task(self._gauges(), name="workflow-gauges"),
                       self.front_loop.create_task(self._pruner(), name="workflow-pruner")]
        if not self.store.durable:
            log.warning("workflows are kept %s: not durable across %s",
                        "in memory" if self.redis is None else "in Redis only",
                        "a restart" if self.redis is None else "a Redis loss")
        self.ready.set()

    def engine_started(self, engine: Engine) -> None:
        self.engine = engine  # runner thread; read on the loop

    def _engine_died(self, exc: BaseException | None) -> None:
        engine = self.engine
        if engine is not None:
            engine.abort()

    async def close(self) -> None:
        """After the HTTP front drained: let running workflows finish within the grace time,
        then stop the runner (what it held stays resumable)."""
        for t in self._tasks:
            t.cancel()
        engine = self.engine
        if engine is not None:
            engine.request_stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.wrap_future(engine.finished),
                                       self.wcfg.shutdown_grace_s + 5.0)
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()

    # ---- local queue (runner thread) ---------------------------------------------------------

    def local_queue_waker(self, wake: Any) -> None:
        if self.local is not None:
            self.local.set_waker(wake)

    def local_put(self, wid: str) -> None:
        if self.local is not None:
            self.local.put(wid)

    def local_take(self, n: int) -> list[Job]:
        return self.local.take(n) if self.local is not None else []

    def health_note(self, error: str | None) -> None:
        self.queue_error = error

    # ---- API ---------------------------------------------------------------------------------

    def _visible(self, rec: dict[str, Any] | None, who: Principal, wid: str) -> dict[str, Any]:
        if rec is None or (who.role != "admin" and rec["owner"] != who.name):
            raise NotFound(f"no workflow {wid!r}", code="workflow_not_found")
        return rec

    async def submit(self, body: Any, who: Principal, request_id: str | None
                     ) -> dict[str, Any]:
        try:
            spec = parse(body, self.limits)
            assert self.executors is not None
            for i, s in enumerate(spec.steps):
                try:
                    self.executors.check(s.type, s.params)
                except StepFailed as exc:
                    raise SpecError(f"steps[{i}] {s.id!r}: {exc.message}", step=s.id) from None
        except SpecError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise BadRequest(exc.message, code="invalid_workflow", param=exc.param) from None
        rec = new_record(spec, who.name, request_id)
        if self.local is not None and self.local.depth() >= self.local.max:
            self.metrics.rejected.labels("queue_full").inc()
            raise Unavailable(f"{self.local.depth()} workflows are queued; retry later",
                              retry_after=5)
        try:
            await self.store.create(rec)  # durable before the 202
            if self.submitter is not None:
                try:
                    await self.submitter.enqueue(rec["id"])
                except Exception as exc:
                    await self._unaccept(rec, f"Redis: {exc}")
                    raise StoreUnavailable(f"Redis: {exc}") from None
            else:
                assert self.local is not None
                self.local.put(rec["id"])
        except (StoreUnavailable, QueueFull) as exc:
            self.metrics.rejected.labels("unavailable").inc()
            raise Unavailable(f"the workflow could not be recorded: {exc}",
                              retry_after=5) from None
        self.metrics.submitted.inc()
        await self.publish(rec["id"], rec["owner"], ev.STATE_SNAPSHOT,
                           {"snapshot": {"status": "pending"}})
        return rec

    async def _unaccept(self, rec: dict[str, Any], why: str) -> None:
        """The job could not be queued: the client gets 503, so the row must not run later."""
        rec.update(status="failed", error=f"not accepted: {why}", finished_at=time.time())
        with contextlib.suppress(Exception):
            await self.store.save(rec)

    async def get(self, wid: str, who: Principal) -> dict[str, Any]:
        try:
            rec = await self.store.get(wid)
        except StoreUnavailable as exc:
            raise Unavailable(f"workflow state is unavailable: {exc}", retry_after=5) from None
        return public(self._visible(rec, who, wid))

    async def list(self, who: Principal, status: str | None, owner: str | None, limit: int,
                   offset: int) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}", param="status")
        if who.role != "admin":
            if owner is not None and owner != who.name:
                raise NotFound("no workflows of that owner are visible to you",
                               code="workflow_not_found")
            owner = who.name
        if owner is not None and "\x00" in owner:  # no owner has one; PostgreSQL refuses it
            return {"workflows": [], "total": 0, "limit": limit, "offset": offset}
        try:
            items, total = await self.store.list_(status=status, owner=owner, limit=limit,
                                                 offset=offset)
        except StoreUnavailable as exc:
            raise Unavailable(f"workflow state is unavailable: {exc}", retry_after=5) from None
        out: dict[str, Any] = {"workflows": items, "total": total, "limit": limit,
                               "offset": offset}
        if offset + len(items) < total:
            out["next_offset"] = offset + len(items)
        return out

    async def cancel(self, wid: str, who: Principal, reason: str | None = None,
                     wait_s: float = 3.0) -> tuple[dict[str, Any], bool]:
        """(state, final): final False while the holder is still stopping it."""
        why = f"cancelled by {who.name}" + (f": {reason}" if reason else "")
        try:
            rec = self._visible(await self.store.get(wid), who, wid)
            if rec["status"] in TERMINAL:
                raise Conflict(f"workflow {wid!r} already {rec['status']}")
            await self.store.request_cancel(wid)
            if self.redis is not None:
                with contextlib.suppress(Exception):
                    await self.redis.publish(f"{self.wcfg.key_prefix}cancel", wid)
            engine = self.engine
            if engine is not None:
                engine.cancel_threadsafe(wid)
            if rec["status"] == "pending":  # not claimed yet: final at once
                rec.update(status="cancelled", error=why, cancel_requested=True,
                           finished_at=time.time())
                for st in rec["steps"].values():
                    st["status"] = "cancelled"
                await self.store.save(rec)
                self.metrics.finished.labels("cancelled").inc()
                await self.publish(wid, rec["owner"], ev.RUN_CANCELLED,
                                   {"status": "cancelled", "error": why})
            deadline = time.monotonic() + wait_s
            while True:
                cur = await self.store.get(wid) or rec
                if cur["status"] in TERMINAL or time.monotonic() > deadline:
                    cur["cancel_requested"] = True
                    return public(cur), cur["status"] in TERMINAL
                await asyncio.sleep(0.05)
        except StoreUnavailable as exc:
            raise Unavailable(f"workflow state is unavailable: {exc}", retry_after=5) from None

    # ---- for the runner (called on this loop through the bridge) -----------------------------

    async def execute(self, step_type: str, params: dict[str, Any], wid: str, step_id: str,
                      owner: str, request_id: str | None) -> dict[str, Any]:
        assert self.executors is not None

        async def pub(etype: str, data: dict[str, Any]) -> None:
            await self.publish(wid, owner, etype, data)

        ctx = StepContext(wid, step_id, owner, request_id, pub, self.wcfg.max_text_deltas,
                          self.wcfg.text_delta_interval_ms / 1000)
        return await self.executors.run(step_type, params, ctx)

    async def publish(self, wid: str, owner: str, etype: str, data: dict[str, Any]) -> None:
        """Hand one event to the daemon's bus; an event that cannot be published is logged,
        never a reason to fail the workflow (its state is recorded regardless)."""
        bus = getattr(self.state, "events", None) if self.state is not None else None
        if bus is None:
            return
        try:
            await bus.publish(ev.Event(type=etype, workflow_id=wid, data=data, owner=owner))
        except Exception as exc:
            log.warning("workflow event not published: %s", exc,
                        extra={"workflow_id": wid, "type": etype})

    # ---- background --------------------------------------------------------------------------

    async def _gauges(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                if self.local is not None:
                    self.metrics.queue_depth.set(self.local.depth())
                elif self.redis is not None:
                    depth = await self._redis_depth()
                    if depth is not None:
                        self.metrics.queue_depth.set(depth)
            await asyncio.sleep(2.0)

    async def _redis_depth(self) -> int | None:
        stream = f"{self.wcfg.key_prefix}jobs"
        for g in await self.redis.xinfo_groups(stream):
            name = g.get("name") or g.get(b"name")
            if name in ("workflows", b"workflows"):
                return int(g.get("lag") or 0) + int(g.get("pending") or 0)
        return None

    async def _pruner(self) -> None:
        await asyncio.sleep(60.0)
        while True:
            try:
                n = await self.store.prune()
                if n:
                    log.info("pruned %d finished workflows", n)
            except Exception as exc:
                log.info("workflow pruning skipped: %s", exc)
            await asyncio.sleep(3600.0)

    def snapshot(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "instance": self.instance, "store": self.store.mode,
            "durable": self.store.durable,
            "queue": "redis" if self.redis_url else "local",
            "running": len(engine.running) if engine is not None else 0,
            "backlog": len(engine.backlog) if engine is not None else 0,
            "max_concurrent": self.wcfg.max_concurrent,
            "queue_error": self.queue_error,
        }
