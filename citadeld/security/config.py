"""The ``auth:``, ``cors:`` and ``limits:`` sections of the config (hooked into ``Config``).

Kept apart from ``citadeld.config`` so that module gains one line per section; the strict base
is repeated here to avoid a circular import.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: the roles, weakest first; a rule naming a role admits that role and every stronger one
ROLES: tuple[str, ...] = ("user", "developer", "admin")
Role = Literal["user", "developer", "admin"]
RuleRole = Literal["open", "user", "developer", "admin"]
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"})
_HASH = re.compile(r"^[0-9a-f]{64}$")
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RoleRule(_Strict):
    """Routes matching ``path`` (a glob on the route's canonical path, e.g.
    ``/api/v1/vectors/{id}`` or ``/api/v1/collections*``) and one of ``methods`` need ``role``
    (or a stronger one); ``open`` needs no credential. The first matching rule wins."""

    path: str
    methods: tuple[str, ...] = ("*",)
    role: RuleRole

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(m.upper() for m in v)
        bad = [m for m in out if m not in _METHODS]
        if bad or not out:
            raise ValueError(f"unknown HTTP method(s) {bad}; use GET, POST, ... or *")
        return out

    def matches(self, method: str, path: str) -> bool:
        if method == "HEAD":
            method = "GET"  # aiohttp adds HEAD beside every GET; it reads the same thing
        if "*" not in self.methods and method not in self.methods:
            return False
        return fnmatch.fnmatchcase(path, self.path)


def _r(path: str, role: RuleRole, *methods: str) -> RoleRule:
    return RoleRule(path=path, role=role, methods=methods or ("*",))


#: the default mapping; every route the daemon serves must match one of these (a test iterates
#: the router), so a new route gets an explicit decision instead of a silent default
DEFAULT_RULES: tuple[RoleRule, ...] = (
    # probes and metrics (Prometheus scrapes them); the list `open_routes` decides these too
    _r("/health/detailed", "developer", "GET"),
    # embedding, in all three dialects, and the model listings clients need for it
    _r("/api/v1/embed", "user", "POST"),
    _r("/api/v1/status", "user", "GET"),
    _r("/v1/embeddings", "user", "POST"),
    _r("/v1/models", "user", "GET"),
    _r("/api/embed", "user", "POST"),
    _r("/api/embeddings", "user", "POST"),
    _r("/api/tags", "user", "GET"),
    _r("/api/version", "user", "GET"),
    # LLM generation; the server list and usage are operators' business
    _r("/api/v1/llm/generate", "user", "POST"),
    _r("/v1/chat/completions", "user", "POST"),
    _r("/api/chat", "user", "POST"),
    _r("/api/generate", "user", "POST"),
    _r("/api/v1/llm/servers", "developer", "GET"),
    _r("/api/v1/llm/usage", "developer", "GET"),
    # vectors: users search and read, developers write and manage collections
    _r("/api/v1/vectors/search", "user", "POST"),
    _r("/api/v1/vectors/operations/*", "user", "GET"),
    _r("/api/v1/vectors/*", "user", "GET"),
    _r("/api/v1/vectors/*", "developer", "POST", "PUT", "PATCH", "DELETE"),
    _r("/api/v1/collections*", "user", "GET"),
    _r("/api/v1/collections*", "developer", "POST", "PUT", "PATCH", "DELETE"),
    # workflows (runs, their events and websockets): users run them
    _r("/api/v1/workflows*", "user"),
    # live workflow events: SSE and websockets (each caller sees its own; admins all)
    _r("/api/v1/events", "user", "GET"),
    _r("/ws", "user", "GET"),
    _r("/ws/workflows/*", "user", "GET"),
    # the audit trail: admins only
    _r("/api/v1/audit*", "admin"),
    # this API's description and its Swagger UI
    _r("/openapi.json", "user", "GET"),
    _r("/docs*", "user", "GET"),
)

DEFAULT_OPEN: tuple[str, ...] = ("/health/live", "/health/ready", "/health", "/metrics")


class JWTConfig(_Strict):
    """JSON Web Tokens from an identity provider (RS256/ES256 via JWKS) or a local HS256 secret.

    Nothing here is used unless ``jwks_url`` or ``hs256_secret`` is set."""

    jwks_url: str | None = None  # e.g. https://<your-app>.clerk.accounts.dev/.well-known/jwks.json
    issuer: str | None = None  # required with jwks_url: the `iss` every token must carry
    audience: tuple[str, ...] = ()  # accepted `aud` values; empty: tokens must carry no `aud`
    algorithms: tuple[Literal["RS256", "ES256", "RS384", "ES384", "RS512", "PS256"], ...] = (
        "RS256", "ES256")  # the allow-list for JWKS-signed tokens
    hs256_secret: str | None = Field(None, min_length=32)  # small setups: a shared secret
    leeway_s: float = Field(30.0, ge=0, le=300)  # clock skew allowed on exp/nbf/iat
    require: tuple[str, ...] = ("exp", "sub")  # claims a token must carry
    role_claim: str = "role"  # e.g. "role", "roles" or a dotted path "public_metadata.role"
    role_values: dict[str, Role] = Field(default_factory=dict)  # claim value -> role, e.g.
    # {"org:admin": admin}; values that are already role names need no entry
    default_role: Role | None = None  # a valid token without a known role; null: 403 everywhere
    jwks_cache_s: float = Field(600.0, ge=10)  # keys are refetched after this ...
    jwks_min_refresh_s: float = Field(30.0, ge=0)  # ... or on an unknown kid, at most this often
    jwks_timeout_s: float = Field(5.0, gt=0)

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("https://", "http://")):
            raise ValueError("must start with https:// (or http:// on a trusted network)")
        return v

    @model_validator(mode="after")
    def _issuer(self) -> JWTConfig:
        if self.jwks_url and not self.issuer:
            raise ValueError("jwt.issuer is required with jwt.jwks_url")
        if not self.role_claim or any(not p for p in self.role_claim.split(".")):
            raise ValueError("jwt.role_claim must be a claim name or a dotted path")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.jwks_url or self.hs256_secret)


class ConfigKey(_Strict):
    """An API key given in the config (for setups without PostgreSQL): only its sha256.

    ``citadeld keygen NAME --role R`` prints a new key and this entry."""

    id: str  # the 12 hex digits after `ck_`
    sha256: str  # hex sha256 of the whole key string
    name: str = ""
    role: Role = "user"
    expires_at: float | None = None  # unix time
    rate_per_min: float | None = Field(None, gt=0)

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _KEY_ID.match(v):
            raise ValueError("must be 12 lower-case hex digits (the part after ck_)")
        return v

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str) -> str:
        v = v.lower()
        if not _HASH.match(v):
            raise ValueError("must be 64 hex digits")
        return v


class AuthConfig(_Strict):
    enabled: bool = False  # the embedded default; the packaged config turns it on
    realm: str = "citadel"  # in WWW-Authenticate
    open_routes: tuple[str, ...] = DEFAULT_OPEN  # paths (globs) anyone may call
    rules: tuple[RoleRule, ...] = DEFAULT_RULES  # replaces the default mapping when set
    extra_rules: tuple[RoleRule, ...] = ()  # checked before `rules`: add without restating
    api_keys: tuple[ConfigKey, ...] = ()  # besides the PostgreSQL table
    keys_refresh_s: float = Field(30.0, ge=1)  # reread the key table (revocations elsewhere)
    jwt: JWTConfig = JWTConfig()

    @model_validator(mode="after")
    def _ids(self) -> AuthConfig:
        seen = set()
        for k in self.api_keys:
            if k.id in seen:
                raise ValueError(f"api_keys: id {k.id} is given twice")
            seen.add(k.id)
        return self


class CORSConfig(_Strict):
    """Browsers (the AG UI) on these origins may call the API. Credentials (cookies,
    Authorization) are allowed only for the origins listed by name; ``*`` admits any other
    origin without credentials."""

    allow_origins: tuple[str, ...] = ()  # e.g. ["https://ui.example.org"]; empty: no CORS
    allow_credentials: bool = True  # for the listed origins only, never for "*"
    allow_headers: tuple[str, ...] = ("Authorization", "Content-Type", "X-API-Key",
                                      "X-Request-ID")
    expose_headers: tuple[str, ...] = ("X-Request-ID", "Retry-After", "RateLimit-Limit",
                                       "RateLimit-Remaining", "RateLimit-Reset",
                                       "RateLimit-Policy", "X-Citadel-Upstream")
    max_age_s: int = Field(600, ge=0, le=86400)

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(o if o == "*" else o.rstrip("/").lower() for o in v)  # as browsers send it
        for o in out:
            if o != "*" and not re.match(r"^https?://[^/\s]+$", o):
                raise ValueError(f"origin {o!r} must be scheme://host[:port] (no path) or *")
        return out


class LimitsConfig(_Strict):
    """Connection-level limits against oversized and slow clients (the body size is
    ``server.max_body_bytes``, the whole request ``server.request_timeout_s``)."""

    max_line_size: int = Field(8190, ge=1024, le=65536)  # request line (method + URL)
    max_field_size: int = Field(8190, ge=1024, le=65536)  # one header
    max_headers: int = Field(100, ge=16, le=1000)
    # an idle keep-alive connection is closed after this; it also bounds how long a new
    # connection may take to send its request head (slow-header clients)
    keepalive_timeout_s: float = Field(15.0, gt=0, le=3600)
    lingering_time_s: float = Field(5.0, ge=0, le=60)  # reading a refused body before closing

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for aiohttp's ``AppRunner`` (passed to every RequestHandler);
        ``max_headers`` only where this aiohttp knows it."""
        import inspect

        from aiohttp.web_protocol import RequestHandler

        out: dict[str, Any] = {
            "max_line_size": self.max_line_size, "max_field_size": self.max_field_size,
            "keepalive_timeout": self.keepalive_timeout_s,
            "lingering_time": self.lingering_time_s}
        if "max_headers" in inspect.signature(RequestHandler.__init__).parameters:
            out["max_headers"] = self.max_headers
        return out
