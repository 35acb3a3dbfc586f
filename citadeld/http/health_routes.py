"""/health family and /metrics. Reads only in-memory state: a probe never waits on a dependency."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from citadeld import __version__
from citadeld.http.body import json_response
from citadeld.security import after_auth
from citadeld.state import STATE, DaemonState


def model_status(state: DaemonState) -> dict[str, bool]:
    return {name: pool.can_embed() for name, pool in state.pools.items()}


def is_ready(state: DaemonState) -> bool:
    return not state.draining and all(model_status(state).values())


def summary(state: DaemonState) -> dict[str, Any]:
    models = model_status(state)
    cache = state.health.get("cache")
    if all(models.values()) and (cache is None or cache["status"] == "ok"):
        status = "ok"
    elif any(models.values()):
        status = "degraded"
    else:
        status = "down"
    storage = getattr(state, "storage", None)  # vectors/persistence: ok|down|disabled
    if storage is not None and status == "ok" and storage.degraded():
        status = "degraded"
    events = getattr(state, "events", None)  # the workflow event bus (Redis or in-process)
    events_status = events.snapshot()["status"] if events is not None else None
    if events_status == "down" and status == "ok":
        status = "degraded"
    return {
        "status": status,
        "ready": is_ready(state),
        "draining": state.draining,
        "version": __version__,
        "models": {k: "ok" if v else "down" for k, v in models.items()},
        "cache": cache["status"] if cache else "unknown",
        **(storage.summary() if storage is not None else {}),
        **({"events": events_status} if events_status is not None else {}),
    }


async def health(request: web.Request) -> web.Response:
    body = summary(request.app[STATE])
    return json_response(body, status=503 if body["status"] == "down" else 200)


async def live(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = is_ready(state)
    return json_response(
        {"ready": ok, "draining": state.draining, "models": model_status(state)},
        status=200 if ok else 503,
    )


async def detailed(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = summary(state)
    body["uptime_s"] = round(time.time() - state.started_at, 3)
    body["dependencies"] = state.health.all()
    body["pools"] = {name: pool.snapshot() for name, pool in state.pools.items()}
    body["cache_stats"] = state.cache.stats()
    body["actors"] = state.supervisor.snapshot() if state.supervisor is not None else []
    storage = getattr(state, "storage", None)
    if storage is not None:  # Qdrant, PostgreSQL, outbox, buffers
        body["storage"] = storage.detailed()
    llm = getattr(state, "llm", None)
    if llm is not None:  # LLM servers: breakers, probes, load
        body["llm"] = llm.snapshot()
    body["security"] = after_auth.snapshot(request.app)  # rate limits: mode; audit: counters
    lag = state.extra.get("loop_lag")
    if lag is not None:
        body["event_loop_lag_ms"] = lag.snapshot()
    workflows = state.extra.get("workflows")
    if workflows is not None:  # runner, queue and store mode
        body["workflows"] = workflows.snapshot()
    events = getattr(state, "events", None)
    if events is not None:  # workflow event bus: backend, Redis reader/publish, buffer
        body["events"] = events.snapshot()
    return json_response(body)


async def metrics(request: web.Request) -> web.Response:
    data = request.app[STATE].metrics.exposition()
    resp = web.Response(body=data)
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", ready)
    app.router.add_get("/health/detailed", detailed)
    app.router.add_get("/metrics", metrics)
