"""aiohttp application factory: the core (composed at each route around the security layers,
or a middleware where an app lists it) gives every request an id, a timeout, metrics, an
access-log line and, whatever goes wrong, an answer in the route's own error dialect."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute, MatchInfoError, UrlMappingMatchInfo

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
from citadeld.http.deadlines import Deadlines
from citadeld.http.errors import dialect_of, error_response
from citadeld.logs import AccessLog, request_id
from citadeld.security import after_auth
from citadeld.security.audit import AUDIT_TRAIL, AuditTrail
from citadeld.security.wiring import install as install_security
from citadeld.state import STATE, DaemonState

log = logging.getLogger("citadeld.http")
access = AccessLog("citadeld.access")

_RID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_QUIET = frozenset({"/health/live", "/health/ready", "/metrics", "/health"})
# while draining these still answer, so orchestrators and Prometheus see the state
_ALWAYS_OPEN = ("/health", "/metrics", "/openapi.json", "/docs")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[..., Awaitable[web.StreamResponse]]

# request ids: a random per-process prefix and a counter; as unique as uuid4 for our purpose
# and a fraction of its cost (uuid4 builds a UUID object from os.urandom per request)
_RID_PREFIX = os.urandom(8).hex()
_rid_seq = itertools.count(1)
_RID_FORMAT = "%s%016x"  # "%": half the cost of an f-string with a format spec, per request


def new_request_id() -> str:
    return _RID_FORMAT % (_RID_PREFIX, next(_rid_seq))


class _RouteMetrics:
    """Metric children cached per (route, method, status): ``labels()`` builds and hashes a
    tuple of strings on every call."""

    __slots__ = ("_count", "_latency", "_state")

    def __init__(self, state: DaemonState) -> None:
        self._state = state  # metrics read on first use: the app may be built before them
        self._count: dict[tuple[str, str, int], Any] = {}
        self._latency: dict[str, Any] = {}

    def record(self, route: str, method: str, status: int, elapsed: float) -> None:
        key = (route, method, status)
        counter = self._count.get(key)
        if counter is None:
            counter = self._count[key] = self._state.metrics.http_requests.labels(
                route, method, str(status))
        counter.inc()
        hist = self._latency.get(route)
        if hist is None:
            hist = self._latency[route] = self._state.metrics.http_latency.labels(route)
        hist.observe(elapsed)


class _Core:
    """What the core middleware needs per request, behind one app lookup instead of three."""

    __slots__ = ("deadlines", "loop", "metrics", "state", "trail")

    def __init__(self, state: DaemonState, deadlines: Deadlines) -> None:
        self.state = state
        self.deadlines = deadlines
        self.metrics = _RouteMetrics(state)
        self.loop: asyncio.AbstractEventLoop | None = None  # the serving loop, from start-up
        self.trail: AuditTrail | None = None  # set on the app by a later start-up hook


CORE = web.AppKey("citadel_core", _Core)


def _http_error(exc: web.HTTPException) -> CitadelError:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
             415: "unsupported_media_type"}
    reason = exc.reason or "error"
    msg = {404: "no such route", 405: "method not allowed for this route"}.get(
        exc.status, reason
    )
    return CitadelError(msg, status=exc.status, code=codes.get(exc.status, "http_error"))


async def _serve(core: _Core, handler: Handler, route_name: str, own_deadline: bool,
                 request: web.Request) -> web.StreamResponse:
    """The core around one handler: request id, deadline, metrics, access log, audit row and,
    whatever goes wrong, an answer in the route's own dialect. Arguments first, the request
    last: a route's handler is ``partial(_serve, core, handler, name, own_deadline)``."""
    state = core.state
    incoming = request.headers.get("X-Request-ID")
    # new_request_id() inline: a call fewer per request
    rid = (incoming if incoming and _RID_OK.match(incoming)
           else _RID_FORMAT % (_RID_PREFIX, next(_rid_seq)))
    token = request_id.set(rid)
    t0 = time.perf_counter()
    status = 500
    deadlines = core.deadlines
    live = deadlines.live
    task: asyncio.Task[Any] | None = None
    try:
        if state.draining and not request.path.startswith(_ALWAYS_OPEN):
            raise Unavailable("daemon is draining; retry on another instance", retry_after=5)
        # routes marked own_deadline (LLM streams) bound their own time; this would cut them
        if not own_deadline:
            # this request's own task (request.task is the connection's, which awaits it);
            # given the loop, current_task skips get_running_loop's getpid() system call
            task = asyncio.current_task(core.loop)
            if task is not None:  # Deadlines.add, inline
                live[task] = time.monotonic() + state.config.server.request_timeout_s
        try:
            resp = await handler(request)
        except asyncio.CancelledError:
            if task is not None and deadlines.done(task):
                task.uncancel()
                raise UpstreamTimeout("request timed out") from None
            raise
        finally:
            if task is not None and live.pop(task, None) is None:
                deadlines.done(task)  # expired: forget it there too
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
        method = request.method
        core.metrics.record(route_name, method, status, elapsed)
        path = request.path
        if path not in _QUIET and access.logger.isEnabledFor(logging.INFO):
            access.request(rid, method, path, status, elapsed, request.remote)
        trail = core.trail  # the audit trail, looked up on the app once
        if trail is None:
            trail = core.trail = request.app.get(AUDIT_TRAIL)
        if trail is not None:
            trail.request_done(request, status, elapsed, rid)
        request_id.reset(token)
    resp.headers["X-Request-ID"] = rid
    return resp


def _route_name(route: AbstractRoute) -> str:
    resource = route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
def core_middleware(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
    """The core as an aiohttp middleware, for apps that list it themselves (test harnesses);
    ``build_app`` composes it at the routes. Returns ``_serve``'s coroutine (no extra
    coroutine level)."""
    route = request.match_info.route
    return _serve(request.app[CORE], handler, _route_name(route),
                  getattr(route.handler, "own_deadline", False), request)


def _route_level(app: web.Application, core: _Core, layers: Sequence[Middleware]) -> None:
    """The core, and the app's other middlewares inside it in their order (CORS, auth, rate
    limits), composed once per route instead of by aiohttp per request: with no middleware
    left on the app, aiohttp skips its chain (an lru_cache lookup, then a ``partial`` and a
    ``_fix_request_current_app`` coroutine level per middleware). Each route's handler becomes
    ``partial(_serve, ...)`` around ``partial(layer, handler=...)``s, as aiohttp would build
    them; requests no route matches (404, 405, CORS preflights) get theirs from the router's
    resolve."""

    def layered(handler: Handler) -> Handler:
        for layer in reversed(layers):
            handler = functools.partial(layer, handler=handler)
        return handler

    for route in app.router.routes():
        handler = route.handler
        if isinstance(handler, functools.partial) and handler.func is _serve:
            continue  # already wrapped (an app started twice)
        wrapped = functools.partial(_serve, core, layered(handler), _route_name(route),
                                    getattr(handler, "own_deadline", False))
        route._handler = wrapped  # aiohttp has no setter
    router = app.router
    if "resolve" in vars(router):
        return
    resolve = router.resolve

    async def resolve_unmatched(request: web.Request) -> UrlMappingMatchInfo:
        match_info = await resolve(request)
        if isinstance(match_info, MatchInfoError):
            # a fresh SystemRoute per miss: its handler raises the 404/405; _serve answers it
            route = match_info.route
            route._handler = functools.partial(
                _serve, core, layered(route.handler), "unmatched", False)
        return match_info

    router.resolve = resolve_unmatched  # type: ignore[method-assign]


async def _start_core(app: web.Application) -> None:
    """Place the core before the app freezes (every route and middleware is known by now):
    at the routes, with the app's middlewares moved inside it. An app that lists
    ``core_middleware`` itself keeps aiohttp's chain."""
    core = app[CORE]
    if core_middleware not in app.middlewares:
        _route_level(app, core, tuple(app.middlewares))
        app.middlewares.clear()
    core.loop = asyncio.get_running_loop()
    core.deadlines.start()


async def _stop_deadlines(app: web.Application) -> None:
    await app[CORE].deadlines.stop()


def install_core(app: web.Application, state: DaemonState, resolution: float = 0.25) -> None:
    """What the core needs on its app: the state, the deadline sweeper, metric children; at
    start-up it places itself (see ``_start_core``) unless ``core_middleware`` is already in
    the app's middlewares."""
    app[STATE] = state
    app[CORE] = _Core(state, Deadlines(resolution))
    app.on_startup.append(_start_core)
    app.on_cleanup.append(_stop_deadlines)


def build_app(state: DaemonState) -> web.Application:
    # the core (request id, deadline, metrics, dialect errors) is placed at start-up, see
    # _start_core: at the routes, outermost, with the security middlewares inside it
    app = web.Application(client_max_size=state.config.server.max_body_bytes)
    install_core(app, state)
    install_security(app, state)  # CORS and auth middlewares: inside the core
    embed_routes.add_routes(app)
    llm_routes.add_routes(app)
    vector_routes.add_routes(app)
    workflow_routes.add_routes(app)
    health_routes.add_routes(app)
    docs_routes.add_routes(app)
    event_routes.add_routes(app)
    after_auth.install(app, state)  # rate limits and audit: after auth (they need the principal)
    return app
