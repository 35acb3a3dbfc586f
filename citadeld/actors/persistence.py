"""PostgreSQL: a supervised PersistenceActor (aiopg pool on the actor's private loop) and the
loop-side Persistence facade.

The actor handles one message at a time on its own event loop, so the front's loop never waits
on PostgreSQL; schema migrations run on the first successful connection (never in ``on_start``,
so a PostgreSQL outage at start-up does not fail the daemon). The facade

* buffers audit, health-history and task rows in memory and writes them in batches; during an
  outage the buffer is bounded: past ``buffer_max_rows`` the oldest rows spill to a local file
  (``SpillFile``), past ``spill_max_bytes`` they are dropped and counted - never silently;
* offers the vector outbox (append, fetch, mark done, status) to the durability logic;
* prunes old rows in bounded chunks (retention), probes PostgreSQL for /health and metrics.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pykka

from citadeld.actors.facade import ActorFacade
from citadeld.bridge import claim, fail_queued, reject, resolve
from citadeld.health import HealthState
from citadeld.storage import migrations
from citadeld.storage.config import PersistenceConfig
from citadeld.storage.metrics import StorageMetrics
from citadeld.storage.spill import Row, SpillFile
from citadeld.supervision import ChildLink, ChildSpec, SupervisedActor

log = logging.getLogger("citadeld.persistence")


class PersistenceUnavailable(Exception):
    """PostgreSQL could not be reached, dropped the connection or did not answer in time."""


class PersistenceError(Exception):
    """PostgreSQL refused a statement (a bug or bad data, not an outage)."""


# kind -> (table, columns, VALUES template); "at" is epoch seconds, json columns are Json()
_ROW_TABLES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "audit": ("citadel_audit_log",
              ("at", "instance", "action", "target", "request_id", "status", "detail",
               "principal", "role", "method", "path", "latency_ms", "client", "body_sha256"),
              "(to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"),
    "health": ("citadel_health_history",
               ("at", "instance", "dependency", "status", "latency_ms", "error"),
               "(to_timestamp(%s), %s, %s, %s, %s, %s)"),
    "task": ("citadel_task_log",
             ("at", "instance", "task_id", "kind", "status", "duration_ms", "error", "detail"),
             "(to_timestamp(%s), %s, %s, %s, %s, %s, %s, %s)"),
}
_JSON_COLUMNS = frozenset({"detail"})
#: An audit row may come as a list in this order, as that list already encoded to JSON (an
#: ``orjson.Fragment``: the request trail's, built at request rate) or as a dict with these keys
#: (the domain rows, older spill files).
AUDIT_FIELDS = ("at", "action", "target", "request_id", "status", "principal", "role", "method",
                "path", "latency_ms", "client", "body_sha256", "detail")
# Audit rows arrive at request rate: one JSON array of arrays per batch, serialised by orjson
# (well under 1 us a row) instead of psycopg2's mogrify (~20 us a row on the actor thread,
# holding the GIL the loop needs). Arrays instead of objects also cut PostgreSQL's parsing:
# it reads each field by position instead of by key. The array goes into the statement as a
# dollar-quoted literal (see _dollar_quoted): libpq's escaping pass over a parameter cost more
# than the encoding itself.
_AUDIT_INSERT_HEAD = (
    "INSERT INTO citadel_audit_log (at, instance, action, target, request_id, status, detail,"
    " principal, role, method, path, latency_ms, client, body_sha256)"
    " SELECT to_timestamp((r->>0)::float8), ")
_AUDIT_INSERT_MID = (
    ", r->>1, r->>2, r->>3, (r->>4)::integer,"
    " coalesce(nullif(r->12, 'null'::jsonb), '{}'::jsonb), r->>5, r->>6, r->>7, r->>8,"
    " (r->>9)::real, r->>10, r->>11 FROM jsonb_array_elements(")
_AUDIT_INSERT_TAIL = "::jsonb) AS r"
_AUDIT_INSERT = _AUDIT_INSERT_HEAD + "%s" + _AUDIT_INSERT_MID + "%s" + _AUDIT_INSERT_TAIL
_AUDIT_HEAD_B, _AUDIT_MID_B, _AUDIT_TAIL_B = (
    x.encode() for x in (_AUDIT_INSERT_HEAD, _AUDIT_INSERT_MID, _AUDIT_INSERT_TAIL))


def _dollar_quoted(data: bytes) -> bytes:
    """``data`` as a PostgreSQL dollar-quoted string literal, which the server takes verbatim:
    no escaping pass over it here. Safe for any content because the tag is chosen so that it
    does not occur in ``data`` (the literal ends only at the tag). ``data`` must be text in the
    connection's encoding without NUL bytes (orjson output is UTF-8 and escapes control
    characters)."""
    tag = b"$j$"
    n = 0
    while tag in data:
        n += 1
        tag = b"$j%d$" % n
    return tag + data + tag


def audit_list(row: dict[str, Any] | list[Any] | orjson.Fragment) -> list[Any] | orjson.Fragment:
    """An audit row in the list form of :data:`AUDIT_FIELDS` (encoded rows stay encoded)."""
    if isinstance(row, dict):
        return [row.get(k) for k in AUDIT_FIELDS]
    return row


# table -> (time column, extra condition) for retention
PRUNE: dict[str, tuple[str, str, str]] = {
    "audit_days": ("citadel_audit_log", "at", "TRUE"),
    "health_days": ("citadel_health_history", "at", "TRUE"),
    "task_log_days": ("citadel_task_log", "at", "TRUE"),
    "outbox_days": ("citadel_vector_outbox", "done_at", "status <> 'pending'"),
    "workflow_days": ("citadel_workflow_state", "finished_at", "finished_at IS NOT NULL"),
}


@dataclass(slots=True)
class _Msg:
    op: str
    future: concurrent.futures.Future[Any]
    arg: Any = None
    deadline: float = math.inf


@dataclass(slots=True)
class OutboxRow:
    seq: int
    body: dict[str, Any]
    created_at: float


def _is_outage(exc: BaseException) -> bool:
    import psycopg2

    return isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError | TimeoutError
                      | OSError | ConnectionError)


class PersistenceActor(SupervisedActor):
    def __init__(self, *, cfg: PersistenceConfig, instance: str, link: ChildLink | None = None
                 ) -> None:
        super().__init__(link=link)
        self.cfg = cfg
        self.instance = instance
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: Any = None
        self.schema_version: int | None = None
        self._instance_sql: bytes | None = None  # self.instance as an SQL literal

    def on_start_supervised(self) -> None:
        self.loop = asyncio.new_event_loop()  # private: never the front's loop

    def on_receive_supervised(self, message: Any) -> Any:
        if not isinstance(message, _Msg):
            return super().on_receive_supervised(message)
        fut = message.future
        if not claim(fut):
            return None
        if time.monotonic() > message.deadline:
            reject(fut, PersistenceUnavailable("stale request: its caller has given up"))
            return None
        self.current_work = message
        assert self.loop is not None
        handler = getattr(self, f"_op_{message.op}")
        budget = max(0.1, min(message.deadline - time.monotonic(), 3600.0))
        try:
            result = self.loop.run_until_complete(
                asyncio.wait_for(self._run(handler, message.arg), budget))
            resolve(fut, result)
        except Exception as exc:
            if _is_outage(exc):
                reject(fut, PersistenceUnavailable(f"{type(exc).__name__}: {exc}".strip()))
            else:
                log.error("PostgreSQL refused %s: %r", message.op, exc)
                reject(fut, PersistenceError(f"{type(exc).__name__}: {exc}"))
        return None

    async def _run(self, handler: Callable[[Any], Awaitable[Any]], arg: Any) -> Any:
        """Run ``handler``; a connection lost at the start of its work is retried once on a
        fresh connection (every operation here is idempotent or harmless to repeat)."""
        try:
            await self._ready()
            return await handler(arg)
        except Exception as exc:
            if not _is_outage(exc) or isinstance(exc, TimeoutError):
                raise
            await self._reset_pool()
            await self._ready()
            return await handler(arg)

    async def _ready(self) -> None:
        if self.pool is None:
            import aiopg

            self.pool = await aiopg.create_pool(
                self.cfg.dsn, minsize=self.cfg.pool_min, maxsize=self.cfg.pool_max,
                timeout=self.cfg.timeout_s, enable_hstore=False, enable_uuid=False,
                connect_timeout=max(1, math.ceil(self.cfg.connect_timeout_s)),
                application_name=f"citadeld:{self.instance}"[:63], pool_recycle=300)
        if self.schema_version is None:
            async with self.pool.acquire() as conn:
                applied = await migrations.migrate(conn)
            if applied:
                log.info("schema migrated", extra={"versions": [m.version for m in applied]})
            self.schema_version = migrations.latest_version()

    async def _reset_pool(self) -> None:
        pool, self.pool = self.pool, None
        self._instance_sql = None
        if pool is not None:
            pool.terminate()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pool.wait_closed(), 2)

    def fail_in_hand(self, exc: BaseException) -> None:
        work, self.current_work = self.current_work, None
        fail_queued(self, work, _Msg, exc)
        loop, self.loop = self.loop, None
        if loop is not None and not loop.is_closed():
            if self.pool is not None:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(self._reset_pool())
            loop.close()

    def on_stop(self) -> None:
        self.fail_in_hand(pykka.ActorDeadError("persistence actor stopped"))
        super().on_stop()

    # -- operations (actor thread, private loop) --

    async def _op_ping(self, _: Any) -> dict[str, Any]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("SELECT 1")
            await cur.fetchone()
        return {"size": self.pool.size, "free": self.pool.freesize,
                "max": self.pool.maxsize, "schema_version": self.schema_version}

    async def _op_with_pool(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run another module's statements on this actor's pool and loop (API keys, audit
        queries, workflows), so their SQL lives with them and shares this pool, its retries and
        its health; ``fn`` must be safe to run twice (see _run)."""
        return await fn(self.pool)

    async def _op_rows(self, rows: list[Row]) -> dict[str, int]:
        import psycopg2.extras

        by_kind: dict[str, list[Any]] = {}
        for kind, row in rows:
            if kind in _ROW_TABLES:
                by_kind.setdefault(kind, []).append(row)
        counts: dict[str, int] = {}
        if list(by_kind) == ["audit"]:  # the common batch: one statement, atomic on its own
            items = by_kind["audit"]
            # lists and encoded rows (the request trail's) go as they are; no call per row
            data = orjson.dumps([audit_list(r) if type(r) is dict else r for r in items],
                                default=str, option=orjson.OPT_SERIALIZE_NUMPY)
            async with self.pool.acquire() as conn, conn.cursor() as cur:
                if conn.raw.encoding in ("UTF8", "UNICODE"):  # orjson: UTF-8, never a raw NUL
                    if self._instance_sql is None:
                        self._instance_sql = cur.mogrify("%s", (self.instance,))
                    await cur.execute(b"".join((
                        _AUDIT_HEAD_B, self._instance_sql, _AUDIT_MID_B, _dollar_quoted(data),
                        _AUDIT_TAIL_B)))
                else:  # another client encoding: let psycopg2 convert and escape
                    await cur.execute(_AUDIT_INSERT, (self.instance, data.decode()))
            return {"citadel_audit_log": len(items)}
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute("BEGIN")
            try:
                for kind, items in by_kind.items():
                    table, cols, template = _ROW_TABLES[kind]
                    if kind == "audit":  # the hot one (a row per request): one JSON parameter
                        await cur.execute(_AUDIT_INSERT, (
                            self.instance, _json_dumps([audit_list(r) for r in items])))
                        counts[table] = len(items)
                        continue
                    values = []
                    for row in items:
                        args = []
                        for c in cols:
                            v = self.instance if c == "instance" and not row.get(c) else row.get(c)
                            if c in _JSON_COLUMNS:
                                v = psycopg2.extras.Json(v or {}, dumps=_json_dumps)
                            args.append(v)
                        values.append(cur.mogrify(template, args).decode())
                    await cur.execute(
                        f"INSERT INTO {table} ({', '.join(cols)}) VALUES {', '.join(values)}")
                    counts[table] = len(items)
                await cur.execute("COMMIT")
            except BaseException:
                if not conn.closed:
                    with contextlib.suppress(Exception):
                        await cur.execute("ROLLBACK")
                raise
        return counts

    async def _op_outbox_append(self, arg: tuple[list[dict[str, Any]], str | None]) -> list[int]:
        items, request_id = arg
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            values = [
                cur.mogrify("(%s, %s, %s, %s, %s::jsonb, %s)", (
                    self.instance, b["collection"], b["kind"], len(b["points"]),
                    _json_dumps(b), request_id)).decode()
                for b in items
            ]
            # one statement: atomic, and RETURNING gives the seqs in VALUES order
            await cur.execute(
                "INSERT INTO citadel_vector_outbox (origin, collection, kind, items, body,"
                f" request_id) VALUES {', '.join(values)} RETURNING seq")
            return [int(r[0]) for r in await cur.fetchall()]

    async def _op_outbox_fetch(self, limit: int) -> list[OutboxRow]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT seq, body, extract(epoch FROM created_at) FROM citadel_vector_outbox"
                " WHERE origin = %s AND status = 'pending' ORDER BY seq LIMIT %s",
                (self.instance, limit))
            rows = await cur.fetchall()
        return [OutboxRow(int(s), b if isinstance(b, dict) else orjson.loads(b), float(t))
                for s, b, t in rows]

    async def _op_outbox_done(self, arg: tuple[list[int], dict[int, str]]) -> int:
        applied, failed = arg
        n = 0
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            if applied:
                await cur.execute(
                    "UPDATE citadel_vector_outbox SET status = 'applied', done_at = now(),"
                    " attempts = attempts + 1 WHERE seq = ANY(%s) AND status = 'pending'",
                    (applied,))
                n += cur.rowcount
            for seq, error in failed.items():
                await cur.execute(
                    "UPDATE citadel_vector_outbox SET status = 'failed', done_at = now(),"
                    " attempts = attempts + 1, last_error = %s"
                    " WHERE seq = %s AND status = 'pending'", (error[:2000], seq))
                n += cur.rowcount
        return n

    async def _op_outbox_stats(self, collection: str | None) -> tuple[int, float | None]:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            if collection is None:
                await cur.execute(
                    "SELECT count(*), extract(epoch FROM min(created_at))"
                    " FROM citadel_vector_outbox WHERE origin = %s AND status = 'pending'",
                    (self.instance,))
            else:
                await cur.execute(
                    "SELECT count(*), extract(epoch FROM min(created_at))"
                    " FROM citadel_vector_outbox WHERE origin = %s AND status = 'pending'"
                    " AND collection = %s", (self.instance, collection))
            count, oldest = await cur.fetchone()
        return int(count), (float(oldest) if oldest is not None else None)

    async def _op_outbox_status(self, seq: int) -> dict[str, Any] | None:
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                "SELECT seq, collection, kind, items, status, attempts, last_error,"
                " extract(epoch FROM created_at), extract(epoch FROM done_at), request_id"
                " FROM citadel_vector_outbox WHERE seq = %s", (seq,))
            row = await cur.fetchone()
        if row is None:
            return None
        keys = ("operation", "collection", "kind", "items", "status", "attempts", "error",
                "created_at", "done_at", "request_id")
        out = dict(zip(keys, row, strict=True))
        for k in ("created_at", "done_at"):
            out[k] = float(out[k]) if out[k] is not None else None
        out["status"] = "queued" if out["status"] == "pending" else out["status"]
        return out

    async def _op_prune(self, arg: tuple[str, str, str, float, int]) -> int:
        table, column, cond, days, chunk = arg
        async with self.pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table}"
                f" WHERE {cond} AND {column} < now() - make_interval(secs => %s) LIMIT %s))",
                (days * 86400.0, chunk))
            return int(cur.rowcount)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class Persistence(ActorFacade):
    """Loop-side facade of the PersistenceActor (see the module docstring)."""

    label = "persistence actor"

    def __init__(self, cfg: PersistenceConfig, state_dir: str, metrics: StorageMetrics,
                 health: HealthState | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.health = health
        self.instance = cfg.instance or socket.gethostname()
        spill_dir = cfg.spill_path or os.path.join(state_dir, "spill")
        self.spill = SpillFile(spill_dir, cfg.spill_max_bytes)
        self.metrics.spilled_rows.set(self.spill.rows)
        self.metrics.pool_max.set(cfg.pool_max)
        self.buffer: deque[Row] = deque()
        # read at scrape time: no gauge update (and its lock) per buffered row
        self.metrics.buffered_rows.set_function(lambda: len(self.buffer))
        # rows per INSERT; at most half the buffer, so that a full batch is written before
        # the buffer would spill with PostgreSQL up
        self._batch = min(cfg.batch_rows, max(1, cfg.buffer_max_rows // 2))
        self.up: bool | None = None  # None: not probed yet
        self.last_error: str | None = None
        self.latency_ms: float | None = None
        self.pool_stats: dict[str, Any] = {}
        super().__init__()
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._spilling: set[asyncio.Future[Any]] = set()
        self._flush_lock = asyncio.Lock()
        self.closed = False

    # -- actor wiring --

    def child_spec(self, name: str = "persistence") -> ChildSpec:
        return ChildSpec(
            name=name, on_started=self.set_actor_ref, on_died=self.actor_died,
            start=lambda link: PersistenceActor.start(cfg=self.cfg, instance=self.instance,
                                                      link=link),
            ping_interval=5.0, ping_timeout=self.cfg.timeout_s * 3 + 10.0,
            shutdown_timeout=self.cfg.timeout_s + 5.0)

    def died_error(self, exc: BaseException | None) -> BaseException:
        return PersistenceUnavailable(f"persistence actor died: {exc!r}")

    def start_actor(self) -> pykka.ActorRef[Any]:
        return PersistenceActor.start(cfg=self.cfg, instance=self.instance)

    async def call(self, op: str, arg: Any = None, wait_s: float | None = None) -> Any:
        # a message may wait behind others and may retry once: allow for both
        limit = wait_s if wait_s is not None else self.cfg.timeout_s * 2 + \
            self.cfg.connect_timeout_s * 2
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._actor is None and not self.closed:  # not started yet: no verdict on PostgreSQL
            raise PersistenceUnavailable("persistence is starting")
        self._inflight.add(cf)
        t0 = time.perf_counter()
        try:
            if self.closed:
                raise PersistenceUnavailable("persistence is closed")
            if self._actor is None:
                raise PersistenceUnavailable("persistence actor is not running")
            try:
                self._actor.tell(_Msg(op, cf, arg, time.monotonic() + limit))
            except pykka.ActorDeadError as exc:
                raise PersistenceUnavailable(f"persistence actor is not running: {exc}") from None
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(cf), limit)
            except TimeoutError:
                raise PersistenceUnavailable(f"no answer from PostgreSQL within {limit} s"
                                             ) from None
            except pykka.ActorDeadError as exc:
                raise PersistenceUnavailable(f"persistence actor died: {exc}") from None
        except PersistenceUnavailable as exc:
            self._down(str(exc))
            raise
        finally:
            self._inflight.discard(cf)
        self.metrics.pg_op.labels(op).observe(time.perf_counter() - t0)
        self._up()
        return result

    def _down(self, error: str) -> None:
        if self.up is not False:
            log.warning("PostgreSQL unavailable: %s", error)
        self.up, self.last_error = False, error

    def _up(self) -> None:
        if self.up is False:
            log.info("PostgreSQL recovered")
            self._wake.set()
        self.up, self.last_error = True, None

    # -- buffered rows --

    def record(self, kind: str, row: dict[str, Any] | list[Any] | orjson.Fragment) -> None:
        """Queue an audit/health/task row (an audit row may be a list or an encoded one, see
        AUDIT_FIELDS); never blocks, never raises. Called at request rate: an append and a
        length check."""
        if isinstance(row, dict):
            row.setdefault("at", time.time())
        buffer = self.buffer
        buffer.append((kind, row))
        if len(buffer) >= self._batch:
            if len(buffer) > self.cfg.buffer_max_rows:
                self._overflow()
            else:
                self._wake.set()

    def audit(self, action: str, target: str | None, request_id: str | None, status: int,
              **detail: Any) -> None:
        self.record("audit", {"action": action, "target": target, "request_id": request_id,
                              "status": status, "detail": detail})

    def log_task(self, task_id: str, kind: str, status: str, *, duration_ms: float | None = None,
                 error: str | None = None, **detail: Any) -> None:
        self.record("task", {"task_id": task_id, "kind": kind, "status": status,
                             "duration_ms": duration_ms, "error": error, "detail": detail})

    def _overflow(self) -> None:
        """Move the oldest half of the buffer to the spill file (in a worker thread)."""
        n = len(self.buffer) - self.cfg.buffer_max_rows // 2
        rows = [self.buffer.popleft() for _ in range(n)]
        self._spill_rows(rows)

    def _spill_rows(self, rows: list[Row]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, self.spill.append, rows)
        self._spilling.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._spilling.discard(f)
            written, dropped = (0, len(rows)) if f.cancelled() or f.exception() else f.result()
            self.metrics.spill_total.inc(written)
            if dropped:
                self.metrics.dropped_rows.labels("spill_full").inc(dropped)
                log.error("dropped %d audit/health rows: the spill file is full", dropped)
            self.metrics.spilled_rows.set(self.spill.rows)
        fut.add_done_callback(done)
        return fut

    async def flush(self, drain: bool = True) -> bool:
        """Write spilled rows, then buffered ones; False when PostgreSQL is away (kept).

        ``drain=False`` (the flusher, woken by a full batch) writes full batches only and
        leaves a remainder for the next round: draining to the last row sent a train of
        small INSERTs (as many rows as arrived during the previous round trip), whose fixed
        cost per statement - on the actor thread, the GIL and PostgreSQL - came to several
        microseconds per row at request rates."""
        async with self._flush_lock:
            return await self._flush(drain)

    async def _flush(self, drain: bool = True) -> bool:
        loop = asyncio.get_running_loop()
        batch = self._batch
        if self._spilling:
            await asyncio.gather(*list(self._spilling), return_exceptions=True)
        # the spill files are looked at on every draining round (at least once per flush
        # interval); between those, only when rows are known to wait there
        replay = drain or self.spill.rows > 0
        path = await loop.run_in_executor(None, self.spill.take) if replay else None
        while path is not None:
            rows, bad = await loop.run_in_executor(None, SpillFile.read, path)
            if bad:
                self.metrics.dropped_rows.labels("torn_spill_line").inc(bad)
                log.warning("skipped %d unreadable lines of %s", bad, path)
            sent = 0
            try:
                while sent < len(rows):
                    await self._write_rows(rows[sent:sent + batch])
                    sent += min(batch, len(rows) - sent)
            except (PersistenceUnavailable, PersistenceError):
                if sent:  # keep only what is left, so nothing is written twice
                    await loop.run_in_executor(None, _rewrite, path, rows[sent:])
                    self.spill.rows = max(0, self.spill.rows - sent)
                self.metrics.spilled_rows.set(self.spill.rows)
                return False
            await loop.run_in_executor(None, self.spill.done, path, len(rows) + bad)
            self.metrics.spilled_rows.set(self.spill.rows)
            log.info("replayed %d spilled rows", len(rows))
            path = await loop.run_in_executor(None, self.spill.take)
        while self.buffer and (drain or len(self.buffer) >= batch):
            rows = [self.buffer.popleft() for _ in range(min(batch, len(self.buffer)))]
            try:
                await self._write_rows(rows)
            except (PersistenceUnavailable, PersistenceError) as exc:
                self.buffer.extendleft(reversed(rows))
                if isinstance(exc, PersistenceError):
                    log.error("PostgreSQL refused %d rows; keeping them: %s", len(rows), exc)
                return False
        return True

    async def _write_rows(self, rows: list[Row]) -> None:
        counts = await self.call("rows", rows)
        for table, n in counts.items():
            self.metrics.rows_written.labels(table).inc(n)

    async def _flusher(self) -> None:
        while not self.closed:
            woken = False
            with contextlib.suppress(TimeoutError):
                woken = await asyncio.wait_for(self._wake.wait(), self.cfg.flush_interval_s)
            self._wake.clear()
            if self.up is False and not self.buffer and self.spill.rows == 0:
                continue
            try:
                # woken: a full batch waits (or PostgreSQL is back); the interval: write all
                ok = await self.flush(drain=not woken)
            except Exception:
                log.exception("flush failed")
                ok = False
            if not ok:
                await asyncio.sleep(min(5.0, self.cfg.flush_interval_s * 2))

    # -- outbox --

    async def outbox_append(self, bodies: list[dict[str, Any]], request_id: str | None
                            ) -> list[int]:
        seqs: list[int] = await self.call("outbox_append", (bodies, request_id))
        self.metrics.outbox_ops.labels("queued").inc(len(seqs))
        return seqs

    async def outbox_fetch(self, limit: int) -> list[OutboxRow]:
        rows: list[OutboxRow] = await self.call("outbox_fetch", limit)
        return rows

    async def outbox_done(self, applied: list[int], failed: dict[int, str]) -> None:
        await self.call("outbox_done", (applied, failed))
        if applied:
            self.metrics.outbox_ops.labels("applied").inc(len(applied))
        if failed:
            self.metrics.outbox_ops.labels("failed").inc(len(failed))

    async def outbox_stats(self, collection: str | None = None) -> tuple[int, float | None]:
        stats: tuple[int, float | None] = await self.call("outbox_stats", collection)
        return stats

    async def outbox_status(self, seq: int) -> dict[str, Any] | None:
        status: dict[str, Any] | None = await self.call("outbox_status", seq)
        return status

    # -- background work --

    async def probe(self) -> bool | None:
        """Ping PostgreSQL; None while the actor has not started (no verdict yet)."""
        if self._actor is None:
            return None
        t0 = time.perf_counter()
        try:
            stats = await self.call("ping", wait_s=self.cfg.timeout_s + self.cfg.connect_timeout_s
                                    + 1)
        except (PersistenceUnavailable, PersistenceError) as exc:
            self.latency_ms = None
            if isinstance(exc, PersistenceError):
                self._down(str(exc))
            ok = False
        else:
            self.latency_ms = (time.perf_counter() - t0) * 1000
            self.pool_stats = stats
            in_use = stats["size"] - stats["free"]
            self.metrics.pool.labels("in_use").set(in_use)
            self.metrics.pool.labels("idle").set(stats["free"])
            ok = True
        if self.health is not None:
            self.health.set("postgres", ok, self.latency_ms, self.last_error,
                            pool=self.pool_stats or None, instance=self.instance)
        return ok

    async def _health_history(self) -> None:
        while not self.closed:
            await asyncio.sleep(self.cfg.health_history_interval_s)
            if self.health is None:
                continue
            now = time.time()
            for name, dep in self.health.all().items():
                self.record("health", {"at": now, "dependency": name, "status": dep["status"],
                                       "latency_ms": dep.get("latency_ms"),
                                       "error": dep.get("error")})

    async def prune_once(self) -> dict[str, int]:
        """One retention round: every table in bounded chunks; returns rows removed."""
        r = self.cfg.retention
        out: dict[str, int] = {}
        for key, (table, column, cond) in PRUNE.items():
            days = float(getattr(r, key))
            if days <= 0:
                continue
            total = 0
            for _ in range(1000):  # at most 1000 chunks per round; the next round goes on
                n = int(await self.call("prune", (table, column, cond, days, r.prune_chunk)))
                total += n
                if n < r.prune_chunk:
                    break
                await asyncio.sleep(0)  # let other messages interleave
            if total:
                self.metrics.pruned_rows.labels(table).inc(total)
                log.info("pruned %d rows from %s", total, table)
            out[table] = total
        return out

    async def _pruner(self) -> None:
        await asyncio.sleep(min(60.0, self.cfg.retention.prune_interval_s))
        while not self.closed:
            try:
                await self.prune_once()
            except (PersistenceUnavailable, PersistenceError) as exc:
                log.info("retention pruning skipped: %s", exc)
            except Exception:
                log.exception("retention pruning failed")
            await asyncio.sleep(self.cfg.retention.prune_interval_s)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._flusher(), name="persistence-flusher"),
                       loop.create_task(self._pruner(), name="persistence-pruner"),
                       loop.create_task(self._health_history(), name="health-history")]

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush what PostgreSQL will take in ``flush_timeout``; spill the rest to disk, so a
        clean shutdown loses no row."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        if self.up is not False and (self.buffer or self.spill.rows):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), flush_timeout)
        self.closed = True
        if self._spilling:
            await asyncio.gather(*list(self._spilling), return_exceptions=True)
        if self.buffer:
            rows = list(self.buffer)
            self.buffer.clear()
            await self._spill_rows(rows)
            log.info("spilled %d unwritten rows to %s at shutdown", len(rows), self.spill.path)
        self.actor_died(RuntimeError("persistence closed"))
        await self.release_actor(wait_s=10)


def _rewrite(path: Path, rows: list[Row]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for kind, row in rows:
            f.write(orjson.dumps({"k": kind, "r": row}, default=str) + b"\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
