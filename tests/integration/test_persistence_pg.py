"""PersistenceActor and its facade against real PostgreSQL: migrations under the advisory lock,
batched rows, retention, outbox; outages of a throwaway server (buffer, spill,
replay) and connections dropped mid-transaction."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import psycopg2
import pytest

from citadeld.actors.persistence import AUDIT_FIELDS, Persistence, PersistenceUnavailable
from citadeld.storage import migrations
from citadeld.storage.config import PersistenceConfig, RetentionConfig
from citadeld.storage.metrics import StorageMetrics
from citadeld.storage.spill import SpillFile
from tests.support.pg import (
    ThrowawayPostgres,
    binaries_available,
    shared_available,
    temp_database,
)

pytestmark = pytest.mark.skipif(not shared_available(), reason="PostgreSQL at 127.0.0.1:5432")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def dsn() -> Iterator[str]:
    with temp_database() as d:
        yield d


def q(dsn: str, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


@asynccontextmanager
async def persistence(tmp_path: Path, dsn: str, **kw: Any) -> AsyncIterator[Persistence]:
    kw.setdefault("flush_interval_s", 0.05)
    cfg = PersistenceConfig(dsn=dsn, instance="t", timeout_s=2, connect_timeout_s=1, **kw)
    p = Persistence(cfg, str(tmp_path), StorageMetrics())
    p.start_unsupervised()
    p.start()
    try:
        yield p
    finally:
        await p.close(flush_timeout=5)


async def wait_until(pred: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await pred() if asyncio.iscoroutinefunction(pred) else pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


# ---- migrations ----------------------------------------------------------------------------


def test_concurrent_migrate_commands_migrate_once(dsn: str) -> None:
    """Three `citadeld migrate` processes at once: one applies, the others find it done."""
    procs = [subprocess.Popen([sys.executable, "-m", "citadeld.main", "migrate", "--dsn", dsn],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    applied = [o for o, _ in outs if "applied migration 1" in o]
    assert len(applied) == 1, outs
    rows = q(dsn, "SELECT version FROM citadel_schema_migrations")
    assert rows == [(v,) for v in range(1, migrations.latest_version() + 1)]
    again = subprocess.run([sys.executable, "-m", "citadeld.main", "migrate", "--dsn", dsn],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_migrate_dry_run_prints_sql_and_changes_nothing(dsn: str) -> None:
    out = subprocess.run([sys.executable, "-m", "citadeld.main", "migrate", "--dsn", dsn,
                          "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "CREATE TABLE citadel_vector_outbox" in out.stdout
    assert q(dsn, "SELECT to_regclass('citadel_schema_migrations')") == [(None,)]


async def test_daemons_starting_together_migrate_once(tmp_path: Path, dsn: str) -> None:
    async with persistence(tmp_path / "a", dsn) as a, persistence(tmp_path / "b", dsn) as b:
        results = await asyncio.gather(a.probe(), b.probe())
        assert results == [True, True]
    assert q(dsn, "SELECT count(*) FROM citadel_schema_migrations") == [
        (len(migrations.MIGRATIONS),)]


# ---- rows, retention, outbox ---------------------------------------------------------


async def test_rows_are_batched_and_pruned(tmp_path: Path, dsn: str) -> None:
    ret = RetentionConfig(audit_days=1, health_days=1, task_log_days=1, outbox_days=1,
                          prune_chunk=7)
    async with persistence(tmp_path, dsn, retention=ret, batch_rows=50) as p:
        for i in range(120):
            p.audit("vectors.store", "default", f"rid-{i}", 200, items=i)
        p.record("health", {"dependency": "qdrant", "status": "ok", "latency_ms": 1.5})
        p.log_task("t1", "workflow", "succeeded", duration_ms=12.0)
        await wait_until(lambda: not p.buffer)
        await p.flush()
        assert q(dsn, "SELECT count(*) FROM citadel_audit_log") == [(120,)]
        assert q(dsn, "SELECT dependency, status FROM citadel_health_history") == [
            ("qdrant", "ok")]
        assert q(dsn, "SELECT task_id, status FROM citadel_task_log") == [("t1", "succeeded")]
        old = time.time() - 3 * 86400
        for i in range(30):
            p.record("audit", {"action": "old", "at": old, "status": 200})
            p.record("audit", {"action": "old", "at": old - i, "status": 200, "detail": {}})
        await p.flush()
        assert q(dsn, "SELECT count(*) FROM citadel_audit_log WHERE action = 'old'") == [(60,)]
        removed = await p.prune_once()
        assert removed["citadel_audit_log"] == 60
        assert q(dsn, "SELECT count(*) FROM citadel_audit_log") == [(120,)]


async def test_a_steady_stream_is_written_in_full_batches(tmp_path: Path, dsn: str) -> None:
    """Rows arriving while a batch is in flight wait for the next full batch instead of
    following as a train of small INSERTs (the per-statement cost dominated at request rate);
    the flush interval still drains the remainder."""
    async with persistence(tmp_path, dsn, batch_rows=50, flush_interval_s=30) as p:
        sizes: list[int] = []
        write = p._write_rows

        async def spy(rows: list[Any]) -> None:
            sizes.append(len(rows))
            await write(rows)
        p._write_rows = spy  # type: ignore[method-assign]
        for i in range(120):
            p.record("audit", [time.time(), "http", None, f"rid-{i}", 200, None, None, "GET",
                               "/x", 1.0, None, None, None])
        assert await p.flush(drain=False)
        assert sizes == [50, 50] and len(p.buffer) == 20
        sizes.clear()
        for i in range(2000):  # a steady stream while the flusher runs
            p.record("audit", [time.time(), "http", None, f"s-{i}", 200, None, None, "GET",
                               "/x", 1.0, None, None, None])
            if i % 10 == 9:
                await asyncio.sleep(0.001)
        await wait_until(lambda: len(p.buffer) < 50)
        assert sizes and set(sizes) == {50}, sizes
        await p.flush()  # what the interval (or shutdown) does: everything
        assert not p.buffer
        assert q(dsn, "SELECT count(*) FROM citadel_audit_log") == [(2120,)]


async def test_batches_fit_a_small_buffer(tmp_path: Path, dsn: str) -> None:
    """A buffer smaller than batch_rows: batches shrink to half the buffer, so a stream with
    PostgreSQL up is written, not spilled while waiting for a batch that could never fill."""
    async with persistence(tmp_path, dsn, batch_rows=2000, buffer_max_rows=100,
                           flush_interval_s=30) as p:
        for i in range(300):  # ~250 rows/s: a 50-row batch has 200 ms to reach PostgreSQL
            p.record("audit", [time.time(), "http", None, f"b-{i}", 200, None, None, "GET",
                               "/x", 1.0, None, None, None])
            if i % 5 == 4:
                await asyncio.sleep(0.02)
        await wait_until(lambda: len(p.buffer) < 50)
        assert p.spill.rows == 0
        await p.flush()
        assert q(dsn, "SELECT count(*) FROM citadel_audit_log") == [(300,)]


async def test_request_rows_as_lists_with_dict_rows_and_spilled_ones(tmp_path: Path,
                                                                     dsn: str) -> None:
    """The request trail's rows (lists, and lists encoded at once as the trail sends them),
    domain dict rows and rows read back from a spill file (written from a list and from an
    encoded row) land in one batch with every field in its column."""
    at = 1_700_000_000.25
    # text that must arrive verbatim: the literal's own tags, quotes, backslashes, non-ASCII
    path = "/api/v1/$j$x$j1$'\\\"é\n"
    request_row = [at, "http", None, "rid-list", 201, "0123456789ab", "user", "POST",
                   path, 1.5, "127.0.0.1", "ab" * 32,
                   {"kind": "key", "key_id": "0123456789ab"}]
    assert len(request_row) == len(AUDIT_FIELDS)
    spilled = [at + 1, "http", None, "rid-spilled", 401, "10.0.0.1", None, "GET", "/x",
               0.25, "10.0.0.1", None, {"kind": "anonymous"}]
    encoded = [at + 2, "http", None, "rid-encoded", 200, "local", "admin", "GET", path, 2.0,
               "::1", None, {"kind": "local"}]
    spill = SpillFile(tmp_path / "spill", 1 << 20)
    spill.append([("audit", spilled),
                  ("audit", orjson.Fragment(orjson.dumps([*spilled[:3], "rid-spilled-enc",
                                                          *spilled[4:]])))])
    async with persistence(tmp_path, dsn) as p:
        p.record("audit", request_row)
        p.record("audit", orjson.Fragment(orjson.dumps(encoded)))
        p.audit("vectors.store", "coll", "rid-dict", 200, items=3)
        await wait_until(lambda: not p.buffer and p.spill.rows == 0)
        await p.flush()
    got = q(dsn, "SELECT extract(epoch FROM at)::float8, instance, action, target, request_id,"
                 " status, principal, role, method, path, latency_ms, client, body_sha256,"
                 " detail FROM citadel_audit_log ORDER BY request_id")
    assert got == [
        (got[0][0], "t", "vectors.store", "coll", "rid-dict", 200, None, None, None, None, None,
         None, None, {"items": 3}),
        (at + 2, "t", "http", None, "rid-encoded", 200, "local", "admin", "GET", path, 2.0,
         "::1", None, {"kind": "local"}),
        (at, "t", "http", None, "rid-list", 201, "0123456789ab", "user", "POST",
         path, 1.5, "127.0.0.1", "ab" * 32, {"kind": "key", "key_id": "0123456789ab"}),
        (at + 1, "t", "http", None, "rid-spilled", 401, "10.0.0.1", None, "GET", "/x", 0.25,
         "10.0.0.1", None, {"kind": "anonymous"}),
        (at + 1, "t", "http", None, "rid-spilled-enc", 401, "10.0.0.1", None, "GET", "/x",
         0.25, "10.0.0.1", None, {"kind": "anonymous"}),
    ]
    assert abs(got[0][0] - time.time()) < 60


async def test_outbox(tmp_path: Path, dsn: str) -> None:
    async with persistence(tmp_path, dsn) as p:
        body = {"kind": "upsert", "collection": "c", "points": [{"id": "a"}, {"id": "b"}]}
        seqs = await p.outbox_append([body, {**body, "kind": "delete"}], "rid")
        assert len(seqs) == 2 and seqs[0] < seqs[1]
        assert (await p.outbox_stats())[0] == 2
        assert (await p.outbox_stats("other"))[0] == 0
        rows = await p.outbox_fetch(10)
        assert [r.seq for r in rows] == seqs and rows[0].body == body
        await p.outbox_done([seqs[0]], {seqs[1]: "rejected"})
        assert (await p.outbox_stats())[0] == 0
        s0, s1 = await p.outbox_status(seqs[0]), await p.outbox_status(seqs[1])
        assert s0 is not None and s0["status"] == "applied" and s0["items"] == 2
        assert s1 is not None and s1["status"] == "failed" and s1["error"] == "rejected"
        assert await p.outbox_status(10**9) is None


# ---- outages -------------------------------------------------------------------------------


@pytest.fixture
def throwaway() -> Iterator[ThrowawayPostgres]:
    if not binaries_available():
        pytest.skip("PostgreSQL server binaries not installed")
    pg = ThrowawayPostgres().start()
    try:
        yield pg
    finally:
        pg.cleanup()


async def test_outage_buffers_spills_and_replays(tmp_path: Path,
                                                 throwaway: ThrowawayPostgres) -> None:
    async with persistence(tmp_path, throwaway.dsn, buffer_max_rows=200, batch_rows=50) as p:
        for i in range(100):
            p.audit("a", None, None, 200, n=i)
        await wait_until(lambda: not p.buffer)
        await p.flush()
        throwaway.stop()  # fast shutdown: connections dropped
        for i in range(100, 1100):
            p.audit("a", None, None, 200, n=i)
            if i % 100 == 0:
                await asyncio.sleep(0.05)  # the flusher keeps trying meanwhile
        await wait_until(lambda: p.up is False)
        assert len(p.buffer) <= 200
        await wait_until(lambda: p.spill.rows > 0 and not p._spilling)
        assert p.metrics.spill_total._value.get() >= 800  # overflow is counted, not silent
        # the gauge is read at scrape time
        assert p.metrics.buffered_rows.collect()[0].samples[0].value == len(p.buffer)
        throwaway.start()
        await wait_until(lambda: not p.buffer and p.spill.rows == 0, within=30)
    got = q(throwaway.dsn, "SELECT (detail->>'n')::int FROM citadel_audit_log")
    assert sorted(n for (n,) in got) == list(range(1100))  # nothing lost, nothing twice


async def test_spill_bound_drops_are_counted(tmp_path: Path) -> None:
    cfg = PersistenceConfig(dsn="postgresql://postgres@127.0.0.1:1/none", buffer_max_rows=10,
                            spill_max_bytes=4096, connect_timeout_s=1, flush_interval_s=0.05)
    p = Persistence(cfg, str(tmp_path), StorageMetrics())
    p.start_unsupervised()
    p.start()
    try:
        for i in range(500):
            p.audit("a", None, None, 200, pad="x" * 50, n=i)
            await asyncio.sleep(0)
        await wait_until(lambda: not p._spilling)
        dropped = p.metrics.dropped_rows.labels("spill_full")._value.get()
        assert dropped > 0
        assert len(p.buffer) + p.spill.rows + dropped == 500
        with pytest.raises(PersistenceUnavailable):
            await p.outbox_stats()
    finally:
        await p.close(flush_timeout=1)
    assert p.spill.rows > 0  # what was buffered at shutdown went to disk, not away


async def test_connections_dropped_mid_transaction(tmp_path: Path, dsn: str) -> None:
    """Another session kills citadeld's connections over and over while rows and outbox writes
    flow: every row arrives exactly once and every acknowledged outbox append is there."""
    stop = threading.Event()
    killed = [0]

    def killer() -> None:
        conn = psycopg2.connect(dsn)
        conn.autocommit = True
        with conn.cursor() as cur:
            while not stop.is_set():
                cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name LIKE 'citadeld:%%'")
                killed[0] += cur.fetchone()[0]
                time.sleep(0.05)
        conn.close()

    async with persistence(tmp_path, dsn, batch_rows=20) as p:
        await p.probe()
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        acked: list[int] = []
        try:
            for i in range(300):
                p.audit("a", None, None, 200, n=i)
                if i % 10 == 0:
                    try:
                        acked += await p.outbox_append(
                            [{"kind": "upsert", "collection": "c", "points": [{"id": str(i)}]}],
                            None)
                    except PersistenceUnavailable:
                        pass  # refused is fine: it was not acknowledged
                await asyncio.sleep(0.005)
        finally:
            stop.set()
            t.join()
        await wait_until(lambda: not p.buffer and p.spill.rows == 0, within=30)
        await p.flush()
    assert killed[0] > 0
    got = sorted(n for (n,) in q(dsn, "SELECT (detail->>'n')::int FROM citadel_audit_log"))
    assert set(got) == set(range(300))
    have = {s for (s,) in q(dsn, "SELECT seq FROM citadel_vector_outbox")}
    assert set(acked) <= have
