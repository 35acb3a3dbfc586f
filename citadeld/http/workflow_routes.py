"""Workflow routes (native dialect): submit, status, list, cancel. Validation, state and
visibility rules live in ``citadeld.workflows.service``."""

from __future__ import annotations

from aiohttp import web

from citadeld.errors import BadRequest, Unavailable
from citadeld.http.body import compile_schema, json_response, read_json
from citadeld.http.workflow_openapi import component_schemas
from citadeld.logs import request_id
from citadeld.security.principal import principal_of
from citadeld.state import STATE
from citadeld.workflows.record import public
from citadeld.workflows.service import WorkflowService

_cancel = compile_schema(component_schemas()["WorkflowCancelRequest"])


def _svc(request: web.Request) -> WorkflowService:
    svc = request.app[STATE].extra.get("workflows")
    if not isinstance(svc, WorkflowService):
        raise Unavailable("workflows are not enabled in this daemon", retry_after=30)
    return svc


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise BadRequest(f"query parameter {name} must be an integer in {lo}..{hi}", param=name)
    return int(raw)


async def submit(request: web.Request) -> web.Response:
    svc = _svc(request)
    body = await read_json(request)
    rec = await svc.submit(body, principal_of(request), request_id.get())
    url = f"/api/v1/workflows/{rec['id']}"
    out = public(rec, with_spec=False) | {"status_url": url, "request_id": request_id.get() or ""}
    return json_response(out, status=202, headers={"Location": url})


async def get_workflow(request: web.Request) -> web.Response:
    wid = request.match_info["id"]
    out = await _svc(request).get(wid, principal_of(request))
    return json_response(out)


async def list_workflows(request: web.Request) -> web.Response:
    svc = _svc(request)
    limit = _int(request, "limit", 50, 1, svc.wcfg.list_max_limit)
    offset = _int(request, "offset", 0, 0, 10_000_000)
    out = await svc.list(principal_of(request), request.query.get("status") or None,
                         request.query.get("owner") or None, limit, offset)
    return json_response(out)


async def cancel(request: web.Request) -> web.Response:
    wid = request.match_info["id"]
    reason = None
    if request.body_exists:
        body = await read_json(request, _cancel)
        reason = body.get("reason")
    out, final = await _svc(request).cancel(wid, principal_of(request), reason)
    return json_response(out, status=200 if final else 202)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/workflows", submit)
    app.router.add_get("/api/v1/workflows", list_workflows)
    app.router.add_get("/api/v1/workflows/{id}", get_workflow)
    app.router.add_post("/api/v1/workflows/{id}/cancel", cancel)
