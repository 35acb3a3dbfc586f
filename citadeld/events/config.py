"""The ``events:`` section of the config (hooked into ``Config``): which bus carries workflow
events, how much of them is retained, and the limits every live transport enforces.

Kept apart from ``citadeld.config`` so that module only gains one line; the strict base is
repeated here to avoid a circular import.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventsConfig(_Strict):
    # auto: Redis Streams when a Redis URL is known (events.redis_url, else cache.redis_url),
    # otherwise the in-process bus
    backend: Literal["auto", "memory", "redis"] = "auto"
    redis_url: str | None = None  # null: the cache's redis_url
    key_prefix: str = Field("citadel:ev:", min_length=1, max_length=64)
    # retention: events kept per workflow and in the all-workflows stream (Redis: MAXLEN ~)
    workflow_maxlen: int = Field(10_000, ge=10)
    global_maxlen: int = Field(100_000, ge=100)
    finished_ttl_s: int = Field(24 * 3600, ge=1)  # a finished workflow's history expires
    idle_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # ... and an abandoned one's
    memory_max_workflows: int = Field(10_000, ge=1)  # histories the in-process bus keeps (LRU)
    # fan-out: each subscriber has a bounded queue; past it the backlog is dropped and the
    # subscriber gets one GAP event (policy gap) or is disconnected (policy disconnect);
    # under policy gap, more than max_gaps overflows also disconnect it
    subscriber_queue: int = Field(1024, ge=1, le=1_000_000)
    slow_consumer: Literal["gap", "disconnect"] = "gap"
    max_gaps: int = Field(100, ge=0)
    max_subscribers: int = Field(10_000, ge=1)
    # Redis: short timeouts on the loop; events published while Redis is unreachable wait in a
    # bounded buffer and are written in order once it is back (past it: publish fails)
    publish_timeout_s: float = Field(2.0, gt=0)  # a write slower than this: Redis is down
    outage_buffer: int = Field(10_000, ge=0)
    read_block_ms: int = Field(1000, ge=10, le=30_000)
    read_count: int = Field(1000, ge=1)
    reconnect_min_s: float = Field(0.1, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    max_connections: int = Field(16, ge=1)  # publish + replay pool (the reader has its own)
    # transports
    heartbeat_s: float = Field(15.0, gt=0)  # SSE comment / websocket ping interval
    send_timeout_s: float = Field(10.0, gt=0)  # a client that reads nothing for this long goes
    ws_max_message_bytes: int = Field(4096, ge=64, le=1 << 20)
    ws_max_messages_per_s: float = Field(20.0, gt=0)  # client messages (burst: 2 s worth)
    ws_max_subscriptions: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _order(self) -> EventsConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("events.reconnect_max_s must be >= reconnect_min_s")
        return self


def resolve_backend(events: EventsConfig, cache_redis_url: str | None
                    ) -> tuple[Literal["memory", "redis"], str | None]:
    """The backend actually used and its Redis URL."""
    url = events.redis_url or cache_redis_url
    if events.backend == "memory" or (events.backend == "auto" and not url):
        return "memory", None
    if not url:
        raise ValueError("events.backend is redis but neither events.redis_url nor "
                         "cache.redis_url is set")
    return "redis", url
