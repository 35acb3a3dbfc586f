"""One error envelope per API dialect, chosen by the route's path prefix.

native: {"error": {"code", "message", "request_id"}}; OpenAI: {"error": {"message", "type",
"param", "code"}}; Ollama: {"error": "..."}. No stack traces ever reach a client.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import orjson
from aiohttp import web

from citadeld.errors import CitadelError


class Dialect(Enum):
    NATIVE = "native"
    OPENAI = "openai"
    OLLAMA = "ollama"


def dialect_of(path: str) -> Dialect:
    if path.startswith("/v1/") or path == "/v1":
        return Dialect.OPENAI
    if path.startswith("/api/") and not path.startswith("/api/v1/"):
        return Dialect.OLLAMA
    return Dialect.NATIVE


_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(dialect: Dialect, status: int, code: str, message: str, param: str | None,
               request_id: str) -> dict[str, Any]:
    if dialect is Dialect.OPENAI:
        fallback = "server_error" if status >= 500 else "invalid_request_error"
        etype = _OPENAI_TYPES.get(status, fallback)
        return {"error": {"message": message, "type": etype, "param": param, "code": code}}
    if dialect is Dialect.OLLAMA:
        return {"error": message}
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_response(dialect: Dialect, exc: CitadelError, request_id: str) -> web.Response:
    body = error_body(dialect, exc.status, exc.code, exc.message, exc.param, request_id)
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    return web.Response(
        status=exc.status, body=orjson.dumps(body), content_type="application/json",
        headers=headers,
    )
