"""Handing workflow jobs to runners: in-process, or a Redis Streams consumer group shared by
every daemon on the same Redis.

Redis: ``enqueue`` XADDs ``{wid}`` to ``<prefix>jobs``; each daemon's runner reads with
XREADGROUP as consumer ``<instance>`` (so the stream delivers every job to one daemon), and
takes a lease ``<prefix>lease:<wid>`` (SET NX PX) before running it. The holder renews the
lease and resets the entry's idle time (XCLAIM JUSTID) every heartbeat; a job whose holder went
silent for ``claim_timeout_s`` is taken over by a live daemon with XAUTOCLAIM, which then finds
the lease expired and resumes the workflow from its durable state. The lease, not the stream,
decides who runs a workflow: a holder whose lease was taken stops, and a job reclaimed while
its lease is still live is only retried later. A daemon restarted under the same instance name
resumes its own pending entries at once (XREADGROUP from id 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("citadeld.workflows")

# renew our lease; take it again if it vanished (Redis restarted empty) - only a lease held
# by another instance means we lost the workflow
_RENEW = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass
class Job:
    wid: str
    entry: str | None = None  # stream entry id (Redis)
    reclaimed: bool = False


class QueueFull(Exception):
    pass


class LocalQueue:
    """One daemon, no Redis: a bounded in-memory queue (lost with the process; PostgreSQL, if
    configured, lets the next start re-enqueue what was unfinished)."""

    shared = False

    def __init__(self, max_queued: int) -> None:
        self.max = max_queued
        self._q: deque[str] = deque()
        self._queued: set[str] = set()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None

    def set_waker(self, wake: Callable[[], None] | None) -> None:
        self._wake = wake

    async def enqueue(self, wid: str) -> None:
        self.put(wid)

    def put(self, wid: str) -> None:
        with self._lock:
            if wid in self._queued:
                return
            if len(self._q) >= self.max:
                raise QueueFull(f"{len(self._q)} workflows are queued (at most {self.max})")
            self._q.append(wid)
            self._queued.add(wid)
        wake = self._wake
        if wake is not None:
            wake()

    def take(self, n: int) -> list[Job]:
        out: list[Job] = []
        with self._lock:
            while self._q and len(out) < n:
                wid = self._q.popleft()
                self._queued.discard(wid)
                out.append(Job(wid))
        return out

    def depth(self) -> int:
        return len(self._q)


class RedisSubmitter:
    """The front's half: append jobs (its own client, on the daemon's loop)."""

    shared = True

    def __init__(self, redis: Any, prefix: str) -> None:
        self.redis = redis
        self.stream = f"{prefix}jobs"

    async def enqueue(self, wid: str) -> None:
        await self.redis.xadd(self.stream, {"wid": wid})


class RedisClaimer:
    """The runner's half: claim, heartbeat, reclaim, ack (a client on the runner's loop)."""

    GROUP = "workflows"

    def __init__(self, redis: Any, prefix: str, instance: str, claim_timeout_s: float) -> None:
        self.redis = redis
        self.prefix = prefix
        self.stream = f"{prefix}jobs"
        self.instance = instance
        self.lease_ms = max(100, int(claim_timeout_s * 1000))
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._autoclaim_start = "0-0"

    def _lease(self, wid: str) -> str:
        return f"{self.prefix}lease:{wid}"

    async def ensure_group(self) -> bool:
        """Create the stream and group; True when they did not exist (Redis lost its data,
        or first start): the caller then re-enqueues unfinished work from PostgreSQL."""
        try:
            await self.redis.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
            return True
        except Exception as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise

    @staticmethod
    def _jobs(entries: Any, reclaimed: bool = False) -> list[Job]:
        out = []
        for eid, fields in entries or []:
            if not fields:  # deleted while pending
                continue
            raw = fields.get(b"wid") or fields.get("wid")
            if raw is None:
                continue
            out.append(Job(raw.decode() if isinstance(raw, bytes) else raw,
                           eid.decode() if isinstance(eid, bytes) else eid, reclaimed))
        return out

    async def own_pending(self, n: int = 1000) -> list[Job]:
        """Entries this instance held before it restarted."""
        res = await self.redis.xreadgroup(self.GROUP, self.instance, {self.stream: "0"},
                                          count=n)
        return self._jobs(res[0][1] if res else [], reclaimed=True)

    async def claim(self, n: int, block_ms: int) -> list[Job]:
        res = await self.redis.xreadgroup(self.GROUP, self.instance, {self.stream: ">"},
                                          count=n, block=block_ms)
        return self._jobs(res[0][1] if res else [])

    async def reclaim(self, n: int) -> list[Job]:
        """Jobs whose holder has been silent past the claim timeout."""
        res = await self.redis.xautoclaim(self.stream, self.GROUP, self.instance,
                                          min_idle_time=self.lease_ms,
                                          start_id=self._autoclaim_start, count=n)
        nxt, entries = res[0], res[1]
        self._autoclaim_start = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
        return self._jobs(entries, reclaimed=True)

    async def acquire(self, wid: str) -> int:
        """0 when we hold the lease now; else the ms until the other holder's lease ends."""
        key = self._lease(wid)
        if await self.redis.set(key, self.instance, nx=True, px=self.lease_ms):
            return 0
        holder = await self.redis.get(key)
        if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder
                                   ) == self.instance:
            await self.redis.pexpire(key, self.lease_ms)  # ours from before a restart
            return 0
        ttl = await self.redis.pttl(key)
        return max(50, int(ttl)) if ttl and ttl > 0 else 50

    async def heartbeat(self, jobs: list[Job]) -> list[Job]:
        """Renew our leases and keep our entries fresh; returns the jobs we lost."""
        if not jobs:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for j in jobs:
            await self._renew(keys=[self._lease(j.wid)],
                              args=[self.instance, self.lease_ms], client=pipe)
        renewed = await pipe.execute()
        kept = [j for j, ok in zip(jobs, renewed, strict=True) if ok]
        lost = [j for j, ok in zip(jobs, renewed, strict=True) if not ok]
        entries = [j.entry for j in kept if j.entry]
        if entries:
            await self.redis.xclaim(self.stream, self.GROUP, self.instance, 0, entries,
                                    justid=True)
        return lost

    async def done(self, job: Job) -> None:
        """The workflow reached a final state (recorded): drop the entry and the lease."""
        pipe = self.redis.pipeline(transaction=False)
        if job.entry:
            pipe.xack(self.stream, self.GROUP, job.entry)
            pipe.xdel(self.stream, job.entry)
        await self._release(keys=[self._lease(job.wid)], args=[self.instance], client=pipe)
        await pipe.execute()

    async def drop_entry(self, job: Job) -> None:
        """A duplicate entry (the workflow is finished or queued elsewhere)."""
        if job.entry:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.stream, self.GROUP, job.entry)
            pipe.xdel(self.stream, job.entry)
            await pipe.execute()

    async def depth(self) -> int | None:
        """Jobs not yet delivered plus delivered and unfinished, over every instance."""
        with contextlib.suppress(Exception):
            for g in await self.redis.xinfo_groups(self.stream):
                name = g.get("name") or g.get(b"name")
                if name in (self.GROUP, self.GROUP.encode()):
                    lag = g.get("lag") or 0
                    return int(lag) + int(g.get("pending") or 0)
        return None

    async def cancel_messages(self, on_cancel: Callable[[str], None],
                              stop: asyncio.Event) -> None:
        """Follow cancellations published by any instance's API."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(f"{self.prefix}cancel")
        try:
            while not stop.is_set():
                msg = await pubsub.get_message(timeout=1.0)
                if msg and msg.get("type") == "message":
                    data = msg["data"]
                    on_cancel(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
