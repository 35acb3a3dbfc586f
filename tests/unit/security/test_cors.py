"""CORS on the real app: preflights before auth, headers on every answer (errors too),
credentials only for origins listed by name, nothing without configured origins."""

from __future__ import annotations

from pathlib import Path

from citadeld.security.config import CORSConfig
from citadeld.security.cors import CORS
from tests.support.auth import auth_client, config, role_keys

UI = "https://ui.example.org"
PRE = {"Origin": UI, "Access-Control-Request-Method": "POST",
       "Access-Control-Request-Headers": "Authorization,Content-Type,X-Request-ID"}


async def test_preflight_and_answers(tmp_path: Path) -> None:
    keys, entries = role_keys()
    async with auth_client(config(tmp_path, entries, cors={"allow_origins": [UI]})) as c:
        r = await c.options("/api/v1/embed", headers=PRE)
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == UI
        assert r.headers["Access-Control-Allow-Credentials"] == "true"
        assert r.headers["Access-Control-Max-Age"] == "600" and r.headers["Vary"] == "Origin"
        # no "*": other origins get nothing they could use
        r = await c.options("/api/v1/embed", headers={**PRE, "Origin": "https://evil.test"})
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        r = await c.get("/api/tags", headers={"Origin": "https://evil.test",
                                              "X-API-Key": keys["user"]})
        assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
        # errors of the auth layer carry the headers too
        r = await c.get("/api/tags", headers={"Origin": UI})
        assert r.status == 401 and r.headers["Access-Control-Allow-Origin"] == UI
        assert "WWW-Authenticate" not in r.headers.get("Access-Control-Expose-Headers", "")
        r = await c.get("/api/tags", headers={"Origin": UI, "X-API-Key": keys["user"]})
        assert r.status == 200 and r.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
        # an OPTIONS that is not a preflight is an ordinary request
        assert (await c.options("/api/v1/embed")).status == 401


async def test_no_origins_no_cors(tmp_path: Path) -> None:
    _keys, entries = role_keys()
    async with auth_client(config(tmp_path, entries)) as c:
        r = await c.options("/api/v1/embed", headers=PRE)
        assert r.status == 401 and "Access-Control-Allow-Origin" not in r.headers
        r = await c.get("/health", headers={"Origin": UI})
        assert "Access-Control-Allow-Origin" not in r.headers


def test_wildcard_never_with_credentials() -> None:
    cors = CORS(CORSConfig(allow_origins=["*", UI], allow_credentials=True))
    assert cors.origin_headers("https://other.test") == {"Access-Control-Allow-Origin": "*"}
    assert cors.origin_headers(UI) == {"Access-Control-Allow-Origin": UI, "Vary": "Origin",
                                       "Access-Control-Allow-Credentials": "true"}
    assert CORS(CORSConfig(allow_origins=[UI], allow_credentials=False)).origin_headers(UI) == {
        "Access-Control-Allow-Origin": UI, "Vary": "Origin"}
