"""Configuration: one YAML file, `CITADEL_*` environment overrides, validated before anything binds.

pydantic does the validation so that a wrong key or value names its own dotted path; the daemon
turns a `ConfigError` into exit status 78 (EX_CONFIG) before it opens a socket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from citadeld.events.config import EventsConfig, resolve_backend
from citadeld.llm.config import LLMConfig
from citadeld.security.config import AuthConfig, CORSConfig, LimitsConfig
from citadeld.security.ratelimit_audit_config import (
    AuditConfig,
    RateLimitsConfig,
    redact_security,
)
from citadeld.storage.config import (
    PersistenceConfig,
    VectorsConfig,
    check_collection_models,
    redact_storage,
)
from citadeld.workflows.config import WorkflowsConfig

ENV_PREFIX = "CITADEL_"
EX_CONFIG = 78


class ConfigError(Exception):
    """A configuration problem; its message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    listen: str = "127.0.0.1:8000"
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(120.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def host(self) -> str:
        return parse_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen)[1]


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class CacheConfig(_Strict):
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str | None = None
    ttl_s: int = Field(7 * 24 * 3600, ge=1)
    max_entries: int = Field(100_000, ge=1)
    value_format: Literal["float32", "msgpack"] = "float32"
    key_prefix: str = "citadel:emb:"
    timeout_s: float = Field(0.25, gt=0)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> CacheConfig:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("cache.redis_url is required when cache.backend is redis")
        return self


class EndpointConfig(_Strict):
    url: str
    api_key: str | None = None
    name: str | None = None
    slots: int = Field(1, ge=1, le=64)  # actors (= concurrent batches) for this endpoint

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")


class BatchConfig(_Strict):
    max_items: int = Field(32, ge=1, le=4096)
    max_tokens: int = Field(16384, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)


class ModelConfig(_Strict):
    backend: Literal["local", "ollama", "openai"]
    dims: int = Field(gt=0, le=65536)
    max_context: int = Field(512, gt=0)
    truncate: bool = True
    normalize: bool = True
    upstream_model: str | None = None
    path: str | None = None
    nice: int = Field(10, ge=0, le=19)  # local only: compute threads run this much below the loop
    endpoints: tuple[EndpointConfig, ...] = ()
    keep_alive: str = "30m"
    timeout_s: float = Field(60.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    attempts: int = Field(3, ge=1, le=10)
    batch: BatchConfig = BatchConfig()
    queue_cap: int = Field(4096, ge=1)
    fallback_model: str | None = None
    aliases: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _backend_shape(self) -> ModelConfig:
        if self.backend in ("ollama", "openai") and not self.endpoints:
            raise ValueError(f"backend {self.backend} needs at least one entry in endpoints")
        if self.backend == "local" and self.endpoints:
            raise ValueError("backend local takes no endpoints (use path)")
        return self


class EmbeddingConfig(_Strict):
    default_model: str = "all-minilm"
    max_inputs: int = Field(2048, ge=1)
    max_input_chars: int = Field(200_000, ge=1)
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {
            "all-minilm": ModelConfig(
                backend="local",
                dims=384,
                max_context=256,
                aliases=("all-minilm:latest", "sentence-transformers/all-MiniLM-L6-v2"),
                # a CPU batch of 32 takes hundreds of ms: waiting 20 ms for the callers just
                # answered to resubmit keeps batches full under load at little cost to a lone one
                batch=BatchConfig(max_items=32, max_wait_ms=20),
            )
        }
    )

    @model_validator(mode="after")
    def _references(self) -> EmbeddingConfig:
        if not self.models:
            raise ValueError("at least one model must be configured")
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not in models")
        names = set(self.models)
        for name, m in self.models.items():
            if m.fallback_model is not None:
                if m.fallback_model not in self.models:
                    raise ValueError(f"models.{name}.fallback_model names unknown model")
                if m.fallback_model == name:
                    raise ValueError(f"models.{name}.fallback_model names itself")
            for alias in m.aliases:
                if alias in names:
                    raise ValueError(f"models.{name}.aliases: {alias!r} is already a model name")
                names.add(alias)
        return self


class SupervisionConfig(_Strict):
    max_restarts: int = Field(5, ge=0)
    period_s: float = Field(30.0, gt=0)
    backoff_min_s: float = Field(0.1, ge=0)
    backoff_max_s: float = Field(5.0, ge=0)
    ping_interval_s: float = Field(5.0, gt=0)
    ping_timeout_s: float = Field(2.0, gt=0)


class AdminConfig(_Strict):
    enabled: bool = True
    socket: str | None = None  # default: $RUNTIME_DIRECTORY/admin.sock (see citadeld.admin.paths)
    mode: str = Field("0660", pattern=r"^0?[0-7]{3}$")  # octal; peers are checked as well
    group: str | None = None  # chgrp the socket to this group (default: the daemon's own)
    timeout_s: float = Field(30.0, gt=0)  # per command, unless the command sets its own

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: object) -> object:
        return f"{v:o}" if isinstance(v, int) else v  # YAML 1.1 reads unquoted 0660 as octal


class WatchdogConfig(_Strict):
    max_loop_lag_s: float | None = Field(None, gt=0)  # default: a third of WatchdogSec, >= 1 s


class Config(_Strict):
    server: ServerConfig = ServerConfig()
    logging: LoggingConfig = LoggingConfig()
    state_dir: str = Field(default_factory=lambda: default_state_dir())
    cache: CacheConfig = CacheConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    supervision: SupervisionConfig = SupervisionConfig()
    llm: LLMConfig = LLMConfig()
    admin: AdminConfig = AdminConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    vectors: VectorsConfig = VectorsConfig()
    persistence: PersistenceConfig = PersistenceConfig()
    auth: AuthConfig = AuthConfig()
    cors: CORSConfig = CORSConfig()
    limits: LimitsConfig = LimitsConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    audit: AuditConfig = AuditConfig()
    workflows: WorkflowsConfig = WorkflowsConfig()
    events: EventsConfig = EventsConfig()

    @model_validator(mode="after")
    def _vector_models(self) -> Config:
        m = self.embedding.models
        check_collection_models(self.vectors, set(m), {a: n for n, c in m.items()
                                                       for a in c.aliases})
        resolve_backend(self.events, self.cache.redis_url)  # events.backend redis needs a URL
        return self


def default_state_dir() -> str:
    """systemd's StateDirectory when set, else a per-user directory (embedded default)."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return env.split(":")[0]
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "citadel")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _parse_scalar(raw: str) -> Any:
    """Environment values are YAML scalars/flow collections so `8`, `true`, `[a, b]` mean what
    they say in the file."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """`CITADEL_SERVER__LISTEN=0.0.0.0:9000` sets server.listen: `__` separates levels."""
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        if any(not p for p in path):
            raise ConfigError(f"environment variable {name}: empty key segment")
        node = data
        for part in path[:-1]:
            if part not in node and part.replace("_", "-") in node:
                part = part.replace("_", "-")  # model names have dashes; env names cannot
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"environment variable {name}: {part} is not a mapping")
            node = child
        node[path[-1]] = _parse_scalar(raw)
    return data


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}")
    return "; ".join(lines)


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read, overlay the environment and CLI overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded
    try:  # overlay onto the full tree, so env can reach keys that only have defaults
        data = Config.model_validate(data).model_dump()
    except ValidationError:
        pass  # the environment may complete it; the final validation names what is wrong
    data = apply_env(data, os.environ if env is None else env)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def redact(cfg: Config) -> dict[str, Any]:
    """The config as a dict with secrets masked, for `config show` and logs."""
    out = cfg.model_dump(mode="json")
    for model in out["embedding"]["models"].values():
        for ep in model["endpoints"]:
            if ep.get("api_key"):
                ep["api_key"] = "***"
    for server in out["llm"]["servers"]:
        if server.get("api_key"):
            server["api_key"] = "***"
    redact_storage(out)
    jwt = out["auth"]["jwt"]
    if jwt.get("hs256_secret"):
        jwt["hs256_secret"] = "***"
    redact_security(out)
    for section in ("cache", "events"):
        url = out[section].get("redis_url")
        if url and "@" in url:
            scheme, _, rest = url.partition("://")
            out[section]["redis_url"] = f"{scheme}://***@{rest.split('@', 1)[1]}"
    return out
