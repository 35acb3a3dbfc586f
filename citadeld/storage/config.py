"""The ``vectors:`` and ``persistence:`` sections of the config (hooked into ``Config``).

Kept apart from ``citadeld.config`` so that module only gains one line per section; the strict
base is repeated here to avoid a circular import.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

COLLECTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
Distance = Literal["cosine", "dot", "euclid", "manhattan"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CollectionSpec(_Strict):
    """A collection created at start-up when missing. ``model`` null: the default model."""

    model: str | None = None
    dimension: int | None = Field(None, ge=1, le=65536)  # only for raw-vector collections
    distance: Distance = "cosine"
    raw: bool = False  # true: no model; vectors only (needs dimension)

    @model_validator(mode="after")
    def _shape(self) -> CollectionSpec:
        if self.raw and self.dimension is None:
            raise ValueError("a raw collection needs dimension")
        if self.raw and self.model is not None:
            raise ValueError("a raw collection takes no model")
        return self


class VectorsConfig(_Strict):
    qdrant_url: str | None = None  # a Qdrant server; null: the embedded store under local_path
    api_key: str | None = None
    prefer_grpc: bool = False
    grpc_port: int = Field(6334, ge=1, le=65535)
    local_path: str | None = None  # default: <state_dir>/qdrant
    # embedded store only: "normal" survives a crash or kill -9 of citadeld (SQLite WAL without
    # an fsync per write, like Qdrant's own WAL); "full" also survives power loss, at ~1 fsync
    # per point (tens of points per second on ordinary disks)
    local_sync: Literal["normal", "full"] = "normal"
    timeout_s: float = Field(10.0, gt=0)
    default_collection: str = "default"
    collections: dict[str, CollectionSpec] = Field(
        default_factory=lambda: {"default": CollectionSpec()}
    )
    max_items: int = Field(1000, ge=1, le=100_000)  # items per store/update call
    max_search_limit: int = Field(1000, ge=1, le=100_000)
    replay_batch: int = Field(256, ge=1, le=10_000)  # outbox rows per replay round
    retry_after_s: float = Field(5.0, gt=0)  # Retry-After of 503s during a Qdrant outage
    # TEST ONLY fault injection: while this file exists the Qdrant client layer raises the
    # errors qdrant-client raises for a refused connection ("down") or, for "timeout <s>",
    # sleeps that long and raises a read timeout. Never set it in production.
    fault_injection_file: str | None = None

    @field_validator("qdrant_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    @model_validator(mode="after")
    def _names(self) -> VectorsConfig:
        for name in self.collections:
            if not COLLECTION_NAME.match(name):
                raise ValueError(f"collections: bad name {name!r} (1-64 of A-Za-z0-9_-)")
        if self.default_collection not in self.collections:
            raise ValueError(f"default_collection {self.default_collection!r} is not in "
                             "collections")
        return self


class RetentionConfig(_Strict):
    """Rows older than this many days are pruned in the background (0 keeps them forever)."""

    audit_days: float = Field(90, ge=0)
    health_days: float = Field(14, ge=0)
    task_log_days: float = Field(30, ge=0)
    outbox_days: float = Field(7, ge=0)  # applied/failed outbox rows; pending ones are kept
    workflow_days: float = Field(30, ge=0)  # finished workflows only
    prune_interval_s: float = Field(3600, gt=0)
    prune_chunk: int = Field(5000, ge=1)  # rows per DELETE, so pruning never holds a long lock


class PersistenceConfig(_Strict):
    dsn: str | None = None  # null: persistence disabled (the embedded default)
    pool_min: int = Field(1, ge=0, le=64)
    pool_max: int = Field(4, ge=1, le=64)
    timeout_s: float = Field(5.0, gt=0)  # per statement
    connect_timeout_s: float = Field(3.0, gt=0)
    instance: str | None = None  # owner of this daemon's outbox rows; default: the host name
    batch_rows: int = Field(2000, ge=1)  # audit/health rows per INSERT batch
    flush_interval_s: float = Field(1.0, gt=0)
    buffer_max_rows: int = Field(10_000, ge=1)  # in memory while PostgreSQL is away; then spill
    spill_path: str | None = None  # default: <state_dir>/spill
    spill_max_bytes: int = Field(256 * 1024 * 1024, ge=4096)  # past it rows are dropped, counted
    health_history_interval_s: float = Field(30.0, gt=0)
    retention: RetentionConfig = RetentionConfig()

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        return v

    @model_validator(mode="after")
    def _pool(self) -> PersistenceConfig:
        if self.pool_min > self.pool_max:
            raise ValueError("pool_min must not exceed pool_max")
        return self


def check_collection_models(vectors: VectorsConfig, models: set[str], aliases: dict[str, str]
                            ) -> None:
    """Cross-section check (called from ``Config``): collections name configured models."""
    for name, spec in vectors.collections.items():
        if spec.model is not None and spec.model not in models and spec.model not in aliases:
            raise ValueError(f"vectors.collections.{name}.model: {spec.model!r} is not a "
                             "configured embedding model")


def redact_storage(out: dict[str, Any]) -> None:
    """Mask the secrets of these sections in a dumped config (for ``config show`` and logs)."""
    vec = out.get("vectors") or {}
    if vec.get("api_key"):
        vec["api_key"] = "***"
    pers = out.get("persistence") or {}
    dsn = pers.get("dsn")
    if dsn:
        pers["dsn"] = re.sub(r"(password\s*=\s*)(\S+)", r"\1***",
                             re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn))
