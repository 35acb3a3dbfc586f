"""Rate limiting per principal and route group, shared by every citadeld through Redis.

The Redis check runs on the front's event loop, unlike the embedding cache (a sync client in
an actor): a check is one tiny EVALSHA whose reply is four integers, and a trip through an
actor would add two thread hand-offs (and GIL ping-pong) to *every* request. It uses a lean
pipelined connection (``citadeld.security.resp``: an asyncio Protocol, hiredis parsing; the
checks of one loop tick leave in one write) rather than redis-py's asyncio client, whose
per-call overhead measured ~100 us of loop CPU here. The loop is protected by (a) a short bound
(``rate_limits.redis_timeout_s``, 50 ms) after which a request is decided by the local buckets
and the connection is dropped; (b) a circuit (the cache's): after a failure Redis is skipped for
a backoff (1 s doubling to 10 s), so an outage adds no latency. While Redis is away each
instance enforces the limit on its own (local buckets): the cluster-wide limit is then at most
N times the configured one, never a 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import Counter, Gauge

from citadeld.cache_core import Circuit
from citadeld.errors import CitadelError
from citadeld.http.errors import dialect_of, error_response
from citadeld.logs import request_id
from citadeld.security.buckets import (
    GCRA_LUA,
    Decision,
    LocalBuckets,
    Policy,
    decision_from_script,
)
from citadeld.security.principal import Principal, principal_of
from citadeld.security.ratelimit_audit_config import GroupLimit, RateLimitsConfig
from citadeld.security.resp import ReplyError, RespConnection, connect, encode
from citadeld.security.seclog import SecurityLog

if TYPE_CHECKING:
    from citadeld.health import HealthState

log = logging.getLogger("citadeld.ratelimit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEALTH_NAME = "rate_limit_redis"
_HEALTH_EVERY_S = 2.0


class _Circuit(Circuit):
    """The cache's circuit, minus its "serving misses" log line: the limiter logs its own."""

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if now >= self.open_until:
            self.open_until = now + self.backoff
            self.backoff = min(self.backoff * 2, self.backoff_max)

    def succeeded(self) -> None:
        self.last_error, self.open_until, self.backoff = None, 0.0, self.backoff_min


class RateLimited(CitadelError):
    status = 429
    code = "rate_limited"


class RateLimitMetrics:
    def __init__(self, registry: Any) -> None:
        self.limited = Counter("citadel_rate_limited", "Requests refused by a rate limit (429)",
                               ["group"], registry=registry)
        self.checks = Counter("citadel_rate_limit_checks",
                              "Rate-limit checks by where they were decided",
                              ["backend"], registry=registry)  # redis | local | fallback
        self.redis_up = Gauge("citadel_rate_limit_redis_up",
                              "1 while rate limits are shared through Redis", registry=registry)


def redis_url_of(cfg: RateLimitsConfig, cache_redis_url: str | None) -> str | None:
    if cfg.backend == "local":
        return None
    return cfg.redis_url or cache_redis_url


class RateLimiter:
    """Decides one request: ``await check(principal, client, group)``; never raises."""

    def __init__(self, cfg: RateLimitsConfig, redis_url: str | None,
                 metrics: RateLimitMetrics | None = None, health: HealthState | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.redis_url = redis_url
        self.metrics = metrics
        self.health = health
        self.groups = cfg.groups()
        self.local = LocalBuckets(cfg.local_max_keys, clock)
        self.circuit = _Circuit(1.0, 10.0, what="rate-limit redis")
        self.fallbacks = 0  # checks decided locally because Redis failed or was skipped
        self._group_of: dict[str, str | None] = {}
        self._prefixes = sorted(((r, name) for name, g in self.groups.items() for r in g.routes),
                                key=lambda x: -len(x[0]))
        self._conn: RespConnection | None = None
        self._connecting: asyncio.Future[RespConnection] | None = None
        self._sha = hashlib.sha1(GCRA_LUA.encode()).hexdigest()
        self._health_at = 0.0
        self._redis_ok: bool | None = None
        self.closed = False
        if metrics is not None:
            metrics.redis_up.set(0)

    @property
    def mode(self) -> str:
        if self.redis_url is None:
            return "local"
        return "redis" if self.circuit.allow() and self.circuit.last_error is None else "fallback"

    # -- which limit applies --

    def group_of(self, route: str) -> str | None:
        """The route group of a canonical route path; None when exempt."""
        try:
            return self._group_of[route]
        except KeyError:
            pass
        group: str | None = "default"
        if any(route == e or route.startswith(e.rstrip("/") + "/") for e in self.cfg.exempt):
            group = None
        else:
            for prefix, name in self._prefixes:
                if route == prefix or route.startswith(prefix.rstrip("/") + "/"):
                    group = name
                    break
        if len(self._group_of) < 4096:
            self._group_of[route] = group
        return group

    def policy(self, principal: Principal, group: str) -> Policy:
        g: GroupLimit = self.groups[group]
        override = principal.rate_per_min
        if override is not None and override > 0:
            # the key's own rate, with the group's burst-to-rate proportion
            burst = max(1, math.ceil(g.capacity * override / g.per_min))
            return Policy(float(override), burst)
        return Policy(g.per_min, g.capacity)

    @staticmethod
    def subject(principal: Principal, client: str | None) -> str:
        """Whose bucket: the key/user, or the client address when there is no credential (or
        auth is off, where every caller is the same LOCAL principal)."""
        if principal.authenticated:
            return f"{principal.kind}:{principal.key_id or principal.name}"
        return f"ip:{client or principal.name or 'unknown'}"

    def key(self, group: str, subject: str) -> str:
        if len(subject) > 200:  # JWT subjects are client-chosen: bound the key length
            subject = "h:" + hashlib.blake2b(subject.encode(), digest_size=16).hexdigest()
        return f"{self.cfg.key_prefix}{group}:{subject}"

    # -- the check --

    async def check(self, principal: Principal, client: str | None, group: str) -> Decision:
        policy = self.policy(principal, group)
        key = self.key(group, self.subject(principal, client))
        if self.redis_url is None:
            self._count("local")
            return self.local.check(key, policy)
        if self.closed or not self.circuit.allow():
            return self._fallback(key, policy)
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.cfg.redis_timeout_s):
                reply = await self._eval(key, policy)
        except Exception as exc:
            self._failed(exc)
            return self._fallback(key, policy)
        if self.circuit.last_error is not None or self._redis_ok is not True:
            if self.circuit.last_error is not None:
                log.warning("rate limits are shared through Redis again")
            self.circuit.succeeded()
        self._set_health(True, (time.perf_counter() - t0) * 1000)
        self._count("redis")
        return decision_from_script(reply, policy)

    async def _eval(self, key: str, policy: Policy) -> list[int]:
        conn = await self._connection()
        cmd = encode("EVALSHA", self._sha, 1, key, repr(policy.interval_s * 1e6), policy.burst)
        reply = await conn.request(cmd)
        if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
            reply = await conn.request(encode("SCRIPT", "LOAD", GCRA_LUA))  # fresh or flushed
            if not isinstance(reply, ReplyError):
                reply = await conn.request(cmd)
        if isinstance(reply, ReplyError):
            raise reply
        if not isinstance(reply, list) or len(reply) != 4:
            raise ConnectionError(f"unexpected reply from the rate-limit script: {reply!r}"[:200])
        return reply

    async def _connection(self) -> RespConnection:
        """The open connection, or one being opened (shared by every check waiting for it)."""
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._connecting is None:
            assert self.redis_url is not None
            self._connecting = asyncio.ensure_future(connect(self.redis_url,
                                                             "citadeld-ratelimit"))
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, fut: asyncio.Future[RespConnection]) -> None:
        self._connecting = None
        if not fut.cancelled() and fut.exception() is None:
            self._conn = fut.result()

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, TimeoutError) and not str(exc):
            exc = TimeoutError(f"no answer in {self.cfg.redis_timeout_s} s")
        self.circuit.failed(exc)
        conn, self._conn = self._conn, None
        if conn is not None:  # slow or broken: its late replies must not be waited for
            conn.close()
        self._set_health(False, None)

    def _fallback(self, key: str, policy: Policy) -> Decision:
        self.fallbacks += 1
        self._count("fallback")
        return self.local.check(key, policy)

    def _count(self, backend: str) -> None:
        if self.metrics is not None:
            self.metrics.checks.labels(backend).inc()

    def _set_health(self, ok: bool, latency_ms: float | None) -> None:
        now = time.monotonic()
        if ok == self._redis_ok and now - self._health_at < _HEALTH_EVERY_S:
            return
        if ok is False and self._redis_ok is not False:
            log.warning("rate limits fall back to local buckets: Redis unavailable",
                        extra={"error": self.circuit.last_error})
        self._redis_ok, self._health_at = ok, now
        if self.metrics is not None:
            self.metrics.redis_up.set(1 if ok else 0)
        if self.health is not None:
            self.health.set(HEALTH_NAME, ok, latency_ms, self.circuit.last_error,
                            mode="redis" if ok else "local fallback",
                            fallbacks=self.fallbacks)

    def snapshot(self) -> dict[str, Any]:
        return {"enabled": True, "mode": self.mode, "local_buckets": len(self.local),
                "fallback_checks": self.fallbacks, "last_error": self.circuit.last_error,
                "groups": {n: {"per_min": g.per_min, "burst": g.capacity}
                           for n, g in self.groups.items()}}

    async def probe(self) -> None:
        """At start-up: connect and load the script (so the first request pays for neither),
        and give /health/detailed a verdict before the first request."""
        if self.redis_url is None:
            return
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(max(1.0, self.cfg.redis_timeout_s * 10)):
                conn = await self._connection()
                reply = await conn.request(encode("SCRIPT", "LOAD", GCRA_LUA))
                if isinstance(reply, ReplyError):
                    raise reply
        except Exception as exc:
            self._failed(exc if str(exc) else TimeoutError("no answer at start-up"))
        else:
            self.circuit.succeeded()
            self._set_health(True, (time.perf_counter() - t0) * 1000)

    async def close(self) -> None:
        self.closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._conn is not None:
            self._conn.close()


# ---- HTTP ----------------------------------------------------------------------------------


def headers_of(d: Decision) -> dict[str, str]:
    """IETF draft-ietf-httpapi-ratelimit-headers (draft 06/07 fields): quota per 60 s window,
    what is left of the burst, seconds until the bucket is full again."""
    per_min = f"{d.limit:g}"
    return {
        "RateLimit-Limit": per_min,
        "RateLimit-Remaining": str(d.remaining),
        "RateLimit-Reset": str(max(0, math.ceil(d.reset_s))),
        "RateLimit-Policy": f"{per_min};w=60;burst={d.burst}",
    }


def rate_limit_middleware(limiter: RateLimiter, seclog: SecurityLog) -> Any:
    """Runs after authentication (it needs the principal), before the handler."""

    @web.middleware
    async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        group = limiter.group_of(route.canonical if route is not None else "unmatched")
        if group is None:
            return await handler(request)
        principal = principal_of(request)
        decision = await limiter.check(principal, request.remote, group)
        if not decision.allowed:
            if limiter.metrics is not None:
                limiter.metrics.limited.labels(group).inc()
            seclog.event("rate_limited", request, principal, group=group,
                         limit_per_min=decision.limit)
            exc = RateLimited(f"rate limit exceeded: {decision.limit:g} requests per minute "
                              f"for {group} routes; retry after the Retry-After seconds",
                              retry_after=decision.retry_after_s)
            refused = error_response(dialect_of(request.path), exc, request_id.get() or "")
            refused.headers.update(headers_of(decision))
            return refused
        resp = await handler(request)
        if not resp.prepared:  # a stream already sent its headers
            resp.headers.update(headers_of(decision))
        return resp

    return rate_limit
