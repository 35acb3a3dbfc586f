"""PostgreSQL for tests: throwaway databases on the shared server, and throwaway servers (own
data directory, spare port) that outage tests may stop and start. The shared server is never
stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2

SHARED_DSN = os.environ.get("CITADEL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BIN = Path(os.environ.get("CITADEL_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _dsn_for(dsn: str, dbname: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{dbname}"


def shared_available() -> bool:
    try:
        psycopg2.connect(SHARED_DSN, connect_timeout=2).close()
        return True
    except psycopg2.Error:
        return False


def binaries_available() -> bool:
    return (PG_BIN / "postgres").exists() and (PG_BIN / "initdb").exists()


@contextlib.contextmanager
def temp_database(server_dsn: str = SHARED_DSN) -> Iterator[str]:
    """A fresh ``citadel_test_<random>`` database; dropped afterwards (connections killed)."""
    name = f"citadel_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server_dsn, connect_timeout=5)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield _dsn_for(server_dsn, name)
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        return ["runuser", "-u", "postgres", "--", *args]
    return args


class ThrowawayPostgres:
    """A private PostgreSQL server in a temp directory on a spare port (trust auth)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="citadel-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-D", str(self.data), "-U",
                                     "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, timeout: float = 30.0) -> ThrowawayPostgres:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            _as_postgres([str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                          "-h", "127.0.0.1", "-k", str(self.dir), "-c", "fsync=off",
                          "-c", "max_connections=50", "-c", "shared_buffers=16MB"]),
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            try:
                psycopg2.connect(self.dsn, connect_timeout=1).close()
                return self
            except psycopg2.Error:
                time.sleep(0.1)
        raise RuntimeError("postgres did not start")

    def stop(self, fast: bool = True) -> None:
        """Stop the server: fast shutdown (SIGINT) drops every connection mid-transaction."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            import signal

            # runuser does not pass signals on: signal the whole session (postmaster included)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT if fast else signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
