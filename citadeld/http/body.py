"""Request bodies: size-checked, parsed with orjson, validated against the route's JSON Schema
(fastjsonschema compiles each schema to plain Python once; a faster accept test compiled from
the same schema answers the common well-formed body before it, see ``fastcheck``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import fastjsonschema
import orjson
from aiohttp import web

from citadeld.errors import BadRequest, CitadelError, PayloadTooLarge
from citadeld.http.fastcheck import compile_fast

Validator = Callable[[Any], Any]


def compile_schema(schema: dict[str, Any]) -> Validator:
    """The schema's validator: raises ``JsonSchemaValueException`` on an invalid body."""
    full = fastjsonschema.compile(schema)
    fast = compile_fast(schema)

    def validate(data: Any) -> Any:
        return data if fast(data) else full(data)

    return validate


async def read_json(request: web.Request, validate: Validator | None = None) -> Any:
    length = request.content_length  # a property that parses the header on every call
    # client_max_size: the app's, set from server.max_body_bytes (a restart-only key)
    if length is not None and length > request.client_max_size:
        limit = request.client_max_size
        raise PayloadTooLarge(f"request body is {length} bytes (at most {limit})", param=None)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        limit = request.client_max_size
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object", code="invalid_json")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if validate is not None:
        try:
            validate(data)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise BadRequest(_schema_message(exc), param=_param(exc)) from None
    return data


def _schema_message(exc: fastjsonschema.JsonSchemaValueException) -> str:
    msg = str(exc.message)
    if msg.startswith("data."):
        msg = msg[5:]
    elif msg.startswith("data "):
        msg = "body " + msg[5:]
    return msg


def _param(exc: fastjsonschema.JsonSchemaValueException) -> str | None:
    path = getattr(exc, "path", None) or []
    parts = [str(p) for p in path[1:]]
    return parts[0] if parts else None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(
        body=orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY),
        status=status,
        content_type="application/json",
        headers=headers,
    )


__all__ = ["CitadelError", "compile_schema", "json_response", "read_json"]
