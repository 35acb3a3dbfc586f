"""An in-process daemon app with authentication on, for the security tests: the real
``build_app`` over the real ``Daemon.build`` state (actors not started: routes that need them
answer 503, which is "allowed" as far as auth is concerned), one config API key per role and an
HS256 secret for tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from citadeld.config import Config
from citadeld.http.app import build_app
from citadeld.runtime import Daemon
from citadeld.security.config import ROLES
from citadeld.security.keys import generate

HS_SECRET = "test-secret-of-at-least-thirty-two-bytes!"
ISSUER = "https://idp.test"


def role_keys() -> tuple[dict[str, str], list[dict[str, Any]]]:
    """One key per role: ({role: key}, the auth.api_keys entries)."""
    keys, entries = {}, []
    for role in ROLES:
        key_id, key, sha = generate()
        keys[role] = key
        entries.append({"id": key_id, "sha256": sha, "name": f"test-{role}", "role": role})
    return keys, entries


def hs_token(role: str | None = "user", *, secret: str = HS_SECRET, **claims: Any) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": f"someone-{role}", "iss": ISSUER, "iat": now,
                            "exp": now + 300}
    if role is not None:
        body["role"] = role
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, secret,
                      algorithm="HS256")


def config(tmp: Path, keys: list[dict[str, Any]], **sections: Any) -> Config:
    auth = {"enabled": True, "api_keys": keys,
            "jwt": {"hs256_secret": HS_SECRET, "issuer": ISSUER}, **sections.pop("auth", {})}
    return Config.model_validate({
        "state_dir": str(tmp),
        "embedding": {"default_model": "m", "models": {"m": {
            "backend": "ollama", "dims": 8, "endpoints": [{"url": "http://127.0.0.1:9"}],
            "timeout_s": 1, "connect_timeout_s": 0.2, "attempts": 1}}},
        "auth": auth, **sections})


@asynccontextmanager
async def auth_client(cfg: Config, setup: Callable[[web.Application], None] | None = None
                      ) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """`setup` may add routes (as later issues do) before the app starts."""
    daemon = Daemon(cfg)
    state = daemon.build(asyncio.get_running_loop())
    app = build_app(state)
    if setup is not None:
        setup(app)
    server = TestServer(app)
    await server.start_server(**cfg.limits.runner_kwargs())  # as the daemon's AppRunner gets
    async with TestClient(server) as client:
        yield client
    for pool in state.pools.values():
        pool.close(RuntimeError("test over"))
