"""The in-process bus, used when no Redis is configured: bounded rings of history per workflow
(at most ``memory_max_workflows`` of them, least recently published evicted first, finished
ones after ``finished_ttl_s``) and one bounded ring of all events, ids from the wall clock in
the Redis Streams shape. Everything runs on the loop's thread; nothing here awaits."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from typing import Any

from citadeld.events.config import EventsConfig
from citadeld.events.hub import BusBase
from citadeld.events.ids import IdClock, Key, format_id
from citadeld.events.metrics import EventMetrics
from citadeld.events.model import TERMINAL, Event


class Ring:
    """The last ``maxlen`` events in id order, and the highest id that fell out."""

    __slots__ = ("events", "expires", "keys", "maxlen", "trimmed")

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self.events: deque[Event] = deque()
        self.keys: deque[Key] = deque()
        self.trimmed: Key | None = None
        self.expires: float | None = None  # monotonic deadline once the workflow finished

    def append(self, event: Event, key: Key) -> None:
        if len(self.events) >= self.maxlen:
            self.events.popleft()
            self.trimmed = self.keys.popleft()
        self.events.append(event)
        self.keys.append(key)

    def after(self, key: Key, count: int) -> list[Event]:
        i = bisect.bisect_right(self.keys, key)
        n = len(self.events)
        return [self.events[j] for j in range(i, min(n, i + count))]


class MemoryBus(BusBase):
    backend = "memory"

    def __init__(self, cfg: EventsConfig, metrics: EventMetrics | None = None) -> None:
        super().__init__(cfg, metrics)
        self._clock = IdClock()
        self._rings: OrderedDict[str, Ring] = OrderedDict()
        self._global = Ring(cfg.global_maxlen)
        self.published = 0

    async def _record(self, event: Event) -> str:
        event.id = eid = self._clock.next()
        key = self._clock.last
        ring = self._rings.get(event.workflow_id)
        if ring is None:
            ring = self._rings[event.workflow_id] = Ring(self.cfg.workflow_maxlen)
        else:
            self._rings.move_to_end(event.workflow_id)
        ring.append(event, key)
        if event.type in TERMINAL:
            ring.expires = time.monotonic() + self.cfg.finished_ttl_s
        self._global.append(event, key)
        self._evict()
        self.published += 1
        self.metrics.published.labels("ok").inc()
        self.hub.dispatch(event)
        return eid

    def _evict(self) -> None:
        rings = self._rings
        now = time.monotonic()
        while rings:
            wf, oldest = next(iter(rings.items()))
            if len(rings) > self.cfg.memory_max_workflows or (
                    oldest.expires is not None and oldest.expires <= now):
                del rings[wf]
            else:
                break

    async def _history(self, workflow_id: str | None, after: Key, count: int
                       ) -> tuple[list[Event], Key | None]:
        if workflow_id is None:
            ring: Ring | None = self._global
        else:
            ring = self._rings.get(workflow_id)
            if ring is not None and ring.expires is not None and ring.expires <= time.monotonic():
                del self._rings[workflow_id]
                ring = None
        if ring is None:
            return [], None
        return ring.after(after, count), ring.trimmed

    async def last(self, workflow_id: str) -> Event | None:
        ring = self._rings.get(workflow_id)
        return ring.events[-1] if ring is not None and ring.events else None

    def snapshot(self) -> dict[str, Any]:
        return {**super().snapshot(), "workflows_retained": len(self._rings),
                "events_retained": len(self._global.events), "published": self.published,
                "last_id": None if self._clock.last == (0, 0) else format_id(self._clock.last)}

