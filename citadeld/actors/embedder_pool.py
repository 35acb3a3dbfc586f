"""EmbedderPool: the facade in front of one model's EmbedderActors.

pykka cannot peek at an inbox, so batches are formed here, on the event loop, before any actor
sees them: single inputs queue up and leave as one batch when a slot is free and the batch is full
(items or tokens) or its oldest input has waited `max_wait_ms`. Each slot (one actor, one backend
endpoint) computes one batch at a time, which matches Ollama's parallel=1 and lets batches grow
under load. Identical in-flight inputs share one slot; inputs whose callers all went away are
dropped before they cost a backend call.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pykka

from citadeld.actors.backends.base import BatchResult
from citadeld.actors.embedder import EmbedBatch, Probe
from citadeld.config import ModelConfig
from citadeld.errors import BackendError, ItemError, Overloaded, Unavailable
from citadeld.metrics import Metrics

log = logging.getLogger("citadeld.embedder")

_batch_ids = itertools.count(1)


def estimate_tokens(text: str) -> int:
    """Cheap token estimate for batch budgeting (about 4 characters a token in English)."""
    return len(text) // 4 + 2


@dataclass(eq=False)
class _Item:
    text: str
    truncate: bool
    tokens: int
    future: asyncio.Future[tuple[np.ndarray, int]]
    enqueued: float
    waiters: int = 1
    attempts: int = 0
    tried: set[int] = field(default_factory=set)
    dispatched: bool = False


@dataclass(eq=False)
class Slot:
    index: int
    endpoint: str
    ref: pykka.ActorRef[Any] | None = None
    batch: list[_Item] | None = None
    reply: concurrent.futures.Future[BatchResult] | None = None
    cooldown_until: float = 0.0
    failures: int = 0
    last_error: str | None = None
    last_ok: float | None = None
    deadline: asyncio.TimerHandle | None = None
    ready: bool = False  # answered a probe or a batch since it (re)started
    freed_at: float = 0.0  # when its last batch ended (monotonic)

    @property
    def alive(self) -> bool:
        return self.ref is not None

    def free(self, now: float) -> bool:
        return self.ref is not None and self.batch is None and now >= self.cooldown_until


class EmbedderPool:
    """Loop-side facade; every method except the `slot_*` callbacks runs on the event loop."""

    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        endpoints: list[str],
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.metrics = metrics
        self.loop = loop
        self.slots = [Slot(i, ep) for i, ep in enumerate(endpoints)]
        self._queue: collections.deque[_Item] = collections.deque()
        self._pending: dict[tuple[str, bool], _Item] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._rr = itertools.count()
        self._m_queue = metrics.queue_depth.labels(name)
        self._m_inflight = metrics.inflight_batches.labels(name)
        self._m_batch = metrics.batch_size.labels(name)
        self._m_wait = metrics.embed_stage.labels(name, "queue")
        self._m_rtt = metrics.embed_stage.labels(name, "batch")
        self._m_backend = metrics.embed_stage.labels(name, "backend")
        self.closed = False

    # ---- supervisor callbacks (any thread) -------------------------------------------------

    def slot_started(self, index: int, ref: pykka.ActorRef[Any]) -> None:
        self._call(self._on_started, index, ref)

    def slot_died(self, index: int, exc: BaseException | None) -> None:
        self._call(self._on_died, index, exc)

    def _call(self, fn: Any, *args: Any) -> None:
        """Hop onto the loop; after shutdown closed it there is nobody left to tell."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def _on_started(self, index: int, ref: pykka.ActorRef[Any]) -> None:
        slot = self.slots[index]
        slot.ref = ref
        slot.ready = False
        self._probe(slot)
        self._kick()

    def _on_died(self, index: int, exc: BaseException | None) -> None:
        slot = self.slots[index]
        slot.ref = None
        slot.ready = False
        if slot.reply is not None:
            err = BackendError(f"embedder actor died: {exc!r}", kind="died", endpoint=slot.endpoint)
            self._finish(slot, slot.reply, None, err)

    # ---- public ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def can_embed(self) -> bool:
        now = time.monotonic()
        return any(s.alive and s.ready and s.cooldown_until <= now for s in self.slots)

    def _probe(self, slot: Slot) -> None:
        """Readiness: the local model is loaded / the endpoint answers. Re-probed while not."""
        ref = slot.ref
        if ref is None or self.closed:
            return
        msg = Probe()

        def done(cf: concurrent.futures.Future[None]) -> None:
            self._call(self._on_probe, slot, ref, cf)

        msg.reply.add_done_callback(done)
        ref.tell(msg)

    def _on_probe(
        self, slot: Slot, ref: pykka.ActorRef[Any], cf: concurrent.futures.Future[None]
    ) -> None:
        if slot.ref is not ref:
            return
        ok = not cf.cancelled() and cf.exception() is None
        slot.ready = ok
        if not ok:
            self.loop.call_later(2.0, self._probe, slot)

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "queue_depth": len(self._queue),
            "slots": [
                {
                    "endpoint": s.endpoint,
                    "alive": s.alive,
                    "ready": s.ready,
                    "busy": s.batch is not None,
                    "cooldown_s": round(max(0.0, s.cooldown_until - now), 3),
                    "consecutive_failures": s.failures,
                    "last_error": s.last_error,
                }
                for s in self.slots
            ],
        }

    async def embed(self, texts: list[str], truncate: bool) -> list[tuple[np.ndarray, int]]:
        """Embed `texts`; returns (vector, tokens) per text. Raises ItemError (one input bad) or
        a CitadelError for the whole call."""
        if self.closed:
            raise Unavailable(f"model {self.name} is shutting down", retry_after=5)
        new = [t for t in texts if (t, truncate) not in self._pending]
        if len(self._queue) + len(new) > self.cfg.queue_cap:
            self.metrics.rejected.labels(self.name).inc()
            raise Overloaded(
                f"model {self.name} has {len(self._queue)} inputs queued (cap"
                f" {self.cfg.queue_cap}); retry later",
                retry_after=self._retry_after_hint(),
            )
        now = time.monotonic()
        items: list[_Item] = []
        for text in texts:
            key = (text, truncate)
            item = self._pending.get(key)
            if item is not None:
                item.waiters += 1
            else:
                item = _Item(text, truncate, estimate_tokens(text), self.loop.create_future(), now)
                item.future.add_done_callback(_consume)
                self._pending[key] = item
                self._queue.append(item)
            items.append(item)
        self._m_queue.set(len(self._queue))
        self._kick()
        try:
            # shield: an item shared with another caller must survive this caller's cancellation
            results = await asyncio.gather(
                *(asyncio.shield(i.future) for i in items), return_exceptions=True
            )
        except asyncio.CancelledError:
            for item in items:
                item.waiters -= 1
                if item.waiters <= 0 and not item.dispatched and not item.future.done():
                    self._drop(item)
            raise
        out: list[tuple[np.ndarray, int]] = []
        for position, res in enumerate(results):
            if isinstance(res, ItemError):
                raise ItemError(res.error, position)  # a fresh one: others may share `res`
            if isinstance(res, BaseException):
                raise res
            out.append(res)
        return out

    def close(self, exc: BaseException) -> None:
        """Fail everything queued; used at shutdown after in-flight batches had their chance."""
        self.closed = True
        while self._queue:
            item = self._queue.popleft()
            self._settle(item, exc)
        self._m_queue.set(0)

    # ---- batching -------------------------------------------------------------------------

    def _retry_after_hint(self) -> float:
        return max(1.0, min(30.0, len(self._queue) / max(1, self.cfg.batch.max_items) * 0.1))

    def _drop(self, item: _Item) -> None:
        self._pending.pop((item.text, item.truncate), None)
        if not item.future.done():
            item.future.cancel()
        self.metrics.embed_items.labels(self.name, "abandoned").inc()

    def _pick_slot(self, now: float, avoid: set[int]) -> Slot | None:
        free = [s for s in self.slots if s.free(now)]
        if not free:
            return None
        preferred = [s for s in free if s.index not in avoid] or free
        best = min(s.failures for s in preferred)
        candidates = [s for s in preferred if s.failures == best]
        return candidates[next(self._rr) % len(candidates)]

    def _kick(self) -> None:
        """Dispatch every batch that is due to every free slot; otherwise arm a timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        bcfg = self.cfg.batch
        while self._queue:
            head = self._queue[0]
            if head.waiters <= 0 or head.future.done():
                self._queue.popleft()
                continue
            now = time.monotonic()
            slot = self._pick_slot(now, head.tried)
            if slot is None:
                self._arm_cooldown_timer(now)
                break
            # max_wait counts from the later of the head's arrival and the slot's last batch
            # end: the callers that batch just answered resubmit within a millisecond or two,
            # and dispatching the leftovers at once would halve every batch in steady state
            waited = now - max(head.enqueued, slot.freed_at)
            due = (
                len(self._queue) >= bcfg.max_items
                or waited * 1000 >= bcfg.max_wait_ms
                or self._queued_tokens(bcfg.max_tokens) >= bcfg.max_tokens
            )
            if not due:
                self._timer = self.loop.call_later(
                    bcfg.max_wait_ms / 1000 - waited, self._kick
                )
                break
            self._dispatch(slot, self._take_batch(head.truncate))
        self._m_queue.set(len(self._queue))

    def _queued_tokens(self, limit: int) -> int:
        total = 0
        for item in self._queue:
            total += item.tokens
            if total >= limit:
                break
        return total

    def _arm_cooldown_timer(self, now: float) -> None:
        waits = [s.cooldown_until - now for s in self.slots if s.alive and s.batch is None]
        waits = [w for w in waits if w > 0]
        if waits:
            self._timer = self.loop.call_later(min(waits), self._kick)

    def _take_batch(self, truncate: bool) -> list[_Item]:
        """Items of one truncate mode, up to the item and token budgets (at least one item)."""
        bcfg = self.cfg.batch
        batch: list[_Item] = []
        tokens = 0
        skipped: list[_Item] = []
        while self._queue and len(batch) < bcfg.max_items:
            item = self._queue[0]
            if item.waiters <= 0 or item.future.done():
                self._queue.popleft()
                continue
            if item.truncate != truncate:
                skipped.append(self._queue.popleft())
                continue
            if batch and tokens + item.tokens > bcfg.max_tokens:
                break
            self._queue.popleft()
            batch.append(item)
            tokens += item.tokens
        self._queue.extendleft(reversed(skipped))
        return batch

    def _dispatch(self, slot: Slot, batch: list[_Item]) -> None:
        assert slot.ref is not None
        now = time.monotonic()
        for item in batch:
            item.dispatched = True
            item.attempts += 1
            item.tried.add(slot.index)
            self._m_wait.observe(now - item.enqueued)
        reply: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
        slot.batch = batch
        slot.reply = reply
        self._m_batch.observe(len(batch))
        self._m_inflight.inc()
        started = now
        texts = [i.text for i in batch]
        slot.ref.tell(EmbedBatch(texts, batch[0].truncate, reply, next(_batch_ids)))

        def done(cf: concurrent.futures.Future[BatchResult]) -> None:
            self._call(self._on_reply, slot, cf, started)

        reply.add_done_callback(done)
        # Belt and braces over the backend's own timeouts: a wedged actor must not hold callers.
        slot.deadline = self.loop.call_later(
            self.cfg.timeout_s + self.cfg.connect_timeout_s + 5, self._on_deadline, slot, reply
        )

    def _on_deadline(self, slot: Slot, reply: concurrent.futures.Future[BatchResult]) -> None:
        if slot.reply is reply:
            err = BackendError(
                "batch exceeded its deadline", kind="timeout", endpoint=slot.endpoint
            )
            self._finish(slot, reply, None, err)
            slot.cooldown_until = time.monotonic() + 5.0

    def _on_reply(
        self, slot: Slot, cf: concurrent.futures.Future[BatchResult], started: float
    ) -> None:
        if slot.reply is not cf:
            return  # already settled by death or deadline
        self._m_rtt.observe(time.monotonic() - started)
        exc = cf.exception()
        if exc is None:
            self._finish(slot, cf, cf.result(), None)
        elif isinstance(exc, BackendError):
            self._finish(slot, cf, None, exc)
        else:
            died = BackendError(repr(exc), kind="died", endpoint=slot.endpoint)
            self._finish(slot, cf, None, died)

    def _finish(
        self,
        slot: Slot,
        cf: concurrent.futures.Future[BatchResult],
        result: BatchResult | None,
        err: BackendError | None,
    ) -> None:
        batch = slot.batch or []
        slot.batch = None
        slot.reply = None
        slot.freed_at = time.monotonic()
        if slot.deadline is not None:
            slot.deadline.cancel()
            slot.deadline = None
        self._m_inflight.dec()
        if result is not None:
            self._m_backend.observe(result.backend_s)
            slot.ready = True
            slot.failures = 0
            slot.last_ok = time.time()
            self._deliver(batch, result)
        else:
            assert err is not None
            self._on_batch_error(slot, batch, err)
        self._kick()

    def _deliver(self, batch: list[_Item], result: BatchResult) -> None:
        ok = 0
        for i, item in enumerate(batch):
            error = result.errors.get(i)
            if error is not None:
                self._settle(item, ItemError(error))
                self.metrics.embed_items.labels(self.name, "rejected").inc()
            else:
                self._settle(item, (result.vectors[i], result.tokens[i]))
                ok += 1
        if ok:
            self.metrics.embed_items.labels(self.name, "ok").inc(ok)

    def _on_batch_error(self, slot: Slot, batch: list[_Item], err: BackendError) -> None:
        self.metrics.backend_errors.labels(self.name, slot.endpoint, err.kind).inc()
        slot.last_error = f"{err.kind}: {err.message}"
        log.warning(
            "embedding batch failed",
            extra={"model": self.name, "endpoint": slot.endpoint, "kind": err.kind,
                   "error": err.message, "items": len(batch)},
        )
        if not err.retryable:
            for item in batch:
                self._settle(item, ItemError(err))
            return
        slot.failures += 1
        if err.kind in ("connect", "timeout") and slot.ready:
            slot.ready = False
            self.loop.call_later(2.0, self._probe, slot)
        backoff = err.retry_after if err.retry_after else min(30.0, 0.25 * 2 ** (slot.failures - 1))
        slot.cooldown_until = time.monotonic() + backoff
        retry = [i for i in batch if i.attempts < self.cfg.attempts and i.waiters > 0]
        for item in batch:
            if item not in retry:
                self._settle(item, err.to_client_error())
        for item in reversed(retry):
            item.dispatched = False
            self._queue.appendleft(item)

    def _settle(self, item: _Item, outcome: Any) -> None:
        self._pending.pop((item.text, item.truncate), None)
        if item.future.done():
            return
        if isinstance(outcome, BaseException):
            item.future.set_exception(outcome)
        else:
            item.future.set_result(outcome)


def _consume(fut: asyncio.Future[Any]) -> None:
    """Mark an item's outcome as seen, so one whose callers left logs no 'never retrieved'."""
    if not fut.cancelled():
        fut.exception()


def pool_endpoints(cfg: ModelConfig) -> list[str]:
    """One label per slot: endpoints repeated `slots` times; the local backend has one slot."""
    if cfg.backend == "local":
        return ["local"]
    out = []
    for ep in cfg.endpoints:
        out.extend([ep.name or ep.url] * ep.slots)
    return out

