"""The Redis cache against real servers: the shared one on 127.0.0.1:6379 (unique key prefix,
cleaned up) and throwaway ``redis-server`` processes for command counting and outages."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from citadeld.actors.cache import CacheActor, RedisCache, _Msg, build_cache, cache_key
from citadeld.supervision import Supervisor

SHARED_URL = "redis://127.0.0.1:6379/0"
TIMEOUT_S = 0.2


def _reachable(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


needs_shared = pytest.mark.skipif(not _reachable(SHARED_URL), reason="no Redis on :6379")
needs_binary = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def vec(seed: int, dims: int = 384) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def key(i: int) -> bytes:
    return cache_key("all-minilm", 384, True, f"text {i}")


class Throwaway:
    """A private redis-server: killed, paused and restarted at will, always on one port."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while not _reachable(self.url):
            assert self.proc.poll() is None and time.monotonic() < deadline, "no redis-server"
            time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def calls(self, command: str) -> int:
        stats = self.client().info("commandstats").get(f"cmdstat_{command}", {})
        return int(stats.get("calls", 0))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case it was paused
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def server() -> Iterator[Throwaway]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    srv = Throwaway()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique prefix on the shared Redis; glob characters prove flush escapes them."""
    p = f"citadel-test:{uuid.uuid4().hex[:12]}:[x]*:"
    yield p
    r = redis.Redis.from_url(SHARED_URL)
    stem = p.split("[", 1)[0]
    for k in list(r.scan_iter(match=stem + "*", count=1000)):
        r.delete(k)


def make(url: str, prefix: str = "t:", fmt: str = "float32", ttl: int = 300,
         timeout_s: float = TIMEOUT_S) -> RedisCache:
    c = build_cache(backend="redis", redis_url=url, ttl_s=ttl, max_entries=1,
                    value_format=fmt, key_prefix=prefix, timeout_s=timeout_s)
    assert isinstance(c, RedisCache)
    return c


@pytest.fixture
async def closing() -> AsyncIterator[list[RedisCache]]:
    caches: list[RedisCache] = []
    yield caches
    for c in caches:
        await c.close()


@needs_shared
@pytest.mark.parametrize("fmt", ["float32", "msgpack"])
async def test_round_trip_exact_with_ttl(fmt: str, prefix: str, closing: list[Any]) -> None:
    c = make(SHARED_URL, prefix, fmt, ttl=300, timeout_s=2.0)  # shared server: may be busy
    closing.append(c)
    vs = [vec(i) for i in range(5)]
    c.put_many([(key(i), vs[i]) for i in range(5)])
    got = await c.get_many([key(i) for i in range(6)])  # same mailbox: sees the puts
    assert got[5] is None
    for i in range(5):
        g = got[i]
        assert g is not None and g.dtype == np.float32 and np.array_equal(g, vs[i])
    raw = redis.Redis.from_url(SHARED_URL).get(prefix.encode() + key(0))
    assert raw is not None
    if fmt == "float32":
        assert raw == vs[0].astype("<f4").tobytes()
    else:
        assert msgpack.unpackb(raw) == {"d": 384, "v": vs[0].tobytes()}
    ttl = redis.Redis.from_url(SHARED_URL).ttl(prefix.encode() + key(0))
    assert 290 < ttl <= 300
    s = c.stats()
    assert (s["hits"], s["misses"], s["errors"], s["healthy"]) == (5, 1, 0, True)
    h = await c.health()
    assert h["status"] == "ok" and h["backend"] == "redis" and h["error"] is None
    assert isinstance(h["latency_ms"], float)


@needs_shared
async def test_flush_drops_only_our_prefix(prefix: str, closing: list[Any]) -> None:
    r = redis.Redis.from_url(SHARED_URL)
    stem = prefix.split("[", 1)[0]
    foreign = [f"{stem}x:foreign".encode(), f"{stem}[x]y:foreign".encode()]  # unescaped glob
    for f in foreign:                                                   # would match these
        r.set(f, b"keep", ex=60)
    c = make(SHARED_URL, prefix, timeout_s=2.0)
    closing.append(c)
    c.put_many([(key(i), vec(i, 8)) for i in range(2500)])  # several SCAN steps
    got = await c.get_many([key(i) for i in range(2500)])  # MGETs chunked in one pipeline
    last = got[2499]
    assert all(g is not None for g in got) and last is not None
    assert np.array_equal(last, vec(2499, 8))
    assert await c.flush() == 2500
    assert (await c.get_many([key(0), key(2499)])) == [None, None]
    assert all(r.get(f) == b"keep" for f in foreign)


@needs_binary
async def test_concurrent_gets_coalesce_into_one_mget(
    server: Throwaway, closing: list[Any]
) -> None:
    c = make(server.url)
    closing.append(c)
    c.put_many([(key(i), vec(i, 16)) for i in range(10)])
    assert (await c.get_many([key(0)]))[0] is not None
    server.client().config_resetstat()
    # 50 callers in one tick, overlapping keys: one MGET over the 12 distinct keys.
    wanted = [[key(j % 12) for j in range(i, i + 5)] for i in range(50)]
    results = await asyncio.gather(*(c.get_many(ks) for ks in wanted))
    for ks, got in zip(wanted, results, strict=True):
        for kk, g in zip(ks, got, strict=True):
            i = next(n for n in range(12) if key(n) == kk)
            assert (g is not None) == (i < 10)
            if g is not None:
                assert np.array_equal(g, vec(i, 16))
    info = server.client().info("stats")
    assert server.calls("mget") == 1
    assert info["keyspace_hits"] + info["keyspace_misses"] == 12  # deduplicated
    await c.get_many([key(1)])  # a later tick is a new batch
    assert server.calls("mget") == 2


@needs_binary
async def test_outage_is_a_fast_miss_and_recovers(server: Throwaway, closing: list[Any]) -> None:
    errors: list[int] = []
    c = build_cache(backend="redis", redis_url=server.url, ttl_s=60, max_entries=1,
                    value_format="float32", key_prefix="o:", timeout_s=TIMEOUT_S,
                    on_error=lambda: errors.append(1))
    assert isinstance(c, RedisCache)
    closing.append(c)
    c.put_many([(key(1), vec(1))])
    assert (await c.get_many([key(1)]))[0] is not None

    server.kill()
    t0 = time.monotonic()
    assert await c.get_many([key(1), key(2)]) == [None, None]
    assert time.monotonic() - t0 < 1.5 * TIMEOUT_S
    assert errors and c.stats()["errors"] >= 1 and c.stats()["healthy"] is False
    t0 = time.monotonic()  # circuit open: not even tried
    assert await c.get_many([key(1)]) == [None]
    assert time.monotonic() - t0 < 0.05 and c.stats()["skipped"] >= 1
    assert c.stats()["errors"] == len(errors) >= 2  # skipped calls count as errors too
    c.put_many([(key(3), vec(3))])  # dropped silently
    h = await c.health()
    assert h["status"] == "down" and h["latency_ms"] is None and "Error" in (h["error"] or "")

    server.start()  # same port
    h = await c.health()
    assert h["status"] == "ok" and h["error"] is None and c.stats()["healthy"] is True
    c.put_many([(key(1), vec(1))])  # the restarted server is empty
    got = (await c.get_many([key(1)]))[0]
    assert got is not None and np.array_equal(got, vec(1))


@needs_binary
async def test_hung_redis_times_out_without_blocking_the_loop(
    server: Throwaway, closing: list[Any]
) -> None:
    c = make(server.url)
    closing.append(c)
    c.put_many([(key(1), vec(1))])
    assert (await c.get_many([key(1)]))[0] is not None
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        assert await c.get_many([key(1)]) == [None]
        elapsed = time.monotonic() - t0
        task.cancel()
        assert TIMEOUT_S * 0.9 < elapsed < 1.5 * TIMEOUT_S
        assert ticks >= 10  # the loop kept running while Redis hung
        assert (await c.health())["status"] == "down"
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    await asyncio.sleep(TIMEOUT_S)  # let the actor's stale socket read run out
    assert (await c.health())["status"] == "ok"
    assert (await c.get_many([key(1)]))[0] is not None


@needs_binary
async def test_puts_from_other_threads_and_loops_hop_over(
    server: Throwaway, closing: list[Any]
) -> None:
    c = make(server.url)  # built on this loop: bound to it
    closing.append(c)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, c.put_many, [(key(7), vec(7))])

    async def private_loop() -> None:  # like an actor that owns its own loop
        c.put_many([(key(8), vec(8))])
        with pytest.raises(RuntimeError):
            await c.get_many([key(8)])

    await loop.run_in_executor(None, asyncio.run, private_loop())
    await asyncio.sleep(0)
    got = await c.get_many([key(7), key(8)])
    assert all(g is not None for g in got)


@needs_binary
async def test_supervised_actor_crash_fails_work_and_restarts(
    server: Throwaway, closing: list[Any]
) -> None:
    c = make(server.url)
    closing.append(c)
    sup = Supervisor("test", [c.child_spec()], backoff_min=0.01, backoff_max=0.02)
    sup.start().result(2)
    try:
        c.put_many([(key(1), vec(1))])
        assert (await c.get_many([key(1)]))[0] is not None
        first = c._actor
        assert first is not None
        bad: concurrent.futures.Future[Any] = concurrent.futures.Future()
        first.tell(_Msg("bogus", bad))  # type: ignore[arg-type]  # a bug: the actor crashes
        with pytest.raises(ValueError):
            await asyncio.wait_for(asyncio.wrap_future(bad), 1)
        deadline = time.monotonic() + 2
        while c._actor is first or c._actor is None or not c._actor.is_alive():
            assert time.monotonic() < deadline, "not restarted"
            await asyncio.sleep(0.01)
        assert sup.snapshot()[0]["restarts"] == 1
        assert c._actor.actor_class is CacheActor
        assert (await c.get_many([key(1)]))[0] is not None
    finally:
        await asyncio.wrap_future(sup.stop())
    t0 = time.monotonic()  # actor stopped: misses at once, no timeout wait
    assert await c.get_many([key(1)]) == [None]
    assert time.monotonic() - t0 < 0.05
