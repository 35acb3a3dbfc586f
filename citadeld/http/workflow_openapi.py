"""The workflow routes' part of the OpenAPI document; ``openapi.build_openapi`` merges it in.

Request schemas are the ones the spec validator compiles (``citadeld.workflows.spec``), so the
document cannot drift from what the daemon enforces."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from citadeld.workflows.spec import OUTPUTS, PARAM_SCHEMAS, STEP_TYPES, WORKFLOW_SCHEMA

Json = dict[str, Any]

ROUTES = frozenset({
    ("POST", "/api/v1/workflows"),
    ("GET", "/api/v1/workflows"),
    ("GET", "/api/v1/workflows/{id}"),
    ("POST", "/api/v1/workflows/{id}/cancel"),
})

_SUBMIT_ERRORS = (400, 413, 500, 503)
_READ_ERRORS = (400, 404, 500, 503)

_STEP_DOC = (
    "One step. `type` is one of " + ", ".join(f"`{t}`" for t in STEP_TYPES) + "; `params` "
    "follow the type's schema (WorkflowParams_<type>). A parameter may quote an earlier step's "
    "output: a string that is exactly `{{steps.<id>.output.<field>[.<key|index>...]}}` takes "
    "the value as it is (a list stays a list); inside a longer string the value is inserted "
    "as text (lists of strings joined by blank lines, anything else as JSON). A reference "
    "makes that step a dependency. Outputs: " + "; ".join(
        f"{t}: {', '.join(sorted(OUTPUTS[t]))}" for t in STEP_TYPES) + ".")

_STEP_STATE: Json = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "type": {"type": "string"},
        "status": {"enum": ["pending", "running", "completed", "failed", "cancelled",
                            "skipped"]},
        "attempts": {"type": "integer"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "duration_ms": {"type": ["number", "null"]},
        "output": {"description": "The step's output once completed (see the outputs of its "
                                  "type)."},
        "error": {"type": ["string", "null"]},
    },
}
_STATUS: Json = {
    "type": "object",
    "required": ["id", "status", "owner", "progress", "status_url"],
    "properties": {
        "id": {"type": "string"}, "name": {"type": ["string", "null"]},
        "owner": {"type": "string", "description": "The principal that submitted it."},
        "status": {"enum": ["pending", "running", "completed", "failed", "cancelled"]},
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "deadline_at": {"type": ["number", "null"]},
        "duration_ms": {"type": ["number", "null"]},
        "error": {"type": ["string", "null"]},
        "instance": {"type": ["string", "null"], "description": "The daemon running it."},
        "runs": {"type": "integer", "description": "Times it was started (>1: resumed)."},
        "cancel_requested": {"type": "boolean"},
        "progress": {"type": "object", "properties": {
            "total": {"type": "integer"}, "completed": {"type": "integer"},
            "running": {"type": "integer"}, "failed": {"type": "integer"}}},
        "steps": {"type": "array", "items": _STEP_STATE},
        "results": {"type": "object", "description": "Outputs of the completed steps by id."},
        "spec": {"type": "object"},
        "status_url": {"type": "string"},
    },
}


def _no_exclusive(node: Any) -> Any:
    """``exclusiveMinimum: 0`` as ``minimum: 0`` (the bundled 3.0 renderer knows only the
    boolean form); the daemon still refuses 0 itself."""
    if isinstance(node, dict):
        out = {k: _no_exclusive(v) for k, v in node.items() if k != "exclusiveMinimum"}
        if "exclusiveMinimum" in node:
            out["minimum"] = node["exclusiveMinimum"]
            out["description"] = (out.get("description", "") + " Must be > "
                                  f"{node['exclusiveMinimum']}.").strip()
        return out
    if isinstance(node, list):
        return [_no_exclusive(v) for v in node]
    return node


def component_schemas() -> Json:
    req = _no_exclusive(copy.deepcopy(WORKFLOW_SCHEMA))
    req["properties"]["steps"]["items"]["description"] = _STEP_DOC
    req["properties"]["steps"]["description"] = "At most `workflows.max_steps` steps (a DAG)."
    req["properties"]["deadline_s"]["description"] = (
        "Whole-workflow deadline in seconds (default `workflows.default_deadline_s`).")
    out: Json = {
        "WorkflowRequest": req,
        "WorkflowStatus": copy.deepcopy(_STATUS),
        "WorkflowList": {"type": "object", "properties": {
            "workflows": {"type": "array", "items": {"type": "object"}},
            "total": {"type": "integer"}, "limit": {"type": "integer"},
            "offset": {"type": "integer"}, "next_offset": {"type": "integer"}}},
        "WorkflowCancelRequest": {"type": "object", "additionalProperties": False,
                                  "properties": {"reason": {"type": "string",
                                                            "maxLength": 500}}},
    }
    for t, schema in PARAM_SCHEMAS.items():
        out[f"WorkflowParams_{t}"] = copy.deepcopy(schema)
    return out


def paths(op: Callable[..., Json], json_ok: Callable[..., Json],
          ref: Callable[[str, str], Json]) -> Json:
    def param(name: str, where: str, schema: Json, description: str,
              required: bool = False) -> Json:
        return {"name": name, "in": where, "required": required, "description": description,
                "schema": schema}

    def with_params(o: Json, *params: Json) -> Json:
        o["parameters"] = [*o.get("parameters", []), *params]
        return o

    def native(description: str) -> Json:
        return {"description": description,
                "content": {"application/json": {"schema": ref("schemas", "NativeError")}}}

    wid = param("id", "path", {"type": "string"}, "The workflow id.", True)
    accepted = json_ok("WorkflowStatus", "Accepted: recorded durably (when PostgreSQL is "
                       "configured) and queued. `Location` is the status URL.")
    accepted["headers"] = {**accepted["headers"], "Location": {
        "description": "The status URL.", "schema": {"type": "string"}}}
    example = {"name": "summarise", "steps": [
        {"id": "embed", "type": "embedding", "params": {"text": "a document"}},
        {"id": "search", "type": "vector_search",
         "params": {"vector": "{{steps.embed.output.vector}}", "limit": 3}},
        {"id": "summarise", "type": "llm_query", "params": {
            "model": "llama3.2", "prompt": "Summarise:\n{{steps.search.output.texts}}"}}]}
    submit = op("native", "workflowsSubmit", "Submit a workflow (a DAG of steps)",
                json_ok("WorkflowStatus"), errors=_SUBMIT_ERRORS, request="WorkflowRequest",
                request_example=example, extra={"202": accepted})
    del submit["responses"]["200"]
    cancel = op("native", "workflowsCancel", "Cancel a workflow (a running step is stopped,"
                " its upstream request aborted)", json_ok("WorkflowStatus", "Cancelled."),
                errors=_READ_ERRORS, request="WorkflowCancelRequest", extra={
                    "202": json_ok("WorkflowStatus", "Cancellation requested; the daemon "
                                   "running it has not confirmed yet."),
                    "409": native("The workflow had already finished.")})
    cancel["requestBody"]["required"] = False
    return {
        "/api/v1/workflows": {
            "post": submit,
            "get": with_params(
                op("native", "workflowsList", "List workflows (newest first)",
                   json_ok("WorkflowList"), errors=_READ_ERRORS),
                param("status", "query", {"enum": ["pending", "running", "completed",
                                                   "failed", "cancelled"]}, "Filter."),
                param("owner", "query", {"type": "string"},
                      "Filter (non-admins only ever see their own)."),
                param("limit", "query", {"type": "integer", "minimum": 1}, "Page size."),
                param("offset", "query", {"type": "integer", "minimum": 0}, "Skip.")),
        },
        "/api/v1/workflows/{id}": {"get": with_params(
            op("native", "workflowsGet", "Status, per-step status, results, errors, timings",
               json_ok("WorkflowStatus"), errors=_READ_ERRORS), wid)},
        "/api/v1/workflows/{id}/cancel": {"post": with_params(cancel, wid)},
    }
