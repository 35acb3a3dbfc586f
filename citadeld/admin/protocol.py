"""The admin socket's wire protocol: newline-delimited JSON, one request and one answer a line.

Request:  ``{"v": 1, "id": 7, "cmd": "cache flush", "args": {}, "confirm": true}``
          or, as citadelctl sends it, the words the operator typed instead of ``cmd``/``args``:
          ``{"v": 1, "id": 7, "words": ["breakers", "open", "llm-a"], "confirm": true}``
          (the daemon picks the longest registered command name that prefixes the words and maps
          the rest to the command's parameters, so new commands need no change in citadelctl).
Answer:   ``{"v": 1, "id": 7, "ok": true, "cmd": "cache flush", "result": ...}``
          ``{"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}``

``v`` is the protocol version. A daemon answers a version it does not speak with
``unsupported_version`` and the list it does speak; additions that old clients can ignore (new
commands, new keys in results) do not change the version. Lines are at most ``MAX_LINE`` bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_LINE = 1024 * 1024

# error codes
BAD_REQUEST = "bad_request"
UNSUPPORTED_VERSION = "unsupported_version"
UNKNOWN_COMMAND = "unknown_command"
USAGE = "usage"
CONFIRMATION_REQUIRED = "confirmation_required"
FORBIDDEN = "forbidden"
TIMEOUT = "timeout"
FAILED = "failed"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"


class AdminError(Exception):
    """Raised by a command handler (or the dispatcher) to answer ``ok: false``."""

    def __init__(self, message: str, code: str = FAILED, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, **self.details}


def encode(obj: Any) -> bytes:
    return orjson.dumps(obj, default=str, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def decode(line: bytes) -> Any:
    return orjson.loads(line)
