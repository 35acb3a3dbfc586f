"""Embedding cache core, free of Redis and actors: keys, value codecs, the facade contract
(EmbeddingCache), the in-process LRU (MemoryCache) and the circuit the Redis facade uses.

Kept apart from the actor module so the byte layout that lives on in Redis across daemon
versions is defined in one place, and the hot path (key, LRU hit) imports nothing heavy.
The Redis backend and ``build_cache`` live in ``citadeld.actors.cache``.
"""

from __future__ import annotations

import abc
import logging
import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from hashlib import blake2b
from typing import Any, Literal

import msgpack
import numpy as np

log = logging.getLogger("citadeld.cache")

CountCb = Callable[[int], None]
# a cache key: a digest (bytes), or for the in-process cache (model, dims, normalize, text)
Key = Any
SHORT_TEXT = 512  # characters: up to this, the in-process cache keys a text by itself
Vec = np.ndarray
ValueFormat = Literal["float32", "msgpack"]
VALUE_FORMATS: tuple[str, ...] = ("float32", "msgpack")

# Bump the personalisation string if the encoding below ever changes: old entries then simply
# stop matching (misses) instead of being misread.
_PERSON = b"citadel.emb.v1"
_LEN = struct.Struct("<Q")
_OPTS = struct.Struct("<q?")


def cache_key(model: str, dims: int, normalize: bool, text: str) -> bytes:
    """16-byte BLAKE2b digest of a length-prefixed encoding of all four inputs.

    Length prefixes make the encoding injective (model "a"+text "bc" cannot collide with model
    "ab"+text "c"); 128 bits make accidental collisions irrelevant at any cache size. Text is
    encoded with ``surrogatepass`` because JSON may legally carry lone surrogates and a cache
    key must never raise. The hash state after model and options is kept per model and copied
    (a third of the cost per key); the digest is the same as hashing everything at once.
    """
    base = _prefixes.get((model, dims, normalize))
    if base is None:
        base = _prefix(model, dims, normalize)
    h = base.copy()
    t = text.encode("utf-8", "surrogatepass")
    h.update(_LEN.pack(len(t)))
    h.update(t)
    return h.digest()


_prefixes: dict[tuple[str, int, bool], Any] = {}


def _prefix(model: str, dims: int, normalize: bool) -> Any:
    m = model.encode("utf-8", "surrogatepass")
    h = blake2b(digest_size=16, person=_PERSON)
    h.update(_LEN.pack(len(m)))
    h.update(m)
    h.update(_OPTS.pack(int(dims), bool(normalize)))
    if len(_prefixes) >= 4096:  # requests choose dims: bound what they can make us keep
        _prefixes.clear()
    _prefixes[(model, dims, normalize)] = h
    return h


def as_f32(vec: object) -> np.ndarray:
    """A read-only, contiguous, 1-D float32 copy: cached vectors are shared between callers, so
    nobody may mutate them in place."""
    a = _vector(np.array(vec, dtype=np.float32, copy=True))
    a.setflags(write=False)
    return a


def _vector(a: np.ndarray) -> np.ndarray:
    if a.ndim == 0 or a.size == 0:  # np.array(None, float32) is a 0-d NaN, not an error
        raise ValueError("an embedding must be a non-empty vector")
    return a.reshape(-1)


def encode_value(vec: np.ndarray, fmt: str) -> bytes:
    """Serialise one vector for Redis.

    "float32": raw little-endian float32 bytes (smallest, zero-parse; what /v1/embeddings
    base64 also uses). "msgpack": ``{"d": dims, "v": <float32 LE bytes>}`` as a msgpack map with
    a bin payload: self-describing for other readers, yet still decoded by ``numpy.frombuffer``
    without a per-float loop; the stored dims guard against truncated values.
    """
    raw = _vector(np.ascontiguousarray(vec, dtype="<f4")).tobytes()
    if fmt == "float32":
        return raw
    if fmt == "msgpack":
        return msgpack.packb({"d": len(raw) // 4, "v": raw}, use_bin_type=True)
    raise ValueError(f"unknown value format {fmt!r}")


def decode_value(data: bytes, fmt: str) -> np.ndarray | None:
    """Inverse of :func:`encode_value`; a corrupt or foreign value decodes to None (a miss)."""
    try:
        if fmt == "msgpack":
            obj = msgpack.unpackb(data, raw=False)
            raw = obj["v"]
            if not isinstance(raw, bytes) or len(raw) != 4 * int(obj["d"]):
                return None
        else:
            raw = data
        if len(raw) % 4 or not raw:
            return None
        # frombuffer views the bytes (read-only, no copy); "<f4" is native float32 on x86/arm64.
        return np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    except Exception:
        return None


class EmbeddingCache(abc.ABC):
    """The facade the daemon sees. Counters live here and are touched only on the loop."""

    backend = "?"

    def __init__(
        self, on_hit: CountCb | None, on_miss: CountCb | None, on_error: Callable[[], None] | None
    ) -> None:
        self.hits = self.misses = self.errors = self.dropped = 0
        self._on_hit, self._on_miss, self._on_error = on_hit, on_miss, on_error

    def _count(self, out: list[Vec | None], misses: int | None = None) -> list[Vec | None]:
        if misses is None:  # not list.count: arrays compare elementwise
            misses = sum(1 for v in out if v is None)
        hits = len(out) - misses
        self.hits += hits
        self.misses += misses
        try:  # a metrics bug must not turn a cache lookup into a request failure
            if hits and self._on_hit:
                self._on_hit(hits)
            if misses and self._on_miss:
                self._on_miss(misses)
        except Exception:
            log.exception("cache hit/miss callback failed")
        return out

    def _error(self) -> None:
        self.errors += 1
        try:
            if self._on_error:
                self._on_error()
        except Exception:
            log.exception("cache error callback failed")

    def key(self, model: str, dims: int, normalize: bool, text: str) -> Key:
        """This backend's key for one text: the BLAKE2b digest, which outlives the process
        (Redis keeps it across daemon versions)."""
        return cache_key(model, dims, normalize, text)

    @abc.abstractmethod
    async def get_many(self, keys: list[bytes]) -> list[Vec | None]: ...

    def lookup_now(self, keys: list[bytes]) -> list[Vec | None] | None:
        """The answer without awaiting, where the backend has it at hand; None: use get_many."""
        return None

    @abc.abstractmethod
    def put_many(self, items: list[tuple[bytes, Vec]]) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> int: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def health(self) -> dict[str, Any]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the cache answers misses afterwards."""


class MemoryCache(EmbeddingCache):
    """Bounded LRU with lazy TTL, served inline on the loop.

    No actor and no thread hop: a dict lookup costs well under a microsecond, and the cache-hit
    path is benchmarked against a bare aiohttp handler. The lock exists because backends may
    write results back from their own threads. Stored vectors are read-only float32 copies,
    shared by every caller that hits them.
    """

    backend = "memory"

    def key(self, model: str, dims: int, normalize: bool, text: str) -> Key:
        """In-process keys never leave the process, so a short text is its own key: the tuple
        costs a third of the digest's instructions and compares exactly (no collision at all).
        Longer texts are keyed by digest, so the cache does not keep them alive."""
        if len(text) <= SHORT_TEXT:
            return (model, dims, normalize, text)
        return cache_key(model, dims, normalize, text)

    def __init__(
        self,
        *,
        max_entries: int,
        ttl_s: float,
        on_hit: CountCb | None = None,
        on_miss: CountCb | None = None,
        on_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(on_hit, on_miss, on_error)
        self.max_entries = max(1, int(max_entries))
        self.ttl_s = ttl_s
        self._clock = clock
        self._data: OrderedDict[Key, tuple[float, Vec]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, keys: list[Key]) -> list[Vec | None]:
        now = self._clock()
        out: list[Vec | None] = []
        data = self._data
        misses = 0
        with self._lock:
            for k in keys:
                entry = data.get(k)
                if entry is None:
                    out.append(None)
                    misses += 1
                elif entry[0] <= now:
                    del data[k]  # expired: dropped on first touch
                    out.append(None)
                    misses += 1
                else:
                    data.move_to_end(k)
                    out.append(entry[1])
        if self._on_hit is None and self._on_miss is None:  # _count's work, without the call
            self.hits += len(out) - misses
            self.misses += misses
            return out
        return self._count(out, misses)

    async def get_many(self, keys: list[Key]) -> list[Vec | None]:
        return self.lookup(keys)

    # the lookup itself (no forwarding frame per request): the in-process answer is always at hand
    lookup_now = lookup

    def put_many(self, items: list[tuple[Key, Vec]]) -> None:
        expires = self._clock() + self.ttl_s if self.ttl_s > 0 else math.inf
        ready: list[tuple[Key, Vec]] = []
        for item in items:
            try:
                key, vec = item
                ready.append((key if type(key) is tuple else bytes(key), as_f32(vec)))
            except Exception:
                self.dropped += 1
        with self._lock:
            for key, vec in ready:
                self._data[key] = (expires, vec)
                self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

    async def flush(self) -> int:
        with self._lock:
            n = len(self._data)
            self._data.clear()
        return n

    def __len__(self) -> int:
        return len(self._data)

    def stats(self) -> dict[str, Any]:
        return {"backend": "memory", "healthy": True, "hits": self.hits, "misses": self.misses,
                "errors": self.errors, "dropped": self.dropped, "entries": len(self._data)}

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "backend": "memory", "latency_ms": 0.0, "error": None}


class Circuit:
    """Skips a failing dependency for a growing backoff, so an outage adds no timeout latency to
    every request. Only a failed *trial* (the first call after the backoff) grows the backoff:
    a burst of failures from calls already in flight must not jump straight to the cap."""

    def __init__(self, backoff_min: float = 1.0, backoff_max: float = 10.0, what: str = "cache",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_min, self.backoff_max, self.what = backoff_min, backoff_max, what
        self.backoff, self.open_until, self.clock = backoff_min, 0.0, clock
        self.last_error: str | None = None

    def allow(self) -> bool:
        return self.clock() >= self.open_until

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if self.last_error is None:
            log.warning("%s unavailable, serving misses: %s", self.what, text)
        self.last_error = text
        if now >= self.open_until:
            self.open_until = now + self.backoff
            self.backoff = min(self.backoff * 2, self.backoff_max)

    def succeeded(self) -> None:
        if self.last_error is not None:
            log.info("%s recovered", self.what)
        self.last_error, self.open_until, self.backoff = None, 0.0, self.backoff_min
