"""The workflow runner: a supervised actor whose thread runs an engine on a private loop.

The engine claims jobs (bounded by ``max_concurrent``), runs each workflow's DAG (independent
steps in parallel), retries steps with full-jitter backoff inside per-step timeouts and the
workflow's deadline, records every step as done before moving on, and publishes progress
events. Step work itself runs on the daemon's loop, where the services live: the engine
schedules it there with ``run_coroutine_threadsafe`` and waits on the concurrent future, so
cancelling a step (timeout, cancel request, lost lease) cancels the service call too.

If the engine crashes, the actor dies, the supervisor restarts it with backoff, and the new
engine resumes what the old one held (its own pending stream entries, or the unfinished
workflows of the local store). The actor never answers Ping (its one message runs the engine
until stop), so its spec has no ping interval.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from citadeld.events import model as ev
from citadeld.supervision import ChildLink, SupervisedActor
from citadeld.workflows.queue import Job, RedisClaimer
from citadeld.workflows.record import STEP_DONE, TERMINAL, snapshot
from citadeld.workflows.spec import (
    ReferenceError_,
    Spec,
    SpecError,
    Step,
    resolve,
    validate_params,
)
from citadeld.workflows.steps import StepFailed, classify
from citadeld.workflows.store import StoreUnavailable

if TYPE_CHECKING:
    from citadeld.workflows.service import WorkflowService

log = logging.getLogger("citadeld.workflows")
T = TypeVar("T")


class WorkflowFailed(Exception):
    pass


class _Interrupted(Exception):
    """Stopped without a verdict (shutdown, lease lost): the workflow stays resumable."""


class Engine:
    def __init__(self, svc: WorkflowService, loop: asyncio.AbstractEventLoop) -> None:
        self.svc = svc
        self.cfg = svc.wcfg
        self.loop = loop
        self.front = svc.front_loop
        self.metrics = svc.metrics
        self.running: dict[str, tuple[asyncio.Task[None], Job]] = {}
        self.backlog: deque[Job] = deque()
        self.cancel_wanted: set[str] = set()
        self.interrupt: set[str] = set()
        self.front_calls: set[concurrent.futures.Future[Any]] = set()
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.claimer: RedisClaimer | None = None
        self.rng = random.Random()
        self.finished: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.last_beat = time.time()

    # ---- thread-safe entry points (called from the daemon's loop) ----------------------------

    def _call(self, fn: Any, *args: Any) -> None:
        """Schedule on the engine's loop; a no-op once that loop is gone (engine died)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def request_stop(self) -> None:
        def stop() -> None:
            self.stop.set()
            self.wake.set()
        self._call(stop)

    def cancel_threadsafe(self, wid: str) -> None:
        self._call(self._cancel, wid)

    def poke(self) -> None:
        self._call(self.wake.set)

    def abort(self) -> None:
        """The actor died: calls in flight on the daemon's loop must not linger."""
        for cf in list(self.front_calls):
            cf.cancel()
        if not self.finished.done():
            self.finished.set_result(None)

    # ---- helpers -----------------------------------------------------------------------------

    async def on_front(self, coro: Coroutine[Any, Any, T]) -> T:
        cf = asyncio.run_coroutine_threadsafe(coro, self.front)
        self.front_calls.add(cf)
        try:
            return await asyncio.wrap_future(cf)
        finally:
            self.front_calls.discard(cf)

    async def publish(self, rec: dict[str, Any], etype: str, **data: Any) -> None:
        await self.on_front(self.svc.publish(rec["id"], rec["owner"], etype, data))

    async def save(self, rec: dict[str, Any], durable: bool = True) -> None:
        rec["updated_at"] = time.time()
        await self.on_front(self.svc.store.save(rec, durable))

    def _cancel(self, wid: str) -> None:
        """A cancel request (API, pubsub, heartbeat flag - often all three): the task is
        cancelled once, so a second request cannot interrupt its recording of the verdict."""
        entry = self.running.get(wid)
        if entry is not None and wid not in self.cancel_wanted and wid not in self.interrupt:
            self.cancel_wanted.add(wid)
            entry[0].cancel()

    # ---- main loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if not self.finished.done():
                self.finished.set_result(None)

    async def _run(self) -> None:
        svc = self.svc
        side: list[asyncio.Task[Any]] = []
        if svc.redis_url is not None:
            import redis.asyncio as aredis
            client = aredis.Redis.from_url(svc.redis_url, socket_timeout=None,
                                           socket_connect_timeout=3.0,
                                           health_check_interval=30)
            self.claimer = RedisClaimer(client, self.cfg.key_prefix, svc.instance,
                                        self.cfg.claim_timeout_s)
            await self._ensure_group()
            with contextlib.suppress(Exception):
                own = await self.claimer.own_pending()
                if own:
                    log.info("resuming workflows held before a restart",
                             extra={"count": len(own)})
                    self.metrics.reclaimed.inc(len(own))
                self.backlog.extend(own)
            side = [self.loop.create_task(self._heartbeats()),
                    self.loop.create_task(self._reclaims()),
                    self.loop.create_task(self.claimer.cancel_messages(self._cancel, self.stop))]
        else:
            svc.local_queue_waker(self.poke)
            for wid in await self.on_front(svc.store.unfinished()):
                if wid not in self.running:
                    with contextlib.suppress(Exception):
                        svc.local_put(wid)
        log.info("workflow runner started", extra={"instance": svc.instance,
                                                   "queue": "redis" if self.claimer else "local",
                                                   "store": svc.store.mode})
        try:
            await self._claim_loop()
        finally:
            await self._shutdown(side)

    async def _ensure_group(self) -> None:
        assert self.claimer is not None
        if await self.claimer.ensure_group() and self.svc.store.durable:
            ids = await self.on_front(self.svc.store.unfinished())
            if ids:  # Redis came back empty (or first start): nothing accepted is dropped
                log.warning("job stream was missing; re-enqueueing unfinished workflows",
                            extra={"count": len(ids)})
                for wid in ids:
                    await self.claimer.redis.xadd(self.claimer.stream, {"wid": wid})

    async def _claim_loop(self) -> None:
        while not self.stop.is_set():
            free = self.cfg.max_concurrent - len(self.running)
            while free > 0 and self.backlog:
                self._start(self.backlog.popleft())
                free -= 1
            if free <= 0:
                await self._idle(1.0)
                continue
            if self.claimer is None:
                jobs = self.svc.local_take(free)
                if not jobs:
                    await self._idle(1.0)
                    continue
            else:
                try:
                    jobs = await self.claimer.claim(free, block_ms=500)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("workflow queue unavailable: %s", exc)
                    self.svc.health_note(f"redis: {exc}")
                    await self._idle(1.0)
                    with contextlib.suppress(Exception):
                        await self._ensure_group()
                    continue
                self.svc.health_note(None)
            for j in jobs:
                self._start(j)

    async def _idle(self, wait_s: float) -> None:
        """Wait for a free slot, new local work, or stop (all of which set ``wake``)."""
        if not self.wake.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait_s)
        self.wake.clear()

    def _start(self, job: Job) -> None:
        if job.wid in self.running:
            if self.claimer is not None and job.entry != self.running[job.wid][1].entry:
                self.loop.create_task(self._quiet(self.claimer.drop_entry(job)))
            return
        task = self.loop.create_task(self._execute(job), name=f"workflow:{job.wid}")
        self.running[job.wid] = (task, job)
        self.metrics.active.set(len(self.running))

        def done(t: asyncio.Task[None], wid: str = job.wid) -> None:
            if self.running.get(wid, (None,))[0] is t:
                del self.running[wid]
            self.cancel_wanted.discard(wid)
            self.interrupt.discard(wid)
            self.metrics.active.set(len(self.running))
            self.wake.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("workflow task failed", exc_info=t.exception(),
                          extra={"workflow_id": wid})
        task.add_done_callback(done)

    async def _quiet(self, coro: Coroutine[Any, Any, Any]) -> None:
        with contextlib.suppress(Exception):
            await coro

    async def _heartbeats(self) -> None:
        assert self.claimer is not None
        while not self.stop.is_set():
            await asyncio.sleep(self.cfg.heartbeat)
            self.last_beat = time.time()
            jobs = [j for _, j in self.running.values()]
            try:
                lost = await self.claimer.heartbeat(jobs)
                flags = await self._cancel_flags(jobs)
            except Exception as exc:
                log.warning("workflow heartbeat failed: %s", exc)
                continue
            for j in lost:
                if j.wid in self.interrupt or j.wid in self.cancel_wanted:
                    continue
                log.warning("lost the claim on a workflow; stopping it here",
                            extra={"workflow_id": j.wid})
                self.metrics.lost_claims.inc()
                self.interrupt.add(j.wid)
                entry = self.running.get(j.wid)
                if entry is not None:
                    entry[0].cancel()
            for wid in flags:
                self._cancel(wid)

    async def _cancel_flags(self, jobs: list[Job]) -> list[str]:
        """Cancellation published while our pubsub connection was down is not missed."""
        assert self.claimer is not None
        if not jobs:
            return []
        pipe = self.claimer.redis.pipeline(transaction=False)
        for j in jobs:
            pipe.exists(f"{self.cfg.key_prefix}cancel:{j.wid}")
        res = await pipe.execute()
        return [j.wid for j, n in zip(jobs, res, strict=True) if n]

    async def _reclaims(self) -> None:
        assert self.claimer is not None
        while not self.stop.is_set():
            await asyncio.sleep(self.cfg.reclaim_interval)
            free = self.cfg.max_concurrent - len(self.running) - len(self.backlog)
            if free <= 0:
                continue
            try:
                jobs = await self.claimer.reclaim(free)
            except Exception as exc:
                log.warning("workflow reclaim failed: %s", exc)
                continue
            fresh = [j for j in jobs if j.wid not in self.running]
            if fresh:
                log.info("reclaimed workflows from a silent instance",
                         extra={"count": len(fresh), "ids": [j.wid for j in fresh][:20]})
                self.metrics.reclaimed.inc(len(fresh))
                self.backlog.extend(fresh)
                self.wake.set()

    async def _shutdown(self, side: list[asyncio.Task[Any]]) -> None:
        if self.running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.shutdown_grace_s):
                    await asyncio.gather(*[t for t, _ in self.running.values()],
                                         return_exceptions=True)
        for wid, (task, _) in list(self.running.items()):
            self.interrupt.add(wid)
            task.cancel()
        if self.running:
            await asyncio.gather(*[t for t, _ in self.running.values()],
                                 return_exceptions=True)
        for t in side:
            t.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        if self.claimer is not None:
            with contextlib.suppress(Exception):
                await self.claimer.redis.aclose()

    # ---- one workflow ------------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        c = self.claimer
        try:
            if c is not None:
                wait_ms = await c.acquire(job.wid)
                if wait_ms:  # another live holder, or a dead one's lease not expired yet
                    self.loop.call_later(wait_ms / 1000 + 0.05, self._retry_later, job)
                    return
            rec = await self.on_front(self.svc.store.get(job.wid, fresh=True))
            if rec is None or rec["status"] in TERMINAL:
                if c is not None:
                    await c.done(job)
                return
        except (StoreUnavailable, OSError, ConnectionError) as exc:
            self._unavailable(job, exc)
            return
        except Exception as exc:
            if type(exc).__module__.startswith("redis"):  # Redis away: reclaimed later
                self._unavailable(job, exc)
                return
            raise
        try:
            final = await self._run_workflow(rec)
        except _Interrupted:
            return
        except StoreUnavailable as exc:  # no verdict without a record: try again later
            self._unavailable(job, exc)
            return
        except Exception as exc:  # a bug: fail this workflow clearly, keep the others going
            log.exception("workflow crashed", extra={"workflow_id": job.wid})
            try:
                final = await self._finish(rec, "failed", f"internal error: {exc!r}")
            except Exception:
                return
        if final and c is not None:
            with contextlib.suppress(Exception):
                await c.done(job)

    def _unavailable(self, job: Job, exc: BaseException) -> None:
        """State or queue unreachable: the workflow keeps its durable state and is picked up
        again - locally after a pause, with Redis when its idle entry is reclaimed."""
        log.warning("workflow state unavailable; the workflow will be resumed",
                    extra={"workflow_id": job.wid, "error": str(exc)})
        if self.claimer is None:
            self.loop.call_later(2.0, self._requeue_local, job.wid)

    def _requeue_local(self, wid: str) -> None:
        with contextlib.suppress(Exception):
            self.svc.local_put(wid)

    def _retry_later(self, job: Job) -> None:
        if not self.stop.is_set():
            self.backlog.append(job)
            self.wake.set()

    async def _run_workflow(self, rec: dict[str, Any]) -> bool:
        """Run to a final state; True once that state is recorded."""
        wid = rec["id"]
        spec = Spec.from_json(rec["spec"])
        if rec.get("cancel_requested") or (self.claimer is not None
                                           and await self.on_front(
                                               self.svc.store.cancel_flag(wid))):
            return await self._final(rec, "cancelled", "cancelled by request")
        resumed = rec.get("runs", 0) > 0
        rec.update(status="running", instance=self.svc.instance, runs=rec.get("runs", 0) + 1)
        rec["started_at"] = rec.get("started_at") or time.time()
        for st in rec["steps"].values():
            if st["status"] != STEP_DONE:
                st["status"] = "pending"
        await self.save(rec)
        done = [sid for sid, st in rec["steps"].items() if st["status"] == STEP_DONE]
        await self.publish(rec, ev.RUN_STARTED, resumed=resumed, instance=self.svc.instance,
                           skipped_done_steps=done)
        remaining = rec["deadline_at"] - time.time()
        try:
            async with asyncio.timeout(max(0.0, remaining)) as deadline:
                await self._run_dag(rec, spec)
        except WorkflowFailed as exc:
            return await self._final(rec, "failed", str(exc))
        except TimeoutError:
            if deadline.expired():
                return await self._final(rec, "failed", f"workflow deadline of "
                                          f"{spec.deadline_s:g} s exceeded")
            raise
        except asyncio.CancelledError:
            if wid in self.interrupt or wid not in self.cancel_wanted:
                raise _Interrupted() from None
            return await self._final(rec, "cancelled", "cancelled by request")
        return await self._final(rec, "completed", None)

    async def _run_dag(self, rec: dict[str, Any], spec: Spec) -> None:
        outputs = {sid: st["output"] for sid, st in rec["steps"].items()
                   if st["status"] == STEP_DONE}
        active: dict[asyncio.Task[dict[str, Any]], str] = {}
        started: set[str] = set(outputs)
        try:
            while True:
                for s in spec.steps:
                    if s.id not in started and all(d in outputs for d in s.depends_on):
                        started.add(s.id)
                        t = self.loop.create_task(self._run_step(rec, s, outputs))
                        active[t] = s.id
                if not active:
                    return
                finished, _ = await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    sid = active.pop(t)
                    exc = t.exception()
                    if exc is not None:
                        raise exc
                    outputs[sid] = t.result()
        finally:
            for t in active:
                t.cancel()
            if active:
                await asyncio.gather(*active, return_exceptions=True)

    async def _run_step(self, rec: dict[str, Any], step: Step, outputs: dict[str, Any]
                        ) -> dict[str, Any]:
        wid, st = rec["id"], rec["steps"][step.id]
        st.update(status="running", started_at=time.time(), finished_at=None, error=None)
        await self.save(rec, durable=False)
        await self.publish(rec, ev.STEP_STARTED, step_id=step.id, step_type=step.type,
                           attempt=st["attempts"] + 1)
        t0 = time.perf_counter()
        ctx_args = (wid, step.id, rec["owner"], rec.get("request_id"))
        attempt = 0
        while True:
            attempt += 1
            st["attempts"] += 1
            timer = None
            try:
                try:
                    params = resolve(step.params, outputs)
                    validate_params(step.type, params, f"step {step.id!r} after resolving "
                                                       "references")
                except (ReferenceError_, SpecError) as exc:
                    raise StepFailed(str(exc), retryable=False) from None
                async with asyncio.timeout(step.timeout_s) as timer:
                    out = await self.on_front(self.svc.execute(step.type, params, *ctx_args))
                break
            except asyncio.CancelledError:
                st.update(status="cancelled", finished_at=time.time())
                raise
            except Exception as exc:
                if isinstance(exc, TimeoutError) and timer is not None and timer.expired():
                    f = StepFailed(f"timed out after {step.timeout_s:g} s", retryable=True)
                else:
                    f = classify(exc)
                self.metrics.failures.labels(step.type, "retryable" if f.retryable
                                             else "final").inc()
                if not f.retryable or attempt > step.retries:
                    tries = f"after {attempt} attempt{'s' if attempt > 1 else ''}"
                    msg = f"step {step.id!r} ({step.type}) failed {tries}: {f.message}"
                    st.update(status="failed", error=msg, finished_at=time.time(),
                              duration_ms=round((time.perf_counter() - t0) * 1000, 3))
                    self.metrics.step_duration.labels(step.type, "failed").observe(
                        time.perf_counter() - t0)
                    await self.save(rec)
                    await self.publish(rec, ev.STEP_ERROR, step_id=step.id,
                                       step_type=step.type, error=msg, attempts=attempt)
                    raise WorkflowFailed(msg) from None
                st["error"] = f"attempt {attempt}: {f.message}"
                cap = min(self.cfg.retry_backoff_max_s, self.cfg.retry_backoff_s * 2 ** attempt)
                delay = self.rng.uniform(cap / 2, cap)
                log.info("workflow step retrying", extra={
                    "workflow_id": wid, "step": step.id, "attempt": attempt,
                    "error": f.message, "delay_s": round(delay, 3)})
                await asyncio.sleep(delay)
        elapsed = time.perf_counter() - t0
        st.update(status=STEP_DONE, output=out, error=None, finished_at=time.time(),
                  duration_ms=round(elapsed * 1000, 3))
        self.metrics.step_duration.labels(step.type, "completed").observe(elapsed)
        await self.save(rec)  # recorded as done before anything depends on it
        await self.publish(rec, ev.STEP_FINISHED, step_id=step.id, step_type=step.type,
                           duration_ms=st["duration_ms"], attempts=attempt)
        await self.publish(rec, ev.STATE_SNAPSHOT, snapshot=snapshot(rec))
        return out

    async def _final(self, rec: dict[str, Any], status: str, error: str | None) -> bool:
        """``_finish`` shielded: a cancel arriving now cannot cut the verdict's recording or
        its announcement short (the task still ends cancelled; the verdict stands)."""
        return await asyncio.shield(self._finish(rec, status, error))

    async def _finish(self, rec: dict[str, Any], status: str, error: str | None) -> bool:
        now = time.time()
        rec.update(status=status, error=error, finished_at=now)
        leftover = "cancelled" if status == "cancelled" else "skipped"
        for st in rec["steps"].values():
            if st["status"] in ("pending", "running"):
                st["status"] = leftover if st["status"] == "pending" else "cancelled"
        for attempt in range(30):  # the verdict must be recorded, or the job stays claimable
            try:
                await self.save(rec)
                break
            except Exception as exc:
                if self.stop.is_set() or attempt == 29:
                    log.error("could not record the final state of a workflow; it stays "
                              "resumable", extra={"workflow_id": rec["id"], "error": str(exc)})
                    raise _Interrupted() from None
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt))
        self.metrics.finished.labels(status).inc()
        self.metrics.duration.labels(status).observe(max(0.0, now - rec["created_at"]))
        etype = {"completed": ev.RUN_FINISHED, "failed": ev.RUN_ERROR,
                 "cancelled": ev.RUN_CANCELLED}[status]
        await self.publish(rec, ev.STATE_SNAPSHOT, snapshot=snapshot(rec))
        await self.publish(rec, etype, status=status, error=error,
                           result_url=f"/api/v1/workflows/{rec['id']}")
        log.info("workflow finished", extra={"workflow_id": rec["id"], "status": status,
                                             "error": error})
        return True


class _Run:
    pass


class WorkflowActor(SupervisedActor):
    """Hosts one Engine; its single message runs the engine until stop."""

    def __init__(self, svc: WorkflowService, *, link: ChildLink | None = None) -> None:
        super().__init__(link=link)
        self.svc = svc
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None

    def on_start_supervised(self) -> None:
        self.svc.ready.wait()  # the daemon's services are wired (set in WorkflowService.start)
        self.loop = asyncio.new_event_loop()
        self.engine = Engine(self.svc, self.loop)
        self.svc.engine_started(self.engine)
        self.actor_ref.tell(_Run())

    def on_receive_supervised(self, message: Any) -> Any:
        if isinstance(message, _Run):
            assert self.loop is not None and self.engine is not None
            self.current_work = message
            self.loop.run_until_complete(self.engine.run())
            return None
        return super().on_receive_supervised(message)

    def fail_in_hand(self, exc: BaseException) -> None:
        if self.engine is not None:
            self.engine.abort()
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(Exception):
                for t in asyncio.all_tasks(loop):
                    t.cancel()
            loop.close()

    def on_stop(self) -> None:
        self.fail_in_hand(RuntimeError("stopped"))
        super().on_stop()
