"""Reading the audit trail back: filters -> one parameterised SELECT, for ``GET /api/v1/audit``
and ``citadelctl audit tail``. Client text only ever travels as query parameters.

Paging is by row id (ids only grow): a page is newest-first and ``next_cursor`` is the id to
continue below; ``after`` asks for rows newer than an id, oldest-first (``tail --follow``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from citadeld.errors import BadRequest, Unavailable

if TYPE_CHECKING:
    from citadeld.actors.persistence import Persistence

FILTER_KEYS = ("principal", "path", "status", "method", "action", "since", "until", "limit",
               "cursor", "after")
_STATUS = re.compile(r"^([1-5])(?:xx|XX)$")
_METHOD = re.compile(r"^[A-Za-z]{1,16}$")
_COLUMNS = ("id", "at", "instance", "action", "target", "principal", "role", "method", "path",
            "status", "latency_ms", "client", "request_id", "body_sha256", "detail")


@dataclass(frozen=True)
class AuditFilter:
    principal: str | None = None
    path_prefix: str | None = None
    status_min: int | None = None
    status_max: int | None = None
    method: str | None = None
    action: str | None = None
    since: float | None = None  # epoch seconds
    until: float | None = None
    before_id: int | None = None  # paging: rows older than this id
    after_id: int | None = None  # follow: rows newer than this id (oldest first)
    limit: int = 100


def _time(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        try:
            t = dt.datetime.fromisoformat(raw)
        except ValueError:
            raise BadRequest(f"{name}: expected ISO 8601 (2026-11-26T13:00:00Z) or epoch "
                             f"seconds, got {raw[:64]!r}", param=name) from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.UTC)
        return t.timestamp()
    if not math.isfinite(value) or value < 0:
        raise BadRequest(f"{name}: must be a finite, non-negative epoch time", param=name)
    return value


def _int(name: str, raw: str, lo: int, hi: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw[:64]!r}", param=name) from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name}: must be between {lo} and {hi}", param=name)
    return value


def _text(name: str, raw: str, max_len: int = 512) -> str:
    if not raw or len(raw) > max_len or "\x00" in raw:
        raise BadRequest(f"{name}: must be 1-{max_len} characters", param=name)
    return raw


def parse_filter(params: Mapping[str, str], max_rows: int, default_limit: int = 100
                 ) -> AuditFilter:
    """Validate query parameters (or admin args); any problem is a 400 naming the parameter."""
    unknown = sorted(set(params) - set(FILTER_KEYS))
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(unknown)[:200]}; known: "
                         f"{', '.join(FILTER_KEYS)}", param=unknown[0][:64])
    kw: dict[str, Any] = {"limit": min(default_limit, max_rows)}
    if "principal" in params:
        kw["principal"] = _text("principal", params["principal"])
    if "path" in params:
        path = _text("path", params["path"])
        if not path.startswith("/"):
            raise BadRequest("path: a path prefix starts with /", param="path")
        kw["path_prefix"] = path
    if "status" in params:
        raw = str(params["status"])
        m = _STATUS.match(raw)
        if m:
            kw["status_min"] = int(m.group(1)) * 100
            kw["status_max"] = kw["status_min"] + 99
        else:
            kw["status_min"] = kw["status_max"] = _int("status", raw, 100, 599)
    if "method" in params:
        method = str(params["method"])
        if not _METHOD.match(method):
            raise BadRequest("method: an HTTP method such as GET or POST", param="method")
        kw["method"] = method.upper()
    if "action" in params:
        kw["action"] = _text("action", params["action"], 128)
    for name in ("since", "until"):
        if name in params:
            kw[name] = _time(name, str(params[name]))
    if "limit" in params:
        kw["limit"] = _int("limit", str(params["limit"]), 1, max_rows)
    if "cursor" in params:
        kw["before_id"] = _int("cursor", str(params["cursor"]), 1, 2**63 - 1)
    if "after" in params:
        kw["after_id"] = _int("after", str(params["after"]), 0, 2**63 - 1)
    if "cursor" in params and "after" in params:
        raise BadRequest("give cursor (older rows) or after (newer rows), not both",
                         param="after")
    f = AuditFilter(**kw)
    if f.since is not None and f.until is not None and f.since > f.until:
        raise BadRequest("since is after until", param="since")
    return f


def _like_prefix(prefix: str) -> str:
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


def build_sql(f: AuditFilter) -> tuple[str, tuple[Any, ...]]:
    where: list[str] = []
    args: list[Any] = []
    for cond, value in (("principal = %s", f.principal), ("method = %s", f.method),
                        ("action = %s", f.action),
                        ("status >= %s", f.status_min), ("status <= %s", f.status_max),
                        ("at >= to_timestamp(%s)", f.since), ("at <= to_timestamp(%s)", f.until),
                        ("id < %s", f.before_id), ("id > %s", f.after_id)):
        if value is not None:
            where.append(cond)
            args.append(value)
    if f.path_prefix is not None:
        where.append("path LIKE %s")
        args.append(_like_prefix(f.path_prefix))
    order = "ASC" if f.after_id is not None else "DESC"
    sql = ("SELECT id, extract(epoch FROM at), instance, action, target, principal, role, method,"
           " path, status, latency_ms, client, request_id, body_sha256, detail"
           " FROM citadel_audit_log" + (" WHERE " + " AND ".join(where) if where else "")
           + f" ORDER BY id {order} LIMIT %s")
    args.append(f.limit + 1)  # one more than asked: is there a next page?
    return sql, tuple(args)


def _row(values: Any) -> dict[str, Any]:
    out = dict(zip(_COLUMNS, values, strict=True))
    out["at"] = dt.datetime.fromtimestamp(float(out["at"]), dt.UTC).isoformat().replace(
        "+00:00", "Z")
    if out["latency_ms"] is not None:
        out["latency_ms"] = round(float(out["latency_ms"]), 3)
    return out


async def query(persistence: Persistence | None, f: AuditFilter) -> dict[str, Any]:
    """``{"items": [...], "next_cursor": str | None}``; 503 when PostgreSQL is not there."""
    from citadeld.actors.persistence import PersistenceError, PersistenceUnavailable

    if persistence is None:
        raise Unavailable("the audit trail is kept in PostgreSQL: set persistence.dsn",
                          retry_after=30)
    sql, args = build_sql(f)

    async def select(pool: Any) -> list[Any]:  # on the PersistenceActor's own loop and pool
        async with pool.acquire() as conn, conn.cursor() as cur:
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    try:
        rows = await persistence.call("with_pool", select)
    except PersistenceUnavailable as exc:
        raise Unavailable(f"PostgreSQL is unavailable: {exc}", retry_after=5) from None
    except PersistenceError as exc:
        raise Unavailable(f"the audit query failed: {exc}", retry_after=5) from None
    more = len(rows) > f.limit
    items = [_row(r) for r in rows[:f.limit]]
    next_cursor = str(items[-1]["id"]) if more and items and f.after_id is None else None
    return {"items": items, "next_cursor": next_cursor}
