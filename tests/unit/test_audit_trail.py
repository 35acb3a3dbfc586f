"""The audit trail's hot path and the security log's throttle, without a database: rows land in
a recording sink with the fields the table gets."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import make_mocked_request

from citadeld.actors.persistence import AUDIT_FIELDS, _json_dumps
from citadeld.errors import BadRequest
from citadeld.security.audit import AuditTrail
from citadeld.security.audit_query import build_sql, parse_filter
from citadeld.security.principal import PRINCIPAL_KEY, Principal
from citadeld.security.ratelimit_audit_config import AuditConfig
from citadeld.security.resp import encode
from citadeld.security.seclog import SecurityLog


class Sink:
    """Keeps each row as recorded (``raw``) and as a dict by field name (``rows``)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[Any] = []

    def record(self, kind: str, encoded: orjson.Fragment) -> None:
        assert isinstance(encoded, orjson.Fragment)  # encoded at once: nothing kept alive
        row = orjson.loads(orjson.dumps(encoded))
        assert isinstance(row, list) and len(row) == len(AUDIT_FIELDS)
        self.raw.append(row)
        self.rows.append((kind, dict(zip(AUDIT_FIELDS, row, strict=True))))


def trail(auth: bool = False, **cfg: Any) -> tuple[AuditTrail, Sink]:
    sink = Sink()
    return AuditTrail(AuditConfig(**cfg), cast(Any, sink), auth), sink


def req(method: str = "POST", path: str = "/api/v1/embed", body: bytes | None = None,
        principal: Principal | None = None) -> Any:
    r = make_mocked_request(method, path, headers={"Authorization": "Bearer sk-secret"})
    if body is not None:
        r._read_bytes = body
    if principal is not None:
        r[PRINCIPAL_KEY] = principal
    return r


def test_row_fields_and_hash() -> None:
    t, sink = trail()
    body = b'{"text": "hello"}'
    t.request_done(req(body=body), 200, 0.0123, "rid-1")
    ((kind, row),) = sink.rows
    assert kind == "audit"
    assert row["principal"] == "local" and row["role"] == "admin"  # auth off
    assert (row["method"], row["path"], row["status"], row["request_id"]) == (
        "POST", "/api/v1/embed", 200, "rid-1")
    assert row["latency_ms"] == pytest.approx(12.3)
    assert row["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "sk-secret" not in repr(row)


def test_principals() -> None:
    t, sink = trail(auth=True)
    key = Principal("k1", "user", "key", key_id="0123456789ab")
    t.request_done(req(principal=key), 200, 0.001, "a")
    t.request_done(req(), 401, 0.001, "b")  # refused before anyone was named
    assert sink.rows[0][1]["principal"] == "k1" and sink.rows[0][1]["detail"] == {
        "kind": "key", "key_id": "0123456789ab"}
    anon = sink.rows[1][1]
    assert anon["principal"] == anon["client"] and anon["role"] is None  # e2e: 127.0.0.1


def test_exclusions_and_nul() -> None:
    t, sink = trail(exclude_paths=("/metrics", "/health/*"))
    for path in ("/metrics", "/health/live", "/health/ready"):
        t.request_done(req("GET", path), 200, 0.001, "x")
    assert sink.rows == []
    t.request_done(req("GET", "/health"), 200, 0.001, "x")  # "/health/*" is not "/health"
    t.request_done(req("GET", "/api/v1/a\x00b"), 404, 0.001, "y")
    assert [r["path"] for _, r in sink.rows] == ["/health", "/api/v1/a\ufffdb"]
    # a lone surrogate (a JWT subject may carry one) must not break the JSON batch
    jwt = Principal("sub-\ud800-x\x00", "user", "jwt")
    t.request_done(req("GET", "/api/v1/é", principal=jwt), 200, 0.001, "z")
    row = sink.rows[-1][1]
    assert row["principal"] == "sub-?-x\ufffd" and row["path"] == "/api/v1/é"
    _json_dumps(sink.raw)  # serialisable, as the INSERT needs


async def test_big_bodies_are_hashed_off_the_loop() -> None:
    t, sink = trail(inline_hash_max_bytes=1024)
    body = b"x" * 5000
    t.request_done(req(body=body), 200, 0.001, "big")
    assert sink.rows == []  # not yet: a thread is hashing it
    await t.close()
    await asyncio.sleep(0)
    assert sink.rows[0][1]["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert sink.rows[0][1]["request_id"] == "big"


def test_never_raises() -> None:
    class Broken(Sink):
        def record(self, kind: str, encoded: orjson.Fragment) -> None:
            raise RuntimeError("sink down")

    t = AuditTrail(AuditConfig(), cast(Any, Broken()), False)
    t.request_done(req(), 200, 0.001, "x")  # swallowed and counted
    assert t.failures == 1
    off = AuditTrail(AuditConfig(), None, False)
    off.request_done(req(), 200, 0.001, "x")
    assert not off.enabled and off.recorded == 0


def test_security_log_throttles(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = SecurityLog(10.0, clock=lambda: now[0])
    p = Principal("k1", "user", "key", key_id="k1")
    r = req()
    with caplog.at_level(logging.WARNING, "citadeld.security"):
        assert log.event("rate_limited", r, p, group="embedding")
        assert not any(log.event("rate_limited", r, p) for _ in range(5))
        now[0] = 11.0
        assert log.event("rate_limited", r, p)
    lines = [rec for rec in caplog.records if rec.name == "citadeld.security"]
    assert len(lines) == 2 and lines[1].suppressed_since_last == 5
    assert all("sk-secret" not in rec.getMessage() + repr(rec.__dict__) for rec in lines)


def test_filters_become_parameters() -> None:
    f = parse_filter({"path": "/api/v1/%_x", "status": "4xx", "principal": "x' OR 1=1 --"}, 100)
    sql, args = build_sql(f)
    assert "OR 1=1" not in sql and "x' OR 1=1 --" in args
    assert "/api/v1/\\%\\_x%" in args  # LIKE wildcards in the prefix are literal
    assert (f.status_min, f.status_max) == (400, 499)
    with pytest.raises(BadRequest):
        parse_filter({"limit": "101"}, 100)


def test_resp_encoding() -> None:
    assert encode("EVALSHA", "ab", 1, "k") == (
        b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$1\r\nk\r\n")
    assert encode("SET", "k\r\n", b"\x00") == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n\x00\r\n"


def test_dollar_quoted_literal_never_ends_inside_the_data() -> None:
    from citadeld.actors.persistence import _dollar_quoted
    assert _dollar_quoted(b'[["a"]]') == b'$j$[["a"]]$j$'
    data = b'["$j$", "$j1$", "$j2"]'
    quoted = _dollar_quoted(data)
    tag = quoted[:quoted.index(b"$", 1) + 1]
    assert tag == b"$j2$" and quoted == tag + data + tag and tag not in data
