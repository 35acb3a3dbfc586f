"""The event vocabulary and the bus interface shared by the workflow engine and the transports.

Types follow the AG-UI protocol's run/step events so an AG-UI front end can render them as they
are. ``id`` is assigned by the bus on publish (a Redis Streams id such as ``1732623000000-0``, or
the same shape from the in-process bus) and is what SSE ``Last-Event-ID`` and websocket resume use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

RUN_STARTED = "RUN_STARTED"
RUN_FINISHED = "RUN_FINISHED"
RUN_ERROR = "RUN_ERROR"
RUN_CANCELLED = "RUN_CANCELLED"
STEP_STARTED = "STEP_STARTED"
STEP_FINISHED = "STEP_FINISHED"
STEP_ERROR = "STEP_ERROR"
TEXT_MESSAGE_CONTENT = "TEXT_MESSAGE_CONTENT"  # a delta from a streaming llm_query step
STATE_SNAPSHOT = "STATE_SNAPSHOT"
GAP = "GAP"  # a slow consumer missed events between two ids

EVENT_TYPES = frozenset({RUN_STARTED, RUN_FINISHED, RUN_ERROR, RUN_CANCELLED, STEP_STARTED,
                         STEP_FINISHED, STEP_ERROR, TEXT_MESSAGE_CONTENT, STATE_SNAPSHOT, GAP})
TERMINAL = frozenset({RUN_FINISHED, RUN_ERROR, RUN_CANCELLED})


@dataclass(slots=True)
class Event:
    type: str
    workflow_id: str
    data: dict[str, Any] = field(default_factory=dict)  # step_id, delta, snapshot, error...
    owner: str | None = None  # principal name that submitted the workflow (visibility)
    ts: float = 0.0  # publish time (time.time()), set by the bus when 0
    id: str | None = None  # set by the bus

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "workflow_id": self.workflow_id,
                "ts": self.ts, **self.data}


class EventBus(Protocol):
    async def publish(self, event: Event) -> str:
        """Append the event; returns its id. Never blocks the loop for long; raises
        ``citadeld.errors.Unavailable`` only when the event cannot be recorded at all."""
        ...

    def subscribe(self, workflow_id: str | None = None, after: str | None = None
                  ) -> AsyncIterator[Event]:
        """Events of one workflow (or all when None) strictly after ``after`` (None: from the
        beginning of what is retained for one workflow, from now for all), then live ones.
        Bounded: a consumer that falls behind gets a GAP event, never unbounded memory."""
        ...

    async def close(self) -> None: ...
