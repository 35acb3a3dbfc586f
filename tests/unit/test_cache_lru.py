"""The in-process cache: key derivation, value codecs, the LRU facade and the circuit."""

from __future__ import annotations

import threading
from typing import Any

import msgpack
import numpy as np
import pytest

from citadeld.actors.cache import MemoryCache, RedisCache, build_cache, cache_key
from citadeld.cache_core import Circuit, decode_value, encode_value


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def vec(seed: int, dims: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dims).astype(np.float32)


def k(i: int) -> bytes:
    return cache_key("m", 8, True, f"text {i}")


# ---- keys -------------------------------------------------------------------------------


def test_key_is_stable_16_bytes() -> None:
    key = cache_key("all-minilm", 384, True, "hello world")
    assert isinstance(key, bytes) and len(key) == 16
    # Pinned: keys outlive the process in Redis; a change here orphans every cached vector.
    assert key.hex() == "9582b65e0cbec80c5a6f7d43fbc39458"
    assert cache_key("all-minilm", 384, True, "hello world") == key


@pytest.mark.parametrize(
    "other",
    [
        ("all-minilm2", 384, True, "hello world"),
        ("all-minilm", 383, True, "hello world"),
        ("all-minilm", 384, False, "hello world"),
        ("all-minilm", 384, True, "hello world "),
    ],
)
def test_each_input_changes_the_key(other: tuple[str, int, bool, str]) -> None:
    assert cache_key(*other) != cache_key("all-minilm", 384, True, "hello world")


def test_key_encoding_is_unambiguous_and_total() -> None:
    assert cache_key("a", 1, True, "bc") != cache_key("ab", 1, True, "c")
    assert cache_key("", 1, True, "") != cache_key("", 1, False, "")
    assert len(cache_key("m", 1, True, "lone \ud800 surrogate")) == 16  # never raises


# ---- codecs -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["float32", "msgpack"])
def test_codec_round_trip_is_exact(fmt: str) -> None:
    v = vec(1, 384)
    out = decode_value(encode_value(v, fmt), fmt)
    assert out is not None and out.dtype == np.float32 and np.array_equal(out, v)


def test_codec_layouts_and_corruption() -> None:
    v = vec(2, 4)
    assert encode_value(v, "float32") == v.astype("<f4").tobytes()
    assert msgpack.unpackb(encode_value(v, "msgpack")) == {"d": 4, "v": v.tobytes()}
    assert decode_value(b"abc", "float32") is None  # not a multiple of 4
    assert decode_value(b"\x00" * 8, "msgpack") is None
    truncated = msgpack.packb({"d": 5, "v": v.tobytes()})
    assert decode_value(truncated, "msgpack") is None


# ---- LRU --------------------------------------------------------------------------------


async def test_lru_is_bounded_and_evicts_least_recent() -> None:
    c = MemoryCache(max_entries=3, ttl_s=0)
    c.put_many([(k(i), vec(i)) for i in range(3)])
    await c.get_many([k(0)])  # 0 becomes most recent; 1 is now the oldest
    c.put_many([(k(3), vec(3))])
    assert len(c) == 3
    got = await c.get_many([k(0), k(1), k(2), k(3)])
    assert [g is not None for g in got] == [True, False, True, True]
    c.put_many([(k(i), vec(i)) for i in range(10, 20)])
    assert len(c) == 3 and c.stats()["entries"] == 3


async def test_lru_values_are_exact_read_only_copies() -> None:
    c = MemoryCache(max_entries=10, ttl_s=0)
    v = vec(5)
    c.put_many([(k(5), v)])
    v[:] = 0  # the caller reusing its buffer must not corrupt the cache
    (got,) = await c.get_many([k(5)])
    assert got is not None and got.dtype == np.float32 and np.array_equal(got, vec(5))
    with pytest.raises(ValueError):
        got[0] = 1.0


async def test_lru_ttl_is_lazy() -> None:
    clock = FakeClock()
    c = MemoryCache(max_entries=10, ttl_s=60, clock=clock)
    c.put_many([(k(1), vec(1))])
    clock.now += 59
    assert (await c.get_many([k(1)]))[0] is not None
    clock.now += 2
    assert len(c) == 1  # expiry is lazy: still stored ...
    assert (await c.get_many([k(1)]))[0] is None  # ... but never served, and dropped on touch
    assert len(c) == 0


async def test_lru_stats_callbacks_flush_health() -> None:
    seen: dict[str, list[int]] = {"hit": [], "miss": []}
    c = build_cache(
        backend="memory", redis_url=None, ttl_s=60, max_entries=100, value_format="float32",
        key_prefix="x:", timeout_s=0.1,
        on_hit=seen["hit"].append, on_miss=seen["miss"].append,
    )
    assert isinstance(c, MemoryCache)
    c.put_many([(k(1), vec(1)), (k(2), vec(2))])
    c.put_many([(k(3), None)])  # type: ignore[list-item]  # garbage is dropped, never raised
    got = await c.get_many([k(1), k(2), k(9)])
    assert [g is not None for g in got] == [True, True, False]
    assert await c.get_many([]) == []
    s = c.stats()
    assert (s["hits"], s["misses"], s["errors"], s["entries"]) == (2, 1, 0, 2)
    assert s["backend"] == "memory" and s["healthy"] is True and s["dropped"] == 1
    assert seen == {"hit": [2], "miss": [1]}
    assert await c.health() == {"status": "ok", "backend": "memory", "latency_ms": 0.0,
                                "error": None}
    assert await c.flush() == 2
    assert c.stats()["entries"] == 0
    await c.close()


async def test_lru_accepts_puts_from_other_threads() -> None:
    c = MemoryCache(max_entries=1000, ttl_s=0)
    threads = [
        threading.Thread(target=c.put_many, args=([(k(t * 100 + i), vec(i)) for i in range(50)],))
        for t in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(c) == 200
    assert all(g is not None for g in await c.get_many([k(300 + i) for i in range(50)]))


def test_build_cache_validates() -> None:
    common: dict[str, Any] = dict(ttl_s=1, max_entries=1, key_prefix="p:", timeout_s=0.1)
    with pytest.raises(ValueError):
        build_cache(backend="memcached", redis_url=None, value_format="float32", **common)
    with pytest.raises(ValueError):
        build_cache(backend="redis", redis_url=None, value_format="float32", **common)
    with pytest.raises(ValueError):
        build_cache(backend="memory", redis_url=None, value_format="json", **common)
    r = build_cache(backend="redis", redis_url="redis://127.0.0.1:1", value_format="msgpack",
                    **common)
    assert isinstance(r, RedisCache) and r.stats()["backend"] == "redis"


# ---- circuit ----------------------------------------------------------------------------


def test_circuit_backs_off_growing_and_recovers() -> None:
    clock = FakeClock()
    c = Circuit(1.0, 4.0, clock=clock)
    assert c.allow()
    c.failed(ConnectionError("refused"))
    assert not c.allow() and c.last_error == "ConnectionError: refused"
    c.failed(TimeoutError())  # a call already in flight: no extra backoff
    assert c.open_until == clock.now + 1.0
    clock.now += 1.0
    assert c.allow()
    c.failed(TimeoutError())  # the trial failed: 2 s now
    clock.now += 1.9
    assert not c.allow()
    clock.now += 0.1
    c.failed(TimeoutError())
    clock.now += 4.0
    c.failed(TimeoutError())
    assert c.open_until - clock.now == 4.0  # capped
    c.succeeded()
    assert c.allow() and c.last_error is None and c.backoff == 1.0
