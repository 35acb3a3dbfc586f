"""Rate limits against real Redis: the shared server (unique key prefixes, cleaned up) and a
throwaway ``redis-server`` that is stopped, hung and flushed mid-run."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis

from citadeld.health import HealthState
from citadeld.security.principal import Principal
from citadeld.security.ratelimit import HEALTH_NAME, RateLimiter
from citadeld.security.ratelimit_audit_config import RateLimitsConfig
from tests.integration.test_cache_redis import SHARED_URL, Throwaway

ALICE = Principal("alice", "user", "key", key_id="alice")
BOB = Principal("bob", "user", "key", key_id="bob")


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"citadel-test:rl:{uuid.uuid4().hex[:12]}:"
    yield p
    r = redis.Redis.from_url(SHARED_URL)
    for k in list(r.scan_iter(match=p + "*", count=1000)):
        r.delete(k)


@pytest.fixture
def server() -> Iterator[Throwaway]:
    srv = Throwaway()
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
async def limiters() -> AsyncIterator[list[RateLimiter]]:
    made: list[RateLimiter] = []
    yield made
    for rl in made:
        await rl.close()


def cfg(prefix: str, per_min: float = 10, burst: int | None = None, **kw: Any
        ) -> RateLimitsConfig:
    return RateLimitsConfig(enabled=True, key_prefix=prefix, embedding={
        "per_min": per_min, "burst": burst, "routes": ["/api/v1/embed"]}, **kw)


def make(made: list[RateLimiter], url: str, c: RateLimitsConfig,
         health: HealthState | None = None) -> RateLimiter:
    rl = RateLimiter(c, url, health=health)
    made.append(rl)
    return rl


async def test_exact_limit_and_a_ttl_bounded_key(prefix: str, limiters: list[RateLimiter]
                                                 ) -> None:
    rl = make(limiters, SHARED_URL, cfg(prefix, per_min=10))
    await rl.probe()
    decisions = [await rl.check(ALICE, "10.0.0.1", "embedding") for _ in range(13)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False] * 3
    assert [d.remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert 5.5 < decisions[-1].retry_after_s <= 6.0  # one interval of 60/10 s
    assert rl.mode == "redis" and rl.fallbacks == 0
    assert len(rl.local) == 0  # decided by Redis, not locally
    r = redis.Redis.from_url(SHARED_URL)
    key = f"{prefix}embedding:key:alice"
    assert r.exists(key)
    assert 0 < r.pttl(key) <= 60_001  # the key lives exactly until the bucket is full
    assert (await rl.check(BOB, "10.0.0.1", "embedding")).allowed  # its own bucket


async def test_two_instances_share_one_limit(prefix: str, limiters: list[RateLimiter]) -> None:
    a = make(limiters, SHARED_URL, cfg(prefix, per_min=20))
    b = make(limiters, SHARED_URL, cfg(prefix, per_min=20))
    await a.probe()
    await b.probe()

    async def hammer(rl: RateLimiter) -> int:
        results = await asyncio.gather(*(rl.check(ALICE, None, "embedding") for _ in range(25)))
        return sum(d.allowed for d in results)

    got = await asyncio.gather(hammer(a), hammer(b))
    assert sum(got) == 20  # concurrent checks from both, pipelined: exactly the burst
    assert a.fallbacks == b.fallbacks == 0


async def test_concurrent_checks_are_pipelined(server: Throwaway, limiters: list[RateLimiter]
                                               ) -> None:
    rl = make(limiters, server.url, cfg("p:", per_min=1000, burst=1000))
    await rl.probe()  # connects and loads the script
    assert server.calls("script|load") + server.calls("script") >= 1
    results = await asyncio.gather(*(rl.check(ALICE, None, "embedding") for _ in range(200)))
    assert all(d.allowed for d in results) and rl.fallbacks == 0
    assert server.calls("evalsha") == 200  # one per check; no SCRIPT EXISTS/EVAL round trips
    assert server.calls("eval") == 0
    clients = [c for c in server.client().client_list() if c["name"] == "citadeld-ratelimit"]
    assert len(clients) == 1  # coalesced: the checks of a tick share one connection


async def test_flushed_scripts_are_reloaded(server: Throwaway, limiters: list[RateLimiter]
                                            ) -> None:
    rl = make(limiters, server.url, cfg("p:", per_min=5))
    assert (await rl.check(ALICE, None, "embedding")).allowed
    server.client().script_flush()
    assert (await rl.check(ALICE, None, "embedding")).allowed
    assert rl.fallbacks == 0 and rl.mode == "redis"


async def test_redis_stopped_mid_run_falls_back_locally_and_recovers(
        server: Throwaway, limiters: list[RateLimiter]) -> None:
    health = HealthState()
    rl = make(limiters, server.url, cfg("p:", per_min=6), health)
    await rl.probe()
    assert health.get(HEALTH_NAME)["status"] == "ok"  # type: ignore[index]
    assert [(await rl.check(ALICE, None, "embedding")).allowed for _ in range(3)] == [True] * 3
    server.kill()
    t0 = time.monotonic()
    local = [(await rl.check(ALICE, None, "embedding")).allowed for _ in range(10)]
    assert time.monotonic() - t0 < 1.0  # an outage costs at most one timeout, then the circuit
    assert local == [True] * 6 + [False] * 4  # each instance enforces the limit on its own
    assert rl.fallbacks == 10 and rl.mode == "fallback"
    h = health.get(HEALTH_NAME)
    assert h is not None and h["status"] == "down" and h["error"]
    server.start()  # same port
    deadline = time.monotonic() + 15
    while rl.mode != "redis" and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        await rl.check(BOB, None, "embedding")  # a trial after the backoff closes the circuit
    assert rl.mode == "redis"
    assert health.get(HEALTH_NAME)["status"] == "ok"  # type: ignore[index]
    # the restarted Redis is empty: Alice's bucket there is fresh again
    assert (await rl.check(ALICE, None, "embedding")).allowed


async def test_hung_redis_is_bounded_by_the_timeout(server: Throwaway,
                                                    limiters: list[RateLimiter]) -> None:
    rl = make(limiters, server.url, cfg("p:", per_min=60, redis_timeout_s=0.05))
    await rl.probe()
    assert (await rl.check(ALICE, None, "embedding")).allowed
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        t0 = time.monotonic()
        results = await asyncio.gather(*(rl.check(ALICE, None, "embedding") for _ in range(20)))
        elapsed = time.monotonic() - t0
        task.cancel()
        assert all(d.allowed for d in results)  # decided by local buckets (burst 60)
        assert elapsed < 0.3, elapsed
        assert ticks >= 3  # the loop kept turning while Redis hung
        assert rl.fallbacks == 20
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


async def test_no_redis_at_start_means_local_buckets(limiters: list[RateLimiter]) -> None:
    from tests.support.pg import free_port

    rl = make(limiters, f"redis://127.0.0.1:{free_port()}/0", cfg("p:", per_min=2))
    await rl.probe()
    assert [(await rl.check(ALICE, None, "embedding")).allowed for _ in range(3)] == \
        [True, True, False]
    assert rl.mode == "fallback"


@pytest.fixture
def pw_server() -> Iterator[Throwaway]:
    """A throwaway redis-server that wants a password."""
    import subprocess

    srv = Throwaway()
    srv.proc = subprocess.Popen(
        ["redis-server", "--port", str(srv.port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "s3cret"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    admin = redis.Redis(port=srv.port, password="s3cret")
    deadline = time.monotonic() + 5
    while True:
        try:
            admin.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "no redis-server"
            time.sleep(0.05)
    try:
        yield srv
    finally:
        srv.kill()


async def test_password_and_db_from_the_url(pw_server: Throwaway,
                                            limiters: list[RateLimiter]) -> None:
    port = pw_server.port
    good = make(limiters, f"redis://:s3cret@127.0.0.1:{port}/3", cfg("pw:", per_min=5))
    await good.probe()
    assert (await good.check(ALICE, None, "embedding")).allowed and good.mode == "redis"
    assert redis.Redis(port=port, password="s3cret", db=3).exists("pw:embedding:key:alice")
    bad = make(limiters, f"redis://:wrong@127.0.0.1:{port}/3", cfg("pw:", per_min=5))
    await bad.probe()
    assert (await bad.check(ALICE, None, "embedding")).allowed  # locally
    assert bad.mode == "fallback" and "WRONGPASS" in (bad.circuit.last_error or "")
