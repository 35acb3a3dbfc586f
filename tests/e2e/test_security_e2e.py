"""Rate limits and the audit trail on real daemons: two citadeld sharing Redis enforce one
limit; every request leaves an audit row in PostgreSQL with the right fields and no secret;
the trail is readable over HTTP and citadelctl; Redis and PostgreSQL outages degrade, never
500 and lose no audit row."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg2
import pytest
import redis

from tests.e2e.conftest import Fake
from tests.integration.test_cache_redis import SHARED_URL, Throwaway
from tests.support.audit_chaos import chaos_postgres_audit
from tests.support.daemon import DaemonProc
from tests.support.pg import temp_database

pytestmark = pytest.mark.e2e

SECRETS = ("sk-SECRET-TOKEN-7f3a", "TOPSECRET-BODY-91c2", "SECRET-QUERY-55d0", "SECRET-KEY-x9")


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


def config(embed_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"request_timeout_s": 30},
        "embedding": {"default_model": "all-minilm", "models": {
            "all-minilm": {"backend": "ollama", "dims": 384, "max_context": 256,
                           "endpoints": [{"url": embed_url}], "attempts": 1,
                           "batch": {"max_wait_ms": 1}}}},
        "supervision": {"ping_interval_s": 2, "ping_timeout_s": 2},
        **extra,
    }


class Pair:
    def __init__(self, a: DaemonProc, b: DaemonProc, dsn: str, prefix: str) -> None:
        self.a, self.b, self.dsn, self.prefix = a, b, dsn, prefix

    def rows(self, where: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT *, t::text AS whole FROM citadel_audit_log t WHERE {where}"
                            " ORDER BY id", args)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        finally:
            conn.close()

    def wait_rows(self, where: str, args: tuple[Any, ...] = (), n: int = 1,
                  timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(where, args)
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, hash_fake: Fake) -> Iterator[Pair]:
    """Two daemons sharing one Redis key prefix: 10 embeddings at once, then one a minute,
    between them (a slow run cannot refill a token mid-test). A keeps
    its audit trail in a fresh PostgreSQL database; B has no PostgreSQL."""
    prefix = f"citadel-test:rl-e2e:{uuid.uuid4().hex[:10]}:"
    limits = {"enabled": True, "redis_url": SHARED_URL, "key_prefix": prefix,
              "redis_timeout_s": 0.5,  # a noisy test machine must not fall back by accident
              "embedding": {"per_min": 1, "burst": 10, "routes": ["/api/v1/embed",
                                                                  "/v1/embeddings",
                                                      "/api/embed", "/api/embeddings"]}}
    work = tmp_path_factory.mktemp("security")
    with temp_database() as dsn:
        a = DaemonProc(config(hash_fake.url, rate_limits=limits, persistence={
            "dsn": dsn, "flush_interval_s": 0.2, "instance": "a"}), work / "a").start(60)
        b = DaemonProc(config(hash_fake.url, rate_limits=limits), work / "b").start(60)
        try:
            yield Pair(a, b, dsn, prefix)
        finally:
            codes = (a.stop(), b.stop())
            r = redis.Redis.from_url(SHARED_URL)
            for k in list(r.scan_iter(match=prefix + "*", count=1000)):
                r.delete(k)
            assert codes == (0, 0), a.log_tail() + b.log_tail()


def test_two_daemons_enforce_one_limit(pair: Pair) -> None:
    statuses = []
    refused = None
    for i in range(30):
        d = pair.a if i % 2 == 0 else pair.b
        r = httpx.post(d.url + "/api/v1/embed", json={"text": f"limit {i}"}, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.headers["RateLimit-Limit"] == "1"
            assert r.headers["RateLimit-Policy"] == "1;w=60;burst=10"
        elif refused is None:
            refused = r
    assert statuses.count(200) == 10 and statuses.count(429) == 20, statuses
    assert refused is not None
    body = refused.json()
    assert body["error"]["code"] == "rate_limited"
    assert body["error"]["request_id"] == refused.headers["X-Request-ID"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert int(refused.headers["RateLimit-Reset"]) > 0
    # the other dialects of the same group answer 429 in their own envelopes
    r = httpx.post(pair.b.url + "/v1/embeddings", json={"input": "x", "model": "all-minilm"})
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    assert "Retry-After" in r.headers
    r = httpx.post(pair.a.url + "/api/embed", json={"input": "x", "model": "all-minilm"})
    assert r.status_code == 429 and isinstance(r.json()["error"], str)
    # probes, metrics and other groups are not touched by the embedding limit
    for _ in range(20):
        assert httpx.get(pair.a.url + "/health/ready").status_code == 200
    assert "RateLimit-Limit" not in httpx.get(pair.a.url + "/health").headers
    r = httpx.get(pair.a.url + "/api/v1/status")
    assert r.status_code == 200 and r.headers["RateLimit-Policy"] == "600;w=60;burst=600"
    metrics = httpx.get(pair.a.url + "/metrics").text
    assert 'citadel_rate_limited_total{group="embedding"}' in metrics
    log = pair.a.logs() + pair.b.logs()
    assert '"event": "rate_limited"' in log or '"event":"rate_limited"' in log
    detailed = httpx.get(pair.a.url + "/health/detailed").json()
    assert detailed["dependencies"]["rate_limit_redis"]["status"] == "ok"
    assert detailed["security"]["rate_limits"]["mode"] == "redis"
    assert detailed["security"]["audit"]["enabled"] and detailed["security"]["audit"][
        "recorded"] > 0
    assert not httpx.get(pair.b.url + "/health/detailed").json()["security"]["audit"][
        "enabled"]  # no PostgreSQL there


def test_audit_rows_have_the_fields_and_no_secrets(pair: Pair) -> None:
    rid = f"audit-{uuid.uuid4().hex[:12]}"
    body = json.dumps({"text": SECRETS[1], "limit": 3}).encode()
    r = httpx.post(pair.a.url + f"/api/v1/vectors/search?api_key={SECRETS[2]}", content=body,
                   headers={"Content-Type": "application/json", "X-Request-ID": rid,
                            "Authorization": f"Bearer {SECRETS[0]}", "X-API-Key": SECRETS[3]},
                   timeout=15)
    assert r.status_code < 500, r.text
    rows = pair.wait_rows("request_id = %s", (rid,))
    assert len(rows) == 1
    row = rows[0]
    assert row["action"] == "http" and row["instance"] == "a"
    assert (row["principal"], row["role"]) == ("local", "admin")  # auth off
    assert (row["method"], row["path"], row["status"]) == (
        "POST", "/api/v1/vectors/search", r.status_code)
    assert row["client"] == "127.0.0.1"
    assert 0 < row["latency_ms"] < 15_000
    assert row["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert row["detail"] == {"kind": "local"}
    everything = "".join(x["whole"] for x in pair.rows("TRUE"))
    log = pair.a.logs()
    for secret in SECRETS:
        assert secret not in everything, secret
        assert secret not in log, secret
    # a refused request is audited too; a body nobody read has no hash
    for i in range(12):  # past what refilled since the previous test: 429
        r = httpx.post(pair.a.url + "/api/v1/embed", json={"text": "over the limit"},
                       headers={"X-Request-ID": f"{rid}-{i}"})
        if r.status_code == 429:
            break
    assert r.status_code == 429
    (row,) = pair.wait_rows("request_id = %s", (f"{rid}-{i}",))
    assert row["status"] == 429 and row["body_sha256"] is None
    # hostile paths cannot poison the batch: PostgreSQL text holds no NUL
    r = httpx.get(pair.a.url + "/api/v1/nope%00x", headers={"X-Request-ID": rid + "-nul"})
    assert r.status_code == 404
    (row,) = pair.wait_rows("request_id = %s", (rid + "-nul",))
    assert row["path"] == "/api/v1/nope\ufffdx" and row["status"] == 404


def test_audit_api_filters_paging_and_bad_input(pair: Pair) -> None:
    tag = uuid.uuid4().hex[:8]
    for i in range(5):
        httpx.get(pair.a.url + "/api/v1/status", headers={"X-Request-ID": f"page-{tag}-{i}"})
    pair.wait_rows("request_id LIKE %s", (f"page-{tag}-%",), n=5)
    base = pair.a.url + "/api/v1/audit"
    page = httpx.get(base, params={"path": "/api/v1/status", "limit": 2}).json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    assert page["items"][0]["id"] > page["items"][1]["id"]  # newest first
    nxt = httpx.get(base, params={"path": "/api/v1/status", "limit": 2,
                                  "cursor": page["next_cursor"]}).json()
    assert nxt["items"][0]["id"] < page["items"][1]["id"]
    limited = httpx.get(base, params={"status": "429", "limit": 1000}).json()["items"]
    assert limited and all(x["status"] == 429 for x in limited)
    assert all(x["status"] // 100 == 4 for x in httpx.get(base, params={"status": "4xx"}).json()[
        "items"])
    item = httpx.get(base, params={"principal": "local", "method": "get", "limit": 1}).json()[
        "items"][0]
    assert item["method"] == "GET" and item["at"].endswith("Z")
    assert set(item) >= {"principal", "role", "method", "path", "status", "latency_ms",
                         "client", "request_id", "body_sha256"}
    assert httpx.get(base, params={"since": "2999-01-01T00:00:00Z"}).json()["items"] == []
    for bad in ({"status": "abc"}, {"limit": "0"}, {"limit": "100001"}, {"nope": "1"},
                {"since": "yesterday"}, {"path": "api"}, {"cursor": "-1"},
                {"cursor": "5", "after": "3"}, {"since": "200", "until": "100"},
                {"principal": "x" * 600}, {"method": "G E T"}):
        r = httpx.get(base, params=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    r = httpx.get(pair.b.url + "/api/v1/audit")  # no PostgreSQL there
    assert r.status_code == 503 and "persistence.dsn" in r.json()["error"]["message"]
    doc = httpx.get(pair.a.url + "/openapi.json").json()
    assert "get" in doc["paths"]["/api/v1/audit"]


def _ctl(d: DaemonProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citadeld.ctl", "-s", d.admin_socket, *args],
                          capture_output=True, text=True, timeout=30, env=d.env)


def test_citadelctl_audit_tail(pair: Pair) -> None:
    out = _ctl(pair.a, "audit", "tail", "-n", "3", "--status", "4xx")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["ID", "AT", "PRINCIPAL"] and len(lines) == 4
    assert all(ln.split()[6].startswith("4") for ln in lines[1:]), lines
    js = json.loads(_ctl(pair.a, "--json", "audit", "tail", "-n", "2", "--principal",
                         "local").stdout)
    items = js["result"]["items"]
    assert len(items) == 2 and items[0]["id"] < items[1]["id"]  # oldest first, like tail
    assert _ctl(pair.a, "audit", "tail", "-n", "0").returncode == 2  # usage error
    assert _ctl(pair.b, "audit", "tail").returncode == 1  # no PostgreSQL: a clear failure
    follow = subprocess.Popen(
        [sys.executable, "-m", "citadeld.ctl", "-s", pair.a.admin_socket, "audit", "tail",
         "-n", "1", "--follow"], stdout=subprocess.PIPE, text=True, env=pair.a.env)
    try:
        assert follow.stdout is not None
        follow.stdout.readline()  # header
        follow.stdout.readline()  # the newest row
        rid = f"follow-{uuid.uuid4().hex[:8]}"
        httpx.get(pair.a.url + "/api/v1/status", headers={"X-Request-ID": rid})
        deadline = time.monotonic() + 15
        seen = False
        while time.monotonic() < deadline and not seen:
            seen = rid in follow.stdout.readline()
        assert seen
    finally:
        follow.terminate()
        follow.wait(10)


def test_redis_stopped_mid_run_falls_back_to_local_buckets(
        tmp_path: Path, hash_fake: Fake) -> None:
    srv = Throwaway()
    srv.start()
    limits = {"enabled": True, "redis_url": srv.url, "redis_timeout_s": 0.2,
              # 25 at once, then one a minute: a slow test run cannot refill a token
              "embedding": {"per_min": 1, "burst": 25, "routes": ["/api/v1/embed"]}}
    d = DaemonProc(config(hash_fake.url, rate_limits=limits), tmp_path).start(60)
    try:
        ok = [httpx.post(d.url + "/api/v1/embed", json={"text": f"r{i}"}).status_code
              for i in range(5)]
        assert ok == [200] * 5
        assert srv.calls("evalsha") == 5
        srv.kill()
        statuses = [httpx.post(d.url + "/api/v1/embed", json={"text": f"r{i}"}).status_code
                    for i in range(30)]
        assert 500 not in statuses and set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) == 25  # the local bucket starts full: 25 more, then 429
        detailed = httpx.get(d.url + "/health/detailed").json()
        dep = detailed["dependencies"]["rate_limit_redis"]
        assert dep["status"] == "down" and dep["mode"] == "local fallback" and dep["error"]
        limits = detailed["security"]["rate_limits"]
        assert limits["mode"] == "fallback" and limits["fallback_checks"] >= 30
        assert "fall back to local buckets" in d.logs()
        srv.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            httpx.get(d.url + "/api/v1/status")  # any limited request is a trial
            dep = httpx.get(d.url + "/health/detailed").json()["dependencies"][
                "rate_limit_redis"]
            if dep["status"] == "ok":
                break
            time.sleep(0.3)
        assert dep["status"] == "ok"
    finally:
        assert d.stop() == 0, d.log_tail()
        srv.kill()


def test_postgres_restart_under_load_loses_no_audit_row(tmp_path: Path,
                                                        hash_fake: Fake) -> None:
    res = chaos_postgres_audit(tmp_path, hash_fake.url, phase_s=2.0, threads=3)
    assert res.answered >= 50, res.line()
    assert res.lost == 0, res.line()


def test_per_key_limits_and_audit_principals_with_auth_on(tmp_path: Path,
                                                         hash_fake: Fake) -> None:
    """Auth on: each API key has its own bucket (a key's rate_per_min overrides the group's),
    401s are audited under the client address, rows name the key id and never the secret."""
    from citadeld.security.keys import generate

    slow_id, slow_key, slow_sha = generate()
    fast_id, fast_key, fast_sha = generate()
    admin_id, admin_key, admin_sha = generate()
    auth = {"enabled": True, "api_keys": [
        {"id": slow_id, "sha256": slow_sha, "name": "slow", "role": "user", "rate_per_min": 3},
        {"id": fast_id, "sha256": fast_sha, "name": "fast", "role": "user"},
        {"id": admin_id, "sha256": admin_sha, "name": "ops", "role": "admin"}]}
    limits = {"enabled": True, "backend": "local",
              "embedding": {"per_min": 5, "routes": ["/api/v1/embed"]}}
    with temp_database() as dsn:
        d = DaemonProc(config(hash_fake.url, auth=auth, rate_limits=limits, persistence={
            "dsn": dsn, "flush_interval_s": 0.2}), tmp_path).start(60)
        try:
            def embed(key: str | None, rid: str) -> httpx.Response:
                headers = {"X-Request-ID": rid}
                if key is not None:
                    headers["Authorization"] = f"Bearer {key}"
                return httpx.post(d.url + "/api/v1/embed", json={"text": "k"}, headers=headers)

            tag = uuid.uuid4().hex[:8]
            slow = [embed(slow_key, f"{tag}-s{i}").status_code for i in range(5)]
            fast = [embed(fast_key, f"{tag}-f{i}").status_code for i in range(7)]
            assert slow == [200] * 3 + [429] * 2  # the key's own 3/min
            assert fast == [200] * 5 + [429] * 2  # the group's 5/min, its own bucket
            assert embed(None, f"{tag}-anon").status_code == 401
            pair = Pair(d, d, dsn, "")
            rows = {r["request_id"]: r for r in pair.wait_rows(
                "request_id LIKE %s", (f"{tag}-%",), n=13)}
            assert len(rows) == 13
            assert {rows[f"{tag}-s{i}"]["principal"] for i in range(5)} == {slow_id}
            assert rows[f"{tag}-s0"]["role"] == "user"
            assert rows[f"{tag}-s0"]["detail"] == {"kind": "key", "key_id": slow_id}
            anon = rows[f"{tag}-anon"]
            assert (anon["status"], anon["principal"], anon["role"]) == (401, "127.0.0.1", None)
            everything = "".join(x["whole"] for x in pair.rows("TRUE"))
            for secret in (slow_key, fast_key, admin_key):
                assert secret not in everything and secret not in d.logs(settle=0)
            # the audit API: admins only, in the native dialect
            r = httpx.get(d.url + "/api/v1/audit", params={"principal": slow_id},
                          headers={"Authorization": f"Bearer {admin_key}"})
            assert r.status_code == 200 and len(r.json()["items"]) == 5
            r = httpx.get(d.url + "/api/v1/audit", headers={"Authorization": f"Bearer {fast_key}"})
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            assert httpx.get(d.url + "/api/v1/audit").status_code == 401
        finally:
            assert d.stop() == 0, d.log_tail()


def test_client_gone_is_audited_as_499(tmp_path: Path) -> None:
    slow = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    try:
        slow.fault(latency_ms=3000)
        with temp_database() as dsn:
            d = DaemonProc(config(slow.url, persistence={"dsn": dsn, "flush_interval_s": 0.2}),
                           tmp_path).start(60)
            try:
                rid = f"gone-{uuid.uuid4().hex[:8]}"
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(d.url + "/api/v1/embed", json={"text": "slow"}, timeout=0.5,
                               headers={"X-Request-ID": rid})
                (row,) = Pair(d, d, dsn, "").wait_rows("request_id = %s", (rid,))
                assert row["status"] == 499 and 300 < row["latency_ms"] < 3000
            finally:
                assert d.stop() == 0, d.log_tail()
    finally:
        slow.stop()
