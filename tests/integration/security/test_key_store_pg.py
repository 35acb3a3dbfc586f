"""KeyStore against real PostgreSQL: only hashes stored, create/revoke visible at once here and
after a refresh in another daemon's store, the local snapshot that carries keys over a restart
during an outage, and refusals without PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from citadeld.actors.persistence import Persistence, PersistenceUnavailable
from citadeld.security.config import AuthConfig
from citadeld.security.key_store import KeyStore, KeyStoreError
from citadeld.security.keys import sha256_hex
from citadeld.storage.config import PersistenceConfig
from citadeld.storage.metrics import StorageMetrics
from tests.support.pg import free_port, temp_database


@pytest.fixture
def dsn() -> Iterator[str]:
    with temp_database() as d:
        yield d


@asynccontextmanager
async def store(tmp: Path, dsn: str, **auth: Any) -> AsyncIterator[KeyStore]:
    cfg = PersistenceConfig(dsn=dsn, instance="t", timeout_s=2, connect_timeout_s=1)
    p = Persistence(cfg, str(tmp), StorageMetrics())
    p.start_unsupervised()
    s = KeyStore(AuthConfig(enabled=True, keys_refresh_s=auth.pop("refresh", 30), **auth), p,
                 str(tmp))
    await s.start()
    try:
        yield s
    finally:
        await s.close()
        await p.close(flush_timeout=2)


async def wait_until(pred: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_create_verify_revoke_and_a_second_daemon(tmp_path: Path, dsn: str) -> None:
    async with store(tmp_path / "a", dsn) as a, store(tmp_path / "b", dsn, refresh=1) as b:
        await wait_until(lambda: a.loaded_at is not None and b.loaded_at is not None)
        entry, key = await a.create("ci", "developer", rate_per_min=50,
                                    expires_at=time.time() + 3600, created_by="uid:0")
        p = a.table.verify(key)
        assert not isinstance(p, str)
        assert (p.name, p.role, p.kind, p.key_id, p.rate_per_min) == (
            entry.id, "developer", "key", entry.id, 50)
        assert a.table.verify(key) is p  # the same object every time: nothing allocated
        # the database holds the hash only
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT sha256, name, role, created_by FROM citadel_api_keys")
            rows = cur.fetchall()
        conn.close()
        assert rows == [(sha256_hex(key), "ci", "developer", "uid:0")]
        assert key.split("_", 2)[2] not in repr(rows)
        # the other daemon learns it on its next refresh
        await wait_until(lambda: not isinstance(b.table.verify(key), str))
        await a.revoke(entry.id)
        assert a.table.verify(key) == "revoked key"
        await wait_until(lambda: b.table.verify(key) == "revoked key")
        assert (await a.revoke(entry.id)).revoked_at == a.table.entries[entry.id].revoked_at
        with pytest.raises(KeyStoreError, match="no API key"):
            await a.revoke("0123456789ab")
        for bad in ({"role": "root"}, {"name": " "}, {"expires_at": time.time() - 1},
                    {"rate_per_min": -1.0}):
            args: dict[str, Any] = {"name": "x", "role": "user", **bad}
            name, role = args.pop("name"), args.pop("role")
            with pytest.raises(KeyStoreError):
                await a.create(name, role, **args)


async def test_snapshot_carries_keys_over_a_restart_without_postgres(tmp_path: Path,
                                                                     dsn: str) -> None:
    async with store(tmp_path, dsn) as a:
        await wait_until(lambda: a.loaded_at is not None)
        _, key = await a.create("kept", "user")
        await a.refresh()  # also writes the snapshot
    snap = tmp_path / "api_keys.json"
    assert stat.S_IMODE(os.stat(snap).st_mode) == 0o600
    assert key not in snap.read_text()
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nope"
    async with store(tmp_path, dead) as restarted:
        assert not isinstance(restarted.table.verify(key), str)  # from the snapshot
        await wait_until(lambda: restarted.last_error is not None)
        assert not isinstance(restarted.table.verify(key), str)  # an outage keeps the table
        with pytest.raises(PersistenceUnavailable):
            await restarted.create("no", "user")


async def test_without_postgres_only_config_keys(tmp_path: Path) -> None:
    from citadeld.security.keys import generate
    kid, key, sha = generate()
    s = KeyStore(AuthConfig(enabled=True, api_keys=[{"id": kid, "sha256": sha,  # type: ignore[list-item]
                                                     "role": "admin"}]), None, str(tmp_path))
    await s.start()
    p = s.table.verify(key)
    assert not isinstance(p, str) and p.role == "admin"
    with pytest.raises(KeyStoreError, match="citadeld keygen"):
        await s.create("x", "user")
    with pytest.raises(KeyStoreError, match="PostgreSQL"):
        await s.revoke(kid)
    await s.close()
