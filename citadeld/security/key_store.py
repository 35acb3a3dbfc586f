"""Keeps the in-memory key table in step with PostgreSQL (``citadel_api_keys``).

Several daemons share the table, so each rereads it every ``auth.keys_refresh_s`` (a revocation
through another daemon takes effect here within that time) and at once after a create or revoke
through this one. The SQL runs on the PersistenceActor's pool and loop, never on the front's.
After every successful load the hashes are also written to ``<state_dir>/api_keys.json``
(mode 0600), so a daemon restarted while PostgreSQL is down still knows its keys. Keys from the
config (``auth.api_keys``) are always in the table, with or without PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from citadeld.security.config import ROLES, AuthConfig, ConfigKey
from citadeld.security.keys import KeyEntry, KeyTable, generate

if TYPE_CHECKING:
    from citadeld.actors.persistence import Persistence

log = logging.getLogger("citadeld.security")

_COLUMNS = ("id, name, role, sha256, rate_per_min, extract(epoch FROM created_at),"
            " extract(epoch FROM expires_at), extract(epoch FROM revoked_at)")


class KeyStoreError(Exception):
    """A key operation that cannot be done (no PostgreSQL, unknown id, bad argument)."""


def _entry(row: Iterable[Any], source: str = "db") -> KeyEntry:
    kid, name, role, sha, rate, created, expires, revoked = row
    return KeyEntry(id=str(kid), name=str(name), role=str(role), digest=bytes.fromhex(sha),
                    rate_per_min=None if rate is None else float(rate),
                    created_at=None if created is None else float(created),
                    expires_at=None if expires is None else float(expires),
                    revoked_at=None if revoked is None else float(revoked), source=source)


def _row(e: KeyEntry) -> list[Any]:
    return [e.id, e.name, e.role, e.digest.hex(), e.rate_per_min, e.created_at, e.expires_at,
            e.revoked_at]


class KeyStore:
    def __init__(self, cfg: AuthConfig, persistence: Persistence | None,
                 state_dir: str | None) -> None:
        self.cfg = cfg
        self.persistence = persistence
        self.table = KeyTable()
        self.snapshot = Path(state_dir) / "api_keys.json" if state_dir else None
        self._config: dict[str, KeyEntry] = {}
        self._db: dict[str, KeyEntry] = {}
        self._saved: bytes | None = None  # the snapshot last written
        self._gen = 0  # bumped by every change made through this daemon
        self.loaded_at: float | None = None  # last successful load from PostgreSQL
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.set_config_keys(cfg.api_keys)

    # ---- the table ---------------------------------------------------------------------------

    def set_config_keys(self, keys: Iterable[ConfigKey]) -> None:
        """The keys of ``auth.api_keys`` (at start and on a config reload)."""
        self._config = {k.id: KeyEntry(id=k.id, name=k.name or k.id, role=k.role,
                                       digest=bytes.fromhex(k.sha256), expires_at=k.expires_at,
                                       rate_per_min=k.rate_per_min, source="config")
                        for k in keys}
        self._publish()

    def _publish(self) -> None:
        self.table.replace({**self._db, **self._config})

    def entries(self) -> list[KeyEntry]:
        return sorted(self.table.entries.values(), key=lambda e: (e.created_at or 0, e.id))

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self.persistence is None:
            return
        await self._load_snapshot()
        self._task = asyncio.get_running_loop().create_task(self._refresher(),
                                                            name="api-keys-refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def _refresher(self) -> None:
        delay = self.cfg.keys_refresh_s
        failures = 0
        while True:
            self._wake.clear()  # before reading: a create during the read wakes us again
            try:
                await self.refresh()
                delay, failures = self.cfg.keys_refresh_s, 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                # the first tries at start-up may run before the PersistenceActor is up
                if failures == (1 if self.loaded_at is not None else 3):
                    log.warning("cannot load API keys from PostgreSQL; using the last known "
                                "table", extra={"error": str(exc)})
                self.last_error = str(exc)
                delay = min(self.cfg.keys_refresh_s, 2.0)  # until the first load, try often
                if self.loaded_at is not None:
                    delay = self.cfg.keys_refresh_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def refresh(self) -> int:
        """Reread the whole table (small: one row per key) and swap it in."""
        persistence = self._require_db()

        async def load(pool: Any) -> list[Any]:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(f"SELECT {_COLUMNS} FROM citadel_api_keys")
                return list(await cur.fetchall())

        gen = self._gen
        rows = await persistence.call("with_pool", load)
        if gen != self._gen:  # a create/revoke raced this read: its result is stale
            self._wake.set()
            return len(self._db)
        self._db = {e.id: e for e in map(_entry, rows)}
        self._publish()
        if self.last_error is not None and self.loaded_at is not None:
            log.info("API keys loaded from PostgreSQL again", extra={"keys": len(self._db)})
        self.loaded_at, self.last_error = time.time(), None
        await self._save_snapshot()
        return len(self._db)

    # ---- snapshot (keys survive a restart during a PostgreSQL outage) ------------------------

    async def _save_snapshot(self) -> None:
        if self.snapshot is None:
            return
        data = orjson.dumps(sorted(_row(e) for e in self._db.values()))
        if data == self._saved:
            return  # unchanged since the last write: no disk traffic every refresh
        try:
            await asyncio.get_running_loop().run_in_executor(None, _write_private,
                                                             self.snapshot, data)
            self._saved = data
        except OSError as exc:
            log.warning("cannot write the API key snapshot", extra={
                "path": str(self.snapshot), "error": str(exc)})

    async def _load_snapshot(self) -> None:
        if self.snapshot is None:
            return
        path = self.snapshot
        try:
            data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
            self._db = {e.id: e for e in map(_entry, orjson.loads(data))}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring an unreadable API key snapshot", extra={
                "path": str(path), "error": str(exc)})
            return
        self._publish()

    # ---- admin operations --------------------------------------------------------------------

    def _require_db(self) -> Persistence:
        if self.persistence is None:
            raise KeyStoreError("API keys need PostgreSQL (persistence.dsn); without it put "
                                "keys in auth.api_keys (`citadeld keygen NAME --role R` prints "
                                "one)")
        return self.persistence

    async def create(self, name: str, role: str, *, expires_at: float | None = None,
                     rate_per_min: float | None = None, created_by: str | None = None
                     ) -> tuple[KeyEntry, str]:
        """A new key: (its entry, the whole key - the only time it exists outside a client)."""
        persistence = self._require_db()
        if role not in ROLES:
            raise KeyStoreError(f"role must be one of {', '.join(ROLES)} (got {role!r})")
        name = name.strip()
        if not name or len(name) > 200 or not name.isprintable():
            raise KeyStoreError("name must be 1-200 printable characters")
        if expires_at is not None and expires_at <= time.time():
            raise KeyStoreError("expiry is in the past")
        if rate_per_min is not None and not rate_per_min > 0:
            raise KeyStoreError("rate must be a positive number of requests per minute")
        key_id, key, sha = generate()

        async def insert(pool: Any) -> Any:
            async with pool.acquire() as conn, conn.cursor() as cur:
                # ON CONFLICT: the actor may run this twice after a dropped connection
                await cur.execute(
                    "INSERT INTO citadel_api_keys (id, name, role, sha256, rate_per_min,"
                    " created_by, expires_at) VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s))"
                    f" ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}",
                    (key_id, name, role, sha, rate_per_min, created_by, expires_at))
                row = await cur.fetchone()
                if row is None:
                    await cur.execute(f"SELECT {_COLUMNS} FROM citadel_api_keys WHERE id = %s",
                                      (key_id,))
                    row = await cur.fetchone()
                return row

        row = await persistence.call("with_pool", insert)
        entry = _entry(row)
        if entry.digest.hex() != sha:  # a 48-bit id collided with an older key
            raise KeyStoreError("key id collision; try again")
        self._db = {**self._db, entry.id: entry}
        self._gen += 1
        self._publish()
        self._wake.set()  # and reread the table soon, which also saves the snapshot
        log.info("API key created", extra={"event": "key_created", "key_id": entry.id,
                                           "role": role, "key_name": name})
        return entry, key

    async def revoke(self, key_id: str) -> KeyEntry:
        persistence = self._require_db()
        if key_id in self._config:
            raise KeyStoreError(f"key {key_id} comes from the config (auth.api_keys): remove "
                                "it there and `citadelctl reload --yes`")

        async def update(pool: Any) -> Any:
            async with pool.acquire() as conn, conn.cursor() as cur:
                await cur.execute(
                    "UPDATE citadel_api_keys SET revoked_at = coalesce(revoked_at, now())"
                    f" WHERE id = %s RETURNING {_COLUMNS}", (key_id,))
                return await cur.fetchone()

        row = await persistence.call("with_pool", update)
        if row is None:
            raise KeyStoreError(f"no API key with id {key_id!r}")
        entry = _entry(row)
        self._db = {**self._db, entry.id: entry}
        self._gen += 1
        self._publish()
        self._wake.set()
        log.info("API key revoked", extra={"event": "key_revoked", "key_id": entry.id})
        return entry

    def status(self) -> dict[str, Any]:
        return {"entries": len(self.table.entries), "config_keys": len(self._config),
                "postgres": self.persistence is not None, "loaded_at": self.loaded_at,
                "last_error": self.last_error}


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
