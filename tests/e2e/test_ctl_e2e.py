"""The real citadeld process steered by the real citadelctl, with a NOTIFY_SOCKET this test
listens on as systemd would: READY/STATUS/WATCHDOG/RELOADING/STOPPING, SIGHUP reload, drain,
SIGTERM and a second SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import Fake
from tests.support.daemon import DaemonProc
from tests.support.notify import NotifyListener

pytestmark = pytest.mark.e2e


def ctl(d: DaemonProc, *words: str, input: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "citadeld.ctl", "--socket", d.admin_socket, *words],
        capture_output=True, text=True, timeout=60, input=input)


def ctl_json(d: DaemonProc, *words: str) -> Any:
    r = ctl(d, "--json", *words)
    assert r.returncode == 0, r.stderr + r.stdout
    return json.loads(r.stdout)["result"]


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


def config_for(fake: Fake, **extra: Any) -> dict[str, Any]:
    return {
        "logging": {"level": "info"},
        "server": {"drain_timeout_s": 20},
        "cache": {"backend": "memory"},
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "max_context": 256, "timeout_s": 20,
            "endpoints": [{"url": fake.url, "api_key": "sk-very-secret"}]}}},
        **extra,
    }


@pytest.fixture(scope="module")
def notify() -> Iterator[NotifyListener]:
    n = NotifyListener()
    yield n
    n.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, hash_fake: Fake,
           notify: NotifyListener) -> Iterator[DaemonProc]:
    d = DaemonProc(config_for(hash_fake), tmp_path_factory.mktemp("ctl"),
                   env={**notify.env, "WATCHDOG_USEC": "1500000"})
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


def test_ready_status_and_watchdog_reach_systemd(daemon: DaemonProc,
                                                 notify: NotifyListener) -> None:
    ready = notify.wait_for("READY", "1")
    assert ready["MAINPID"] == str(daemon.proc.pid if daemon.proc else 0)
    assert "serving on 127.0.0.1:" in ready["STATUS"]
    seen = len(notify.messages)
    notify.wait_for("WATCHDOG", "1", after=seen, timeout=10)  # fed every 0.5 s
    st = ctl_json(daemon, "status")
    assert st["watchdog"]["enabled"] and st["watchdog"]["withheld"] is None


def test_admin_socket_is_0660(daemon: DaemonProc) -> None:
    mode = os.stat(daemon.admin_socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_readable_tables_and_json(daemon: DaemonProc) -> None:
    r = ctl(daemon, "status")
    assert r.returncode == 0, r.stderr
    for text in ("citadeld:", "uptime:", "listen:", "MODELS", "all-minilm", "BACKENDS",
                 "BREAKERS", daemon.url.split("//")[1]):
        assert text in r.stdout
    st = ctl_json(daemon, "status")
    assert st["listen"] == daemon.url.split("//")[1] and st["ready"] is True
    assert st["models"][0]["name"] == "all-minilm" and st["queues"] == {"all-minilm": 0}
    assert st["uptime_s"] > 0 and st["supervisor"]["state"] == "running"

    actors = ctl(daemon, "actors")
    assert actors.returncode == 0 and "embedder:all-minilm:0" in actors.stdout
    assert "MAILBOX" in actors.stdout and "RESTARTS" in actors.stdout
    rows = ctl_json(daemon, "actors")["actors"]
    assert {r["name"] for r in rows} >= {"pool:all-minilm", "embedder:all-minilm:0"}
    assert all(r["state"] == "running" and r["mailbox"] is not None for r in rows)

    health = ctl(daemon, "health")
    assert health.returncode == 0 and "status:   ok" in health.stdout

    stats = ctl(daemon, "stats")
    assert stats.returncode == 0 and "citadel_http_requests_total" in stats.stdout

    models = ctl_json(daemon, "models", "list")["models"]
    assert models[0]["ready"] and models[0]["dims"] == 384
    warm = ctl(daemon, "models", "warm", "all-minilm")
    assert warm.returncode == 0 and "all-minilm is warm" in warm.stdout
    assert ctl(daemon, "models", "warm", "nope").returncode == 1

    helped = ctl(daemon, "help")
    assert "* cache flush" in helped.stdout and "  status" in helped.stdout
    version = ctl(daemon, "version")
    assert "citadelctl 0.1.0" in version.stdout and "citadeld 0.1.0" in version.stdout


def test_config_show_masks_secrets(daemon: DaemonProc) -> None:
    r = ctl(daemon, "config", "show")
    assert r.returncode == 0
    assert "sk-very-secret" not in r.stdout and "api_key: '***'" in r.stdout
    shown = ctl_json(daemon, "config", "show")
    assert shown["config_file"] == str(daemon.config_path)


def test_mutating_commands_need_yes(daemon: DaemonProc) -> None:
    r = ctl(daemon, "drain")
    assert r.returncode == 2 and "--yes" in r.stderr
    assert httpx.get(daemon.url + "/health/ready").status_code == 200
    flush = ctl(daemon, "cache", "flush", input="y\n")  # stdin is not a terminal: no question
    assert flush.returncode == 2
    ok = ctl(daemon, "cache", "flush", "--yes")
    assert ok.returncode == 0 and "flushed" in ok.stdout
    assert ctl(daemon, "frobnicate").returncode == 2
    assert ctl(daemon, "log-level", "set", "loud", "--yes").returncode == 2


def test_cache_flush_asks_on_a_terminal(daemon: DaemonProc) -> None:
    for answer, code, text in (("n\n", 2, "not confirmed"), ("y\n", 0, "flushed")):
        master, slave = pty.openpty()
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "citadeld.ctl", "--socket", daemon.admin_socket,
                 "cache", "flush"], stdin=slave, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)
            os.write(master, answer.encode())
            out, err = p.communicate(timeout=30)
        finally:
            os.close(master)
            os.close(slave)
        assert p.returncode == code, out + err
        assert text in out + err


def test_drain_and_undrain(daemon: DaemonProc) -> None:
    r = ctl(daemon, "drain", "--yes")
    assert r.returncode == 0, r.stderr
    try:
        ready = httpx.get(daemon.url + "/health/ready")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        refused = httpx.post(daemon.url + "/api/v1/embed", json={"text": "hello"})
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert httpx.get(daemon.url + "/metrics").status_code == 200
        assert "draining" in ctl(daemon, "status").stdout
    finally:
        assert ctl(daemon, "undrain", "--yes").returncode == 0
    assert httpx.get(daemon.url + "/health/ready").status_code == 200
    ok = httpx.post(daemon.url + "/api/v1/embed", json={"text": "hello"})
    assert ok.status_code == 200


def test_log_level_changes_live(daemon: DaemonProc) -> None:
    assert ctl_json(daemon, "log-level", "get")["level"] == "info"
    r = ctl(daemon, "log-level", "set", "debug", "--yes")
    assert r.returncode == 0 and "info -> debug" in r.stdout
    try:
        httpx.post(daemon.url + "/api/v1/embed", json={"text": "logged at debug"},
                   headers={"X-Request-ID": "rid-ctl-e2e"})
        assert ctl_json(daemon, "log-level", "get")["level"] == "debug"
    finally:
        ctl(daemon, "log-level", "set", "info", "--yes")
    logs = [json.loads(x) for x in daemon.logs().splitlines() if x.startswith("{")]
    assert any(e.get("request_id") == "rid-ctl-e2e" for e in logs)  # request ids in the logs
    assert any(e.get("msg") == "log level changed" for e in logs)


def test_sighup_and_ctl_reload(daemon: DaemonProc, notify: NotifyListener) -> None:
    cfg = yaml.safe_load(daemon.config_path.read_text())
    cfg["embedding"]["models"]["all-minilm"]["batch"] = {"max_items": 7}
    cfg["server"]["listen"] = "127.0.0.1:1"  # needs a restart: must not be applied
    daemon.config_path.write_text(yaml.safe_dump(cfg))
    seen = len(notify.messages)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = notify.wait_for("RELOADING", "1", after=seen)
    assert int(reloading["MONOTONIC_USEC"]) > 0
    notify.wait_for("READY", "1", after=seen + 1)
    st = ctl_json(daemon, "status")
    assert st["pending_restart"] == ["server.listen"]
    shown = ctl_json(daemon, "config", "show")["config"]
    assert shown["embedding"]["models"]["all-minilm"]["batch"]["max_items"] == 7
    assert shown["server"]["listen"] == daemon.url.split("//")[1]
    assert httpx.get(daemon.url + "/health/live").status_code == 200

    r = ctl(daemon, "reload", "--yes")
    assert r.returncode == 0 and "needs restart: server.listen" in r.stdout
    daemon.config_path.write_text("server: [not, a, mapping]\n")
    bad = ctl(daemon, "reload", "--yes")
    assert bad.returncode == 1 and "running config kept" in bad.stderr
    assert ctl_json(daemon, "status")["ready"] is True
    logs = daemon.logs()
    assert '"msg":"configuration reloaded"' in logs and '"source":"SIGHUP"' in logs


def test_sigterm_sends_stopping_and_exits_zero(daemon: DaemonProc,
                                               notify: NotifyListener) -> None:
    seen = len(notify.messages)
    assert daemon.stop() == 0, daemon.log_tail()
    notify.wait_for("STOPPING", "1", after=seen, timeout=5)
    assert not os.path.exists(daemon.admin_socket)
    r = ctl(daemon, "status")
    assert r.returncode == 69
    assert r.stderr.count("\n") == 1 and daemon.admin_socket in r.stderr
    assert "Traceback" not in r.stderr


def test_second_sigterm_exits_at_once(tmp_path: Path, hash_fake: Fake) -> None:
    d = DaemonProc(config_for(hash_fake, server={"drain_timeout_s": 60}), tmp_path).start()
    hash_fake.fault(route="/api/embed", latency_ms=15000)
    try:
        def stuck() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the daemon goes away mid-request
                httpx.post(d.url + "/api/v1/embed", json={"text": "stuck", "cache": False},
                           timeout=30)

        t = threading.Thread(target=stuck)
        t.start()
        time.sleep(0.5)
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert d.proc.poll() is None  # draining: waits for the in-flight request
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(5)
        assert time.monotonic() - t0 < 3
        assert '"msg":"second signal: exiting at once"' in d.logs()
    finally:
        hash_fake.reset()
        d.stop()


def test_a_second_daemon_on_the_same_admin_socket_exits_69(tmp_path: Path,
                                                           hash_fake: Fake) -> None:
    first = DaemonProc(config_for(hash_fake), tmp_path / "one").start()
    try:
        second = DaemonProc(config_for(hash_fake, admin={"socket": first.admin_socket}),
                            tmp_path / "two")
        with pytest.raises(RuntimeError, match="exited 69"):
            second.start(ready_timeout=30)
        assert "in use by another running citadeld" in second.logs()
        assert ctl(first, "version").returncode == 0  # the first one keeps its socket
    finally:
        first.stop()
