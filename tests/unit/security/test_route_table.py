"""Every route of the real app, against every role and no credential.

The table below is the contract; the test iterates the app's router, so a route added anywhere
without a line here fails (and so does a route the default rules do not name)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from citadeld.http.errors import Dialect, dialect_of
from citadeld.security.config import ROLES, AuthConfig
from citadeld.security.roles import UNMAPPED, Policy
from citadeld.security.wiring import AUTH
from tests.support.auth import auth_client, config, role_keys

OPEN = "open"
# (method, canonical path) -> the weakest role allowed ("open": no credential needed)
EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/health"): OPEN,
    ("GET", "/health/live"): OPEN,
    ("GET", "/health/ready"): OPEN,
    ("GET", "/metrics"): OPEN,
    ("GET", "/health/detailed"): "developer",
    ("POST", "/api/v1/embed"): "user",
    ("GET", "/api/v1/status"): "user",
    ("POST", "/v1/embeddings"): "user",
    ("GET", "/v1/models"): "user",
    ("POST", "/api/embed"): "user",
    ("POST", "/api/embeddings"): "user",
    ("GET", "/api/tags"): "user",
    ("GET", "/api/version"): "user",
    ("POST", "/api/v1/llm/generate"): "user",
    ("POST", "/v1/chat/completions"): "user",
    ("POST", "/api/chat"): "user",
    ("POST", "/api/generate"): "user",
    ("GET", "/api/v1/llm/servers"): "developer",
    ("GET", "/api/v1/llm/usage"): "developer",
    ("POST", "/api/v1/vectors/search"): "user",
    ("GET", "/api/v1/vectors/operations/{operation}"): "user",
    ("GET", "/api/v1/vectors/{id}"): "user",
    ("POST", "/api/v1/vectors/store"): "developer",
    ("POST", "/api/v1/vectors/update"): "developer",
    ("DELETE", "/api/v1/vectors/{id}"): "developer",
    ("GET", "/api/v1/collections"): "user",
    ("GET", "/api/v1/collections/{name}"): "user",
    ("POST", "/api/v1/collections"): "developer",
    ("DELETE", "/api/v1/collections/{name}"): "developer",
    ("GET", "/api/v1/audit"): "admin",
    ("GET", "/api/v1/events"): "user",
    ("GET", "/ws"): "user",
    ("GET", "/ws/workflows/{workflow_id}"): "user",
    ("GET", "/openapi.json"): "user",
    ("GET", "/docs"): "user",
    ("GET", "/docs/openapi-3.0.json"): "user",
}
# route families other issues fill in: any route under them is tested against this role
FAMILIES: list[tuple[str, str, str]] = [
    ("GET", "/docs/static/*/{name}", "user"),  # its directory is the bundle's version
    ("*", "/api/v1/workflows*", "user"),  # runs, events, websockets (issue 5)
    ("*", "/api/v1/audit*", "admin"),  # the audit trail (issue 7)
]


def expected(method: str, path: str) -> str | None:
    if method == "HEAD":
        method = "GET"
    exact = EXPECTED.get((method, path))
    if exact is not None:
        return exact
    for m, glob, role in FAMILIES:
        if m in ("*", method) and fnmatch.fnmatchcase(path, glob):
            return role
    return None


def concrete(path: str) -> str:
    fill = {"id": "p-1", "name": "default", "operation": "1"}
    return re.sub(r"\{(\w+)\}", lambda m: fill.get(m.group(1), "x"), path).replace(
        "/{name}", "/swagger-ui.css")


def check_dialect(path: str, status: int, body: Any) -> None:
    dialect = dialect_of(path)
    if dialect is Dialect.OLLAMA:
        assert isinstance(body["error"], str)
    elif dialect is Dialect.OPENAI:
        etype = "authentication_error" if status == 401 else "permission_error"
        assert body["error"]["type"] == etype and body["error"]["code"] in (
            "unauthorized", "forbidden")
    else:
        assert body["error"]["code"] == ("unauthorized" if status == 401 else "forbidden")
        assert body["error"]["request_id"]


def test_default_rules_name_every_route_in_the_table() -> None:
    policy = Policy(AuthConfig(enabled=True))
    for (method, path), role in EXPECTED.items():
        req = policy.decide(method, path)
        assert req is not UNMAPPED, (method, path)
        assert req.role == role, (method, path, req.role)


async def test_every_route_against_every_role(tmp_path: Path) -> None:
    keys, entries = role_keys()
    async with auth_client(config(tmp_path, entries)) as client:
        assert await run_table(client, keys) >= 4 * len(EXPECTED)


async def run_table(client: Any, keys: dict[str, str]) -> int:
    """Every route of the client's app x (no credential, each role); returns the count."""
    policy = client.app[AUTH].policy
    routes = [(r, r.method, r.resource.canonical) for r in client.app.router.routes()
              if r.resource is not None]
    unmapped = [(m, p) for _, m, p in routes if expected(m, p) is None]
    assert not unmapped, f"routes missing from the auth table (and maybe the rules): {unmapped}"
    no_rule = [(m, p) for r, m, p in routes if policy.requirement(r) is UNMAPPED]
    assert not no_rule, f"routes no auth rule names (admin only by default): {no_rule}"
    rank = {r: i for i, r in enumerate(ROLES)}
    checked = 0
    for _, method, path in routes:
        need = expected(method, path)
        assert need is not None
        url = concrete(path)
        body = {} if method in ("POST", "PUT", "PATCH") else None
        for who in (None, *ROLES):
            headers = {"Authorization": f"Bearer {keys[who]}"} if who else {}
            # headers only: a streaming route (SSE) may never finish its body
            resp = await client.request(method, url, json=body, headers=headers)
            data = await resp.read() if resp.status in (401, 403) else b""
            resp.close()
            if need == OPEN or (who is not None and rank[who] >= rank[need]):
                assert resp.status not in (401, 403), (method, url, who, resp.status)
            elif who is None:
                assert resp.status == 401, (method, url, who, resp.status)
                assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="citadel"')
            else:
                assert resp.status == 403, (method, url, who, resp.status)
                assert 'error="insufficient_scope"' in resp.headers["WWW-Authenticate"]
            if resp.status in (401, 403) and method != "HEAD":
                check_dialect(url, resp.status, orjson.loads(data))
            checked += 1
    return checked


@pytest.mark.parametrize("header", ["Authorization", "X-API-Key"])
async def test_bad_credentials_are_401_everywhere_but_open_routes(tmp_path: Path,
                                                                 header: str) -> None:
    keys, entries = role_keys()
    async with auth_client(config(tmp_path, entries)) as client:
        good = keys["admin"]
        bad_values = [good[:-1] + ("A" if good[-1] != "A" else "B"),  # wrong secret
                      "ck_000000000000_" + "A" * 43,  # unknown id
                      "garbage", "Bearer", "ck_", "a.b.c"]
        for bad in bad_values:
            value = f"Bearer {bad}" if header == "Authorization" else bad
            r = await client.post("/v1/embeddings", json={}, headers={header: value})
            assert r.status == 401, bad
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            assert (await r.json())["error"]["type"] == "authentication_error"
            r = await client.get("/health/live", headers={header: value})
            assert r.status == 200, bad
        value = f"Bearer {good}" if header == "Authorization" else good
        assert (await client.get("/api/v1/llm/usage", headers={header: value})).status != 401


async def test_basic_scheme_and_unknown_routes(tmp_path: Path) -> None:
    keys, entries = role_keys()
    async with auth_client(config(tmp_path, entries)) as client:
        r = await client.get("/api/tags", headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert r.status == 401 and isinstance((await r.json())["error"], str)
        # an unknown route reveals nothing without a credential, 404 with one
        assert (await client.get("/api/v1/nope")).status == 401
        r = await client.get("/api/v1/nope", headers={"X-API-Key": keys["user"]})
        assert r.status == 404
        r = await client.delete("/api/v1/embed", headers={"X-API-Key": keys["user"]})
        assert r.status == 405


async def test_routes_other_issues_add_are_covered(tmp_path: Path) -> None:
    """Workflow and audit routes, as issues 5 and 7 add them, meet the default rules and the
    table without a change here; a route in an unknown family would fail the table."""
    keys, entries = role_keys()

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def setup(app: web.Application) -> None:
        app.router.add_post("/api/v1/workflows", ok)
        app.router.add_post("/api/v1/workflows/{id}/cancel", ok)
        app.router.add_get("/api/v1/workflows/{id}/events", ok)
        app.router.add_get("/api/v1/audit", ok)

    assert expected("GET", "/api/v1/brand-new") is None
    assert Policy(AuthConfig(enabled=True)).decide("GET", "/api/v1/brand-new") is UNMAPPED
    async with auth_client(config(tmp_path, entries), setup) as client:
        assert await run_table(client, keys) >= 4 * (len(EXPECTED) + 4)
        r = await client.get("/api/v1/audit", headers={"X-API-Key": keys["developer"]})
        assert r.status == 403
