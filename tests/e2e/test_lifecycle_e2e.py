"""The daemon's life: embedded defaults, draining on SIGTERM, escalation past the root's restart
intensity, and a Redis cache that goes away and comes back."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.e2e.conftest import Fake
from tests.support.daemon import DaemonProc, free_port

pytestmark = pytest.mark.e2e


def test_embedded_defaults_serve_the_local_model(tmp_path: Path) -> None:
    """What `scripts/run.sh` starts: no servers, in-process model and cache."""
    d = DaemonProc({}, tmp_path).start(ready_timeout=120)
    try:
        r = httpx.post(d.url + "/api/v1/embed", timeout=30, json={
            "texts": ["a cat sat on the mat", "a kitten rested on the rug",
                      "quarterly tax filing deadline"],
        })
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "all-minilm" and body["dimensions"] == 384
        cat, kitten, tax = (np.asarray(v) for v in body["embeddings"])
        assert float(cat @ kitten) > float(cat @ tax) + 0.2
        assert httpx.get(d.url + "/health").json()["cache"] == "ok"
    finally:
        assert d.stop() == 0, d.log_tail()


def test_sigterm_drains_in_flight_requests(tmp_path: Path, flaky_fake: Fake) -> None:
    d = DaemonProc({
        "server": {"drain_timeout_s": 10},
        "embedding": {"default_model": "flaky", "models": {"flaky": {
            "backend": "ollama", "dims": 384, "endpoints": [{"url": flaky_fake.url}],
            "timeout_s": 10,
        }}},
    }, tmp_path).start()
    flaky_fake.reset()
    flaky_fake.fault(route="/api/embed", latency_ms=1500)
    result: dict[str, object] = {}

    def slow_request() -> None:
        r = httpx.post(d.url + "/api/v1/embed", json={"text": "in flight"}, timeout=20)
        result["status"] = r.status_code

    try:
        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.5)  # the request is now waiting on the slow upstream
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        t.join(15)
        assert result.get("status") == 200, "the in-flight request must finish during drain"
        assert d.proc.wait(15) == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(d.url + "/health/live", timeout=1)
    finally:
        flaky_fake.reset()
        d.stop()
    assert '"msg":"draining"' in d.logs()


def test_root_escalation_exits_non_zero(tmp_path: Path) -> None:
    """A model that can never start exhausts the restart intensity; the daemon exits so that
    systemd restarts it, instead of limping on."""
    d = DaemonProc({
        "embedding": {"models": {"all-minilm": {
            "backend": "local", "dims": 384, "path": str(tmp_path / "no-model-here"),
        }}},
        "supervision": {"max_restarts": 2, "period_s": 30, "backoff_min_s": 0.01,
                        "backoff_max_s": 0.05},
    }, tmp_path)
    d.start(require_ready=False)
    assert d.proc is not None
    code = d.proc.wait(90)
    d.stop()
    assert code == 70, d.log_tail()
    logs = d.logs()
    assert "root supervisor gave up" in logs
    assert "Traceback" not in "\n".join(
        line for line in logs.splitlines() if not line.startswith("{")
    )


class ThrowawayRedis:
    """A private redis-server on a spare port, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:  # scripts/test.sh installs it; a bare checkout may lack it
            pytest.fail("redis-server is required for this test (apt-get install redis-server)")
        self.exe = exe
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("throwaway redis did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[ThrowawayRedis]:
    r = ThrowawayRedis(tmp_path)
    r.start()
    yield r
    r.kill()


def test_redis_cache_outage_is_a_miss_and_shows_in_health(
    tmp_path: Path, flaky_fake: Fake, throwaway_redis: ThrowawayRedis,
) -> None:
    port = throwaway_redis.port
    d = DaemonProc({
        "cache": {"backend": "redis", "redis_url": f"redis://127.0.0.1:{port}/0",
                  "timeout_s": 0.2},
        "embedding": {"default_model": "flaky", "models": {"flaky": {
            "backend": "ollama", "dims": 384, "endpoints": [{"url": flaky_fake.url}],
        }}},
    }, tmp_path).start()
    flaky_fake.reset()
    try:
        url = d.url + "/api/v1/embed"
        assert httpx.post(url, json={"text": "cache me"}).json()["cached"] == [False]
        assert httpx.post(url, json={"text": "cache me"}).json()["cached"] == [True]
        throwaway_redis.kill()
        t0 = time.monotonic()
        r = httpx.post(url, json={"text": "cache me"})
        assert r.status_code == 200 and r.json()["cached"] == [False]
        assert time.monotonic() - t0 < 2
        deadline = time.monotonic() + 10
        while httpx.get(d.url + "/health").json()["cache"] != "down":
            assert time.monotonic() < deadline, "cache outage never showed in /health"
            time.sleep(0.2)
        assert httpx.get(d.url + "/health").json()["status"] == "degraded"
        throwaway_redis.start()  # back on the same port: hits resume without a restart
        deadline = time.monotonic() + 20
        while httpx.get(d.url + "/health").json()["cache"] != "ok":
            assert time.monotonic() < deadline, "cache recovery never showed in /health"
            time.sleep(0.2)
        httpx.post(url, json={"text": "after recovery"})
        assert httpx.post(url, json={"text": "after recovery"}).json()["cached"] == [True]
    finally:
        assert d.stop() == 0, d.log_tail()
