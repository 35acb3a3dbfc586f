"""The auth middleware: who is calling (API key or JWT), may they call this route.

It runs inside ``core_middleware`` (request id, metrics and access log cover its answers) and
stores a :class:`Principal` in ``request[PRINCIPAL_KEY]`` for everything downstream. Answers:
401 with ``WWW-Authenticate`` when a credential is missing or bad, 403 when a good credential
lacks the role; both in the route's dialect. The client learns only that its credential is
invalid; why (unknown id, wrong secret, expired, revoked, bad signature ...) goes to the
security log, without the secret.

Credentials: ``Authorization: Bearer <key or JWT>`` or ``X-API-Key: <key>``; a websocket
upgrade may carry ``?access_token=<key or JWT>`` instead, because browsers cannot set headers
on websockets (the query string may end up in proxy logs: prefer short-lived JWTs there).
On open routes a credential is optional; a valid one still names the caller (rate limits,
audit), an invalid one is ignored so a stale token never fails a probe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from citadeld.errors import CitadelError
from citadeld.http.errors import dialect_of, error_response
from citadeld.logs import request_id
from citadeld.security.config import AuthConfig
from citadeld.security.jwt_auth import JWTVerifier, TokenRejected, looks_like_jwt
from citadeld.security.key_store import KeyStore
from citadeld.security.keys import KeyEntry, key_id_of, looks_like_key
from citadeld.security.principal import PRINCIPAL_KEY, Principal
from citadeld.security.roles import OPEN, Policy, rank_of

security_log = logging.getLogger("citadeld.security")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unauthorized(CitadelError):
    status = 401
    code = "unauthorized"


class Forbidden(CitadelError):
    status = 403
    code = "forbidden"


class Authenticator:
    """Everything the middleware needs, built once per app."""

    def __init__(self, cfg: AuthConfig, keys: KeyStore, jwt: JWTVerifier | None) -> None:
        self.cfg = cfg
        self.policy = Policy(cfg)
        self.keys = keys
        self.jwt = jwt
        realm = cfg.realm.replace('"', "")
        self.challenge = f'Bearer realm="{realm}"'
        self.challenge_invalid = f'Bearer realm="{realm}", error="invalid_token"'
        self.challenge_scope = f'Bearer realm="{realm}", error="insufficient_scope"'

    async def authenticate(self, token: str) -> Principal | str:
        """The token's principal, or why it was refused."""
        if looks_like_key(token):
            return self.keys.table.verify(token)
        if self.jwt is not None and looks_like_jwt(token):
            try:
                return await self.jwt.verify(token)
            except TokenRejected as exc:
                return str(exc)
        return "not an API key" + (" or a JWT" if self.jwt is not None else "")


def credential(request: web.Request) -> str | None:
    """The presented credential; "" when a header is there but unusable."""
    headers = request.headers
    value = headers.get("Authorization")
    if value is not None:
        scheme, _, token = value.strip().partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""
    value = headers.get("X-API-Key")
    if value is not None:
        return value.strip()
    if headers.get("Upgrade", "").lower() == "websocket":
        return request.query.get("access_token")
    return None


def security_event(event: str, request: web.Request, reason: str, status: int,
                   token: str | None = None, principal: Principal | None = None) -> None:
    extra = {"event": event, "reason": reason, "status": status, "method": request.method,
             "path": request.path, "remote": request.remote}
    if token:
        kid = key_id_of(token)
        if kid is not None:
            extra["key_id"] = kid
    if principal is not None:
        extra.update(principal=principal.name, role=principal.role, kind=principal.kind)
    security_log.warning("access " + ("denied" if status == 403 else "refused"), extra=extra)


def _refuse(request: web.Request, auth: Authenticator, status: int, message: str,
            challenge: str) -> web.Response:
    exc = (Forbidden if status == 403 else Unauthorized)(message)
    resp = error_response(dialect_of(request.path), exc, request_id.get() or "")
    resp.headers["WWW-Authenticate"] = challenge
    return resp


# a cache of Authorization header values that proved to be valid API keys; past this many
# distinct values it starts over (a daemon sees a handful of keys, not thousands)
_CACHE_MAX = 256


def make_middleware(auth: Authenticator) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware. A repeat ``Authorization`` value that was a valid API key costs one dict
    lookup (no regex, no sha256): its principal is cached along with the key table it was
    checked against, so a refresh, create or revoke (each swaps the table) and the key's expiry
    still take effect at once. Refusals and JWTs are never cached."""
    policy = auth.policy
    table = auth.keys.table  # the same object for the daemon's life; its entries are swapped
    # header value -> (principal, its rank, the key's expiry, the table the key was checked in)
    seen: dict[str, tuple[Principal, int, float, dict[str, KeyEntry]]] = {}
    clock = time.time

    @web.middleware
    async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        need = policy.requirement(request.match_info.route).rank
        header = request.headers.get("Authorization")
        if header is not None:
            hit = seen.get(header)
            if hit is not None and hit[3] is table.entries and hit[1] >= need \
                    and clock() < hit[2]:
                request[PRINCIPAL_KEY] = hit[0]
                return await handler(request)
        token = credential(request)
        principal: Principal | str
        if token is None:
            if need == OPEN:
                request[PRINCIPAL_KEY] = Principal(name=request.remote or "unknown",
                                                   role="anonymous", kind="anonymous")
                return await handler(request)
            security_event("auth_failed", request, "no credential", 401)
            return _refuse(request, auth, 401, "authentication required: send Authorization:"
                           " Bearer <API key or token>, or X-API-Key", auth.challenge)
        if not token:
            principal = "unusable Authorization header"
        elif looks_like_key(token):  # no coroutine, no await
            entries = table.entries
            principal = table.verify(token)
            if header is not None and isinstance(principal, Principal):
                if len(seen) >= _CACHE_MAX:
                    seen.clear()
                expires = entries[principal.name].expires_at
                seen[header] = (principal, rank_of(principal.role),
                                math.inf if expires is None else expires, entries)
        else:
            principal = await auth.authenticate(token)
        if isinstance(principal, str):
            if need != OPEN:
                security_event("auth_failed", request, principal, 401, token)
                return _refuse(request, auth, 401, "invalid credential", auth.challenge_invalid)
            principal = Principal(name=request.remote or "unknown", role="anonymous",
                                  kind="anonymous")
        elif rank_of(principal.role) < need:
            security_event("access_denied", request, "role", 403, token, principal)
            return _refuse(request, auth, 403,
                           f"role {principal.role!r} may not {request.method} this route",
                           auth.challenge_scope)
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return auth_middleware
