"""The request audit trail: one row per HTTP request into PostgreSQL's ``citadel_audit_log``.

The core (``citadeld.http.app``) calls the trail's ``request_done`` from its
``finally`` block, so every request is seen with its final status (errors rendered, timeouts,
clients gone: 499). The hot-path cost is one row encoded to JSON at once and one
``deque.append`` into the PersistenceActor's buffer (batched INSERTs, spill file during
outages, see ``citadeld.actors.persistence``); nothing waits on PostgreSQL. Encoded at once
because a buffered row of Python objects (a list, a dict, a float, strings) stays alive until
its batch is written: thousands of them per batch cost the event loop GC passes and cache
misses (~5 us a request, measured); one bytes object each does not.

A row says who (principal, role), what (method, path - never the query string, which may
carry credentials), the outcome (status, latency), from where (client address), the request id
and the SHA-256 of the request body as the handler read it (aiohttp keeps the bytes it read; a
body nobody read, e.g. of a 401 or 413, has no hash). Never the body, never a header.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from hashlib import sha256
from typing import TYPE_CHECKING, Any

from aiohttp import web
from orjson import Fragment, dumps

from citadeld.actors.persistence import AUDIT_FIELDS
from citadeld.security.principal import LOCAL, PRINCIPAL_KEY, Principal
from citadeld.security.ratelimit_audit_config import AuditConfig

if TYPE_CHECKING:
    from citadeld.actors.persistence import Persistence

log = logging.getLogger("citadeld.audit")

ACTION = "http"  # the action of request rows; domain rows (e.g. vectors.store) keep theirs
# a request the auth layer refused before naming anyone: recorded under its client address
_UNAUTHENTICATED = Principal(name="", role="", kind="anonymous")
_BODY_SHA256 = AUDIT_FIELDS.index("body_sha256")


def _nowhere(kind: str, row: Fragment) -> None:
    """The sink of a trail without PostgreSQL (it is disabled: never called)."""


def _storable(text: str) -> str:
    """Text PostgreSQL and the JSON batch accept: no NUL (a %00 in a URL), no lone surrogate
    (a JWT subject may carry one); one bad row must never stall the whole trail. The caller
    checks ``text.isascii() and "\x00" not in text`` first (the common case, no call)."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


class AuditTrail:
    def __init__(self, cfg: AuditConfig, persistence: Persistence | None,
                 auth_enabled: bool = False) -> None:
        self.cfg = cfg
        self.persistence = persistence
        self.auth_enabled = auth_enabled
        self.enabled = cfg.enabled and persistence is not None
        exact = [p for p in cfg.exclude_paths if not p.endswith("*")]
        self._exact = frozenset(exact)
        self._prefixes = tuple(p[:-1] for p in cfg.exclude_paths if p.endswith("*"))
        self._hashing: set[asyncio.Future[Any]] = set()
        self.recorded = 0
        self.failures = 0
        self._inline_max = cfg.inline_hash_max_bytes
        # bound once: the hot path makes no attribute walk to reach the buffer
        self._sink: Callable[[str, Fragment], None] = (
            persistence.record if persistence is not None else _nowhere)

    def excluded(self, path: str) -> bool:
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))

    def request_done(self, request: web.Request, status: int, elapsed: float, rid: str) -> None:
        """From the core middleware's ``finally``: never blocks, never raises. The row is a
        list in the order of ``AUDIT_FIELDS`` (cheaper to build and to encode than a dict)."""
        try:
            if not self.enabled:
                return
            path = request.path
            if self.excluded(path):
                return
            p = request.get(PRINCIPAL_KEY)
            if p is None:  # auth refused it (401) or never ran; with auth off: LOCAL
                p = _UNAUTHENTICATED if self.auth_enabled else LOCAL
            client = request.remote
            name: str | None = p.name or client
            if name is not None and not (name.isascii() and "\x00" not in name):
                name = _storable(name)
            if not path.isascii() or "\x00" in path:
                path = _storable(path)
            row: list[Any] = [
                time.time() - elapsed, ACTION, None, rid, status, name, p.role or None,
                request.method, path, elapsed * 1000.0, client, None,
                {"kind": p.kind, "key_id": p.key_id} if p.key_id else {"kind": p.kind}]
            body = getattr(request, "_read_bytes", None)  # aiohttp's cache of request.read()
            if body:
                if len(body) <= self._inline_max:
                    row[_BODY_SHA256] = sha256(body).hexdigest()
                else:  # hashlib drops the GIL on big inputs: hash in a thread, record then
                    self._hash_later(row, body)
                    return
            self._sink("audit", Fragment(dumps(row)))
            self.recorded += 1
        except Exception:  # the audit trail must never turn a request into an error
            self.failures += 1
            if self.failures in (1, 10, 100) or self.failures % 1000 == 0:
                log.exception("audit record failed", extra={"failures": self.failures})

    def _record(self, row: list[Any]) -> None:
        self._sink("audit", Fragment(dumps(row)))
        self.recorded += 1

    def _hash_later(self, row: list[Any], body: bytes) -> None:
        fut = asyncio.get_running_loop().run_in_executor(
            None, lambda: sha256(body).hexdigest())
        self._hashing.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._hashing.discard(f)
            row[_BODY_SHA256] = None if f.cancelled() or f.exception() else f.result()
            self._record(row)
        fut.add_done_callback(done)

    async def close(self) -> None:
        """Before persistence closes: let pending body hashes land in the buffer."""
        if self._hashing:
            await asyncio.gather(*list(self._hashing), return_exceptions=True)
            await asyncio.sleep(0)

    def snapshot(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "recorded": self.recorded, "failures": self.failures,
                "excluded_paths": list(self.cfg.exclude_paths)}


AUDIT_TRAIL: web.AppKey[AuditTrail] = web.AppKey("citadel_audit_trail", AuditTrail)

