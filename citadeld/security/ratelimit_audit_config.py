"""The ``rate_limits:`` and ``audit:`` sections of the config (hooked into ``Config``).

Kept apart from ``citadeld.config`` so that module only gains one line per section; the strict
base is repeated here to avoid a circular import.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupLimit(_Strict):
    """One route group's limit: ``per_min`` requests a minute per principal (or per client
    address for anonymous callers), of which ``burst`` may come at once (default: per_min)."""

    per_min: float = Field(gt=0, le=10_000_000)
    burst: int | None = Field(None, ge=1, le=10_000_000)
    routes: tuple[str, ...] = ()  # path prefixes of the route group (canonical route paths)

    @property
    def capacity(self) -> int:
        return self.burst if self.burst is not None else max(1, int(self.per_min))

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for r in v:
            if not r.startswith("/"):
                raise ValueError(f"route prefix {r!r} must start with /")
        return v


_EMBED_ROUTES = ("/api/v1/embed", "/v1/embeddings", "/api/embed", "/api/embeddings")
_LLM_ROUTES = ("/api/v1/llm/generate", "/v1/chat/completions", "/v1/completions", "/api/chat",
               "/api/generate")
_VECTOR_ROUTES = ("/api/v1/vectors", "/api/v1/collections")


class RateLimitsConfig(_Strict):
    enabled: bool = False  # the embedded default trusts its (loopback) callers
    # auto: Redis when redis_url (or else cache.redis_url) is set, otherwise in-process buckets
    backend: Literal["auto", "redis", "local"] = "auto"
    redis_url: str | None = None  # default: cache.redis_url
    key_prefix: str = "citadel:rl:"
    redis_timeout_s: float = Field(0.05, gt=0, le=5)  # slower: this request uses local buckets
    local_max_keys: int = Field(100_000, ge=100)  # in-process buckets kept (idle ones go first)
    embedding: GroupLimit = GroupLimit(per_min=100, routes=_EMBED_ROUTES)
    llm: GroupLimit = GroupLimit(per_min=60, routes=_LLM_ROUTES)
    vectors: GroupLimit = GroupLimit(per_min=300, routes=_VECTOR_ROUTES)
    default: GroupLimit = GroupLimit(per_min=600)  # every other route not exempt
    exempt: tuple[str, ...] = ("/health", "/metrics", "/openapi.json", "/docs")

    @field_validator("redis_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            return None
        if v is not None and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    def groups(self) -> dict[str, GroupLimit]:
        return {"embedding": self.embedding, "llm": self.llm, "vectors": self.vectors,
                "default": self.default}


class AuditConfig(_Strict):
    enabled: bool = True
    # exact paths or prefixes ending in "*" never audited, e.g. ["/metrics", "/health/*"]
    exclude_paths: tuple[str, ...] = ()
    inline_hash_max_bytes: int = Field(262_144, ge=0)  # larger bodies are hashed off the loop
    query_max_rows: int = Field(1000, ge=1, le=100_000)  # per GET /api/v1/audit page
    # rate-limit trips are logged at most once per principal and route group in this window
    event_log_interval_s: float = Field(10.0, ge=0)

    @model_validator(mode="after")
    def _paths(self) -> AuditConfig:
        for p in self.exclude_paths:
            if not p.startswith("/"):
                raise ValueError(f"exclude_paths: {p!r} must start with /")
        return self


def redact_security(out: dict[str, Any]) -> None:
    """Mask the Redis password of ``rate_limits.redis_url`` in a dumped config."""
    rl = out.get("rate_limits") or {}
    url = rl.get("redis_url")
    if url and "@" in url:
        scheme, _, rest = url.partition("://")
        rl["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
