"""The three durability chaos scenarios of the vector store, against the real citadeld process.
Shared by tests/e2e/test_vectors_e2e.py and bench/store_bench.py (which prints the counts).

Each scenario runs a closed-loop store load (several client threads, unique ids), injects its
fault mid-load, heals it, and then checks that every id whose store got a 2xx (200 applied or
202 queued) can be read back. ``lost`` must be 0.
"""

from __future__ import annotations

import concurrent.futures
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.daemon import DaemonProc
from tests.support.pg import ThrowawayPostgres

ITEMS_PER_REQUEST = 4


@dataclass
class ChaosResult:
    name: str
    requests: int = 0
    acked_requests: int = 0
    acked_ids: int = 0
    queued_requests: int = 0  # 202
    refused: int = 0  # 4xx/5xx answers: not acknowledged, so not counted as lost
    errors: int = 0  # no answer (connection refused/reset, e.g. during kill -9)
    lost: int = 0  # acknowledged ids that cannot be read back
    lost_rows: int = 0  # audit rows of acknowledged stores missing in PostgreSQL (PG chaos)
    statuses: dict[int, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.name}: {self.acked_ids} ids acknowledged in {self.acked_requests} requests"
                f" ({self.queued_requests} queued/202), {self.refused} refused, {self.errors}"
                f" without answer; lost {self.lost}")


class StoreLoad:
    """Threads that store unique ids as fast as the daemon answers."""

    def __init__(self, name: str, threads: int = 3, pause_s: float = 0.0) -> None:
        self.name, self.threads, self.pause_s = name, threads, pause_s
        self.url = ""
        self.acked: list[str] = []
        self.acked_requests = 0
        self.queued = 0
        self.statuses: dict[int, int] = {}
        self.errors = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self, url: str) -> StoreLoad:
        self.url = url
        self._stop.clear()
        for t in range(self.threads):
            w = threading.Thread(target=self._run, args=(t, len(self._workers)), daemon=True)
            self._workers.append(w)
            w.start()
        return self

    def retarget(self, url: str) -> None:
        self.url = url

    def _run(self, thread: int, generation: int) -> None:
        n = 0
        with httpx.Client(timeout=15) as client:
            while not self._stop.is_set():
                ids = [f"{self.name}-{generation}-{thread}-{n}-{k}"
                       for k in range(ITEMS_PER_REQUEST)]
                n += 1
                body = {"items": [{"id": i, "text": f"chaos text {i}", "metadata": {"n": n}}
                                  for i in ids]}
                try:
                    r = client.post(self.url + "/api/v1/vectors/store", json=body)
                except httpx.HTTPError:
                    with self._lock:
                        self.requests += 1
                        self.errors += 1
                    time.sleep(0.05)
                    continue
                with self._lock:
                    self.requests += 1
                    self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
                    if r.status_code in (200, 202):
                        assert r.json()["ids"] == ids
                        self.acked.extend(ids)
                        self.acked_requests += 1
                        self.queued += r.status_code == 202
                if r.status_code >= 400:
                    time.sleep(0.05)
                elif self.pause_s:
                    time.sleep(self.pause_s)

    def stop(self) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)

    def result(self) -> ChaosResult:
        refused = sum(n for s, n in self.statuses.items() if s >= 400)
        return ChaosResult(self.name, self.requests, self.acked_requests, len(self.acked),
                           self.queued, refused, self.errors, statuses=dict(self.statuses))


def storage_status(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(url + "/health/detailed", timeout=5).json()
    storage: dict[str, Any] = body["storage"]
    return storage


def wait_drained(url: str, timeout: float = 60.0) -> None:
    """Until the outbox is empty and no audit rows wait in memory or in the spill file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = storage_status(url)
        v, p = s["vectors"], s["persistence"]
        if v["outbox_pending"] == 0 and v["outbox_in_flight"] == 0 and \
                p.get("buffered_rows", 0) == 0 and p.get("spilled_rows", 0) == 0:
            return
        time.sleep(0.2)
    raise AssertionError(f"outbox/buffers not drained in {timeout}s: {storage_status(url)}")


def wait_vectors_ok(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).json().get("vectors") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("vector store never became ok")


def count_missing(url: str, ids: list[str], workers: int = 4) -> int:
    """Acknowledged ids that cannot be read back (GET /api/v1/vectors/{id})."""
    def check(chunk: list[str]) -> int:
        missing = 0
        with httpx.Client(timeout=15) as c:
            for i in chunk:
                r = c.get(f"{url}/api/v1/vectors/{i}")
                if r.status_code != 200 or r.json()["id"] != i:
                    missing += 1
        return missing

    chunks = [ids[k::workers] for k in range(workers)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(check, chunks))


def daemon_config(embed_url: str, dsn: str | None, fault: Path | None) -> dict[str, Any]:
    vectors: dict[str, Any] = {"timeout_s": 2, "retry_after_s": 1}
    if fault is not None:
        vectors["fault_injection_file"] = str(fault)
    return {
        "server": {"max_body_bytes": 8 * 1024 * 1024, "request_timeout_s": 30},
        "embedding": {"default_model": "all-minilm", "max_inputs": 2048, "models": {
            "all-minilm": {"backend": "ollama", "dims": 384, "max_context": 256,
                           "endpoints": [{"url": embed_url}], "attempts": 1,
                           "batch": {"max_wait_ms": 2}}}},
        "vectors": vectors,
        "persistence": {"dsn": dsn, "instance": "chaos", "flush_interval_s": 0.2,
                        "timeout_s": 2, "connect_timeout_s": 1},
        "supervision": {"ping_interval_s": 2, "ping_timeout_s": 2},
    }


def start_daemon(config: dict[str, Any], workdir: Path) -> DaemonProc:
    d = DaemonProc(config, workdir).start(ready_timeout=60)
    wait_vectors_ok(d.url)
    return d


def chaos_qdrant(workdir: Path, embed_url: str, dsn: str, phase_s: float = 2.0) -> ChaosResult:
    """Qdrant becomes unavailable under a store load and comes back: writes are queued (202),
    reads answer 503, the replayer applies the queue in order; nothing acknowledged is lost."""
    fault = workdir / "qdrant.fault"
    d = start_daemon(daemon_config(embed_url, dsn, fault), workdir)
    load = StoreLoad("q").start(d.url)
    notes: list[str] = []
    try:
        time.sleep(phase_s)
        fault.write_text("down")
        time.sleep(phase_s)
        r = httpx.post(d.url + "/api/v1/vectors/search", json={"text": "chaos"}, timeout=10)
        notes.append(f"search during the outage: HTTP {r.status_code}, Retry-After "
                     f"{r.headers.get('Retry-After')}")
        if r.status_code != 503 or "Retry-After" not in r.headers:
            raise AssertionError(f"search during a Qdrant outage: {r.status_code} {r.text}")
        fault.unlink()
        time.sleep(phase_s)
    finally:
        load.stop()
    wait_drained(d.url)
    res = load.result()
    res.lost = count_missing(d.url, load.acked)
    res.notes = notes
    code = d.stop()
    if code != 0:
        raise AssertionError(f"citadeld exited {code}: {d.log_tail()}")
    return res


def chaos_postgres(workdir: Path, embed_url: str, phase_s: float = 2.0) -> ChaosResult:
    """PostgreSQL stops (fast shutdown: connections dropped mid-transaction) under a store load
    and restarts: vector writes go on (Qdrant is up), audit rows buffer/spill and are replayed.
    Lost counts acknowledged ids not readable and audit rows of acknowledged stores missing."""
    import psycopg2

    pg = ThrowawayPostgres().start()
    d = None
    try:
        d = start_daemon(daemon_config(embed_url, pg.dsn, None), workdir)
        load = StoreLoad("p").start(d.url)
        notes: list[str] = []
        try:
            time.sleep(phase_s)
            pg.stop(fast=True)
            time.sleep(phase_s)
            notes.append(f"/health during the outage: {httpx.get(d.url + '/health').json()}")
            pg.start()
            time.sleep(phase_s)
        finally:
            load.stop()
        wait_drained(d.url)
        res = load.result()
        res.lost = count_missing(d.url, load.acked)
        conn = psycopg2.connect(pg.dsn)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM citadel_audit_log WHERE action = 'vectors.store'")
            rows = int(cur.fetchone()[0])
        conn.close()
        res.lost_rows = max(0, load.acked_requests - rows)
        notes.append(f"audit rows of stores: {rows} for {load.acked_requests} acknowledged")
        res.notes = notes
        code = d.stop()
        d = None
        if code != 0:
            raise AssertionError(f"citadeld exited {code}")
        return res
    finally:
        if d is not None:
            d.stop(signal.SIGKILL)
        pg.cleanup()


def chaos_kill9(workdir: Path, embed_url: str, dsn: str, phase_s: float = 2.0) -> ChaosResult:
    """kill -9 of citadeld during a store load - with part of the acknowledged writes applied
    in the embedded Qdrant and part queued in the outbox (Qdrant made unavailable first) -
    then a restart: every acknowledged id is readable once the outbox has drained."""
    fault = workdir / "qdrant.fault"
    config = daemon_config(embed_url, dsn, fault)
    d = start_daemon(config, workdir)
    load = StoreLoad("k").start(d.url)
    try:
        time.sleep(phase_s)
        fault.write_text("down")
        time.sleep(phase_s)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait(10)
        time.sleep(0.3)
    finally:
        load.stop()
    d.stop()
    fault.unlink()
    d2 = start_daemon(config, workdir)
    try:
        wait_drained(d2.url)
        res = load.result()
        res.lost = count_missing(d2.url, load.acked)
        res.notes = [f"{res.queued_requests} requests were queued before the kill"]
    finally:
        code = d2.stop()
    if code != 0:
        raise AssertionError(f"citadeld exited {code} after the restart")
    return res
