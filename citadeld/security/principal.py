"""The caller of one request, as the auth middleware established it.

Everything downstream (role checks, rate limits, audit, event visibility) reads the principal
from the request instead of re-parsing credentials, so there is one place that decides who
someone is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiohttp import web

PrincipalKind = Literal["key", "jwt", "anonymous", "local"]

@dataclass(frozen=True, slots=True)
class Principal:
    """``name`` is stable per caller (key id, JWT subject, or the client address)."""

    name: str
    role: str  # admin | developer | user | anonymous (mapping configurable)
    kind: PrincipalKind
    key_id: str | None = None
    rate_per_min: float | None = None  # per-key override of the default limit

    @property
    def authenticated(self) -> bool:
        return self.kind in ("key", "jwt")


#: request key under which the auth middleware stores the Principal (a typed RequestKey: a plain
#: string key makes aiohttp warn on every request)
PRINCIPAL_KEY: web.RequestKey[Principal] = web.RequestKey("citadel.principal", Principal)

#: what a request carries when auth is disabled: the operator chose to trust the network
LOCAL = Principal(name="local", role="admin", kind="local")


def principal_of(request: web.Request) -> Principal:
    """The request's principal; LOCAL when no auth middleware ran (auth disabled)."""
    p = request.get(PRINCIPAL_KEY)
    return p if isinstance(p, Principal) else LOCAL
