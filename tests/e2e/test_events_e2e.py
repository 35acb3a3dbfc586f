"""Live events through the real citadeld process.

The daemon's bus is Redis Streams on a throwaway redis-server; this test process is "another
citadeld instance" sharing that Redis: it publishes with the same RedisBus class the daemon
uses, and the daemon's one reader must fan the events out to its websocket and SSE clients.
(Until the workflow engine runs inside the daemon, that is the real way events reach it.)
A Redis restart mid-stream must leave the daemon serving and delivering.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from aiohttp import WSMsgType

from citadeld.events.config import EventsConfig
from citadeld.events.model import RUN_FINISHED, RUN_STARTED, STEP_FINISHED, STEP_STARTED, Event
from citadeld.events.redis_bus import RedisBus
from tests.e2e.conftest import Fake
from tests.integration.test_cache_redis import Throwaway
from tests.support.daemon import DaemonProc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("redis-server") is None,
                                 reason="no redis-server")]

REQUEST_TIMEOUT_S = 1.5  # the middleware's; live streams must outlive it


@pytest.fixture(scope="module")
def redis_srv() -> Iterator[Throwaway]:
    srv = Throwaway()
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"e2e:{uuid.uuid4().hex[:8]}:ev:"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, redis_srv: Throwaway, hash_fake: Fake,
           prefix: str) -> Iterator[DaemonProc]:
    config = {
        "server": {"request_timeout_s": REQUEST_TIMEOUT_S},
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "max_context": 256,
            "endpoints": [{"url": hash_fake.url}]}}},
        "cache": {"backend": "redis", "redis_url": redis_srv.url},  # events: auto -> redis
        "events": {"key_prefix": prefix, "heartbeat_s": 5.0, "read_block_ms": 200,
                   "reconnect_min_s": 0.05, "reconnect_max_s": 0.5},
    }
    proc = DaemonProc(config, tmp_path_factory.mktemp("citadeld-events"))
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log_tail()


@pytest.fixture
async def peer(redis_srv: Throwaway, prefix: str) -> AsyncIterator[RedisBus]:
    """Another instance on the same Redis, publishing as a workflow engine would."""
    bus = RedisBus(EventsConfig(key_prefix=prefix, read_block_ms=200), redis_srv.url)
    await bus.start()
    yield bus
    await bus.close()


async def get(d: DaemonProc, path: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as c:
        return await c.get(d.url + path)


async def detailed(d: DaemonProc) -> dict[str, Any]:
    return dict((await get(d, "/health/detailed")).json())


async def metric(d: DaemonProc, name: str) -> float:
    text = (await get(d, "/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def next_frame(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type is WSMsgType.TEXT, (msg.type, msg.data)
    return dict(orjson.loads(msg.data))


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    cur: dict[str, Any] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if not line:
            if "data" in cur:
                yield cur
            cur = {}
        elif not line.startswith(":"):
            k, _, v = line.partition(": ")
            cur[k] = orjson.loads(v) if k == "data" else v


async def test_events_from_another_instance_reach_ws_and_sse_clients(
        daemon: DaemonProc, peer: RedisBus) -> None:
    assert (await detailed(daemon))["events"]["backend"] == "redis"
    wf = f"wf-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{daemon.url}/ws/workflows/{wf}")
        quitter = await http.ws_connect(f"{daemon.url}/ws/workflows/{wf}")
        sse = await http.get(f"{daemon.url}/api/v1/events", params={"workflow_id": wf})
        assert sse.status == 200 and sse.headers["Content-Type"].startswith("text/event-stream")
        ids = [await peer.publish(Event(RUN_STARTED, wf))]
        assert (await next_frame(quitter))["id"] == ids[0]
        await quitter.close()  # a client that leaves mid-run disturbs nothing
        for i in range(3):
            ids.append(await peer.publish(Event(STEP_STARTED, wf, {"step_id": f"s{i}"})))
            ids.append(await peer.publish(Event(STEP_FINISHED, wf, {"step_id": f"s{i}"})))
        await asyncio.sleep(REQUEST_TIMEOUT_S + 0.5)  # streams outlive the request timeout
        ids.append(await peer.publish(Event(RUN_FINISHED, wf, {"result": {"ok": True}})))
        got = [await next_frame(ws) for _ in ids]
        assert [g["id"] for g in got] == ids and got[-1]["result"] == {"ok": True}
        close = await ws.receive(timeout=10)
        assert close.type is WSMsgType.CLOSE and close.data == 1000
        seen = [e async for e in sse_events(sse)]  # ends after the terminal event
        assert [e["id"] for e in seen] == ids == [e["data"]["id"] for e in seen]
        again = await http.get(f"{daemon.url}/api/v1/events", params={"workflow_id": wf},
                               headers={"Last-Event-ID": ids[-1]})
        assert again.status == 204
        resumed = await http.get(f"{daemon.url}/api/v1/events", params={"workflow_id": wf},
                                 headers={"Last-Event-ID": ids[-3]})
        assert [e["id"] async for e in sse_events(resumed)] == ids[-2:]
    lag_count = await metric(daemon, 'citadel_event_fanout_lag_seconds_count{transport="ws"}')
    assert lag_count >= len(ids)
    assert await metric(daemon, 'citadel_events_delivered_total{transport="sse"}') >= len(ids)
    for _ in range(50):
        if (await detailed(daemon))["events"]["subscribers"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await detailed(daemon))["events"]["subscribers"] == 0


async def test_redis_restart_mid_stream(daemon: DaemonProc, peer: RedisBus,
                                        redis_srv: Throwaway) -> None:
    wf = f"wf-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{daemon.url}/ws")  # all events, live
        for _ in range(50):
            if (await detailed(daemon))["events"]["subscribers"] >= 1:
                break
            await asyncio.sleep(0.05)
        first = await peer.publish(Event(RUN_STARTED, wf))
        assert (await next_frame(ws))["id"] == first
        redis_srv.kill()
        for _ in range(100):
            if (await detailed(daemon))["events"]["reader"] == "down":
                break
            await asyncio.sleep(0.05)
        d = (await detailed(daemon))
        assert d["events"]["status"] == "down" and d["events"]["last_error"]
        assert (await get(daemon, "/health")).json()["events"] == "down"
        redis_srv.start()
        for _ in range(100):
            if (await detailed(daemon))["events"]["status"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert (await detailed(daemon))["events"]["reader_reconnects"] >= 1
        await peer.close()  # its connections died with the old server: a fresh peer
        fresh = RedisBus(EventsConfig(key_prefix=peer.cfg.key_prefix, read_block_ms=200),
                         redis_srv.url)
        await fresh.start()
        try:
            later = await fresh.publish(Event(RUN_FINISHED, wf))
            frame = await next_frame(ws)  # the same websocket, still open, gets it
            assert frame["id"] == later and frame["type"] == RUN_FINISHED
        finally:
            await fresh.close()
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_bad_input_and_docs(daemon: DaemonProc) -> None:
    r = httpx.get(daemon.url + "/api/v1/events", headers={"Last-Event-ID": "x"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.get(daemon.url + "/ws/workflows/a%20b", timeout=5)
    assert r.status_code == 400
    paths = httpx.get(daemon.url + "/openapi.json", timeout=5).json()["paths"]
    assert {"/ws", "/ws/workflows/{workflow_id}", "/api/v1/events"} <= set(paths)



async def test_sigterm_ends_open_streams_at_once(tmp_path_factory: pytest.TempPathFactory,
                                                 hash_fake: Fake) -> None:
    """The in-process bus; open streams must not hold the drain for its whole timeout."""
    d = DaemonProc({
        "server": {"drain_timeout_s": 20},
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "max_context": 256,
            "endpoints": [{"url": hash_fake.url}]}}},
        "events": {"backend": "memory"},
    }, tmp_path_factory.mktemp("citadeld-events-term"))
    await asyncio.to_thread(d.start)
    try:
        assert (await detailed(d))["events"]["backend"] == "memory"
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{d.url}/ws/workflows/wf-x")
            sse = await http.get(f"{d.url}/api/v1/events")
            for _ in range(50):
                if (await detailed(d))["events"]["subscribers"] == 2:
                    break
                await asyncio.sleep(0.05)
            assert d.proc is not None
            t0 = asyncio.get_running_loop().time()
            d.proc.send_signal(signal.SIGTERM)
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
            assert await asyncio.wait_for(sse.content.read(), 10) is not None  # ends
            code = await asyncio.to_thread(d.proc.wait, 15)
            assert code == 0
            assert asyncio.get_running_loop().time() - t0 < 10  # not the 20 s drain timeout
    finally:
        await asyncio.to_thread(d.stop)
