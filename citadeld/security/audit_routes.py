"""``GET /api/v1/audit`` (native dialect, admins only) and its part of the OpenAPI document."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from citadeld.errors import CitadelError
from citadeld.http.body import json_response
from citadeld.security.audit_query import parse_filter, query
from citadeld.security.principal import principal_of
from citadeld.state import STATE

AUDIT_PATH = "/api/v1/audit"
ADMIN_ROLE = "admin"

Json = dict[str, Any]


async def audit_list(request: web.Request) -> web.Response:
    # The auth role map guards this route (admin); checking here too means a role map edited
    # by mistake cannot open the audit trail to everyone.
    if principal_of(request).role != ADMIN_ROLE:
        raise CitadelError("the audit trail is for admins", status=403, code="forbidden")
    state = request.app[STATE]
    f = parse_filter(request.query, state.config.audit.query_max_rows)
    storage = state.storage
    persistence = storage.persistence if storage is not None else None
    return json_response(await query(persistence, f))


def add_routes(app: web.Application) -> None:
    app.router.add_get(AUDIT_PATH, audit_list)


# ---- OpenAPI ---------------------------------------------------------------------------------

AUDIT_ROW: Json = {
    "type": "object",
    "required": ["id", "at", "action", "status"],
    "properties": {
        "id": {"type": "integer", "description": "Row id; grows with time (paging cursor)."},
        "at": {"type": "string", "format": "date-time", "description": "When the request "
               "arrived (UTC)."},
        "instance": {"type": "string", "description": "The citadeld that served it."},
        "action": {"type": "string", "description": "`http` for request rows; domain rows "
                   "(e.g. `vectors.store`) name their operation."},
        "target": {"type": ["string", "null"]},
        "principal": {"type": ["string", "null"], "description": "Key id / JWT subject, or "
                      "the client address for anonymous callers; `local` with auth off."},
        "role": {"type": ["string", "null"]},
        "method": {"type": ["string", "null"]},
        "path": {"type": ["string", "null"], "description": "Path without the query string."},
        "status": {"type": ["integer", "null"], "description": "HTTP status (499: the client "
                   "went away)."},
        "latency_ms": {"type": ["number", "null"]},
        "client": {"type": ["string", "null"], "description": "Client address."},
        "request_id": {"type": ["string", "null"]},
        "body_sha256": {"type": ["string", "null"], "description": "SHA-256 (hex) of the "
                        "request body as read; null when there was none or it was not read."},
        "detail": {"type": "object"},
    },
}

AUDIT_PAGE: Json = {
    "type": "object",
    "required": ["items", "next_cursor"],
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditRow"}},
        "next_cursor": {"type": ["string", "null"], "description": "Pass as `cursor` for the "
                        "next (older) page; null on the last page."},
    },
}


def _param(name: str, description: str, schema: Json) -> Json:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def openapi_schemas() -> Json:
    return {"AuditRow": AUDIT_ROW, "AuditPage": AUDIT_PAGE}


def openapi_paths(op: Callable[..., Json], json_ok: Callable[..., Json]) -> Json:
    get = op("native", "auditList", "The request audit trail, newest first (admins)",
             json_ok("AuditPage"), errors=(400, 500, 503))
    get["description"] = (
        "Every request the daemon served: principal, role, method, path, status, latency, "
        "client address, request id and the SHA-256 of the body (never the body or a "
        "credential). Filters combine with AND. Needs the `admin` role.")
    get["parameters"] = get["parameters"] + [
        _param("principal", "Exact principal.", {"type": "string", "maxLength": 512}),
        _param("path", "Path prefix, e.g. `/api/v1/vectors`.",
               {"type": "string", "pattern": "^/", "maxLength": 512}),
        _param("status", "A status (`429`) or a class (`4xx`).",
               {"type": "string", "pattern": "^([1-5][0-9][0-9]|[1-5][xX][xX])$"}),
        _param("method", "HTTP method.", {"type": "string", "pattern": "^[A-Za-z]{1,16}$"}),
        _param("action", "Row action (`http` for requests).", {"type": "string"}),
        _param("since", "From this time: ISO 8601 or epoch seconds.", {"type": "string"}),
        _param("until", "Up to this time: ISO 8601 or epoch seconds.", {"type": "string"}),
        _param("limit", "Rows per page (default 100).",
               {"type": "integer", "minimum": 1, "maximum": 100000}),
        _param("cursor", "`next_cursor` of the previous page.", {"type": "string",
                                                                 "pattern": "^[0-9]+$"}),
        _param("after", "Only rows with a larger id, oldest first (following the trail).",
               {"type": "string", "pattern": "^[0-9]+$"}),
    ]
    return {AUDIT_PATH: {"get": get}}
