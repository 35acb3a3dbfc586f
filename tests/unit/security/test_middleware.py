"""The auth middleware on the real app: JWTs, the principal handed downstream, websocket
upgrades with ?access_token=, open routes, and security log lines without secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from citadeld.http.app import build_app
from citadeld.runtime import Daemon
from citadeld.security.principal import principal_of
from citadeld.security.wiring import AUTH
from tests.support.auth import config, hs_token, role_keys


async def whoami(request: web.Request) -> web.Response:
    p = principal_of(request)
    return web.json_response({"name": p.name, "role": p.role, "kind": p.kind,
                              "key_id": p.key_id})


async def ws(request: web.Request) -> web.WebSocketResponse:
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    p = principal_of(request)
    await sock.send_json({"name": p.name, "role": p.role})
    await sock.close()
    return sock


@asynccontextmanager
async def client(tmp: Path, **sections: Any) -> AsyncIterator[tuple[TestClient[Any, Any],
                                                                    dict[str, str]]]:
    keys, entries = role_keys()
    cfg = config(tmp, entries, **sections)
    state = Daemon(cfg).build(asyncio.get_running_loop())
    app = build_app(state)
    # routes a later issue adds (workflows are user routes by the default rules)
    app.router.add_get("/api/v1/workflows/whoami", whoami)
    app.router.add_get("/api/v1/workflows/ws", ws)
    async with TestClient(TestServer(app)) as c:
        yield c, keys


async def test_jwt_roles_through_the_app(tmp_path: Path) -> None:
    async with client(tmp_path) as (c, _):
        r = await c.get("/api/v1/workflows/whoami",
                        headers={"Authorization": f"Bearer {hs_token('developer')}"})
        assert r.status == 200
        assert await r.json() == {"name": "someone-developer", "role": "developer",
                                  "kind": "jwt", "key_id": None}
        h = {"Authorization": f"Bearer {hs_token('user')}"}
        assert (await c.get("/health/detailed", headers=h)).status == 403
        h = {"Authorization": f"Bearer {hs_token('developer')}"}
        assert (await c.get("/health/detailed", headers=h)).status == 200
        # a token without a known role is authenticated but may do nothing protected
        h = {"Authorization": f"Bearer {hs_token(None)}"}
        r = await c.post("/v1/embeddings", json={}, headers=h)
        assert r.status == 403 and (await r.json())["error"]["type"] == "permission_error"
        for bad in (hs_token("admin", secret="another-secret-of-thirty-two-bytes!!"),
                    hs_token("admin", exp=1), hs_token("admin", iss="https://evil.test")):
            r = await c.get("/api/tags", headers={"Authorization": f"Bearer {bad}"})
            assert r.status == 401 and isinstance((await r.json())["error"], str)


async def test_principal_of_keys_and_anonymous(tmp_path: Path) -> None:
    async with client(tmp_path, auth={"open_routes": ["/health*", "/metrics",
                                                      "/api/v1/workflows/whoami"]}) as (c, keys):
        r = await c.get("/api/v1/workflows/whoami", headers={"X-API-Key": keys["admin"]})
        body = await r.json()
        assert body["kind"] == "key" and body["role"] == "admin"
        assert body["key_id"] == keys["admin"][3:15] == body["name"]
        r = await c.get("/api/v1/workflows/whoami")
        assert await r.json() == {"name": "127.0.0.1", "role": "anonymous",
                                  "kind": "anonymous", "key_id": None}
        # a bad credential on an open route: anonymous, not refused
        r = await c.get("/api/v1/workflows/whoami", headers={"X-API-Key": "ck_nope"})
        assert r.status == 200 and (await r.json())["kind"] == "anonymous"


async def test_websocket_upgrade_with_query_token(tmp_path: Path) -> None:
    async with client(tmp_path) as (c, keys):
        for url in (f"/api/v1/workflows/ws?access_token={keys['user']}",
                    f"/api/v1/workflows/ws?access_token={hs_token('user')}"):
            sock = await c.ws_connect(url)
            msg = await sock.receive()
            assert msg.type == WSMsgType.TEXT and json.loads(msg.data)["role"] == "user"
            await sock.close()
        sock = await c.ws_connect("/api/v1/workflows/ws",
                                  headers={"Authorization": f"Bearer {keys['user']}"})
        assert json.loads((await sock.receive()).data)["role"] == "user"
        await sock.close()
        from aiohttp import WSServerHandshakeError
        with pytest.raises(WSServerHandshakeError) as info:
            await c.ws_connect("/api/v1/workflows/ws?access_token=ck_bad")
        assert info.value.status == 401
        with pytest.raises(WSServerHandshakeError):
            await c.ws_connect("/api/v1/workflows/ws")
        # the query token counts only on an upgrade, never on a plain request
        r = await c.get(f"/api/v1/workflows/whoami?access_token={keys['user']}")
        assert r.status == 401


async def test_security_log_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="citadeld.security")
    async with client(tmp_path) as (c, keys):
        wrong = keys["admin"][:-2] + "zz"
        await c.post("/api/embed", json={}, headers={"X-API-Key": wrong})
        await c.get("/health/detailed", headers={"X-API-Key": keys["user"]})
    records = [r for r in caplog.records if r.name == "citadeld.security"]
    failed = next(r for r in records if getattr(r, "event", "") == "auth_failed")
    assert failed.reason == "wrong secret" and failed.key_id == keys["admin"][3:15]  # type: ignore[attr-defined]
    denied = next(r for r in records if getattr(r, "event", "") == "access_denied")
    assert denied.role == "user" and denied.status == 403  # type: ignore[attr-defined]
    text = " ".join(str(r.__dict__) for r in records)
    assert wrong not in text and keys["user"] not in text and keys["user"][16:] not in text


async def test_raw_non_utf8_credentials_are_401_not_500(tmp_path: Path) -> None:
    """Header bytes that are not UTF-8 reach Python as surrogates; PyJWT cannot encode them."""
    async with client(tmp_path) as (c, keys):
        host, port = c.server.host, c.server.port
        for header in (b"Authorization: Bearer eyJ\xff.e30.x", b"Authorization: Bearer \xff",
                       b"X-API-Key: ck_\xff\xfe", b"Authorization: \xff",
                       b"X-API-Key: \xc3\xa9.\xc3\xa9.\xc3\xa9",
                       b"Authorization: Bearer " + keys["user"].encode()[:-1] + b"\xe9"):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                         + header + b"\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            status = (await reader.read()).split(b"\r\n", 1)[0]
            writer.close()
            assert status == b"HTTP/1.1 401 Unauthorized", (header, status)


async def test_repeat_key_is_cached_until_the_table_or_expiry_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeat Authorization value skips the regex and the sha256, but a new key table
    (refresh, create, revoke, reload) and the key's expiry still count at once."""
    async with client(tmp_path) as (c, keys):
        store = c.app[AUTH].keys
        calls: list[str] = []
        verify = store.table.verify
        monkeypatch.setattr(store.table, "verify", lambda t: calls.append(t) or verify(t))
        h = {"Authorization": f"Bearer {keys['user']}"}
        for _ in range(3):
            r = await c.get("/api/v1/workflows/whoami", headers=h)
            assert r.status == 200 and (await r.json())["role"] == "user"
        assert len(calls) == 1
        # the cached principal still meets each route's role
        assert (await c.get("/health/detailed", headers=h)).status == 403
        # a wrong secret is never served from the cache, nor cached
        wrong = {"Authorization": f"Bearer {keys['user'][:-2]}zz"}
        for _ in range(2):
            assert (await c.get("/api/v1/workflows/whoami", headers=wrong)).status == 401
        # a reload without the key takes effect on the next request
        kept = list(store.cfg.api_keys)
        others = [k for k in kept if k.role != "user"]
        store.set_config_keys(others)
        assert (await c.get("/api/v1/workflows/whoami", headers=h)).status == 401
        # a cached key past its expiry is refused
        user = next(k for k in kept if k.role == "user")
        expires = time.time() + 2.0
        store.set_config_keys([*others, user.model_copy(update={"expires_at": expires})])
        assert (await c.get("/api/v1/workflows/whoami", headers=h)).status == 200
        await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
        assert (await c.get("/api/v1/workflows/whoami", headers=h)).status == 401
