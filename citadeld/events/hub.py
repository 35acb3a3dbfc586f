"""What both buses share: local fan-out to bounded subscriber queues, the history-then-live
hand-over, GAP markers for slow consumers, and publishing from any thread.

A backend implements ``_record`` (store the event, return its id; the event reaches
subscribers through ``Hub.dispatch``, called by the backend once the event is recorded) and
``_history`` (retained events after an id, plus the highest id trimmed from retention so a
resume that reaches below it gets a GAP).

Memory is bounded everywhere: a subscriber's queue holds at most ``subscriber_queue`` events;
when it is full the backlog is dropped and replaced by one pending GAP (from/to ids, count) so
the consumer skips ahead to live events; past ``max_gaps`` overflows (or at once under the
``disconnect`` policy) the subscriber is ended with ``SlowConsumer``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from citadeld.errors import CitadelError, Unavailable
from citadeld.events.config import EventsConfig
from citadeld.events.ids import ZERO, Key, format_id, parse_id
from citadeld.events.metrics import EventMetrics
from citadeld.events.model import EVENT_TYPES, GAP, Event

log = logging.getLogger("citadeld.events")

ALL = "*"  # workflow_id of a GAP on an all-workflows subscription
HISTORY_PAGE = 500
MAX_WORKFLOW_ID = 256

Accept = Callable[[Event], bool]


class SlowConsumer(CitadelError):
    """The subscriber fell behind more often than the policy allows and was disconnected."""

    status = 503
    code = "slow_consumer"


class BusClosed(Exception):
    pass


def check_event(event: Event) -> None:
    """What publish accepts; a bad event is the caller's bug, so ValueError, not a 4xx."""
    if event.type not in EVENT_TYPES or event.type == GAP:
        raise ValueError(f"unknown event type {event.type!r}")
    if not isinstance(event.workflow_id, str) or not 0 < len(event.workflow_id) <= \
            MAX_WORKFLOW_ID or event.workflow_id == ALL:
        raise ValueError("workflow_id must be a non-empty string of at most 256 characters")
    if not isinstance(event.data, dict):
        raise ValueError("event data must be a dict")
    try:
        orjson.dumps(event.data)
    except TypeError as exc:
        raise ValueError(f"event data is not JSON-serialisable: {exc}") from None


class Subscription:
    """One consumer's view: ``async for event in sub`` (history first, then live).

    Created by ``Hub.subscribe``; always ``close()`` it (transports do, in ``finally``).
    """

    def __init__(self, hub: Hub, workflow_id: str | None, after: str | None,
                 accept: Accept | None) -> None:
        self.hub = hub
        self.workflow_id = workflow_id
        self.scope = "all" if workflow_id is None else "workflow"
        self.accept = accept
        self._after = parse_id(after) if after is not None else None
        # replay: a workflow subscription starts from its retained beginning, an all-workflows
        # one from now unless resuming
        self._replay = workflow_id is not None or after is not None
        self.cursor: Key = self._after if self._after is not None else ZERO
        self._live = not self._replay
        self._missed = False  # a live event arrived while replaying: replay once more
        self._q: deque[Event] = deque()
        self._gap: list[Any] | None = None  # [from_key, to_key, count]
        self._waiter: asyncio.Future[None] | None = None
        self._ended: BaseException | None = None
        self.gaps = 0
        self.delivered = 0
        self._history_left = 0  # replayed events still queued after going live
        self.historic = False  # the last event returned came from history, not live

    # -- producer side (the loop's thread, from Hub.dispatch) --------------------------------

    def offer(self, event: Event, key: Key) -> None:
        if self._ended is not None:
            return
        if self.accept is not None and not self.accept(event):
            return
        if not self._live:
            self._missed = True  # the replay loop reads it from history
            return
        if key <= self.cursor:
            return  # already delivered by the replay
        cfg = self.hub.cfg
        if len(self._q) >= cfg.subscriber_queue:
            self._overflow()
            if self._ended is not None:
                return
        self._q.append(event)
        self.cursor = key
        self._wake()

    def _overflow(self) -> None:
        q = self._q
        n = len(q)
        first = parse_id(q[0].id or "0-0")
        last = parse_id(q[-1].id or "0-0")
        if self._gap is None:
            self._gap = [first, last, n]
        else:
            self._gap[1], self._gap[2] = last, self._gap[2] + n
        q.clear()
        self._history_left = 0
        self.gaps += 1
        m = self.hub.metrics
        m.dropped.labels("gap").inc(n)
        cfg = self.hub.cfg
        if cfg.slow_consumer == "disconnect" or self.gaps > cfg.max_gaps:
            m.slow_disconnects.inc()
            self.end(SlowConsumer(
                f"subscriber fell behind {self.gaps} time(s) (queue {cfg.subscriber_queue});"
                " reconnect with the last id received to resume"))

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def end(self, reason: BaseException | None = None) -> None:
        """Stop delivering; the consumer sees StopAsyncIteration (or ``reason`` raised)."""
        if self._ended is None:
            self._ended = reason if reason is not None else BusClosed()
            self._q.clear()
            self.hub._unregister(self)
            self._wake()

    def close(self) -> None:
        self.end()

    async def aclose(self) -> None:
        self.end()

    @property
    def closed(self) -> bool:
        return self._ended is not None

    # -- consumer side -----------------------------------------------------------------------

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self._ended is not None:
                if isinstance(self._ended, BusClosed):
                    raise StopAsyncIteration
                raise self._ended
            if self._replay:
                event = await self._next_replayed()
                if event is not None:
                    return event
                continue
            if self._gap is not None:
                self.historic = False
                return self._emit_gap()
            if self._q:
                self.delivered += 1
                self.historic = self._history_left > 0
                if self.historic:
                    self._history_left -= 1
                return self._q.popleft()
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _emit_gap(self) -> Event:
        assert self._gap is not None
        first, last, count = self._gap
        self._gap = None
        return Event(GAP, self.workflow_id or ALL,
                     {"from": format_id(first), "to": format_id(last), "dropped": count},
                     ts=time.time())

    async def _next_replayed(self) -> Event | None:
        """One event of history, or None once the replay has caught up (then we are live)."""
        self.historic = True
        if self._q:
            self.delivered += 1
            return self._q.popleft()
        self._missed = False
        size = min(HISTORY_PAGE, self.hub.cfg.subscriber_queue)
        page, trimmed = await self.hub.history(self.workflow_id, self.cursor, size)
        if self._ended is not None:
            return None
        gap: Event | None = None
        if trimmed is not None and trimmed > self.cursor:  # retention dropped these
            gap = Event(GAP, self.workflow_id or ALL,
                        {"from": format_id(self.cursor), "to": format_id(trimmed),
                         "dropped": None, "reason": "retention"}, ts=time.time())
            self.cursor = trimmed
        for e in page:
            key = parse_id(e.id or "0-0")
            if key > self.cursor:
                if self.accept is None or self.accept(e):
                    self._q.append(e)
                self.cursor = key
        if len(page) < size and not self._missed:
            # caught up; no await between this check and going live, so nothing falls between
            self._replay = False
            self._live = True
            self._history_left = len(self._q)
        return gap

class Hub:
    """Subscribers of one bus, indexed by workflow, and the bounds on them."""

    def __init__(self, cfg: EventsConfig, metrics: EventMetrics) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._by_wf: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self._count = 0
        self.history: Callable[[str | None, Key, int],
                               Any] = _no_history  # set by the bus

    def subscribe(self, workflow_id: str | None, after: str | None,
                  accept: Accept | None) -> Subscription:
        if self._count >= self.cfg.max_subscribers:
            raise Unavailable(f"too many event subscribers ({self.cfg.max_subscribers})",
                              retry_after=5)
        if after is not None:
            parse_id(after)  # ValueError for the transport to turn into a 400
        sub = Subscription(self, workflow_id, after, accept)
        if workflow_id is None:
            self._all.add(sub)
        else:
            self._by_wf.setdefault(workflow_id, set()).add(sub)
        self._count += 1
        self.metrics.sub_gauge(sub.scope).inc()
        return sub

    def _unregister(self, sub: Subscription) -> None:
        if sub.workflow_id is None:
            if sub not in self._all:
                return
            self._all.discard(sub)
        else:
            subs = self._by_wf.get(sub.workflow_id)
            if subs is None or sub not in subs:
                return
            subs.discard(sub)
            if not subs:
                del self._by_wf[sub.workflow_id]
        self._count -= 1
        self.metrics.sub_gauge(sub.scope).dec()

    def dispatch(self, event: Event) -> None:
        """Hand a recorded event to every interested subscriber (never blocks)."""
        key = parse_id(event.id or "0-0")
        subs = self._by_wf.get(event.workflow_id)
        if subs:
            for s in tuple(subs):
                s.offer(event, key)
        if self._all:
            for s in tuple(self._all):
                s.offer(event, key)

    def end_all(self) -> None:
        for s in [*self._all, *(s for subs in self._by_wf.values() for s in subs)]:
            s.end()

    @property
    def count(self) -> int:
        return self._count


async def _no_history(workflow_id: str | None, after: Key, count: int
                      ) -> tuple[list[Event], Key | None]:
    return [], None


class BusBase:
    """publish/subscribe/close of the EventBus protocol on top of a backend's record/history."""

    backend = "base"

    def __init__(self, cfg: EventsConfig, metrics: EventMetrics | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else EventMetrics()
        self.hub = Hub(cfg, self.metrics)
        self.hub.history = self._history
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self.closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._bind()

    def _bind(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.get_ident()

    async def close(self) -> None:
        self.closed = True
        self.hub.end_all()

    # -- protocol ----------------------------------------------------------------------------

    async def publish(self, event: Event) -> str:
        """Record and fan out. Callable from any thread's loop: off the bus's own loop the call
        is carried over to it (the bus's state lives on one loop)."""
        if self._loop is None:
            self._bind()
        elif threading.get_ident() != self._thread:
            fut = asyncio.run_coroutine_threadsafe(self.publish(event), self._loop)
            return await asyncio.wrap_future(fut)
        if self.closed:
            raise Unavailable("event bus is closed", retry_after=5)
        check_event(event)
        if not event.ts:
            event.ts = time.time()
        return await self._record(event)

    def publish_threadsafe(self, event: Event) -> concurrent.futures.Future[str]:
        """For a thread without a loop (an actor): the id arrives in the returned future."""
        if self._loop is None:
            raise RuntimeError("event bus not started")
        return asyncio.run_coroutine_threadsafe(self.publish(event), self._loop)

    def subscribe(self, workflow_id: str | None = None, after: str | None = None,
                  accept: Accept | None = None) -> Subscription:
        """See ``EventBus.subscribe``. ``accept`` (an addition) filters events before they are
        queued, so a subscriber's queue never fills with events it would not be shown."""
        if self.closed:
            raise Unavailable("event bus is closed", retry_after=5)
        return self.hub.subscribe(workflow_id, after, accept)

    async def last(self, workflow_id: str) -> Event | None:
        """The latest retained event of a workflow (to tell a finished one from a quiet one)."""
        raise NotImplementedError

    def snapshot(self) -> dict[str, Any]:
        return {"backend": self.backend, "status": "ok", "subscribers": self.hub.count}

    # -- backend -----------------------------------------------------------------------------

    async def _record(self, event: Event) -> str:
        raise NotImplementedError

    async def _history(self, workflow_id: str | None, after: Key, count: int
                       ) -> tuple[list[Event], Key | None]:
        raise NotImplementedError
