"""Rate-limit trips (429) as security events in the log (the auth middleware logs failed logins
and denied access itself).

One structured WARNING line per event, without secrets (no credentials, no bodies, no query
strings: only who, from where, what route, what happened). A flood (a brute-force run, a client
hammering past its limit) must not become a flood of log writes on the event loop, so each
(kind, principal) logs at most once per ``interval_s`` and the next line says how many were
suppressed in between.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from citadeld.security.principal import Principal

log = logging.getLogger("citadeld.security")

_MAX_TRACKED = 10_000


class SecurityLog:
    def __init__(self, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, suppressed)

    def event(self, kind: str, request: web.Request, principal: Principal,
              **fields: Any) -> bool:
        """Log one event (or count it as suppressed); returns whether a line was written."""
        who = principal.name if principal.authenticated else f"{principal.kind}@{request.remote}"
        now = self.clock()
        key = (kind, who)
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if len(self._last) >= _MAX_TRACKED:
            cutoff = now - self.interval_s
            self._last = {k: v for k, v in self._last.items() if v[0] >= cutoff}
        self._last[key] = (now, 0)
        log.warning("security event", extra={
            "event": kind, "principal": principal.name, "principal_kind": principal.kind,
            "role": principal.role, "key_id": principal.key_id, "client": request.remote,
            "method": request.method, "path": request.path,
            "suppressed_since_last": last[1] if last is not None else 0, **fields})
        return True
