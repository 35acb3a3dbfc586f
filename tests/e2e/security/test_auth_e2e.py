"""The real daemon with auth on and PostgreSQL: `citadelctl keys create` -> use the key ->
revoke -> 401, on this daemon at once and on a second daemon sharing the table within its
refresh period; CORS preflights; the security log; --insecure refusal before binding."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import Fake
from tests.support.daemon import DaemonProc, free_port
from tests.support.pg import temp_database

pytestmark = pytest.mark.e2e

UI = "https://ui.example.org"


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    with temp_database() as dsn:
        yield dsn


def config(fake: Fake, dsn: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "logging": {"level": "info"},
        "cache": {"backend": "memory"},
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "max_context": 256, "timeout_s": 20,
            "endpoints": [{"url": fake.url}]}}},
        "persistence": {"dsn": dsn, "flush_interval_s": 0.2},
        "auth": {"enabled": True, "keys_refresh_s": 1},
        "cors": {"allow_origins": [UI, "*"]},
        **extra,
    }


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory, hash_fake: Fake, pg_dsn: str
            ) -> Iterator[tuple[DaemonProc, DaemonProc]]:
    a = DaemonProc(config(hash_fake, pg_dsn), tmp_path_factory.mktemp("auth-a")).start()
    b = DaemonProc(config(hash_fake, pg_dsn, persistence={"dsn": pg_dsn, "instance": "b"}),
                   tmp_path_factory.mktemp("auth-b")).start()
    yield a, b
    for d in (a, b):
        if d.proc is not None and d.proc.poll() is None:
            assert d.stop() == 0, d.log_tail()


def ctl(d: DaemonProc, *words: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "citadeld.ctl", "--socket", d.admin_socket,
                           *words], capture_output=True, text=True, timeout=60)


def ctl_json(d: DaemonProc, *words: str) -> Any:
    r = ctl(d, "--json", *words)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)["result"]


def embed(d: DaemonProc, key: str | None, header: str = "Authorization") -> httpx.Response:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    return httpx.post(d.url + "/api/embed", json={"model": "all-minilm", "input": "hi"},
                      headers=headers, timeout=30)


def eventually(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_key_lifecycle_across_two_daemons(daemons: tuple[DaemonProc, DaemonProc]) -> None:
    a, b = daemons
    r = embed(a, None)
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="citadel"'

    refused = ctl(a, "keys", "create", "ci", "--role", "user")
    assert refused.returncode == 2 and "--yes" in refused.stderr

    text = ctl(a, "keys", "create", "ci", "--role", "user", "--rate", "100", "--expires",
               "30d", "--yes")
    assert text.returncode == 0, text.stderr
    assert "shown only once" in text.stdout
    key = next(w for w in text.stdout.split() if w.startswith("ck_"))
    key_id = key[3:15]

    # usable at once on the daemon that created it, both headers
    assert embed(a, key).status_code == 200
    assert embed(a, key, "X-API-Key").status_code == 200
    # and on the other daemon once it rereads the table
    eventually(lambda: embed(b, key).status_code == 200)
    # a user key may embed but not see detailed health
    r = httpx.get(a.url + "/health/detailed", headers={"X-API-Key": key}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"

    listed = ctl_json(a, "keys", "list")
    row = next(k for k in listed["keys"] if k["id"] == key_id)
    assert row["role"] == "user" and row["state"] == "active" and row["rate_per_min"] == 100
    assert row["expires_at"] is not None
    plain = ctl(a, "keys", "list")
    assert key_id in plain.stdout and key[16:] not in plain.stdout

    revoked = ctl_json(a, "keys", "revoke", key_id, "--yes")
    assert revoked["id"] == key_id and revoked["revoked_at"]
    r = embed(a, key)
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    eventually(lambda: embed(b, key).status_code == 401)
    assert ctl_json(a, "keys", "list")["keys"][0]["state"] == "revoked"
    missing = ctl(a, "keys", "revoke", "000000000000", "--yes")
    assert missing.returncode == 1 and "no API key" in missing.stderr
    # bad arguments: usage errors (2) or refusals (1), and no key is created by any of them
    before = len(ctl_json(a, "keys", "list")["keys"])
    for args, code, text in ((["--role", "root"], 2, "role must be one of"),
                             (["--role", "user", "--rate", "fast"], 2, "not a number"),
                             (["--role", "user", "--rate", "0"], 1, "positive"),
                             (["--role", "user", "--expires", "soon"], 2, "duration"),
                             (["--role", "user", "--expires", "2001-01-01"], 1, "in the past"),
                             (["--role", "user", "--colour", "red"], 2, "unknown argument"),
                             ([], 2, "missing ROLE")):
        r = ctl(a, "keys", "create", "x", *args, "--yes")
        assert r.returncode == code and text in r.stderr, (args, r.returncode, r.stderr)
    r = ctl(a, "keys", "create", "tab\there", "--role", "user", "--yes")
    assert r.returncode == 1 and "printable" in r.stderr
    assert len(ctl_json(a, "keys", "list")["keys"]) == before

    # the security log names the key id and the reason, never the secret
    logs = a.logs()
    events = [json.loads(line) for line in logs.splitlines()
              if '"auth_failed"' in line]
    assert any(e.get("key_id") == key_id and e["reason"] == "revoked key" for e in events)
    assert any(e["reason"] == "no credential" for e in events)
    assert key not in logs and key[16:] not in logs


def test_admin_key_sees_everything_and_keys_survive_a_restart(
        daemons: tuple[DaemonProc, DaemonProc]) -> None:
    a, _ = daemons
    key = ctl_json(a, "keys", "create", "ops", "--role", "admin", "--yes")["key"]
    r = httpx.get(a.url + "/health/detailed", headers={"Authorization": f"Bearer {key}"},
                  timeout=10)
    assert r.status_code == 200 and "dependencies" in r.json()
    assert a.stop() == 0
    a.start()
    assert embed(a, key).status_code == 200


def test_cors(daemons: tuple[DaemonProc, DaemonProc]) -> None:
    a, _ = daemons
    pre = {"Origin": UI, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(a.url + "/v1/embeddings", headers=pre, timeout=10)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == UI
    assert r.headers["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    # any other origin: admitted by "*", never with credentials
    r = httpx.options(a.url + "/v1/embeddings", headers={**pre, "Origin": "https://x.test"},
                      timeout=10)
    assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in r.headers
    bad = httpx.options(a.url + "/v1/embeddings", timeout=10,
                        headers={**pre, "Access-Control-Request-Headers": "x-evil"})
    assert bad.status_code == 403
    # a real answer, even a 401, carries the headers, so the page can read it
    r = httpx.post(a.url + "/v1/embeddings", json={}, headers={"Origin": UI}, timeout=10)
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == UI
    assert "X-Request-ID" in r.headers["Access-Control-Expose-Headers"]


def test_connection_limits_reach_the_daemon(daemons: tuple[DaemonProc, DaemonProc]) -> None:
    a, _ = daemons
    assert httpx.get(a.url + "/health/live", headers={"X-Big": "a" * 8000},
                     timeout=10).status_code == 200
    assert httpx.get(a.url + "/health/live", headers={"X-Big": "a" * 9000},
                     timeout=10).status_code == 400  # limits.max_field_size 8190


def _bound(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_insecure_refusal_exits_78_before_binding(tmp_path: Path, hash_fake: Fake) -> None:
    port = free_port()
    cfg = config(hash_fake, None, server={"listen": f"0.0.0.0:{port}"},
                 auth={"enabled": False}, state_dir=str(tmp_path / "state"),
                 admin={"socket": str(tmp_path / "admin.sock")})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "citadeld.main", "--config", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 78, r.stderr
    assert "refusing to listen on 0.0.0.0" in r.stderr and "--insecure" in r.stderr
    assert not _bound(port)
    proc = subprocess.Popen([*cmd, "--insecure"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        eventually(lambda: _bound(port), timeout=60)
        assert httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=5).status_code == 200
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_postgres_outage_keeps_keys_working(tmp_path: Path, hash_fake: Fake) -> None:
    """PostgreSQL (a throwaway server) stops under a running daemon: known keys keep working,
    create/revoke say PostgreSQL is unavailable and change nothing; once it is back a revoke
    works and takes effect at once."""
    from tests.support.pg import ThrowawayPostgres

    pg = ThrowawayPostgres().start()
    d = DaemonProc(config(hash_fake, pg.dsn), tmp_path / "d")
    try:
        d.start()
        key = ctl_json(d, "keys", "create", "ci", "--role", "user", "--yes")["key"]
        pg.stop()
        assert embed(d, key).status_code == 200
        time.sleep(1.5)  # a refresh or two fail meanwhile (keys_refresh_s: 1)
        assert embed(d, key).status_code == 200
        r = ctl(d, "keys", "create", "other", "--role", "user", "--yes")
        assert r.returncode == 1 and "PostgreSQL" in r.stderr and "no key was created" in r.stderr
        r = ctl(d, "keys", "revoke", key[3:15], "--yes")
        assert r.returncode == 1 and "not revoked" in r.stderr
        assert embed(d, key).status_code == 200
        listed = ctl(d, "keys", "list")
        assert listed.returncode == 0 and "PostgreSQL:" in listed.stdout
        pg.start()
        eventually(lambda: ctl(d, "keys", "revoke", key[3:15], "--yes").returncode == 0, 30)
        assert embed(d, key).status_code == 401
        assert d.stop() == 0, d.log_tail()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        pg.cleanup()
