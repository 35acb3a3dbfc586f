"""The core middleware's deadline sweeper, request ids, metrics and access lines."""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from citadeld.config import Config
from citadeld.http.app import core_middleware, install_core, new_request_id
from citadeld.http.deadlines import Deadlines
from citadeld.metrics import Metrics
from citadeld.security.audit import AUDIT_TRAIL, AuditTrail
from citadeld.state import DaemonState


async def test_sweep_cancels_only_overdue_tasks_and_reports_them() -> None:
    d = Deadlines(resolution=10)
    slow = asyncio.create_task(asyncio.sleep(30))
    fast = asyncio.create_task(asyncio.sleep(30))
    d.add(cast("asyncio.Task[object]", slow), 1.0)
    d.add(cast("asyncio.Task[object]", fast), 5.0)
    assert d.sweep_once(2.0) == 1
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert not fast.cancelled()
    assert d.done(cast("asyncio.Task[object]", slow)) is True  # it expired
    assert d.done(cast("asyncio.Task[object]", fast)) is False  # finished in time
    assert d.sweep_once(100.0) == 0  # forgotten tasks are never cancelled later
    assert not fast.cancelled()
    fast.cancel()


def test_request_ids_are_unique_32_hex() -> None:
    ids = {new_request_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


class _Trail:
    """Stands in for the audit trail: the rows the core hands it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, str]] = []

    def request_done(self, request: web.Request, status: int, elapsed: float, rid: str) -> None:
        self.rows.append((request.path, status, rid))

    async def close(self) -> None:
        pass


@web.middleware
async def _other(request: web.Request, handler: Any) -> web.StreamResponse:
    """A layer after the core (as auth is): the core must still wrap it."""
    if request.headers.get("X-Refuse"):
        raise web.HTTPForbidden()
    return cast(web.StreamResponse, await handler(request))


_PLACEMENT = web.AppKey("placement", str)


# the core as an explicit middleware, at the routes (aiohttp then runs no middleware chain), and
# at the routes with another middleware composed inside it (as auth is)
@pytest.fixture(params=["middleware", "routes", "around-other"])
async def client(request: pytest.FixtureRequest
                 ) -> AsyncIterator[tuple[TestClient[Any, Any], Metrics]]:
    cfg = Config.model_validate({"server": {"request_timeout_s": 0.3}})
    metrics = Metrics()
    state = SimpleNamespace(config=cfg, metrics=metrics, draining=False)
    layers: dict[str, list[Any]] = {"middleware": [core_middleware], "routes": [],
                                    "around-other": [_other]}
    app = web.Application(middlewares=layers[request.param])
    install_core(app, cast(DaemonState, state), resolution=0.05)
    app[AUDIT_TRAIL] = cast(AuditTrail, _Trail())
    app[_PLACEMENT] = request.param

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="never")

    async def fast(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def streams(request: web.Request) -> web.Response:
        await asyncio.sleep(0.6)  # longer than the request timeout: it bounds its own time
        return web.json_response({"ok": True})
    streams.own_deadline = True  # type: ignore[attr-defined]

    app.router.add_get("/api/v1/slow", slow)
    app.router.add_get("/v1/slow", slow)
    app.router.add_get("/api/v1/fast", fast)
    app.router.add_get("/api/v1/own", streams)
    async with TestClient(TestServer(app)) as c:
        yield c, metrics


async def test_handler_past_the_timeout_gets_504_in_its_dialect(
    client: tuple[TestClient[Any, Any], Metrics],
) -> None:
    c, metrics = client
    r = await c.get("/api/v1/slow", headers={"X-Request-ID": "abc-1"})
    assert r.status == 504
    body = await r.json()
    assert body["error"]["code"] == "upstream_timeout"
    assert body["error"]["request_id"] == "abc-1" == r.headers["X-Request-ID"]
    r = await c.get("/v1/slow")
    assert r.status == 504
    assert "timed out" in (await r.json())["error"]["message"]  # OpenAI envelope
    text = generate_latest(metrics.registry).decode()
    assert 'citadel_http_requests_total{method="GET",route="/api/v1/slow",status="504"} 1.0' \
        in text


async def test_fast_and_own_deadline_routes_are_not_cut(
    client: tuple[TestClient[Any, Any], Metrics],
) -> None:
    c, metrics = client
    r = await c.get("/api/v1/own")
    assert r.status == 200
    r = await c.get("/api/v1/fast", headers={"X-Request-ID": "bad id with spaces"})
    assert r.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    for _ in range(3):
        assert (await c.get("/api/v1/fast")).status == 200
    await asyncio.sleep(0.2)  # sweeps run meanwhile and must not cancel anything finished
    text = generate_latest(metrics.registry).decode()
    assert 'citadel_http_requests_total{method="GET",route="/api/v1/fast",status="200"} 4.0' \
        in text


async def test_unmatched_routes_answer_in_their_dialect_with_id_metrics_and_audit(
    client: tuple[TestClient[Any, Any], Metrics],
) -> None:
    c, metrics = client
    r = await c.get("/api/v1/nowhere", headers={"X-Request-ID": "nf-1"})
    assert r.status == 404
    assert r.headers["X-Request-ID"] == "nf-1"
    assert await r.json() == {"error": {"code": "not_found", "message": "no such route",
                                        "request_id": "nf-1"}}
    r = await c.post("/api/v1/fast")
    assert r.status == 405
    assert (await r.json())["error"]["code"] == "method_not_allowed"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-ID"])
    r = await c.get("/v1/nowhere")  # OpenAI envelope
    assert r.status == 404
    assert (await r.json())["error"]["type"] == "invalid_request_error"
    r = await c.get("/api/nowhere")  # Ollama envelope
    assert await r.json() == {"error": "no such route"}
    text = generate_latest(metrics.registry).decode()
    assert 'citadel_http_requests_total{method="GET",route="unmatched",status="404"} 3.0' \
        in text
    assert 'citadel_http_requests_total{method="POST",route="unmatched",status="405"} 1.0' \
        in text
    trail = cast(_Trail, c.app[AUDIT_TRAIL])
    assert ("/api/v1/nowhere", 404, "nf-1") in trail.rows
    assert len(trail.rows) == 4
    r = await c.get("/api/v1/fast")
    assert r.status == 200 and r.headers["X-Request-ID"]
    assert trail.rows[-1][:2] == ("/api/v1/fast", 200)


async def test_core_placement(client: tuple[TestClient[Any, Any], Metrics]) -> None:
    c, _ = client
    mws = list(c.app.middlewares)
    if not mws:  # at the routes: every route's handler runs the core, other layers inside
        assert all(isinstance(r.handler, functools.partial) for r in c.app.router.routes())
        layered = c.app[_PLACEMENT] == "around-other"
        # refused by the inner layer (on a route and on a miss): the core's id and dialect
        for path in ("/api/v1/fast", "/api/v1/nowhere"):
            r = await c.get(path, headers={"X-Refuse": "1", "X-Request-ID": "r-1"})
            assert r.status == (403 if layered else 200 if path.endswith("fast") else 404)
            assert r.headers["X-Request-ID"] == "r-1"
            if layered:
                assert (await r.json())["error"]["request_id"] == "r-1"
    else:
        assert c.app[_PLACEMENT] == "middleware" and mws == [core_middleware]
