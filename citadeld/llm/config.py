"""The `llm:` section of citadel.yaml: LLM servers, routing policy, breakers, probes, limits.

Strict like the rest of the config (unknown keys are errors naming their path). Defined here,
not in `citadeld.config`, so the LLM router owns its settings; `Config.llm` embeds `LLMConfig`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def canonical_model(name: str) -> str:
    """Ollama spells `llama3.2` and `llama3.2:latest` for the same model: match them as one."""
    return name[: -len(":latest")] if name.endswith(":latest") else name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerConfig(_Strict):
    """resilience4j semantics; rates are percentages over the sliding window."""

    window_type: Literal["count", "time"] = "count"
    window_size: int = Field(20, ge=1, le=100_000)  # last N calls, or last N seconds
    minimum_calls: int = Field(5, ge=1)  # no verdict on fewer calls than this
    failure_rate_threshold: float = Field(50.0, gt=0, le=100)
    slow_call_rate_threshold: float = Field(100.0, gt=0, le=100)
    slow_call_duration_s: float = Field(10.0, gt=0)  # time to first token (see docs)
    wait_open_s: float = Field(1.0, gt=0)  # OPEN wait after the first trip ...
    wait_open_multiplier: float = Field(2.0, ge=1)  # ... times this per repeated trip ...
    wait_open_max_s: float = Field(30.0, gt=0)  # ... capped here
    wait_open_jitter: float = Field(0.2, ge=0, lt=1)  # +/- this fraction, at random
    half_open_calls: int = Field(2, ge=1, le=1000)  # probe calls admitted in HALF_OPEN
    half_open_max_s: float = Field(0.0, ge=0)  # HALF_OPEN longer than this re-opens; 0 = off

    @model_validator(mode="after")
    def _shape(self) -> BreakerConfig:
        if self.wait_open_max_s < self.wait_open_s:
            raise ValueError("wait_open_max_s must be >= wait_open_s")
        if self.window_type == "count" and self.minimum_calls > self.window_size:
            raise ValueError("minimum_calls cannot exceed window_size of a count window")
        return self


class TimeoutsConfig(_Strict):
    connect_s: float = Field(2.0, gt=0)  # TCP connect (and pool wait)
    first_token_s: float = Field(30.0, gt=0)  # request sent -> first generated text
    idle_s: float = Field(30.0, gt=0)  # longest silence between two chunks
    total_s: float = Field(600.0, gt=0)  # one attempt, start to end

    @model_validator(mode="after")
    def _order(self) -> TimeoutsConfig:
        if self.first_token_s > self.total_s:
            raise ValueError("first_token_s cannot exceed total_s")
        return self


class ServedModel(_Strict):
    name: str = Field(min_length=1)  # the name clients use
    upstream: str | None = None  # the name at this server, when it differs


class LLMServerConfig(_Strict):
    name: str
    kind: Literal["ollama", "openai"]
    url: str
    api_key: str | None = None
    models: tuple[str | ServedModel, ...] = Field(min_length=1)
    priority: int = Field(0, ge=0, le=1000)  # lower is preferred; equal ones share load
    weight: float = Field(1.0, gt=0)  # share among servers of equal priority
    max_inflight: int = Field(0, ge=0)  # attempts at once; past it: skipped; 0 = no cap
    keep_alive: str | None = None  # Ollama keep_alive sent with each request
    timeouts: TimeoutsConfig = TimeoutsConfig()
    breaker: BreakerConfig | None = None  # overrides llm.breaker for this server

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be 1-64 of A-Za-z0-9._-")
        return v

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        v = v.rstrip("/")
        if v.endswith("/v1"):  # OpenAI base URLs are often written with /v1; we add it ourselves
            v = v[:-3]
        return v

    def served(self) -> dict[str, str]:
        """Client-facing model name (canonical) -> the name to send upstream."""
        out: dict[str, str] = {}
        for m in self.models:
            if isinstance(m, str):
                out[canonical_model(m)] = m
            else:
                out[canonical_model(m.name)] = m.upstream or m.name
        return out


class RetryBudgetConfig(_Strict):
    ratio: float = Field(0.2, ge=0, le=1)  # retries may be this fraction of requests ...
    min_per_s: float = Field(3.0, ge=0)  # ... plus this many per second at any load
    window_s: float = Field(10.0, gt=0, le=600)


class RoutingConfig(_Strict):
    strategy: Literal["priority", "least_busy", "lowest_latency"] = "priority"
    max_attempts: int = Field(3, ge=1, le=10)  # tries of one request, across servers
    backoff_base_s: float = Field(0.02, ge=0)  # full jitter: uniform(0, min(max, base*2^n))
    backoff_max_s: float = Field(1.0, ge=0)
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    when_all_open: Literal["fail", "wait"] = "fail"
    max_wait_s: float = Field(5.0, ge=0)  # "wait": longest wait for a server to recover
    max_retry_after_s: float = Field(5.0, ge=0)  # longer upstream Retry-After: pass to client
    request_timeout_s: float = Field(600.0, gt=0)  # whole request before its first byte
    default_retry_after_s: float = Field(5.0, gt=0)  # when no recovery time is known


class ProbeConfig(_Strict):
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(1.0, gt=0)
    failures_to_open: int = Field(2, ge=0)  # consecutive failed probes open a CLOSED breaker


class LimitsConfig(_Strict):
    max_prompt_chars: int = Field(400_000, ge=1)  # prompt + message text; more -> 413
    max_messages: int = Field(1024, ge=1)


class ModelPolicy(_Strict):
    price_per_1k: float | None = Field(None, ge=0)  # prompt and completion alike ...
    price_per_1k_prompt: float | None = Field(None, ge=0)  # ... unless these say otherwise
    price_per_1k_completion: float | None = Field(None, ge=0)
    aliases: tuple[str, ...] = ()

    def prices(self) -> tuple[float | None, float | None]:
        p = self.price_per_1k_prompt if self.price_per_1k_prompt is not None else self.price_per_1k
        c = (self.price_per_1k_completion if self.price_per_1k_completion is not None
             else self.price_per_1k)
        return p, c


class LLMConfig(_Strict):
    servers: tuple[LLMServerConfig, ...] = ()
    routing: RoutingConfig = RoutingConfig()
    breaker: BreakerConfig = BreakerConfig()
    probes: ProbeConfig = ProbeConfig()
    limits: LimitsConfig = LimitsConfig()
    models: dict[str, ModelPolicy] = Field(default_factory=dict)
    currency: str = "USD"

    @model_validator(mode="after")
    def _references(self) -> LLMConfig:
        names = [s.name for s in self.servers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate server names: {dup}")
        served = {m for s in self.servers for m in s.served()}
        seen = set(served)
        for name, policy in self.models.items():
            if canonical_model(name) not in served:
                raise ValueError(f"models.{name}: no server in llm.servers serves it")
            for alias in policy.aliases:
                if canonical_model(alias) in seen:
                    raise ValueError(f"models.{name}.aliases: {alias!r} is already a model name")
                seen.add(canonical_model(alias))
        return self

    def breaker_for(self, server: LLMServerConfig) -> BreakerConfig:
        return server.breaker or self.breaker
