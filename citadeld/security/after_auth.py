"""The layers after authentication - rate limiting and the audit trail - joined to the app by
one ``install(app, state)`` call in ``build_app`` after the auth layer's own ``install`` (the
limiter needs the principal the auth middleware sets).

The limiter and the trail are built in the app's start-up hook, when the daemon's metrics,
health and persistence exist, and closed in its clean-up hook - before persistence flushes its
buffer, so body hashes still being computed land in it.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from citadeld.security.audit import AUDIT_TRAIL, AuditTrail
from citadeld.security.audit_routes import add_routes
from citadeld.security.ratelimit import (
    Handler,
    RateLimiter,
    RateLimitMetrics,
    rate_limit_middleware,
    redis_url_of,
)
from citadeld.security.seclog import SecurityLog
from citadeld.state import STATE

log = logging.getLogger("citadeld.security")

RATE_LIMITER: web.AppKey[RateLimiter] = web.AppKey("citadel_rate_limiter", RateLimiter)


def install(app: web.Application, state: Any) -> None:
    cfg = state.config
    seclog = SecurityLog(cfg.audit.event_log_interval_s)
    add_routes(app)
    if cfg.rate_limits.enabled:
        holder: dict[str, Any] = {}

        @web.middleware
        async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
            mw = holder.get("mw")
            if mw is None:  # before start-up (tests that build an app without running it)
                return await handler(request)
            return await mw(request, handler)

        app.middlewares.append(rate_limit)

        async def start_limiter(app: web.Application) -> None:
            st = app[STATE]
            limiter = RateLimiter(cfg.rate_limits, redis_url_of(cfg.rate_limits,
                                                                cfg.cache.redis_url),
                                  RateLimitMetrics(st.metrics.registry), st.health)
            app[RATE_LIMITER] = limiter
            holder["mw"] = rate_limit_middleware(limiter, seclog)
            await limiter.probe()
            log.info("rate limits on", extra={"mode": limiter.mode, **{
                g: f"{lim.per_min:g}/min burst {lim.capacity}"
                for g, lim in limiter.groups.items()}})

        async def stop_limiter(app: web.Application) -> None:
            limiter = app.get(RATE_LIMITER)
            if limiter is not None:
                await limiter.close()

        app.on_startup.append(start_limiter)
        app.on_cleanup.append(stop_limiter)

    async def start_audit(app: web.Application) -> None:
        st = app[STATE]
        storage = getattr(st, "storage", None)
        persistence = storage.persistence if storage is not None else None
        if cfg.audit.enabled and persistence is None:
            log.warning("audit trail: no PostgreSQL (persistence.dsn unset); requests are "
                        "only in the access log")
        auth = getattr(cfg, "auth", None)
        app[AUDIT_TRAIL] = AuditTrail(cfg.audit, persistence, bool(auth and auth.enabled))

    async def stop_audit(app: web.Application) -> None:
        trail = app.get(AUDIT_TRAIL)
        if trail is not None:
            await trail.close()

    app.on_startup.append(start_audit)
    app.on_cleanup.append(stop_audit)


def snapshot(app: web.Application) -> dict[str, Any]:
    """For ``/health/detailed``-style views: the limiter's mode and the trail's counters."""
    limiter = app.get(RATE_LIMITER)
    trail = app.get(AUDIT_TRAIL)
    return {"rate_limits": limiter.snapshot() if limiter is not None else {"enabled": False},
            "audit": trail.snapshot() if trail is not None else {"enabled": False}}
