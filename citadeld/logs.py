"""Structured JSON-line logs on stdout (journald keeps them), each stamped with the request id
of the request being served, carried in a contextvar so deep code needs no plumbing."""

from __future__ import annotations

import atexit
import contextvars
import logging
import sys
import threading
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """Writes without a flush per record: an access line per request must not cost a write
    syscall on the event loop. Warnings and errors flush at once; a background thread flushes
    the rest twice a second, so journald still sees every line promptly."""

    def __init__(self, stream: Any, interval: float = 0.5) -> None:
        super().__init__(stream)
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_loop, args=(interval,), name="log-flush", daemon=True
        )
        self._flusher.start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            self.stream.write(line + "\n")
            if record.levelno >= logging.WARNING:
                self.flush()
        except Exception:
            self.handleError(record)

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()


def setup_logging(level: str) -> None:
    handler = BufferedStreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)
    # third-party chatter stays at warning unless we debug
    for noisy in ("httpx", "httpcore", "pykka", "aiohttp.access", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("citadeld").setLevel(level.upper())
