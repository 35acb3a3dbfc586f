"""Where workflow state lives: hot in Redis, durable in PostgreSQL, or in memory.

Runs on the daemon's event loop only (the runner reaches it through the bridge). Writes that
must survive a crash - the accept before the 202, every step recorded as done, the final
state - go to PostgreSQL through a group commit: concurrent saves share one multi-row upsert,
so a thousand running workflows cost a few statements per flush, not one each. A save never
turns a finished row back into an unfinished one (``WHERE finished_at IS NULL``), which also
fences a late write from a holder that lost its claim. Redis keeps a copy of every state with
a TTL so GETs from any instance are cheap; without PostgreSQL it is the only copy, and
without either the state is in this process's memory and lost with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from citadeld.workflows.record import TERMINAL, progress, summary

log = logging.getLogger("citadeld.workflows")

Rec = dict[str, Any]

_COLS = ("id", "owner", "name", "status", "instance", "cancel_requested", "steps_total",
         "steps_done", "error", "created_at", "updated_at", "finished_at", "state")
_UPSERT = (
    "INSERT INTO citadel_workflows AS w (" + ", ".join(_COLS) + ") VALUES {values}"
    " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, instance = EXCLUDED.instance,"
    " cancel_requested = w.cancel_requested OR EXCLUDED.cancel_requested,"
    " steps_done = EXCLUDED.steps_done, error = EXCLUDED.error, updated_at = now(),"
    " finished_at = EXCLUDED.finished_at, state = EXCLUDED.state"
    " WHERE w.finished_at IS NULL")
_ROW = ("(%s, %s, %s, %s, %s, %s, %s, %s, %s, to_timestamp(%s), now(),"
        " CASE WHEN %s::float8 IS NULL THEN NULL ELSE to_timestamp(%s::float8) END, %s::jsonb)")


def _row_args(rec: Rec) -> tuple[Any, ...]:
    fin = rec.get("finished_at")
    return (rec["id"], rec["owner"], rec.get("name"), rec["status"], rec.get("instance"),
            bool(rec.get("cancel_requested")), len(rec["steps"]), progress(rec)["completed"],
            (rec.get("error") or None) and str(rec["error"])[:4000], rec["created_at"], fin, fin,
            orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY).decode())


class StoreUnavailable(Exception):
    """The durable store could not record the state (PostgreSQL or Redis away)."""


class GroupCommit:
    """Saves queued while a flush runs go together in the next one; each caller waits for
    the flush that carries its latest state."""

    def __init__(self, flush: Callable[[list[Rec]], Awaitable[None]], max_batch: int = 500
                 ) -> None:
        self._flush = flush
        self._max = max_batch
        self._pending: dict[str, tuple[Rec, list[asyncio.Future[None]]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def save(self, rec: Rec) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._pending.get(rec["id"])
        self._pending[rec["id"]] = (rec, [*(entry[1] if entry else []), fut])
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        await fut

    async def _run(self) -> None:
        while self._pending:
            ids = list(self._pending)[: self._max]
            batch = [self._pending.pop(i) for i in ids]
            try:
                await self._flush([rec for rec, _ in batch])
            except Exception as exc:
                for _, futs in batch:
                    for f in futs:
                        if not f.done():
                            f.set_exception(exc)
            else:
                for _, futs in batch:
                    for f in futs:
                        if not f.done():
                            f.set_result(None)


class WorkflowStore:
    def __init__(self, *, persistence: Any = None, redis: Any = None, key_prefix: str = "",
                 hot_ttl_s: int = 3600, retention_s: float = 0.0) -> None:
        self.pg = persistence  # citadeld.actors.persistence.Persistence or None
        self.redis = redis  # redis.asyncio.Redis (on this loop) or None
        self.prefix = key_prefix
        self.hot_ttl = hot_ttl_s
        self.retention_s = retention_s
        self._mem: dict[str, bytes] = {}
        self._mem_lock = threading.Lock()
        self._commit = GroupCommit(self._pg_flush)

    @property
    def mode(self) -> str:
        if self.pg is not None:
            return "postgres+redis" if self.redis is not None else "postgres"
        return "redis" if self.redis is not None else "memory"

    @property
    def durable(self) -> bool:
        return self.pg is not None

    def _key(self, wid: str) -> str:
        return f"{self.prefix}state:{wid}"

    # ---- writes ------------------------------------------------------------------------------

    async def create(self, rec: Rec) -> None:
        """The accept: durable before the client hears 202."""
        await self.save(rec, durable=True)
        if self.redis is not None and self.pg is None:
            try:
                await self.redis.zadd(f"{self.prefix}index", {rec["id"]: rec["created_at"]})
            except Exception as exc:
                raise StoreUnavailable(f"Redis: {exc}") from None

    async def save(self, rec: Rec, durable: bool = True) -> None:
        """Record the state; ``durable=False`` (a step started) only refreshes the hot copy."""
        data = orjson.dumps(rec, option=orjson.OPT_SERIALIZE_NUMPY)
        if self.pg is None and self.redis is None:
            with self._mem_lock:  # like the upsert: a final state is never overwritten
                old = self._mem.get(rec["id"])
                if old is None or orjson.loads(old)["status"] not in TERMINAL:
                    self._mem[rec["id"]] = data
            return
        if self.redis is not None:
            ttl = self.hot_ttl if self.pg is not None else self._redis_ttl(rec)
            try:
                await self.redis.set(self._key(rec["id"]), data, ex=ttl)
            except Exception as exc:
                if self.pg is None:
                    raise StoreUnavailable(f"Redis: {exc}") from None
                log.warning("workflow hot state not written to Redis: %s", exc)
        if self.pg is not None and durable:
            try:
                await self._commit.save(rec)
            except Exception as exc:
                raise StoreUnavailable(f"PostgreSQL: {exc}") from None

    def _redis_ttl(self, rec: Rec) -> int | None:
        if rec["status"] in TERMINAL and self.retention_s > 0:
            return max(1, int(self.retention_s))
        return None

    async def _pg_flush(self, recs: list[Rec]) -> None:
        args = [_row_args(r) for r in recs]

        async def run(pool: Any) -> None:
            async with pool.acquire() as conn, conn.cursor() as cur:
                values = ", ".join(cur.mogrify(_ROW, a).decode() for a in args)
                await cur.execute(_UPSERT.format(values=values))

        await self.pg.call("with_pool", run)

    async def request_cancel(self, wid: str) -> None:
        """Mark a workflow for cancellation wherever it runs (the holder finishes it)."""
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.set(f"{self.prefix}cancel:{wid}", b"1", ex=86_400)
        if self.pg is not None:
            async def run(pool: Any) -> None:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("UPDATE citadel_workflows SET cancel_requested = true,"
                                      " updated_at = now() WHERE id = %s", (wid,))
            try:
                await self.pg.call("with_pool", run)
            except Exception as exc:
                raise StoreUnavailable(f"PostgreSQL: {exc}") from None
        if self.pg is None and self.redis is None:
            with self._mem_lock:
                raw = self._mem.get(wid)
                if raw is not None:
                    rec = orjson.loads(raw)
                    rec["cancel_requested"] = True
                    self._mem[wid] = orjson.dumps(rec)

    async def cancel_flag(self, wid: str) -> bool:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                if await self.redis.exists(f"{self.prefix}cancel:{wid}"):
                    return True
        return False

    # ---- reads -------------------------------------------------------------------------------

    async def get(self, wid: str, fresh: bool = False) -> Rec | None:
        """The latest state; ``fresh`` skips the hot copy (the runner loading a claimed job)."""
        if self.pg is None and self.redis is None:
            with self._mem_lock:
                raw = self._mem.get(wid)
            return orjson.loads(raw) if raw is not None else None
        if self.redis is not None and not fresh:
            try:
                raw = await self.redis.get(self._key(wid))
            except Exception as exc:
                if self.pg is None:
                    raise StoreUnavailable(f"Redis: {exc}") from None
                raw = None
            if raw is not None:
                rec: Rec = orjson.loads(raw)
                if self.pg is None or rec["status"] in TERMINAL:
                    return rec
                if await self.cancel_flag(wid):
                    rec["cancel_requested"] = True
                return rec
        if self.pg is None:
            if fresh and self.redis is not None:
                raw = await self.redis.get(self._key(wid))
                return orjson.loads(raw) if raw is not None else None
            return None

        async def run(pool: Any) -> Any:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute("SELECT state, cancel_requested FROM citadel_workflows"
                                  " WHERE id = %s", (wid,))
                return await cur.fetchone()
        try:
            row = await self.pg.call("with_pool", run)
        except Exception as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None
        if row is None:
            return None
        state = row[0] if isinstance(row[0], dict) else orjson.loads(row[0])
        state["cancel_requested"] = bool(row[1]) or bool(state.get("cancel_requested"))
        return state  # type: ignore[no-any-return,unused-ignore]

    async def list_(self, *, status: str | None, owner: str | None, limit: int, offset: int
                   ) -> tuple[list[dict[str, Any]], int]:
        """Newest first: (summaries, total matching)."""
        if self.pg is not None:
            return await self._pg_list(status, owner, limit, offset)
        if self.redis is not None:
            try:
                ids = [i.decode() if isinstance(i, bytes) else i for i in
                       await self.redis.zrevrange(f"{self.prefix}index", 0, 9999)]
                raws = await self.redis.mget([self._key(i) for i in ids]) if ids else []
            except Exception as exc:
                raise StoreUnavailable(f"Redis: {exc}") from None
            recs = [orjson.loads(r) for r in raws if r is not None]
        else:
            with self._mem_lock:
                recs = [orjson.loads(r) for r in self._mem.values()]
            recs.sort(key=lambda r: r["created_at"], reverse=True)
        match = [r for r in recs if (status is None or r["status"] == status)
                 and (owner is None or r["owner"] == owner)]
        return [summary(r) for r in match[offset:offset + limit]], len(match)

    async def _pg_list(self, status: str | None, owner: str | None, limit: int, offset: int
                       ) -> tuple[list[dict[str, Any]], int]:
        where, args = ["TRUE"], []
        if status is not None:
            where.append("status = %s")
            args.append(status)
        if owner is not None:
            where.append("owner = %s")
            args.append(owner)
        cond = " AND ".join(where)

        async def run(pool: Any) -> Any:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"SELECT count(*) FROM citadel_workflows WHERE {cond}", args)
                total = (await cur.fetchone())[0]
                await cur.execute(
                    "SELECT id, name, owner, status, extract(epoch FROM created_at),"
                    " extract(epoch FROM updated_at), (state->>'started_at')::float8,"
                    " extract(epoch FROM finished_at), error, instance, steps_total, steps_done"
                    f" FROM citadel_workflows WHERE {cond} ORDER BY created_at DESC, id"
                    " LIMIT %s OFFSET %s", [*args, limit, offset])
                return total, await cur.fetchall()
        try:
            total, rows = await self.pg.call("with_pool", run)
        except Exception as exc:
            raise StoreUnavailable(f"PostgreSQL: {exc}") from None
        out = []
        for (wid, name, own, st, created, updated, started, finished, error, inst, n,
             done) in rows:
            out.append({"id": wid, "name": name, "owner": own, "status": st,
                        "created_at": float(created), "updated_at": float(updated),
                        "started_at": started, "finished_at": float(finished) if finished
                        else None, "error": error, "instance": inst,
                        "progress": {"total": n, "completed": done},
                        "status_url": f"/api/v1/workflows/{wid}"})
        return out, int(total)

    async def unfinished(self, limit: int = 10_000) -> list[str]:
        """Ids of workflows not finished (for re-enqueueing after a restart or Redis loss)."""
        if self.pg is not None:
            async def run(pool: Any) -> Any:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute("SELECT id FROM citadel_workflows WHERE finished_at IS NULL"
                                      " ORDER BY created_at LIMIT %s", (limit,))
                    return await cur.fetchall()
            return [r[0] for r in await self.pg.call("with_pool", run)]
        if self.redis is None:
            with self._mem_lock:
                recs = [orjson.loads(r) for r in self._mem.values()]
            return [r["id"] for r in sorted(recs, key=lambda r: r["created_at"])
                    if r["status"] not in TERMINAL][:limit]
        return []

    async def prune(self, chunk: int = 5000) -> int:
        """Drop finished workflows older than the retention (PostgreSQL; memory)."""
        if self.retention_s <= 0:
            return 0
        if self.pg is not None:
            async def run(pool: Any) -> int:
                async with pool.acquire() as conn, conn.cursor() as cur:
                    await cur.execute(
                        "DELETE FROM citadel_workflows WHERE id = ANY(ARRAY(SELECT id FROM"
                        " citadel_workflows WHERE finished_at IS NOT NULL AND finished_at <"
                        " now() - make_interval(secs => %s) LIMIT %s))",
                        (self.retention_s, chunk))
                    return int(cur.rowcount)
            n: int = await self.pg.call("with_pool", run)
            return n
        import time
        if self.redis is not None:  # Redis only: states expire by TTL; trim the list index
            removed: int = await self.redis.zremrangebyscore(
                f"{self.prefix}index", 0, time.time() - self.retention_s - 86_400)
            return removed
        if self.redis is None:
            cutoff = time.time() - self.retention_s
            with self._mem_lock:
                old = [k for k, v in self._mem.items()
                       if (r := orjson.loads(v))["finished_at"] and r["finished_at"] < cutoff]
                for k in old:
                    del self._mem[k]
            return len(old)
        return 0
