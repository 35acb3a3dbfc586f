"""A workflow's state as stored (Redis, PostgreSQL, memory) and shown by the API.

One plain JSON document per workflow, so every store keeps the same thing and a resumed run
finds every finished step's output in it. Status words are the API's: pending, running,
completed, failed, cancelled (workflow); pending, running, completed, failed, cancelled,
skipped (step).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from citadeld.workflows.spec import Spec

TERMINAL = frozenset({"completed", "failed", "cancelled"})
STEP_DONE = "completed"


def new_id() -> str:
    return "wf_" + uuid.uuid4().hex


def new_record(spec: Spec, owner: str, request_id: str | None = None) -> dict[str, Any]:
    now = time.time()
    return {
        "id": new_id(), "name": spec.name, "owner": owner, "status": "pending",
        "created_at": now, "updated_at": now, "started_at": None, "finished_at": None,
        "deadline_at": now + spec.deadline_s, "error": None, "instance": None, "runs": 0,
        "cancel_requested": False, "request_id": request_id, "spec": spec.to_json(),
        "steps": {s.id: {"status": "pending", "type": s.type, "attempts": 0,
                         "started_at": None, "finished_at": None, "duration_ms": None,
                         "output": None, "error": None} for s in spec.steps},
    }


def progress(rec: dict[str, Any]) -> dict[str, int]:
    steps = rec["steps"].values()
    counts = {"total": len(rec["steps"]), "completed": 0, "running": 0, "failed": 0}
    for s in steps:
        if s["status"] in counts:
            counts[s["status"]] += 1
    return counts


def summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The list view: no outputs, no spec."""
    return {k: rec.get(k) for k in ("id", "name", "owner", "status", "created_at", "updated_at",
                                    "started_at", "finished_at", "error", "instance")} | {
        "progress": progress(rec), "status_url": f"/api/v1/workflows/{rec['id']}"}


def public(rec: dict[str, Any], with_spec: bool = True) -> dict[str, Any]:
    """The GET view: status, per-step status/timings/outputs/errors, progress."""
    out = summary(rec) | {"deadline_at": rec.get("deadline_at"), "runs": rec.get("runs", 0),
                          "cancel_requested": rec.get("cancel_requested", False)}
    started, finished = rec.get("started_at"), rec.get("finished_at")
    out["duration_ms"] = (round((finished - started) * 1000, 3)
                          if started is not None and finished is not None else None)
    order = [s["id"] for s in rec["spec"]["steps"]]
    out["steps"] = [{"id": sid, **rec["steps"][sid]} for sid in order]
    out["results"] = {sid: rec["steps"][sid]["output"] for sid in order
                      if rec["steps"][sid]["status"] == STEP_DONE}
    if with_spec:
        out["spec"] = rec["spec"]
    return out


def snapshot(rec: dict[str, Any]) -> dict[str, Any]:
    """A compact STATE_SNAPSHOT payload: statuses, no outputs."""
    return {"status": rec["status"], "progress": progress(rec),
            "steps": {sid: s["status"] for sid, s in rec["steps"].items()}}
