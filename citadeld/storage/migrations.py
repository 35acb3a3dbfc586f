"""Versioned PostgreSQL schema migrations, applied under an advisory lock.

All pending migrations run in one transaction that first takes a transaction-scoped advisory
lock: two daemons starting together serialise on it, and the second finds everything applied
and does nothing. DDL is transactional in PostgreSQL, so a failed migration leaves no trace.
Migrations are append-only: never edit a released one (its checksum is recorded and a changed
one is reported), add the next version instead.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("citadeld.persistence")

LOCK_KEY = 0x43_49_54_44  # "CITD": pg_advisory_xact_lock key shared by every citadeld
TABLE = "citadel_schema_migrations"

BOOTSTRAP = f"""\
CREATE TABLE IF NOT EXISTS {TABLE} (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]


V1 = """\
-- audit log: who changed what, one row per mutating API call
CREATE TABLE citadel_audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    instance    text NOT NULL,
    action      text NOT NULL,
    target      text,
    request_id  text,
    status      integer,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX citadel_audit_log_at ON citadel_audit_log (at);
CREATE INDEX citadel_audit_log_action_at ON citadel_audit_log (action, at);
CREATE INDEX citadel_audit_log_request ON citadel_audit_log (request_id)
    WHERE request_id IS NOT NULL;

-- service health history: one row per dependency per probe round
CREATE TABLE citadel_health_history (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    instance    text NOT NULL,
    dependency  text NOT NULL,
    status      text NOT NULL,
    latency_ms  real,
    error       text
);
CREATE INDEX citadel_health_history_dep_at ON citadel_health_history (dependency, at);
CREATE INDEX citadel_health_history_at ON citadel_health_history (at);

-- task log: one row per task state change (workflows, background jobs)
CREATE TABLE citadel_task_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    instance    text NOT NULL,
    task_id     text NOT NULL,
    kind        text NOT NULL,
    status      text NOT NULL,
    duration_ms real,
    error       text,
    detail      jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX citadel_task_log_task ON citadel_task_log (task_id, at);
CREATE INDEX citadel_task_log_at ON citadel_task_log (at);
CREATE INDEX citadel_task_log_kind_status ON citadel_task_log (kind, status, at);

-- workflow state: the latest state of each workflow, optimistic concurrency by version
CREATE TABLE citadel_workflow_state (
    workflow_id text PRIMARY KEY,
    kind        text NOT NULL,
    status      text NOT NULL,
    state       jsonb NOT NULL DEFAULT '{}'::jsonb,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX citadel_workflow_state_status ON citadel_workflow_state (status, updated_at);
CREATE INDEX citadel_workflow_state_finished ON citadel_workflow_state (finished_at)
    WHERE finished_at IS NOT NULL;

-- vector outbox: acknowledged vector writes Qdrant has not applied yet, replayed in seq order
CREATE TABLE citadel_vector_outbox (
    seq         bigserial PRIMARY KEY,
    origin      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    collection  text NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('upsert', 'update', 'delete')),
    items       integer NOT NULL,
    body        jsonb NOT NULL,
    request_id  text,
    status      text NOT NULL DEFAULT 'pending'
                CHECK (status IN ('pending', 'applied', 'failed')),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    done_at     timestamptz
);
CREATE INDEX citadel_vector_outbox_pending ON citadel_vector_outbox (origin, seq)
    WHERE status = 'pending';
CREATE INDEX citadel_vector_outbox_pending_coll ON citadel_vector_outbox (origin, collection)
    WHERE status = 'pending';
CREATE INDEX citadel_vector_outbox_done ON citadel_vector_outbox (done_at)
    WHERE status <> 'pending';"""

V2 = """\
-- API keys (issue 7): only the sha256 of each key is stored; the daemons keep the table in memory
CREATE TABLE citadel_api_keys (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('user', 'developer', 'admin')),
    sha256       text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    rate_per_min real CHECK (rate_per_min IS NULL OR rate_per_min > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    created_by   text,
    expires_at   timestamptz,
    revoked_at   timestamptz
);"""

V3 = """\
-- request audit trail: one row per HTTP request (action 'http'), besides the domain rows
ALTER TABLE citadel_audit_log
    ADD COLUMN principal   text,
    ADD COLUMN role        text,
    ADD COLUMN method      text,
    ADD COLUMN path        text,
    ADD COLUMN latency_ms  real,
    ADD COLUMN client      text,
    ADD COLUMN body_sha256 text;
-- one index more per request row is all the trail's queries get: they page by id (the primary
-- key) newest first; by principal is the common question; status and path filter on the way
CREATE INDEX citadel_audit_log_principal ON citadel_audit_log (principal, id)
    WHERE principal IS NOT NULL;"""

V4 = """\
-- workflows (issue 5): one row per workflow, its whole state (spec, per-step status and
-- outputs) in one document written at every transition; columns for listing and claiming
CREATE TABLE citadel_workflows (
    id               text PRIMARY KEY,
    owner            text NOT NULL,
    name             text,
    status           text NOT NULL CHECK (status IN ('pending', 'running', 'completed',
                                                     'failed', 'cancelled')),
    instance         text,
    cancel_requested boolean NOT NULL DEFAULT false,
    steps_total      integer NOT NULL,
    steps_done       integer NOT NULL DEFAULT 0,
    error            text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    state            jsonb NOT NULL
);
CREATE INDEX citadel_workflows_created ON citadel_workflows (created_at DESC);
CREATE INDEX citadel_workflows_owner ON citadel_workflows (owner, created_at DESC);
CREATE INDEX citadel_workflows_status ON citadel_workflows (status, created_at DESC);
CREATE INDEX citadel_workflows_unfinished ON citadel_workflows (updated_at)
    WHERE finished_at IS NULL;
CREATE INDEX citadel_workflows_finished ON citadel_workflows (finished_at)
    WHERE finished_at IS NOT NULL;"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "audit, health history, task log, workflow state, vector outbox", V1),
    Migration(2, "api keys", V2),
    Migration(3, "request audit trail: principal, role, method, path, latency, client, "
                 "body hash", V3),
    Migration(4, "workflows", V4),
)


def pending(applied: dict[int, str]) -> list[Migration]:
    """Migrations not yet applied, in order; warns about edited ones."""
    for m in MIGRATIONS:
        got = applied.get(m.version)
        if got is not None and got != m.checksum:
            log.warning("migration %d was changed after it was applied (checksum %s, now %s)",
                        m.version, got, m.checksum)
    return [m for m in MIGRATIONS if m.version not in applied]


def render(migrations: list[Migration]) -> str:
    """The SQL a run would execute, for ``citadeld migrate --dry-run``."""
    parts = ["BEGIN;", f"SELECT pg_advisory_xact_lock({LOCK_KEY});", BOOTSTRAP]
    for m in migrations:
        parts.append(f"-- migration {m.version}: {m.name}")
        parts.append(m.sql)
        parts.append(f"INSERT INTO {TABLE} (version, name, checksum) VALUES "
                     f"({m.version}, '{m.name}', '{m.checksum}');")
    parts.append("COMMIT;")
    return "\n".join(parts) + "\n"


async def _applied(cur: Any) -> dict[int, str]:
    await cur.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,))
    row = await cur.fetchone()
    if not row or not row[0]:
        return {}
    await cur.execute(f"SELECT version, checksum FROM {TABLE}")
    return {int(v): str(c) for v, c in await cur.fetchall()}


async def plan(conn: Any) -> list[Migration]:
    """What ``migrate`` would apply on this connection (aiopg), without changing anything."""
    async with conn.cursor() as cur:
        return pending(await _applied(cur))


async def migrate(conn: Any) -> list[Migration]:
    """Apply pending migrations on an aiopg connection; returns those this call applied."""
    async with conn.cursor() as cur:
        await cur.execute("BEGIN")
        try:
            await cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            await cur.execute(BOOTSTRAP)
            todo = pending(await _applied(cur))
            for m in todo:
                log.info("applying migration %d: %s", m.version, m.name)
                await cur.execute(m.sql)
                await cur.execute(
                    f"INSERT INTO {TABLE} (version, name, checksum) VALUES (%s, %s, %s)",
                    (m.version, m.name, m.checksum))
            await cur.execute("COMMIT")
        except BaseException:
            if not conn.closed:
                try:
                    await cur.execute("ROLLBACK")
                except Exception:
                    log.debug("rollback after a failed migration failed", exc_info=True)
            raise
    return todo


def latest_version() -> int:
    return MIGRATIONS[-1].version
