"""aiohttp application factory: one middleware gives every request an id, a timeout, metrics,
an access-log line and, whatever goes wrong, an answer in the route's own error dialect."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from citadeld.errors import CitadelError, Unavailable, UpstreamTimeout
from citadeld.http import (
    docs_routes,
    embed_routes,
    event_routes,
    health_routes,
    llm_routes,
    vector_routes,
    workflow_routes,
)
from citadeld.http.errors import dialect_of, error_response
from citadeld.logs import request_id
from citadeld.state import STATE, DaemonState

log = logging.getLogger("citadeld.http")
access = logging.getLogger("citadeld.access")

_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET = frozenset({"/health/live", "/health/ready", "/metrics", "/health"})
# while draining these still answer, so orchestrators and Prometheus see the state
_ALWAYS_OPEN = ("/health", "/metrics", "/openapi.json", "/docs")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _http_error(exc: web.HTTPException) -> CitadelError:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
             415: "unsupported_media_type"}
    reason = exc.reason or "error"
    msg = {404: "no such route", 405: "method not allowed for this route"}.get(
        exc.status, reason
    )
    return CitadelError(msg, status=exc.status, code=codes.get(exc.status, "http_error"))


@web.middleware
async def core_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    state: DaemonState = request.app[STATE]
    incoming = request.headers.get("X-Request-ID", "")
    rid = incoming if _RID_OK.match(incoming) else uuid.uuid4().hex
    token = request_id.set(rid)
    t0 = time.perf_counter()
    route = request.match_info.route.resource
    route_name = route.canonical if route is not None else "unmatched"
    status = 500
    try:
        if state.draining and not request.path.startswith(_ALWAYS_OPEN):
            raise Unavailable("daemon is draining; retry on another instance", retry_after=5)
        # routes marked own_deadline (LLM streams) bound their own time; this would cut them
        own = getattr(request.match_info.handler, "own_deadline", False)
        try:
            async with asyncio.timeout(None if own else state.config.server.request_timeout_s):
                resp = await handler(request)
        except TimeoutError:
            raise UpstreamTimeout("request timed out") from None
        status = resp.status
    except CitadelError as exc:
        resp = error_response(dialect_of(request.path), exc, rid)
        status = resp.status
        if status >= 500:
            log.warning("request failed", extra={"status": status, "error": exc.message,
                                                 "path": request.path})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        resp = error_response(dialect_of(request.path), _http_error(exc), rid)
        status = resp.status
    except asyncio.CancelledError:
        status = 499  # client went away; nothing to answer
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path})
        resp = error_response(
            dialect_of(request.path),
            CitadelError("internal error; see the daemon log for this request id"),
            rid,
        )
        status = 500
    finally:
        elapsed = time.perf_counter() - t0
        state.metrics.http_requests.labels(route_name, request.method, str(status)).inc()
        state.metrics.http_latency.labels(route_name).observe(elapsed)
        if request.path not in _QUIET and access.isEnabledFor(logging.INFO):
            access.info(
                "request",
                extra={"method": request.method, "path": request.path, "status": status,
                       "ms": round(elapsed * 1000, 2), "remote": request.remote},
            )
        request_id.reset(token)
    resp.headers["X-Request-ID"] = rid
    return resp


def build_app(state: DaemonState) -> web.Application:
    app = web.Application(
        middlewares=[core_middleware],
        client_max_size=state.config.server.max_body_bytes,
    )
    app[STATE] = state
    embed_routes.add_routes(app)
    llm_routes.add_routes(app)
    vector_routes.add_routes(app)
    workflow_routes.add_routes(app)
    health_routes.add_routes(app)
    docs_routes.add_routes(app)
    event_routes.add_routes(app)
    return app
