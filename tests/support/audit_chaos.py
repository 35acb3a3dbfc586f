"""Audit-trail durability under a PostgreSQL restart, against the real citadeld process.
Shared by tests/e2e/test_security_e2e.py and bench/security_bench.py (which prints the counts).

A closed-loop embedding load (cache hits after the first round; every request has its own
``X-Request-ID``) runs while a throwaway PostgreSQL is stopped (fast shutdown: connections
dropped mid-transaction) and started again. Every request the daemon answered - whatever the
status - must have its audit row in ``citadel_audit_log`` once the buffers have drained.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from tests.support.daemon import DaemonProc
from tests.support.pg import ThrowawayPostgres
from tests.support.storage_chaos import wait_drained


@dataclass
class AuditChaosResult:
    answered: int = 0  # requests the daemon answered (any status): each must leave a row
    no_answer: int = 0  # connection errors: not acknowledged, not counted
    rows: int = 0  # rows of those request ids found after recovery
    lost: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    max_buffered: int = 0
    max_spilled: int = 0
    buffer_max_rows: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.answered} requests answered ({self.statuses}), {self.rows} audit rows "
                f"found after recovery, lost {self.lost}; peak {self.max_buffered} rows "
                f"buffered / {self.max_spilled} spilled (buffer bound {self.buffer_max_rows})")


class AuditLoad:
    """Threads that embed a few fixed texts as fast as the daemon answers, each request with
    a unique request id that is remembered when the daemon answers."""

    def __init__(self, url: str, threads: int = 3, texts: int = 8) -> None:
        self.url = url
        self.threads = threads
        self.bodies = [{"texts": [f"audit chaos text {i}"]} for i in range(texts)]
        self.answered: list[str] = []
        self.no_answer = 0
        self.statuses: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> AuditLoad:
        for t in range(self.threads):
            w = threading.Thread(target=self._run, args=(t,), daemon=True)
            self._workers.append(w)
            w.start()
        return self

    def _run(self, thread: int) -> None:
        n = 0
        run = uuid.uuid4().hex[:8]
        with httpx.Client(timeout=15) as client:
            while not self._stop.is_set():
                rid = f"chaos-{run}-{thread}-{n}"
                body = self.bodies[n % len(self.bodies)]
                n += 1
                try:
                    r = client.post(self.url + "/api/v1/embed", json=body,
                                    headers={"X-Request-ID": rid})
                except httpx.HTTPError:
                    with self._lock:
                        self.no_answer += 1
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.answered.append(rid)
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)


def daemon_config(embed_url: str, dsn: str, buffer_max_rows: int = 10_000) -> dict[str, Any]:
    return {
        "server": {"request_timeout_s": 30},
        "embedding": {"default_model": "all-minilm", "models": {
            "all-minilm": {"backend": "ollama", "dims": 384, "max_context": 256,
                           "endpoints": [{"url": embed_url}], "attempts": 1,
                           "batch": {"max_wait_ms": 1}}}},
        "persistence": {"dsn": dsn, "instance": "audit-chaos", "flush_interval_s": 0.2,
                        "timeout_s": 2, "connect_timeout_s": 1,
                        "buffer_max_rows": buffer_max_rows},
        "logging": {"level": "warning"},
        "supervision": {"ping_interval_s": 2, "ping_timeout_s": 2},
    }


def _persistence(url: str) -> dict[str, Any]:
    p: dict[str, Any] = httpx.get(url + "/health/detailed", timeout=5).json()["storage"][
        "persistence"]
    return p


def rows_for(dsn: str, request_ids: list[str]) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(DISTINCT request_id) FROM citadel_audit_log"
                        " WHERE action = 'http' AND request_id = ANY(%s)", (request_ids,))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def chaos_postgres_audit(workdir: Path, embed_url: str, phase_s: float = 2.0,
                         threads: int = 3, buffer_max_rows: int = 2000) -> AuditChaosResult:
    """Load, stop PostgreSQL, load on, start it, load on; then count rows per answered id.

    ``buffer_max_rows`` is kept small so the outage overflows memory into the spill file:
    the bound being exercised is the spill file's (``persistence.spill_max_bytes``)."""
    pg = ThrowawayPostgres().start()
    d: DaemonProc | None = None
    res = AuditChaosResult(buffer_max_rows=buffer_max_rows)
    try:
        d = DaemonProc(daemon_config(embed_url, pg.dsn, buffer_max_rows), workdir).start(
            ready_timeout=60)
        load = AuditLoad(d.url, threads).start()
        try:
            time.sleep(phase_s)
            pg.stop(fast=True)
            t_end = time.monotonic() + phase_s
            while time.monotonic() < t_end:
                p = _persistence(d.url)
                res.max_buffered = max(res.max_buffered, int(p.get("buffered_rows", 0)))
                res.max_spilled = max(res.max_spilled, int(p.get("spilled_rows", 0)))
                time.sleep(0.2)
            res.notes.append(f"/health during the outage: {httpx.get(d.url + '/health').json()}")
            pg.start()
            time.sleep(phase_s)
        finally:
            load.stop()
        wait_drained(d.url)
        res.answered = len(load.answered)
        res.no_answer = load.no_answer
        res.statuses = dict(load.statuses)
        res.rows = rows_for(pg.dsn, load.answered)
        res.lost = res.answered - res.rows
        code = d.stop()
        d = None
        if code != 0:
            raise AssertionError(f"citadeld exited {code}")
        return res
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        pg.cleanup()
