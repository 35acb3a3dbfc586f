"""The Redis Streams event bus against real servers: the shared Redis on :6379 (a unique key
prefix per test, deleted afterwards) and a throwaway redis-server restarted mid-stream."""

from __future__ import annotations

import asyncio
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from citadeld.errors import Unavailable
from citadeld.events.config import EventsConfig
from citadeld.events.hub import Subscription
from citadeld.events.ids import parse_id
from citadeld.events.model import GAP, RUN_FINISHED, STEP_FINISHED, STEP_STARTED, Event
from citadeld.events.redis_bus import RedisBus
from tests.integration.test_cache_redis import SHARED_URL, Throwaway, needs_shared

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"citadel-test:ev:{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(SHARED_URL)
    for k in list(r.scan_iter(match=p + "*", count=1000)):
        r.delete(k)


@pytest.fixture
async def buses() -> AsyncIterator[list[RedisBus]]:
    made: list[RedisBus] = []
    yield made
    for b in made:
        await b.close()


async def make(made: list[RedisBus], url: str, prefix: str, **kw: object) -> RedisBus:
    opts: dict[str, object] = {"key_prefix": prefix, "read_block_ms": 200,
                               "publish_timeout_s": 1.0, "reconnect_min_s": 0.05,
                               "reconnect_max_s": 0.3, **kw}
    cfg = EventsConfig.model_validate(opts)
    bus = RedisBus(cfg, url)
    made.append(bus)
    await bus.start()
    return bus


async def take(sub: Subscription, n: int, wait_s: float = 5.0) -> list[Event]:
    out: list[Event] = []

    async def run() -> None:
        async for e in sub:
            out.append(e)
            if len(out) == n:
                return
    await asyncio.wait_for(run(), wait_s)
    return out


def ev(wf: str, i: int, t: str = STEP_STARTED, owner: str | None = None) -> Event:
    return Event(t, wf, {"step_id": f"s{i}", "i": i}, owner=owner)


@needs_shared
async def test_two_instances_see_each_others_events(prefix: str, buses: list[RedisBus]
                                                    ) -> None:
    a = await make(buses, SHARED_URL, prefix)
    b = await make(buses, SHARED_URL, prefix)
    live_b = b.subscribe()  # all workflows, from now
    live_a = a.subscribe()
    ids = [await a.publish(ev("w1", 0)), await b.publish(ev("w2", 1, owner="bob"))]
    got_b = await take(live_b, 2)
    got_a = await take(live_a, 2)
    assert [e.id for e in got_b] == ids == [e.id for e in got_a]
    assert got_b[1].owner == "bob" and got_b[1].data == {"step_id": "s1", "i": 1}
    assert got_b[0].ts > 0
    # one workflow's history, from either instance
    hist = await take(b.subscribe("w1"), 1)
    assert hist[0].id == ids[0] and hist[0].workflow_id == "w1"


@needs_shared
async def test_history_then_live_and_resume_after_id(prefix: str, buses: list[RedisBus]
                                                     ) -> None:
    bus = await make(buses, SHARED_URL, prefix)
    ids = [await bus.publish(ev("w", i)) for i in range(5)]
    sub = bus.subscribe("w", after=ids[2])
    first = await take(sub, 2)
    assert [e.id for e in first] == ids[3:]
    later = [await bus.publish(ev("w", i)) for i in range(5, 8)]
    await bus.publish(ev("other", 99))  # another workflow: not on this subscription
    nxt = await take(sub, 3)
    assert [e.id for e in nxt] == later  # live, no duplicates of the replayed ones
    # resume of the all-workflows stream after an id
    allsub = bus.subscribe(None, after=ids[4])
    got = await take(allsub, 4)
    assert [e.id for e in got][:3] == later and got[3].workflow_id == "other"


@needs_shared
async def test_trimmed_history_yields_a_retention_gap_and_finished_ttl(
        prefix: str, buses: list[RedisBus]) -> None:
    bus = await make(buses, SHARED_URL, prefix, workflow_maxlen=10, finished_ttl_s=120)
    ids = [await bus.publish(ev("w", i)) for i in range(400)]  # MAXLEN ~ trims whole nodes
    await bus.publish(Event(RUN_FINISHED, "w"))
    sub = bus.subscribe("w")
    first = await take(sub, 1)
    assert first[0].type == GAP and first[0].data["reason"] == "retention"
    assert first[0].data["from"] == "0-0"
    rest_first = await take(sub, 1)
    assert rest_first[0].id in ids and rest_first[0].id != ids[0]
    r = redis.Redis.from_url(SHARED_URL)
    ttl = r.ttl(bus.wf_key("w"))
    assert 0 < ttl <= 120
    assert await bus.last("w") is not None and (await bus.last("w")).type == RUN_FINISHED  # type: ignore[union-attr]
    assert await bus.last("nope") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_publish_while_redis_never_came_up_buffers_then_fails_clearly(
        buses: list[RedisBus]) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    bus = await make(buses, url, "t:", outage_buffer=3, publish_timeout_s=0.2)
    sub = bus.subscribe("w")  # live delivery goes on locally during the outage
    ids = [await bus.publish(ev("w", i)) for i in range(3)]
    with pytest.raises(Unavailable, match="Redis unreachable"):
        await bus.publish(ev("w", 3))
    snap = bus.snapshot()
    assert snap["status"] == "down" and snap["buffered"] == 3 and snap["lost"] == 1
    # this subscription started replaying from a Redis that is not there: it says so
    with pytest.raises(Unavailable):
        await take(sub, 1)
    live = bus.subscribe()  # live only: gets the buffered events that follow
    await bus.close()  # cannot flush: the 3 buffered are counted lost, nothing hangs
    assert bus.snapshot()["lost"] == 4
    assert ids[0] < ids[1] < ids[2]
    assert [e async for e in live] == []


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")
async def test_redis_restart_mid_stream(buses: list[RedisBus]) -> None:
    srv = Throwaway()
    srv.start()
    try:
        bus = await make(buses, srv.url, "t:")
        sub = bus.subscribe("w")
        before = [await bus.publish(ev("w", i)) for i in range(3)]
        got = await take(sub, 3)
        assert [e.id for e in got] == before
        srv.kill()  # Redis goes away mid-run
        during = [await bus.publish(ev("w", i)) for i in range(3, 6)]  # buffered
        got = await take(sub, 3)  # ...and still delivered here at once
        assert [e.id for e in got] == during
        assert bus.snapshot()["publish"] == "down"
        srv.start()  # back, empty (no persistence)
        for _ in range(100):
            if bus.snapshot()["buffered"] == 0 and bus.snapshot()["status"] == "ok":
                break
            await asyncio.sleep(0.05)
        snap = bus.snapshot()
        assert snap["status"] == "ok" and snap["buffered"] == 0 and snap["flushed"] == 3
        assert snap["reader_reconnects"] >= 1
        after = [await bus.publish(ev("w", i, STEP_FINISHED)) for i in range(6, 8)]
        got = await take(sub, 2)  # the reader resumed: new events arrive, no duplicates
        assert [e.id for e in got] == after
        # the buffered events reached Redis with the ids their publishers were given
        other = await make(buses, srv.url, "t:")
        replay = await take(other.subscribe("w"), 5)
        assert [e.id for e in replay] == during + after
    finally:
        srv.kill()


@needs_shared
async def test_garbage_in_the_stream_is_skipped_not_fatal(prefix: str, buses: list[RedisBus]
                                                          ) -> None:
    bus = await make(buses, SHARED_URL, prefix)
    live = bus.subscribe()
    r = redis.Redis.from_url(SHARED_URL)
    r.xadd(bus.all_key, {"e": b"not json"})  # another writer got it wrong
    r.xadd(bus.all_key, {"other": b"1"})
    r.xadd(bus.all_key, {"e": b'{"t": "STEP_STARTED"}'})  # no workflow id
    good = await bus.publish(ev("w", 1))
    got = await take(live, 1)
    assert [e.id for e in got] == [good]
    assert bus.snapshot()["reader"] == "ok"


@needs_shared
async def test_an_explicit_id_redis_refuses_falls_back_to_a_new_one(
        prefix: str, buses: list[RedisBus]) -> None:
    """What a flush does when another instance wrote later ids during our outage."""
    from citadeld.events.redis_bus import encode
    bus = await make(buses, SHARED_URL, prefix)
    top = await bus.publish(ev("w", 1))
    stale = Event(STEP_FINISHED, "w", {"step_id": "late"}, ts=1.0, id="1-0")
    new_id = await bus._xadd(stale, encode(stale), "1-0")
    assert new_id != "1-0" and parse_id(new_id) > parse_id(top)
    replay = await take(bus.subscribe("w"), 2)
    assert [e.id for e in replay] == [top, new_id] and replay[1].data == {"step_id": "late"}
