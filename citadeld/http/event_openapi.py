"""The live-event routes' part of the OpenAPI document; ``openapi.build_openapi`` merges it.

OpenAPI has no words for a websocket conversation, so the upgrade is documented as a GET
answering 101, with the frames both ways as named schemas (``WorkflowEvent``,
``EventsClientMessage``, ``EventsControlMessage``); SSE is a ``text/event-stream`` response
whose ``data:`` lines are ``WorkflowEvent`` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from citadeld.events.model import EVENT_TYPES

Json = dict[str, Any]

ROUTES = frozenset({
    ("GET", "/ws"),
    ("GET", "/ws/workflows/{workflow_id}"),
    ("GET", "/api/v1/events"),
})

_ID = {"type": "string", "pattern": r"^\d{1,15}-\d{1,19}$", "examples": ["1732623000000-0"]}
_WF = {"type": "string", "pattern": r"^[A-Za-z0-9._:-]{1,128}$"}

_EVENT: Json = {
    "type": "object",
    "description": (
        "One workflow event (AG-UI run/step vocabulary). Fields of the event's data (step_id, "
        "delta, snapshot, error, ...) sit beside these. GAP: the subscriber missed events "
        "between `from` and `to` (`dropped` of them; `reason: retention` when history was "
        "trimmed); a GAP has no id."),
    "required": ["type", "workflow_id", "ts"],
    "properties": {
        "id": {**_ID, "type": ["string", "null"],
               "description": "Resume point (SSE Last-Event-ID, websocket `after`)."},
        "type": {"type": "string", "enum": sorted(EVENT_TYPES)},
        "workflow_id": {"type": "string", "description": "`*` on a GAP of all workflows."},
        "ts": {"type": "number", "description": "Publish time, seconds since the epoch."},
        "step_id": {"type": "string"},
        "from": _ID,
        "to": _ID,
        "dropped": {"type": ["integer", "null"]},
    },
    "additionalProperties": True,
}

_CLIENT: Json = {
    "type": "object",
    "description": "A frame a `/ws` client sends (JSON text, at most `events.ws_max_message_"
                   "bytes`, at most `events.ws_max_messages_per_s`). `workflow_id` null or "
                   "absent: all workflows the caller may see.",
    "required": ["type"],
    "properties": {
        "type": {"type": "string", "enum": ["subscribe", "unsubscribe", "ping"]},
        "workflow_id": {**_WF, "type": ["string", "null"]},
        "after": {**_ID, "type": ["string", "null"],
                  "description": "subscribe only: events strictly after this id."},
    },
    "additionalProperties": False,
}

_CONTROL: Json = {
    "type": "object",
    "description": "The server's reply to a client frame (lower-case types; events keep "
                   "their upper-case ones): subscribed, unsubscribed (also when a workflow "
                   "finished: `reason: finished`), pong, error (`code`, `message`).",
    "required": ["type"],
    "properties": {
        "type": {"type": "string",
                 "enum": ["subscribed", "unsubscribed", "pong", "error"]},
        "workflow_id": {**_WF, "type": ["string", "null"]},
        "code": {"type": "string"},
        "message": {"type": "string"},
    },
}

_CLOSE_CODES = (
    "Close codes: 1000 workflow finished (`/ws/workflows/{id}`); 1001 daemon shutting down or "
    "the bus closed; 1008 too many client messages; 1009 a client frame over the size limit; "
    "1011 internal error; 1013 event history unreachable (Redis down), retry; 4008 slow "
    "consumer (fell behind the bus's policy, or did not read for `events.send_timeout_s`): "
    "reconnect with `after` = the last id received.")


def component_schemas() -> Json:
    return {"WorkflowEvent": _EVENT, "EventsClientMessage": _CLIENT,
            "EventsControlMessage": _CONTROL}


def paths(op: Callable[..., Json], ref: Callable[[str, str], Json]) -> Json:
    def param(name: str, where: str, schema: Json, doc: str, required: bool = False) -> Json:
        return {"name": name, "in": where, "required": required, "schema": schema,
                "description": doc}

    def upgrade(operation: Json, doc: str, *params: Json) -> Json:
        operation["responses"].pop("200", None)
        operation["responses"] = {"101": {
            "description": f"Switching Protocols (websocket). {doc} {_CLOSE_CODES}",
            "content": {"application/json": {"schema": ref("schemas", "WorkflowEvent")}},
        }, **operation["responses"]}
        operation["parameters"] = [*operation["parameters"], *params]
        return operation

    after = param("after", "query", _ID, "Resume: only events strictly after this id.")
    sse_ok = {
        "description": (
            "`text/event-stream`: `id: <event id>` and `data: <WorkflowEvent JSON>` per event "
            "(a GAP has no id line), `: ping` comments every `events.heartbeat_s`, `retry:` "
            "2000 ms. A workflow's stream ends after its terminal event; `event: error` ends a "
            "stream that fell behind the slow-consumer policy."),
        "content": {"text/event-stream": {"schema": {"type": "string"},
                                          "example": 'id: 1732623000000-0\ndata: {"id": '
                                                     '"1732623000000-0", "type": "RUN_STARTED"'
                                                     ', "workflow_id": "wf1", "ts": 1732623000'
                                                     '.0}\n\n'}},
    }
    sse = op("native", "eventsStream",
             "Server-sent events of all workflows the caller may see, or of one",
             sse_ok, errors=(400, 404, 500, 503),
             extra={"204": {"description": "The workflow finished at or before Last-Event-ID: "
                                           "nothing more will come (EventSource stops)."}})
    sse["parameters"] = [
        *sse["parameters"],
        param("workflow_id", "query", _WF, "Only this workflow's events, from its retained "
                                           "beginning (or after Last-Event-ID)."),
        param("Last-Event-ID", "header", _ID, "Resume after this id (sent by EventSource on "
                                              "reconnect)."),
        after,
    ]
    return {
        "/ws/workflows/{workflow_id}": {"get": upgrade(
            op("native", "eventsWorkflowSocket",
               "Websocket of one workflow's events: history, then live",
               {"description": "unused"}, errors=(400, 404, 500, 503)),
            "Server frames are WorkflowEvent JSON text frames, history first (from the "
            "retained beginning, or after `after`), then live; closed after the terminal "
            "event. Client frames are ignored (answered with an error frame).",
            param("workflow_id", "path", _WF, "The workflow.", True), after)},
        "/ws": {"get": upgrade(
            op("native", "eventsSocket",
               "Websocket of every event the caller may see, with subscribe/unsubscribe",
               {"description": "unused"}, errors=(400, 500, 503)),
            "Starts subscribed to all visible events from now (or after `after`; "
            "`?subscribe=none` starts with nothing). Client frames: EventsClientMessage; "
            "replies: EventsControlMessage; events: WorkflowEvent. A workflow subscribed by id "
            "gets its history then live events, and leaves the all-events feed.",
            after, param("subscribe", "query", {"type": "string", "enum": ["all", "none"]},
                         "`none`: start without the all-events subscription."))},
        "/api/v1/events": {"get": sse},
    }
