"""Two citadeld daemons sharing PostgreSQL and Redis, and the kill -9 scenario of issue 5:
one daemon is killed mid-workflow and the other must finish everything accepted. Shared by
tests/e2e/test_workflows_e2e.py and bench/workflow_bench.py (which reports the counts)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.daemon import DaemonProc
from tests.support.storage_chaos import wait_vectors_ok

REDIS_URL = "redis://127.0.0.1:6379/0"
TERMINAL = ("completed", "failed", "cancelled")


def daemon_config(fast_url: str, slow_url: str, dsn: str | None, prefix: str, instance: str,
                  dead_url: str | None = None, **workflows: Any) -> dict[str, Any]:
    timeouts = {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 60}
    servers = [{"name": "fast", "kind": "ollama", "url": fast_url, "models": ["llama3.2"],
                "timeouts": timeouts},
               {"name": "slow", "kind": "ollama", "url": slow_url, "models": ["slow-model"],
                "timeouts": timeouts}]
    if dead_url is not None:
        servers.append({"name": "gone", "kind": "ollama", "url": dead_url, "models": ["ghost"],
                        "timeouts": timeouts})
    cfg: dict[str, Any] = {
        "server": {"request_timeout_s": 30},
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "ollama", "dims": 384, "max_context": 256,
            "endpoints": [{"url": fast_url}], "attempts": 1, "batch": {"max_wait_ms": 1}}}},
        "llm": {"servers": servers, "routing": {"backoff_base_s": 0.01}},
        "workflows": {"redis_url": REDIS_URL if prefix else None, "key_prefix": prefix or
                      "citadel:wf:", "instance": instance, "claim_timeout_s": 1.5,
                      "retry_backoff_s": 0.05, "retry_backoff_max_s": 0.2,
                      "shutdown_grace_s": 1, **workflows},
        "supervision": {"ping_interval_s": 2, "ping_timeout_s": 2},
    }
    if dsn is not None:
        cfg["persistence"] = {"dsn": dsn, "instance": instance, "timeout_s": 3,
                              "connect_timeout_s": 2, "flush_interval_s": 0.2}
    return cfg


def start(config: dict[str, Any], workdir: Path) -> DaemonProc:
    """A daemon whose vector store has created its collections (steps may use them)."""
    d = DaemonProc(config, workdir).start(ready_timeout=60)
    wait_vectors_ok(d.url)
    return d


def kill_body(slow_words: int) -> dict[str, Any]:
    """embed -> a slow streaming LLM step quoting it -> a fast LLM step quoting that."""
    return {"steps": [
        {"id": "embed", "type": "embedding", "params": {"text": "a document to summarise"}},
        {"id": "draft", "type": "llm_query", "params": {
            "model": "slow-model",
            "prompt": " ".join(["w"] * slow_words) + " {{steps.embed.output.model}}"}},
        {"id": "final", "type": "llm_query", "params": {
            "model": "llama3.2", "prompt": "Shorten: {{steps.draft.output.text}}"}},
    ]}


@dataclass
class KillResult:
    submitted: int = 0
    accepted: int = 0
    completed: int = 0
    resumed_by_survivor: int = 0  # started on the killed daemon, finished on the other
    lost: int = 0  # accepted (202) and never completed
    seconds_to_finish: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        return (f"kill -9: {self.accepted} of {self.submitted} workflows accepted, "
                f"{self.completed} completed, {self.resumed_by_survivor} resumed by the "
                f"survivor after the kill; lost {self.lost}")


def wait_running(d: DaemonProc, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = int(httpx.get(d.url + "/health/detailed", timeout=5).json()
                      ["workflows"]["running"])
        if running:
            return running
        time.sleep(0.05)
    raise AssertionError("the daemon never ran a workflow")


def kill9_scenario(a: DaemonProc, b: DaemonProc, n: int = 20, slow_words: int = 15,
                   timeout: float = 90.0) -> KillResult:
    """Submit ``n`` workflows to ``a`` and ``b`` alternately, kill -9 ``a`` while it runs
    some, and wait for ``b`` to bring every accepted workflow to an end."""
    res = KillResult(submitted=n)
    ids: list[str] = []
    with httpx.Client(timeout=10) as c:
        for i in range(n):
            d = a if i % 2 == 0 else b
            r = c.post(d.url + "/api/v1/workflows", json=kill_body(slow_words))
            if r.status_code == 202:
                ids.append(r.json()["id"])
        res.accepted = len(ids)
        wait_running(a)
        time.sleep(0.3)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait(10)
        t0 = time.monotonic()
        pending = set(ids)
        final: dict[str, dict[str, Any]] = {}
        while pending and time.monotonic() - t0 < timeout:
            for wid in list(pending):
                rec = c.get(f"{b.url}/api/v1/workflows/{wid}").json()
                if rec.get("status") in TERMINAL:
                    final[wid] = rec
                    pending.discard(wid)
            time.sleep(0.2)
        res.seconds_to_finish = round(time.monotonic() - t0, 2)
    for rec in final.values():
        res.statuses[rec["status"]] = res.statuses.get(rec["status"], 0) + 1
    res.completed = res.statuses.get("completed", 0)
    res.resumed_by_survivor = sum(1 for r in final.values() if r["runs"] >= 2)
    res.lost = res.accepted - res.completed
    return res
