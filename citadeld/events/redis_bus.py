"""The Redis Streams bus: every citadeld sharing a Redis sees every event.

Layout (prefix ``events.key_prefix``): ``<prefix>all`` holds every event, ``<prefix>wf:<id>``
one workflow's; both ``XADD ... MAXLEN ~``. One Lua script writes an event to both with the
same id, so a resume id means the same on either stream, and sets the workflow stream's TTL
(``idle_ttl_s``, ``finished_ttl_s`` once a terminal event is written).

Live delivery: ONE reader task per daemon does ``XREAD BLOCK`` on the all-events stream over
its own connection and fans out to local subscribers (``Hub.dispatch``), so N websockets cost
no Redis connections; history (``XRANGE`` after an id) and publishes share a small bounded
pool. The reader reconnects with jittered backoff and resumes after the last id it read.

Publishing runs ``redis.asyncio`` on the daemon's loop: it is non-blocking I/O, so an actor
thread is not needed. ``publish`` queues the event for one writer task that sends everything
queued meanwhile as one pipeline (a thousand concurrent publishers cost a few round trips and
never wait for a pool connection), bounded by ``publish_timeout_s``. When Redis cannot take an
event, it goes to a bounded in-order buffer, gets a provisional id of the same shape (from a
clock that never goes below ids seen from Redis) and is fanned out to this instance's
subscribers at once; a flusher writes the buffer in order, with those ids where Redis accepts
them, once Redis is back. Past ``outage_buffer``
events, publish raises ``Unavailable``: the events are lost, the caller is told. A write that
timed out may still have been applied: such an event can then appear twice (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from citadeld.errors import Unavailable
from citadeld.events.config import EventsConfig
from citadeld.events.hub import BusBase
from citadeld.events.ids import IdClock, Key, parse_id
from citadeld.events.metrics import EventMetrics
from citadeld.events.model import TERMINAL, Event

log = logging.getLogger("citadeld.events")

# KEYS: all-stream, workflow stream. ARGV: all maxlen, workflow maxlen, id ('*' or one from
# the outage buffer), ttl of the workflow stream, payload. An explicit id Redis refuses (not
# above the stream's last) falls back to '*'.
_PUBLISH = """
local id = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[3], 'e', ARGV[5])
if type(id) == 'table' and id.err then
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', ARGV[5])
end
local wid = redis.pcall('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id, 'e', ARGV[5])
if type(wid) == 'table' and wid.err then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[5])
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return id
"""

_ERRORS = (RedisError, OSError, TimeoutError)
FLUSH_BATCH = 100
WRITE_BATCH = 1000


def encode(event: Event) -> bytes:
    return orjson.dumps({"t": event.type, "w": event.workflow_id, "d": event.data,
                         "o": event.owner, "ts": event.ts})


def decode(eid: bytes | str, payload: bytes) -> Event:
    obj = orjson.loads(payload)
    return Event(obj["t"], obj["w"], obj.get("d") or {}, obj.get("o"), obj.get("ts") or 0.0,
                 eid.decode() if isinstance(eid, bytes) else eid)


def _trimmed(info: Any) -> Key | None:
    """The highest id retention removed, from XINFO STREAM (Redis >= 7): MAXLEN trimming
    leaves ``entries-added`` above ``length`` and moves ``recorded-first-entry-id``; None when
    nothing was trimmed, the stream is missing (an error reply) or the server is older."""
    if not isinstance(info, (list, dict)):
        return None
    f = info if isinstance(info, dict) else dict(zip(info[::2], info[1::2], strict=False))

    def get(name: str) -> Any:
        v = f.get(name.encode(), f.get(name))
        return v.decode() if isinstance(v, bytes) else v

    added, length, first = get("entries-added"), get("length"), get("recorded-first-entry-id")
    if added is None or length is None or not first or int(added) <= int(length):
        return None
    ms, seq = parse_id(first)
    return (ms, seq - 1) if seq > 0 else (ms - 1, 0)  # just below the first one retained


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)  # our own loops decide when to try again


class RedisBus(BusBase):
    backend = "redis"

    def __init__(self, cfg: EventsConfig, url: str, metrics: EventMetrics | None = None
                 ) -> None:
        super().__init__(cfg, metrics)
        self.url = url
        self.all_key = f"{cfg.key_prefix}all"
        self._cmd: aioredis.Redis | None = None
        self._script: Any = None
        self._reader_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._buffer: deque[tuple[Event, bytes]] = deque()
        self._pending: list[tuple[Event, bytes, asyncio.Future[str]]] = []
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._ok = self.metrics.published.labels("ok")
        self._clock = IdClock()  # provisional ids during an outage
        self.last_read: str | None = None
        self.reader_up = False
        self.publish_up = True
        self.last_error: str | None = None
        self.reconnects = 0
        self.published = 0
        self.flushed = 0
        self.lost = 0

    def wf_key(self, workflow_id: str) -> str:
        return f"{self.cfg.key_prefix}wf:{workflow_id}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Never fails on a Redis outage: the reader keeps trying and /health shows it."""
        self._bind()
        t = self.cfg.publish_timeout_s
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url, max_connections=self.cfg.max_connections, timeout=t,
            socket_timeout=t, socket_connect_timeout=t, retry=_no_retry())
        self._cmd = aioredis.Redis(connection_pool=pool)
        self._script = self._cmd.register_script(_PUBLISH)
        ready = asyncio.get_running_loop().create_future()
        self._reader_task = asyncio.create_task(self._read_loop(ready), name="events-reader")
        # wait briefly for the reader to pin its start id, so an event published right after
        # start() is not missed by this instance's subscribers; an outage does not hold us up
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), min(1.0, self.cfg.publish_timeout_s))

    async def close(self) -> None:
        await super().close()
        if self._writer is not None and not self._writer.done():
            self._wake.set()  # it writes what is pending, then ends (closed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._writer), self.cfg.publish_timeout_s
                                       * 2)
        for task in (self._writer, self._reader_task, self._flush_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._buffer:  # a last chance for events published during an outage
            with contextlib.suppress(*_ERRORS):
                await asyncio.wait_for(self._flush(), 2.0)
            if self._buffer:
                log.warning("events lost at shutdown: Redis unreachable",
                            extra={"events": len(self._buffer)})
                self.lost += len(self._buffer)
                self._buffer.clear()
                self.metrics.buffered.set(0)
        if self._cmd is not None:
            await self._cmd.aclose()

    # -- publish -----------------------------------------------------------------------------

    async def _record(self, event: Event) -> str:
        """Queue for the writer, which sends everything queued meanwhile as one pipeline: a
        thousand concurrent publishers make a few round trips, not a thousand, and never wait
        for a pool connection (a busy pool is not an outage)."""
        payload = encode(event)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((event, payload, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_loop(), name="events-writer")
        self._wake.set()
        return await asyncio.shield(fut)  # a cancelled publisher does not unpublish

    async def _write_loop(self) -> None:
        while not self.closed or self._pending:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:WRITE_BATCH]
                del self._pending[:WRITE_BATCH]
                if not self._buffer:
                    try:
                        ids = await self._write(batch)
                    except _ERRORS as exc:
                        self._down("publish", exc)
                    else:
                        self._written(batch, ids)
                        continue
                for event, payload, fut in batch:  # Redis is out: the bounded buffer, in order
                    try:
                        fut.set_result(self._buffered(event, payload))
                    except Unavailable as exc:
                        fut.set_exception(exc)
                        fut.exception()  # the publisher may have gone; do not warn

    async def _write(self, batch: list[tuple[Event, bytes, asyncio.Future[str]]]) -> list[Any]:
        assert self._cmd is not None
        async with asyncio.timeout(self.cfg.publish_timeout_s):
            async with self._cmd.pipeline(transaction=False) as pipe:
                for event, payload, _ in batch:
                    await self._xadd(event, payload, "*", client=pipe)
                return list(await pipe.execute())

    def _written(self, batch: list[tuple[Event, bytes, asyncio.Future[str]]],
                 ids: list[Any]) -> None:
        if not self.publish_up:
            self.publish_up = True
            self._update_gauge()
        for (event, _, fut), raw in zip(batch, ids, strict=True):
            eid = raw.decode() if isinstance(raw, bytes) else str(raw)
            event.id = eid
            self._clock.observe(parse_id(eid))
            if not fut.done():
                fut.set_result(eid)
        self.published += len(batch)
        self._ok.inc(len(batch))

    async def _xadd(self, event: Event, payload: bytes, eid: str, client: Any = None) -> str:
        ttl = self.cfg.finished_ttl_s if event.type in TERMINAL else self.cfg.idle_ttl_s
        res = await self._script(
            keys=[self.all_key, self.wf_key(event.workflow_id)],
            args=[self.cfg.global_maxlen, self.cfg.workflow_maxlen, eid, ttl, payload],
            client=client)
        return res.decode() if isinstance(res, bytes) else str(res)

    def _buffered(self, event: Event, payload: bytes) -> str:
        if len(self._buffer) >= self.cfg.outage_buffer:
            self.lost += 1
            self.metrics.published.labels("failed").inc()
            raise Unavailable(
                f"event bus unavailable: Redis unreachable ({self.last_error}) and "
                f"{len(self._buffer)} events already buffered", retry_after=5)
        event.id = self._clock.next()
        self._buffer.append((event, payload))
        self.metrics.published.labels("buffered").inc()
        self.metrics.buffered.set(len(self._buffer))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_loop(), name="events-flush")
        self.hub.dispatch(event)  # local subscribers need not wait for Redis
        return event.id

    async def _flush_loop(self) -> None:
        delay = self.cfg.reconnect_min_s
        while self._buffer:
            try:
                await self._flush()
            except _ERRORS as exc:
                self._down("publish", exc)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.cfg.reconnect_max_s)
        self.publish_up = True
        self._update_gauge()

    async def _flush(self) -> None:
        """Write the buffer in order, a pipeline of FLUSH_BATCH events at a time."""
        assert self._cmd is not None
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(FLUSH_BATCH, len(self._buffer)))]
            async with self._cmd.pipeline(transaction=False) as pipe:
                for event, payload in batch:
                    await self._xadd(event, payload, event.id or "*", client=pipe)
                await asyncio.wait_for(pipe.execute(), self.cfg.publish_timeout_s)
            for _ in batch:
                self._buffer.popleft()
            self.flushed += len(batch)
            self.published += len(batch)
            self.metrics.buffered.set(len(self._buffer))
        log.info("events buffered during a Redis outage written", extra={
            "flushed_total": self.flushed})

    # -- live: one reader per daemon ---------------------------------------------------------

    async def _read_loop(self, ready: asyncio.Future[None]) -> None:
        cfg = self.cfg
        delay = cfg.reconnect_min_s
        conn: aioredis.Redis | None = None
        while not self.closed:
            try:
                if conn is None:
                    conn = aioredis.Redis.from_url(
                        self.url, socket_connect_timeout=cfg.publish_timeout_s,
                        socket_timeout=cfg.read_block_ms / 1000 + 5, retry=_no_retry(),
                        single_connection_client=True)
                    # resumes after last_read; the first time, from what is new from now on
                    top: Any = await conn.xrevrange(self.all_key, "+", "-", count=1)
                    if self.last_read is None:
                        self.last_read = top[0][0].decode() if top else "0-0"
                    if not self.reader_up:
                        self.reader_up = True
                        self._update_gauge()
                        log.info("event reader connected", extra={"after": self.last_read})
                    delay = cfg.reconnect_min_s
                if not ready.done():
                    ready.set_result(None)
                assert self.last_read is not None
                resp: Any = await conn.xread({self.all_key: self.last_read}, count=cfg.read_count,
                                        block=cfg.read_block_ms)
                for _stream, entries in resp or ():
                    for eid, fields in entries:
                        self.last_read = eid.decode()
                        payload = fields.get(b"e")
                        if payload is None:
                            continue
                        try:
                            event = decode(eid, payload)
                        except (orjson.JSONDecodeError, KeyError, TypeError):
                            log.warning("undecodable event skipped",
                                        extra={"id": self.last_read})
                            continue
                        self._clock.observe(parse_id(self.last_read))
                        self.hub.dispatch(event)
            except asyncio.CancelledError:
                break
            except _ERRORS as exc:
                self._down("reader", exc)
                self.reconnects += 1
                self.metrics.reader_reconnects.inc()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.aclose()
                    conn = None
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, cfg.reconnect_max_s)
            except Exception:  # a bug must not end live delivery for good
                log.exception("event reader failed; restarting it")
                await asyncio.sleep(cfg.reconnect_max_s)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.aclose()

    def _down(self, part: str, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        was_up = self.publish_up and self.reader_up
        if part == "reader":
            self.reader_up = False
        else:
            self.publish_up = False
        if was_up:
            log.warning("event bus lost Redis", extra={"part": part, "error": self.last_error})
        self._update_gauge()

    def _update_gauge(self) -> None:
        self.metrics.bus_up.set(1 if self.publish_up and self.reader_up else 0)

    # -- history -----------------------------------------------------------------------------

    async def _history(self, workflow_id: str | None, after: Key, count: int
                       ) -> tuple[list[Event], Key | None]:
        if self._cmd is None:
            raise Unavailable("event bus not started", retry_after=1)
        key = self.all_key if workflow_id is None else self.wf_key(workflow_id)
        start = "-" if after == (0, 0) else f"({after[0]}-{after[1]}"
        try:
            async with self._cmd.pipeline(transaction=False) as pipe:
                pipe.xrange(key, start, "+", count=count)
                pipe.execute_command("XINFO", "STREAM", key)
                entries, info = await asyncio.wait_for(
                    pipe.execute(raise_on_error=False), self.cfg.publish_timeout_s)
        except _ERRORS as exc:
            raise Unavailable(f"event history unavailable: {type(exc).__name__}",
                              retry_after=2) from None
        if isinstance(entries, Exception):
            raise Unavailable(f"event history unavailable: {entries}", retry_after=2)
        events = [decode(eid, f[b"e"]) for eid, f in entries if b"e" in f]
        return events, _trimmed(info)

    async def last(self, workflow_id: str) -> Event | None:
        if self._cmd is None:
            return None
        try:
            top: Any = await asyncio.wait_for(
                self._cmd.xrevrange(self.wf_key(workflow_id), "+", "-", count=1),
                self.cfg.publish_timeout_s)
        except _ERRORS as exc:
            raise Unavailable(f"event history unavailable: {type(exc).__name__}",
                              retry_after=2) from None
        if not top or b"e" not in top[0][1]:
            return None
        return decode(top[0][0], top[0][1][b"e"])

    def snapshot(self) -> dict[str, Any]:
        up = self.publish_up and self.reader_up
        return {**super().snapshot(), "status": "ok" if up else "down",
                "publish": "ok" if self.publish_up else "down",
                "reader": "ok" if self.reader_up else "down",
                "last_error": self.last_error, "last_read_id": self.last_read,
                "reader_reconnects": self.reconnects, "published": self.published,
                "buffered": len(self._buffer), "buffer_cap": self.cfg.outage_buffer,
                "flushed": self.flushed, "lost": self.lost, "checked_at": time.time()}
