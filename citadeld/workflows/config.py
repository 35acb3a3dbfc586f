"""The ``workflows:`` section of citadel.yaml (hooked into ``Config`` with one line)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class WorkflowsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # state and claiming: Redis for hot state + the job stream (null: cache.redis_url when the
    # cache is on Redis, else none); PostgreSQL (persistence.dsn) for durable state.
    redis_url: str | None = None
    key_prefix: str = "citadel:wf:"  # every Redis key and the job stream start with this
    instance: str | None = None  # consumer name in the stream group; default: host:port
    max_steps: int = Field(100, ge=1, le=10_000)
    max_concurrent: int = Field(64, ge=1, le=100_000)  # workflows this daemon runs at once
    max_queued: int = Field(100_000, ge=1)  # local queue bound (no Redis); past it 503
    claim_timeout_s: float = Field(30.0, gt=0)  # a holder silent this long loses its jobs
    heartbeat_s: float | None = Field(None, gt=0)  # default: claim_timeout_s / 3
    reclaim_interval_s: float | None = Field(None, gt=0)  # default: claim_timeout_s / 2
    default_step_timeout_s: float = Field(120.0, gt=0)
    max_step_timeout_s: float = Field(3600.0, gt=0)
    default_retries: int = Field(2, ge=0, le=20)
    max_retries: int = Field(10, ge=0, le=100)
    retry_backoff_s: float = Field(0.5, ge=0)  # full jitter: uniform(0, min(max, base*2^n))
    retry_backoff_max_s: float = Field(10.0, ge=0)
    default_deadline_s: float = Field(3600.0, gt=0)  # whole workflow, when the spec sets none
    max_deadline_s: float = Field(86_400.0, gt=0)
    shutdown_grace_s: float = Field(5.0, ge=0)  # on SIGTERM running workflows may finish
    hot_ttl_s: int = Field(3600, ge=1)  # Redis copy of a workflow's state (PostgreSQL keeps it)
    retention_days: float = Field(30.0, ge=0)  # finished workflows; 0 keeps them forever
    list_max_limit: int = Field(500, ge=1, le=10_000)
    max_text_deltas: int = Field(10_000, ge=0)  # TEXT_MESSAGE_CONTENT events per llm step
    text_delta_interval_ms: float = Field(25.0, ge=0)  # chunks closer than this share one event

    @model_validator(mode="after")
    def _shape(self) -> WorkflowsConfig:
        if self.default_step_timeout_s > self.max_step_timeout_s:
            raise ValueError("default_step_timeout_s must not exceed max_step_timeout_s")
        if self.default_retries > self.max_retries:
            raise ValueError("default_retries must not exceed max_retries")
        if self.default_deadline_s > self.max_deadline_s:
            raise ValueError("default_deadline_s must not exceed max_deadline_s")
        if self.redis_url is not None and not self.redis_url.startswith(
                ("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return self

    @property
    def heartbeat(self) -> float:
        return self.heartbeat_s or self.claim_timeout_s / 3

    @property
    def reclaim_interval(self) -> float:
        return self.reclaim_interval_s or self.claim_timeout_s / 2
