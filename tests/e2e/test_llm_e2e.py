"""The real citadeld process routing LLM requests across fake Ollama/OpenAI server processes:
the official clients unchanged, a primary killed under load and brought back, all-down 503s,
and a client that hangs up mid-stream."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import ollama
import openai
import pytest

from tests.e2e.conftest import Fake, dead_port
from tests.fakes.process import start_fake
from tests.support.daemon import DaemonProc

pytestmark = pytest.mark.e2e

MODEL = "llama3.2"
WAIT_OPEN_S = 1.0


def llm_fake(module: str, *extra: str) -> Fake:
    return Fake(module, "--fake-vectors", "hash", "--models", "all-minilm", "--chat-models",
                MODEL, "--parallel", "0", *extra)


@pytest.fixture(scope="module")
def primary() -> Iterator[Fake]:
    fake = llm_fake("ollama")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def secondary() -> Iterator[Fake]:
    fake = llm_fake("openai_compat")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def slow() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm", "--chat-models",
                "slow-model", "--parallel", "0", "--chunk-delay-ms", "100")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def llmd(tmp_path_factory: pytest.TempPathFactory, primary: Fake, secondary: Fake, slow: Fake
         ) -> Iterator[DaemonProc]:
    timeouts = {"connect_s": 1, "first_token_s": 3, "idle_s": 3, "total_s": 30}
    config: dict[str, Any] = {
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "openai", "dims": 384, "endpoints": [{"url": secondary.url}]}}},
        "llm": {
            "servers": [
                {"name": "llm-01", "kind": "ollama", "url": primary.url, "models": [MODEL],
                 "priority": 0, "timeouts": timeouts},
                {"name": "llm-02", "kind": "openai", "url": secondary.url, "models": [MODEL],
                 "priority": 1, "timeouts": timeouts},
                {"name": "llm-slow", "kind": "ollama", "url": slow.url,
                 "models": ["slow-model"]},
                {"name": "ghost-1", "kind": "ollama", "url": f"http://127.0.0.1:{dead_port()}",
                 "models": ["ghost"]},
                {"name": "ghost-2", "kind": "openai", "url": f"http://127.0.0.1:{dead_port()}",
                 "models": ["ghost"]},
            ],
            "breaker": {"window_size": 20, "minimum_calls": 5, "wait_open_s": WAIT_OPEN_S,
                        "wait_open_max_s": 4, "half_open_calls": 2},
            "probes": {"interval_s": 0.5, "timeout_s": 0.5},
            "models": {MODEL: {"price_per_1k": 0.1}},
        },
    }
    proc = DaemonProc(config, tmp_path_factory.mktemp("llmd"))
    proc.start(require_ready=False)
    yield proc
    code = proc.stop()
    assert code == 0, proc.log_tail()


def servers(d: DaemonProc) -> dict[str, Any]:
    return dict(httpx.get(d.url + "/api/v1/llm/servers", timeout=5).json()["servers"])


def test_official_clients_unchanged(llmd: DaemonProc) -> None:
    oa = openai.OpenAI(base_url=llmd.url + "/v1", api_key="unused", max_retries=0)
    resp = oa.chat.completions.create(model=MODEL,
                                      messages=[{"role": "user", "content": "hello there"}])
    assert resp.choices[0].message.content == "Echo: hello there"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    chunks = oa.chat.completions.create(model=MODEL, stream=True,
                                        messages=[{"role": "user", "content": "one two"}])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        "Echo: one two"
    assert MODEL in [m.id for m in oa.models.list().data]
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])

    ol = ollama.Client(host=llmd.url, timeout=10)
    parts = list(ol.chat(model=MODEL, stream=True,
                         messages=[{"role": "user", "content": "a b c"}]))
    assert "".join(p.message.content or "" for p in parts) == "Echo: a b c"
    assert parts[-1].done and parts[-1].eval_count == 4
    assert ol.generate(model=MODEL, prompt="yo").response == "Echo: yo"

    r = httpx.post(llmd.url + "/api/v1/llm/generate", timeout=10,
                   headers={"X-Citadel-Caller": "e2e"}, json={"model": MODEL, "prompt": "hi"})
    body = r.json()
    assert r.status_code == 200 and body["server"] == "llm-01" and body["usage"]["cost"] > 0
    assert r.headers["X-Citadel-Upstream"] == "llm-01"
    detailed = httpx.get(llmd.url + "/health/detailed", timeout=5).json()
    assert detailed["dependencies"]["llm:llm-01"]["status"] == "ok"
    assert detailed["llm"]["servers"]["llm-02"]["breaker"]["state"] == "closed"
    metrics = httpx.get(llmd.url + "/metrics", timeout=5).text
    assert 'citadel_llm_tokens_total{caller="e2e"' in metrics
    assert 'citadel_llm_breaker_state{server="llm-01"} 0.0' in metrics


def test_all_down_answers_503_fast(llmd: DaemonProc) -> None:
    """Refused connections trip both breakers; from then on every answer is a fast 503 (with
    the breakers open: no upstream call at all; half-open: one refused probe call)."""
    answers = []
    with httpx.Client(base_url=llmd.url, timeout=10) as client:
        for _ in range(30):
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json={
                "model": "ghost", "messages": [{"role": "user", "content": "x"}]})
            answers.append((r.status_code, time.perf_counter() - t0,
                            r.headers.get("Retry-After"), r.json()["error"]))
            time.sleep(0.05)
    assert all(status == 503 for status, *_ in answers)
    assert max(elapsed for _, elapsed, *_ in answers) < 0.5, answers
    fast = [a for a in answers if a[3]["code"] == "no_server_available"]
    assert len(fast) >= 10
    for _, elapsed, retry_after, err in fast:
        assert retry_after is not None and int(retry_after) >= 1
        assert "ghost-1" in err["message"] and "ghost-2" in err["message"]
        assert elapsed < 0.1


def test_client_hangup_cancels_upstream(llmd: DaemonProc, slow: Fake) -> None:
    words = " ".join(f"w{i}" for i in range(50))
    with httpx.stream("POST", llmd.url + "/api/v1/llm/generate", timeout=10,
                      json={"model": "slow-model", "prompt": words, "stream": True}) as r:
        lines = r.iter_lines()  # keep it: a dropped iterator closes the response
        assert '"delta"' in next(lines)
        assert slow.stats()["in_flight"] == 1
    # the client closed the connection after one line of a 5 s stream
    deadline = time.monotonic() + 3
    while slow.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.stats()["in_flight"] == 0
    assert servers(llmd)["llm-slow"]["inflight"] == 0


async def _open_loop(url: str, rps: float, duration: float, log: list[dict[str, Any]]) -> None:
    """Open loop: one request every 1/rps seconds whatever the answers do (a closed loop
    would slow down with the server and hide an outage)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(i: int) -> None:
            t0 = time.monotonic()
            row: dict[str, Any] = {"i": i, "t": t0}
            try:
                async with session.post(url, json={"model": MODEL, "prompt": f"q {i}"}) as r:
                    await r.read()
                    row.update(status=r.status, server=r.headers.get("X-Citadel-Upstream"),
                               attempts=int(r.headers.get("X-Citadel-Attempts", "0")))
            except Exception as exc:  # a hang shows up here as a timeout
                row.update(status=-1, error=repr(exc))
            row["latency"] = time.monotonic() - t0
            log.append(row)

        start = time.monotonic()
        tasks = []
        i = 0
        while time.monotonic() - start < duration:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rps - time.monotonic()))
        await asyncio.gather(*tasks)


def test_kill_primary_under_load_then_recover(llmd: DaemonProc, primary: Fake) -> None:
    url = llmd.url + "/api/v1/llm/generate"
    log: list[dict[str, Any]] = []
    opened: list[float] = []

    def watch_and_kill() -> float:
        time.sleep(1.5)
        killed = time.monotonic()
        primary.proc.send_signal(signal.SIGKILL)
        primary.proc.wait()
        while time.monotonic() - killed < 3:
            if servers(llmd)["llm-01"]["breaker"]["state"] != "closed":
                opened.append(time.monotonic())
                break
            time.sleep(0.02)
        return killed

    async def run() -> float:
        loop = asyncio.get_running_loop()
        killer = loop.run_in_executor(None, watch_and_kill)
        await _open_loop(url, 50, 5.0, log)
        return await killer

    killed = asyncio.run(run())
    failed = [r for r in log if r["status"] != 200]
    assert len(log) >= 200
    assert len(failed) <= len(log) * 0.01, failed[:5]
    assert max(r["latency"] for r in log) < 5.0  # none hang
    assert opened and opened[0] - killed <= 1.0, "breaker did not open within 1 s"
    after = [r for r in log if r["t"] > killed + 1.0]
    assert after and all(r["server"] == "llm-02" for r in after if r["status"] == 200)

    # bring it back on the same port: HALF_OPEN probes must close the breaker
    state = servers(llmd)["llm-01"]["breaker"]
    wait = state.get("half_open_in_s", 0.0)
    proc, _ = start_fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm",
                         "--chat-models", MODEL, "--parallel", "0", "--port", str(primary.port))
    primary.proc = proc
    back = time.monotonic()
    served_at = None
    while time.monotonic() - back < wait + 5:
        r = httpx.post(url, json={"model": MODEL, "prompt": "again"}, timeout=10)
        assert r.status_code == 200
        if r.headers["X-Citadel-Upstream"] == "llm-01":
            served_at = time.monotonic()
            break
        time.sleep(0.02)
    assert served_at is not None and served_at - back <= wait + 1.0, (served_at, back, wait)
    deadline = time.monotonic() + 2
    while servers(llmd)["llm-01"]["breaker"]["state"] != "closed":
        httpx.post(url, json={"model": MODEL, "prompt": "again"}, timeout=10)
        assert time.monotonic() < deadline


def test_citadelctl_breakers(llmd: DaemonProc) -> None:
    """Operators force a breaker open, see traffic move, and reset it."""
    import json
    import subprocess
    import sys

    def ctl(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "citadeld.ctl", "--socket", llmd.admin_socket, *words],
            capture_output=True, text=True, timeout=60)

    listed = ctl("--json", "breakers", "list")
    assert listed.returncode == 0, listed.stderr
    assert "llm-01" in json.loads(listed.stdout)["result"]
    assert ctl("breakers", "open", "llm-01").returncode == 2  # mutating: needs --yes
    try:
        assert ctl("breakers", "open", "llm-01", "--yes").returncode == 0
        assert servers(llmd)["llm-01"]["breaker"]["state"] != "closed"
        r = httpx.post(llmd.url + "/api/v1/llm/generate", timeout=30,
                       json={"model": MODEL, "prompt": "hi", "stream": False})
        assert r.status_code == 200 and r.headers["X-Citadel-Upstream"] != "llm-01"
        assert ctl("breakers", "reset", "nope", "--yes").returncode == 1
    finally:
        assert ctl("breakers", "reset", "llm-01", "--yes").returncode == 0
    assert servers(llmd)["llm-01"]["breaker"]["state"] == "closed"
