"""The in-process event bus and what both buses share: ids, rings, GAP and slow-consumer
policy, replay-then-live hand-over, visibility filters, publish from other threads, and the
websocket client-message validation."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from citadeld.config import ConfigError, load_config
from citadeld.errors import Unavailable
from citadeld.events.config import EventsConfig, resolve_backend
from citadeld.events.hub import SlowConsumer, Subscription
from citadeld.events.ids import IdClock, format_id, is_id, parse_id
from citadeld.events.memory_bus import MemoryBus, Ring
from citadeld.events.model import GAP, RUN_FINISHED, STEP_STARTED, Event
from citadeld.http.event_routes import _Bucket, _check_message, sse_event, visibility
from citadeld.security.principal import LOCAL, Principal

pytestmark = pytest.mark.timeout(20)


def ev(wf: str = "w", i: int = 0, t: str = STEP_STARTED, owner: str | None = None) -> Event:
    return Event(t, wf, {"i": i}, owner=owner)


async def bus(**kw: Any) -> MemoryBus:
    b = MemoryBus(EventsConfig.model_validate(kw))
    await b.start()
    return b


async def drain(sub: Subscription, n: int) -> list[Event]:
    out: list[Event] = []
    async with asyncio.timeout(5):
        async for e in sub:
            out.append(e)
            if len(out) == n:
                break
    return out


# ---- ids ---------------------------------------------------------------------------------


def test_ids_parse_format_and_order() -> None:
    assert parse_id("1732623000000-3") == (1732623000000, 3)
    assert format_id((5, 0)) == "5-0"
    assert parse_id("9-10") > parse_id("9-9") and parse_id("10-0") > parse_id("9-99")
    for bad in ("", "1", "1-", "-1", "a-1", "1-1-1", " 1-1", "1-1\n", "1" * 16 + "-0", "\u0661-0",
                "1-0 "):
        assert not is_id(bad)
        with pytest.raises(ValueError):
            parse_id(bad)


def test_id_clock_is_monotonic_even_when_the_clock_steps_back(monkeypatch: Any) -> None:
    now = [1000.0]
    monkeypatch.setattr("citadeld.events.ids.time.time", lambda: now[0])
    c = IdClock()
    a, b = c.next(), c.next()
    now[0] = 999.0  # NTP stepped back
    d = c.next()
    now[0] = 1001.0
    e = c.next()
    assert [a, b, d, e] == ["1000000-0", "1000000-1", "1000000-2", "1001000-0"]
    c.observe((2000000, 7))  # an id seen from Redis
    now[0] = 1500.0
    assert c.next() == "2000000-8"


def test_ring_keeps_the_newest_and_remembers_what_fell_out() -> None:
    r = Ring(3)
    for i in range(5):
        r.append(ev(i=i), (1, i))
    assert [k for k in r.keys] == [(1, 2), (1, 3), (1, 4)] and r.trimmed == (1, 1)
    assert [e.data["i"] for e in r.after((1, 2), 10)] == [3, 4]
    assert [e.data["i"] for e in r.after((0, 0), 2)] == [2, 3]
    assert r.after((1, 4), 10) == []


# ---- publish / history / live ------------------------------------------------------------


async def test_publish_validates_and_sets_id_and_ts() -> None:
    b = await bus()
    e = ev()
    eid = await b.publish(e)
    assert e.id == eid and is_id(eid) and e.ts > 0
    for bad in (Event("NOPE", "w"), Event(GAP, "w"), Event(STEP_STARTED, ""),
                Event(STEP_STARTED, "*"), Event(STEP_STARTED, "x" * 300),
                Event(STEP_STARTED, "w", {"x": object()}),
                Event(STEP_STARTED, "w", [1] )):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await b.publish(bad)
    await b.close()
    with pytest.raises(Unavailable):
        await b.publish(ev())
    with pytest.raises(Unavailable):
        b.subscribe()


async def test_workflow_subscription_replays_then_goes_live_without_duplicates() -> None:
    b = await bus()
    ids = [await b.publish(ev(i=i)) for i in range(3)]
    sub = b.subscribe("w")
    got = await drain(sub, 1)  # replay started
    more = [await b.publish(ev(i=i)) for i in range(3, 5)]
    await b.publish(ev("other"))
    got += await drain(sub, 4)
    assert [e.id for e in got] == ids + more
    assert b.hub.count == 1
    sub.close()
    assert b.hub.count == 0 and sub.closed


async def test_all_subscription_is_live_only_unless_resuming() -> None:
    b = await bus()
    old = await b.publish(ev("a"))
    live = b.subscribe()
    resumed = b.subscribe(None, after="0-0")
    new = await b.publish(ev("b"))
    assert [e.id for e in await drain(live, 1)] == [new]
    assert [e.id for e in await drain(resumed, 2)] == [old, new]


async def test_bad_after_is_a_value_error() -> None:
    b = await bus()
    with pytest.raises(ValueError):
        b.subscribe("w", after="yesterday")


async def test_overflow_drops_the_backlog_into_one_gap_and_keeps_the_newest() -> None:
    b = await bus(subscriber_queue=4)
    sub = b.subscribe()
    ids = [await b.publish(ev(i=i)) for i in range(10)]  # nothing consumed meanwhile
    got = await drain(sub, 3)
    # 0-3 queued; 4th overflow drops them; 4-7 queued; 8th drops those; 8, 9 remain
    assert got[0].type == GAP and got[0].workflow_id == "*"
    assert got[0].data == {"from": ids[0], "to": ids[7], "dropped": 8}
    assert [e.id for e in got[1:]] == ids[8:]
    assert sub.gaps == 2
    assert b.metrics.dropped.labels("gap")._value.get() == 8


async def test_slow_consumer_disconnected_past_max_gaps_or_at_once_by_policy() -> None:
    b = await bus(subscriber_queue=2, max_gaps=1)
    sub = b.subscribe("w")
    await drain_replay_done(sub)
    for i in range(7):
        await b.publish(ev(i=i))
    with pytest.raises(SlowConsumer):
        await drain(sub, 10)
    assert b.hub.count == 0  # unregistered: publishing no longer touches it
    b2 = await bus(subscriber_queue=2, slow_consumer="disconnect")
    sub2 = b2.subscribe()
    for i in range(3):
        await b2.publish(ev(i=i))
    with pytest.raises(SlowConsumer):
        await drain(sub2, 1)
    assert b2.metrics.slow_disconnects._value.get() == 1


async def drain_replay_done(sub: Subscription) -> None:
    """Let a workflow subscription finish its (empty) replay so it is live."""
    task = asyncio.create_task(sub.__anext__())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_retention_gap_when_resuming_below_what_is_kept() -> None:
    b = await bus(workflow_maxlen=10)
    ids = [await b.publish(ev(i=i)) for i in range(15)]
    got = await drain(b.subscribe("w"), 11)
    assert got[0].type == GAP and got[0].data["reason"] == "retention"
    assert got[0].data["from"] == "0-0" and got[0].data["to"] == ids[4]
    assert [e.id for e in got[1:]] == ids[5:]
    # resuming inside what is retained: no gap
    got = await drain(b.subscribe("w", after=ids[6]), 2)
    assert [e.id for e in got] == ids[7:9]


async def test_accept_filters_before_queueing() -> None:
    b = await bus(subscriber_queue=2)
    sub = b.subscribe(accept=visibility(Principal("bob", "user", "key")))
    for i in range(10):
        await b.publish(ev(i=i, owner="alice"))  # would overflow the queue if queued
    mine = await b.publish(ev(owner="bob"))
    free = await b.publish(ev())
    got = await drain(sub, 2)
    assert [e.id for e in got] == [mine, free] and sub.gaps == 0
    assert visibility(LOCAL) is None  # admins (and auth off) see everything


async def test_memory_bus_evicts_least_recent_and_expired_workflows(monkeypatch: Any) -> None:
    b = await bus(memory_max_workflows=2, finished_ttl_s=5)
    await b.publish(ev("a"))
    await b.publish(ev("b"))
    await b.publish(ev("c"))  # a is least recently published: gone
    assert await b.last("a") is None and await b.last("c") is not None
    await b.publish(ev("b", t=RUN_FINISHED))
    clock = [0.0]
    real = time.monotonic

    def later() -> float:
        return real() + clock[0]
    monkeypatch.setattr("citadeld.events.memory_bus.time.monotonic", later)
    clock[0] = 10
    assert await drain_list(b, "b") == []  # finished and past its TTL
    assert len(await drain_list(b, "c")) == 1


async def drain_list(b: MemoryBus, wf: str) -> list[Event]:
    page, _ = await b._history(wf, (0, 0), 100)
    return page


async def test_publish_from_another_thread_and_its_loop() -> None:
    b = await bus()
    sub = b.subscribe()
    results: list[Any] = []

    def actor() -> None:  # an actor thread with its own private loop
        results.append(asyncio.run(b.publish(ev("t", 1))))
        results.append(b.publish_threadsafe(ev("t", 2)).result(5))

    th = threading.Thread(target=actor)
    th.start()
    got = await drain(sub, 2)
    await asyncio.to_thread(th.join)
    assert [e.id for e in got] == results


async def test_max_subscribers() -> None:
    b = await bus(max_subscribers=2)
    s1, _s2 = b.subscribe(), b.subscribe("w")
    with pytest.raises(Unavailable):
        b.subscribe()
    s1.close()
    b.subscribe()
    assert b.metrics.sub_gauge("all")._value.get() == 1


async def test_close_ends_subscriptions() -> None:
    b = await bus()
    sub = b.subscribe()
    task = asyncio.create_task(drain(sub, 1))
    await asyncio.sleep(0.01)
    await b.close()
    assert await task == []


# ---- transports' pure parts --------------------------------------------------------------


@pytest.mark.parametrize(("msg", "ok"), [
    ({"type": "subscribe"}, True),
    ({"type": "subscribe", "workflow_id": "wf-1", "after": "1-0"}, True),
    ({"type": "subscribe", "workflow_id": None, "after": None}, True),
    ({"type": "unsubscribe", "workflow_id": "wf-1"}, True),
    ({"type": "ping"}, True),
    ({"type": "unsubscribe", "after": "1-0"}, False),
    ({"type": "subscribe", "workflow_id": ""}, False),
    ({"type": "subscribe", "workflow_id": 5}, False),
    ({"type": "subscribe", "workflow_id": "a/b"}, False),
    ({"type": "subscribe", "workflow_id": "ab\n"}, False),
    ({"type": "subscribe", "after": "1-0\n"}, False),
    ({"type": "subscribe", "after": 1}, False),
    ({"type": "subscribe", "bogus": 1}, False),
    ({"type": None}, False),
    ({}, False),
    ([], False),
    ("subscribe", False),
    (None, False),
])
def test_client_message_validation(msg: object, ok: bool) -> None:
    err = _check_message(msg)
    assert (err is None) == ok, err


def test_rate_bucket() -> None:
    b = _Bucket(2.0)
    assert [b.take() for _ in range(5)] == [True, True, True, True, False]


def test_sse_framing() -> None:
    e = Event(STEP_STARTED, "w", {"step_id": "a"}, ts=1.0, id="5-0")
    assert sse_event(e) == (b'id: 5-0\ndata: {"id":"5-0","type":"STEP_STARTED",'
                            b'"workflow_id":"w","ts":1.0,"step_id":"a"}\n\n')
    gap = Event(GAP, "w", {"from": "1-0", "to": "2-0", "dropped": 3}, ts=1.0)
    assert sse_event(gap).startswith(b"data: ")  # no id: resume stays before the gap


def test_config_backend_resolution_and_validation() -> None:
    assert resolve_backend(EventsConfig(), None) == ("memory", None)
    assert resolve_backend(EventsConfig(), "redis://c") == ("redis", "redis://c")
    assert resolve_backend(EventsConfig(redis_url="redis://e"), "redis://c") == (
        "redis", "redis://e")
    assert resolve_backend(EventsConfig(backend="memory"), "redis://c") == ("memory", None)
    with pytest.raises(ConfigError, match=r"events\.backend is redis"):
        load_config(env={"CITADEL_EVENTS__BACKEND": "redis"})
    with pytest.raises(ConfigError, match=r"events\.subscriber_queue"):
        load_config(env={"CITADEL_EVENTS__SUBSCRIBER_QUEUE": "0"})
    with pytest.raises(ConfigError, match=r"events\.nope: unknown key"):
        load_config(env={"CITADEL_EVENTS__NOPE": "1"})
    cfg = load_config(env={"CITADEL_EVENTS__SLOW_CONSUMER": "disconnect"})
    assert cfg.events.slow_consumer == "disconnect"
