"""How the security layer joins the app: one call from ``build_app``.

Layer order: the core (request id, deadline, metrics, dialect errors; ``citadeld.http.app``
composes it at start-up at each route, outermost, with the middlewares added here inside it in
their order), then CORS (preflights never need a credential), then auth.
Later layers that need the principal (rate limits, audit) go after auth: add them in
:func:`install`.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from citadeld.security.config import AuthConfig, CORSConfig
from citadeld.security.cors import CORS
from citadeld.security.jwt_auth import JWTVerifier
from citadeld.security.key_store import KeyStore
from citadeld.security.middleware import Authenticator, make_middleware

log = logging.getLogger("citadeld.security")

AUTH: web.AppKey[Authenticator] = web.AppKey("citadel_auth", Authenticator)


def install(app: web.Application, state: Any) -> None:
    """Add CORS and auth to `app` per the config in `state` (a DaemonState)."""
    cfg = state.config
    auth_cfg: AuthConfig = getattr(cfg, "auth", None) or AuthConfig()
    cors_cfg: CORSConfig = getattr(cfg, "cors", None) or CORSConfig()
    if cors_cfg.allow_origins:
        cors = CORS(cors_cfg)
        app.middlewares.append(cors.middleware)
        app.on_response_prepare.append(cors.on_response_prepare)
    if not auth_cfg.enabled:
        return
    storage = getattr(state, "storage", None)
    keys = KeyStore(auth_cfg, getattr(storage, "persistence", None),
                    getattr(cfg, "state_dir", None))
    verifier = JWTVerifier(auth_cfg.jwt) if auth_cfg.jwt.enabled else None
    auth = Authenticator(auth_cfg, keys, verifier)
    app[AUTH] = auth
    extra = getattr(state, "extra", None)
    if isinstance(extra, dict):
        extra["keys"] = keys  # for `citadelctl keys ...`
    app.middlewares.append(make_middleware(auth))

    async def on_startup(app: web.Application) -> None:
        auth.policy.bind(app)
        await keys.start()
        if verifier is not None and verifier.jwks is not None:
            verifier.jwks.start_fetch()  # warm: the first token need not wait for it
        if keys.persistence is None and not auth_cfg.api_keys and verifier is None:
            log.warning("authentication is on but nothing can authenticate: no persistence.dsn"
                        " (for `citadelctl keys create`), no auth.api_keys (`citadeld keygen`)"
                        " and no auth.jwt source; only the open routes answer")
        log.info("authentication on", extra={
            "api_keys": keys.status(), "jwt": "jwks" if auth_cfg.jwt.jwks_url else
            "hs256" if auth_cfg.jwt.hs256_secret else "off",
            "open_routes": list(auth_cfg.open_routes)})

    async def on_cleanup(app: web.Application) -> None:
        await keys.close()
        if verifier is not None:
            await verifier.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
