"""The websocket and SSE transports over a real aiohttp server (citadeld.http.app.build_app)
and a real bus: the in-process one, and Redis Streams on the shared server (unique prefix).

Events are published through the bus the daemon itself uses (``DaemonState.events``); the
workflow engine publishes through the same call."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import aiohttp
import orjson
import pytest
import redis
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from citadeld.config import Config
from citadeld.events.config import EventsConfig
from citadeld.events.hub import BusBase
from citadeld.events.ids import parse_id
from citadeld.events.memory_bus import MemoryBus
from citadeld.events.model import GAP, RUN_FINISHED, STEP_STARTED, Event
from citadeld.events.redis_bus import RedisBus
from citadeld.health import HealthState
from citadeld.http.app import build_app
from citadeld.metrics import Metrics
from citadeld.security.principal import PRINCIPAL_KEY, Principal
from citadeld.state import DaemonState
from tests.integration.test_cache_redis import SHARED_URL, _reachable

pytestmark = pytest.mark.timeout(60)

Factory = Callable[..., Awaitable[tuple[TestClient, BusBase]]]


@web.middleware
async def as_principal(request: web.Request, handler: Any) -> web.StreamResponse:
    """Stands in for the auth middleware (issue 7): the caller named by a test header."""
    who = request.headers.get("X-Test-Principal")
    if who:
        name, role = who.split(":")
        request[PRINCIPAL_KEY] = Principal(name=name, role=role, kind="key")
    return await handler(request)


@pytest.fixture(params=["memory", "redis"])
async def serve(request: pytest.FixtureRequest) -> AsyncIterator[Factory]:
    kind = request.param
    prefix = f"citadel-test:evt:{uuid.uuid4().hex[:12]}:"
    if kind == "redis" and not _reachable(SHARED_URL):
        pytest.skip("no Redis on :6379")
    made: list[tuple[TestClient, BusBase]] = []

    async def factory(**events: Any) -> tuple[TestClient, BusBase]:
        opts: dict[str, Any] = {"heartbeat_s": 5.0, "read_block_ms": 200,
                                "key_prefix": prefix, **events}
        ecfg = EventsConfig.model_validate(opts)
        cfg = Config.model_validate({"events": opts})
        metrics = Metrics()
        from citadeld.events.metrics import EventMetrics
        em = EventMetrics(metrics.registry)
        bus: BusBase = MemoryBus(ecfg, em) if kind == "memory" else RedisBus(ecfg, SHARED_URL,
                                                                             em)
        await bus.start()
        state = DaemonState(config=cfg, metrics=metrics, embedding=cast(Any, None), pools={},
                            cache=cast(Any, None), health=HealthState(), events=bus)
        app = build_app(state)
        app.middlewares.insert(0, as_principal)
        client = TestClient(TestServer(app))
        await client.start_server()
        made.append((client, bus))
        return client, bus

    yield factory
    for client, bus in made:
        await client.close()
        await bus.close()
    if kind == "redis":
        r = redis.Redis.from_url(SHARED_URL)
        for k in list(r.scan_iter(match=prefix + "*", count=1000)):
            r.delete(k)


def ev(wf: str, i: int, t: str = STEP_STARTED, owner: str | None = None) -> Event:
    return Event(t, wf, {"step_id": f"s{i}"}, owner=owner)


async def frames(ws: aiohttp.ClientWebSocketResponse, n: int, wait_s: float = 5.0
                 ) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        msg = await ws.receive(timeout=wait_s)
        assert msg.type is WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        out.append(orjson.loads(msg.data))
    return out


async def wait_for(cond: Callable[[], bool], wait_s: float = 5.0) -> None:
    for _ in range(int(wait_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


# ---- websocket: one workflow -------------------------------------------------------------


async def test_ws_workflow_history_then_live_then_closes_after_terminal(serve: Factory) -> None:
    client, bus = await serve()
    ids = [await bus.publish(ev("wf1", i)) for i in range(3)]
    async with client.ws_connect("/ws/workflows/wf1") as ws:
        got = await frames(ws, 3)
        assert [f["id"] for f in got] == ids
        assert got[0]["type"] == STEP_STARTED and got[0]["workflow_id"] == "wf1"
        assert got[0]["step_id"] == "s0" and "owner" not in got[0]
        await bus.publish(ev("other", 9))
        live = [await bus.publish(ev("wf1", 3)), await bus.publish(ev("wf1", 4, RUN_FINISHED))]
        got = await frames(ws, 2)
        assert [f["id"] for f in got] == live and got[1]["type"] == RUN_FINISHED
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1000
    # resume after an id: only what follows
    async with client.ws_connect(f"/ws/workflows/wf1?after={ids[1]}") as ws:
        got = await frames(ws, 3)
        assert [f["id"] for f in got] == [ids[2], *live]
    await wait_for(lambda: bus.hub.count == 0)


async def test_ws_bad_input_is_a_400_before_the_upgrade(serve: Factory) -> None:
    client, _ = await serve()
    for url in ("/ws/workflows/bad%20id", "/ws/workflows/wf?after=yesterday",
                "/ws?after=1-x", "/ws/workflows/" + "x" * 200):
        resp = await client.get(url, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                             "Sec-WebSocket-Version": "13",
                                             "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
        assert resp.status == 400, url
        body = await resp.json()
        assert body["error"]["code"] == "invalid_request" and body["error"]["request_id"]


async def test_ws_client_disconnect_mid_run_does_not_disturb_publishing(serve: Factory) -> None:
    client, bus = await serve()
    ws = await client.ws_connect("/ws/workflows/wf2")
    await bus.publish(ev("wf2", 0))
    assert len(await frames(ws, 1)) == 1
    await ws.close()  # the client goes away mid-run
    await wait_for(lambda: bus.hub.count == 0)
    ids = [await bus.publish(ev("wf2", i)) for i in range(1, 20)]
    ids.append(await bus.publish(ev("wf2", 20, RUN_FINISHED)))
    async with client.ws_connect("/ws/workflows/wf2") as ws2:  # the run went on
        got = await frames(ws2, 21)
        assert [f["id"] for f in got][1:] == ids


# ---- websocket: all events, subscribe / unsubscribe --------------------------------------


async def test_ws_all_live_subscribe_unsubscribe_and_bad_messages(serve: Factory) -> None:
    client, bus = await serve()
    early = await bus.publish(ev("w-a", 0))
    async with client.ws_connect("/ws") as ws:
        await wait_for(lambda: bus.hub.count == 1)
        first = await bus.publish(ev("w-b", 1))
        got = await frames(ws, 1)
        assert got[0]["id"] == first  # live only: the earlier event is not replayed
        for bad, code in ((b"not json", "invalid_json"),
                          (orjson.dumps([1, 2]), "invalid_message"),
                          (orjson.dumps({"type": "dance"}), "invalid_message"),
                          (orjson.dumps({"type": "subscribe", "workflow_id": "a b"}),
                           "invalid_message"),
                          (orjson.dumps({"type": "subscribe", "after": "x"}), "invalid_message"),
                          (orjson.dumps({"type": "subscribe", "extra": 1}), "invalid_message")):
            await ws.send_str(bad.decode())
            reply = (await frames(ws, 1))[0]
            assert reply["type"] == "error" and reply["code"] == code, (bad, reply)
        await ws.send_bytes(b"\x00\x01")
        assert (await frames(ws, 1))[0]["code"] == "unsupported_data"
        await ws.send_str('{"type": "ping"}')
        assert (await frames(ws, 1))[0] == {"type": "pong"}
        # a workflow's history on request; its events are not doubled by the all-events feed
        await ws.send_str(orjson.dumps({"type": "subscribe", "workflow_id": "w-a"}).decode())
        got = await frames(ws, 2)
        assert got[0] == {"type": "subscribed", "workflow_id": "w-a", "after": None}
        assert got[1]["id"] == early
        nxt = await bus.publish(ev("w-a", 2))
        assert [f["id"] for f in await frames(ws, 1)] == [nxt]
        await ws.send_str('{"type": "unsubscribe"}')  # stop the all-events feed
        assert (await frames(ws, 1))[0]["type"] == "unsubscribed"
        await bus.publish(ev("w-c", 3))  # no longer delivered
        fin = await bus.publish(ev("w-a", 4, RUN_FINISHED))
        got = await frames(ws, 2)
        assert got[0]["id"] == fin
        assert got[1] == {"type": "unsubscribed", "workflow_id": "w-a", "reason": "finished"}
        await ws.send_str('{"type": "ping"}')  # the socket stays open
        assert (await frames(ws, 1))[0] == {"type": "pong"}


async def test_ws_subscription_limit_and_messages_on_the_workflow_socket(serve: Factory) -> None:
    client, bus = await serve(ws_max_subscriptions=2)
    async with client.ws_connect("/ws") as ws:  # the all-events feed is one subscription
        await ws.send_str('{"type": "subscribe", "workflow_id": "a"}')
        assert (await frames(ws, 1))[0]["type"] == "subscribed"
        await ws.send_str('{"type": "subscribe", "workflow_id": "b"}')
        reply = (await frames(ws, 1))[0]
        assert reply["code"] == "too_many_subscriptions" and reply["workflow_id"] == "b"
        await ws.send_str('{"type": "subscribe", "workflow_id": "a", "after": "1-0"}')
        assert (await frames(ws, 1))[0]["type"] == "subscribed"  # re-subscribing replaces
        await ws.send_str('{"type": "unsubscribe", "workflow_id": "zzz"}')
        assert (await frames(ws, 1))[0] == {"type": "unsubscribed", "workflow_id": "zzz",
                                            "found": False}
    async with client.ws_connect("/ws/workflows/w") as ws:
        await ws.send_str('{"type": "ping"}')
        assert (await frames(ws, 1))[0]["code"] == "unsupported"
        fin = await bus.publish(ev("w", 0, RUN_FINISHED))
        assert (await frames(ws, 1))[0]["id"] == fin
    await wait_for(lambda: bus.hub.count == 0)


async def test_ws_oversized_and_too_fast_messages_close_the_socket(serve: Factory) -> None:
    client, _ = await serve(ws_max_message_bytes=256, ws_max_messages_per_s=2)
    async with client.ws_connect("/ws?subscribe=none") as ws:
        await ws.send_str("x" * 1000)
        msg = await ws.receive(timeout=5)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1009
    async with client.ws_connect("/ws?subscribe=none") as ws:
        for _ in range(10):
            if ws.closed:
                break
            await ws.send_str('{"type": "ping"}')
        codes = []
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not WSMsgType.TEXT:
                codes.append(msg.data)
                break
        assert codes == [1008]


async def test_visibility_by_owner(serve: Factory) -> None:
    client, bus = await serve()
    bob = {"X-Test-Principal": "bob:user"}
    admin = {"X-Test-Principal": "root:admin"}
    async with client.ws_connect("/ws", headers=bob) as wb, \
            client.ws_connect("/ws", headers=admin) as wa:
        await wait_for(lambda: bus.hub.count == 2)
        mine = await bus.publish(ev("w1", 0, owner="bob"))
        await bus.publish(ev("w2", 1, owner="alice"))
        shared = await bus.publish(ev("w3", 2))
        assert [f["id"] for f in await frames(wb, 2)] == [mine, shared]
        assert len(await frames(wa, 3)) == 3
    async with client.ws_connect("/ws/workflows/w9", headers=bob) as ws:
        await bus.publish(ev("w9", 3, RUN_FINISHED, owner="alice"))
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)  # nothing of alice's
    # once the workflow has events, someone else's is not found at all
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect("/ws/workflows/w2", headers=bob)
    assert info.value.status == 404
    resp = await client.get("/api/v1/events?workflow_id=w2", headers=bob)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "workflow_not_found"
    async with client.ws_connect("/ws/workflows/w2", headers=admin) as ws:
        assert (await frames(ws, 1))[0]["workflow_id"] == "w2"


async def test_slow_consumer_gets_a_gap_then_skips_ahead(serve: Factory) -> None:
    client, bus = await serve(subscriber_queue=4)
    async with client.ws_connect("/ws/workflows/wslow") as ws:
        await wait_for(lambda: bus.hub.count == 1)
        await asyncio.sleep(0.05)  # its replay (empty) is done: live
        # one burst: the fan-out outruns the socket writer (Redis: the reader gets one batch)
        ids = await asyncio.gather(*(bus.publish(ev("wslow", i)) for i in range(200)))
        last = max(ids, key=parse_id)
        got = []
        while len(got) < 200:
            f = (await frames(ws, 1))[0]
            got.append(f)
            if f["id"] == last:
                break
        gaps = [f for f in got if f["type"] == GAP]
        assert gaps, [f["type"] for f in got]
        assert gaps[0]["dropped"] > 0 and gaps[0]["from"] <= gaps[0]["to"]
        assert got[-1]["id"] == last  # it skipped ahead to the live end
        assert len(got) < 200


async def test_slow_consumer_disconnect_policy(serve: Factory) -> None:
    client, bus = await serve(subscriber_queue=2, slow_consumer="disconnect")
    async with client.ws_connect("/ws/workflows/wd") as ws:
        await wait_for(lambda: bus.hub.count == 1)
        await asyncio.sleep(0.05)
        await asyncio.gather(*(bus.publish(ev("wd", i)) for i in range(100)))
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is not WSMsgType.TEXT:
                break
        assert msg.type is WSMsgType.CLOSE and msg.data == 4008
    assert bus.metrics.slow_disconnects._value.get() == 1


async def test_a_client_that_reads_nothing_is_cut_off(serve: Factory) -> None:
    """A raw websocket client that never reads: the server's writes stall once the socket
    buffers are full, and the watchdog aborts the connection after send_timeout_s."""
    client, bus = await serve(send_timeout_s=0.5, heartbeat_s=60)  # no ping-timeout close
    assert client.port is not None
    _reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(b"GET /ws/workflows/wstall HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    await writer.drain()
    await wait_for(lambda: bus.hub.count == 1)
    big = "x" * 65536
    for i in range(400):  # ~26 MB: more than loopback buffers hold
        await bus.publish(Event(STEP_STARTED, "wstall", {"i": i, "pad": big}))
        if bus.hub.count == 0:
            break
    await wait_for(lambda: bus.hub.count == 0, wait_s=5)  # cut off, not stuck forever
    await bus.publish(ev("wstall", 999))  # publishing is unaffected
    writer.close()


async def test_too_many_subscribers_is_503(serve: Factory) -> None:
    client, _ = await serve(max_subscribers=1)
    async with client.get("/api/v1/events") as first:
        assert first.status == 200
        resp = await client.get("/api/v1/events")
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert (await resp.json())["error"]["code"] == "unavailable"


# ---- SSE ---------------------------------------------------------------------------------


async def read_sse(resp: aiohttp.ClientResponse, n: int, wait_s: float = 5.0
                   ) -> list[dict[str, Any]]:
    """n events (comments skipped) as {"id", "data", "event"} dicts."""
    out: list[dict[str, Any]] = []
    cur: dict[str, Any] = {}
    comments: list[str] = []
    async with asyncio.timeout(wait_s):
        while len(out) < n:
            line = (await resp.content.readline()).decode()
            if line == "":
                break
            line = line.rstrip("\n")
            if line == "":
                if "data" in cur:
                    out.append({**cur, "comments": comments})
                    comments = []
                cur = {}
            elif line.startswith(":"):
                comments.append(line)
            else:
                field, _, value = line.partition(": ")
                cur[field] = orjson.loads(value) if field == "data" else value
    return out


async def test_sse_stream_resume_and_end(serve: Factory) -> None:
    client, bus = await serve()
    ids = [await bus.publish(ev("ws1", i)) for i in range(3)]
    async with client.get("/api/v1/events?workflow_id=ws1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"].startswith("no-cache")
        got = await read_sse(resp, 3)
        assert [g["id"] for g in got] == ids == [g["data"]["id"] for g in got]
    # reconnect as EventSource does: Last-Event-ID
    async with client.get("/api/v1/events?workflow_id=ws1",
                          headers={"Last-Event-ID": ids[0]}) as resp:
        more = [await bus.publish(ev("ws1", 3)), await bus.publish(ev("ws1", 4, RUN_FINISHED))]
        got = await read_sse(resp, 4)
        assert [g["id"] for g in got] == [*ids[1:], *more]
        assert await resp.content.read() == b""  # ended after the terminal event
    async with client.get("/api/v1/events?workflow_id=ws1",
                          headers={"Last-Event-ID": more[-1]}) as resp:
        assert resp.status == 204  # finished and seen: EventSource stops reconnecting
    for bad in ({"Last-Event-ID": "nope"},):
        resp = await client.get("/api/v1/events", headers=bad)
        assert resp.status == 400
    assert (await client.get("/api/v1/events?workflow_id=a%20b")).status == 400


async def test_sse_all_events_heartbeat_and_client_going_away(serve: Factory) -> None:
    client, bus = await serve(heartbeat_s=0.2)
    resp = await client.get("/api/v1/events", headers={"X-Test-Principal": "bob:user"})
    await wait_for(lambda: bus.hub.count == 1)
    await asyncio.sleep(0.5)
    a = await bus.publish(ev("x1", 0, owner="alice"))
    b = await bus.publish(ev("x2", 0, owner="bob"))
    got = await read_sse(resp, 1)
    assert got[0]["id"] == b and a != b
    assert any(c == ": ping" for c in got[0].get("comments", []))
    resp.close()  # the client goes away
    await wait_for(lambda: bus.hub.count == 0)
    await bus.publish(ev("x2", 1, owner="bob"))  # publishing is undisturbed


async def test_shutdown_closes_streams_going_away(serve: Factory) -> None:
    client, bus = await serve()
    ws = await client.ws_connect("/ws/workflows/wz")
    await wait_for(lambda: bus.hub.count == 1)
    closing = asyncio.create_task(client.server.close())
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1001
    await closing



async def test_history_unreachable_closes_1013_and_sse_says_so() -> None:
    """Redis down: a new stream that needs history is told to retry, the daemon is fine."""
    from tests.support.daemon import free_port
    cfg_opts = {"publish_timeout_s": 0.2, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2}
    bus = RedisBus(EventsConfig.model_validate(cfg_opts), f"redis://127.0.0.1:{free_port()}/0")
    await bus.start()
    state = DaemonState(config=Config.model_validate({"events": cfg_opts}), metrics=Metrics(),
                        embedding=cast(Any, None), pools={}, cache=cast(Any, None),
                        health=HealthState(), events=bus)
    client = TestClient(TestServer(build_app(state)))
    await client.start_server()
    try:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect("/ws/workflows/w1")
        assert info.value.status == 503  # before the upgrade
        async with client.ws_connect("/ws?after=1-0") as ws:  # resuming all needs history
            msg = await ws.receive(timeout=5)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1013
        assert (await client.get("/api/v1/events?workflow_id=w1")).status == 503
        async with client.get("/api/v1/events?after=1-0") as resp:
            assert resp.status == 200
            body = (await resp.content.read()).decode()
            assert "event: error" in body and '"code":"unavailable"' in body
        health = await (await client.get("/health")).json()
        assert health["events"] == "down" and bus.snapshot()["reader"] == "down"
        assert bus.hub.count == 0
    finally:
        await client.close()
        await bus.close()
