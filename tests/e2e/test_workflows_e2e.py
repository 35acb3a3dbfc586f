"""Workflows through the real citadeld with real Redis and PostgreSQL and the LLM/Ollama fakes:
the original plans' example end to end, cancel during a streaming step, an LLM server that is
down, bad input, and kill -9 of one of two daemons mid-workflow (0 workflows lost)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

from tests.e2e.conftest import Fake, dead_port
from tests.integration.workflow_harness import drop_prefix, new_prefix, redis_available
from tests.support.daemon import DaemonProc
from tests.support.pg import shared_available, temp_database
from tests.support.workflow_chaos import daemon_config, kill9_scenario, start

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not (shared_available() and redis_available()), reason="PostgreSQL and Redis are needed")]

TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture(scope="module")
def fast() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm", "--chat-models",
                "llama3.2", "--parallel", "0")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def slow() -> Iterator[Fake]:
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm", "--chat-models",
                "slow-model", "--parallel", "0", "--chunk-delay-ms", "100")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    with temp_database() as d:
        yield d


@pytest.fixture(scope="module")
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    drop_prefix(p)


@pytest.fixture(scope="module")
def wfd(tmp_path_factory: pytest.TempPathFactory, fast: Fake, slow: Fake, dsn: str,
        prefix: str) -> Iterator[DaemonProc]:
    cfg = daemon_config(fast.url, slow.url, dsn, prefix, "solo",
                        dead_url=f"http://127.0.0.1:{dead_port()}")
    d = start(cfg, tmp_path_factory.mktemp("wf"))
    yield d
    assert d.stop() == 0, d.log_tail()


def submit(d: DaemonProc, body: Any) -> httpx.Response:
    return httpx.post(d.url + "/api/v1/workflows", json=body, timeout=10)


def wait(d: DaemonProc, wid: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec: dict[str, Any] = httpx.get(f"{d.url}/api/v1/workflows/{wid}", timeout=5).json()
        if rec["status"] in TERMINAL or time.monotonic() > deadline:
            return rec
        time.sleep(0.05)


EXAMPLE = {"name": "summarise-a-document", "steps": [
    {"id": "store", "type": "vector_store", "params": {
        "collection": "default", "items": [
            {"id": "doc-1", "text": "Citadel replaces Celery workers with supervised actors."},
            {"id": "doc-2", "text": "Quarterly tax filing is due in April."}]}},
    {"id": "embed", "type": "embedding",
     "params": {"text": "Citadel replaces Celery workers with supervised actors."}},
    {"id": "search", "type": "vector_search", "depends_on": ["store"],
     "params": {"vector": "{{steps.embed.output.vector}}", "limit": 1}},
    {"id": "summarise", "type": "llm_query", "params": {
        "model": "llama3.2", "prompt": "Summarise: {{steps.search.output.texts}}"}},
]}


def sse_events(d: DaemonProc, wid: str) -> list[dict[str, Any]]:
    """One workflow's events over SSE: from its retained beginning to its terminal event."""
    out = []
    with httpx.stream("GET", f"{d.url}/api/v1/events", params={"workflow_id": wid},
                      timeout=15) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith(
            "text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                out.append(json.loads(line[5:]))
    return out


def ws_events(d: DaemonProc, wid: str) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        out = []
        async with aiohttp.ClientSession() as s, s.ws_connect(
                f"{d.url}/ws/workflows/{wid}", timeout=aiohttp.ClientWSTimeout(ws_close=5)
        ) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    out.append(json.loads(msg.data))
        return out
    return asyncio.run(asyncio.wait_for(run(), 15))


def check_example_events(events: list[dict[str, Any]], answer: str, min_deltas: int = 1
                         ) -> None:
    types = [e["type"] for e in events]
    assert types[:2] == ["STATE_SNAPSHOT", "RUN_STARTED"], types  # pending on submit
    assert events[0]["snapshot"]["status"] == "pending"
    assert types[-1] == "RUN_FINISHED", types
    for step in ("store", "embed", "search", "summarise"):
        started = [i for i, e in enumerate(events)
                   if e["type"] == "STEP_STARTED" and e["step_id"] == step]
        finished = [i for i, e in enumerate(events)
                    if e["type"] == "STEP_FINISHED" and e["step_id"] == step]
        assert len(started) == len(finished) == 1 and started[0] < finished[0], step
    order = {e["step_id"]: i for i, e in enumerate(events) if e["type"] == "STEP_FINISHED"}
    first_search = next(i for i, e in enumerate(events)
                        if e["type"] == "STEP_STARTED" and e["step_id"] == "search")
    assert order["store"] < first_search and order["embed"] < first_search  # the DAG held
    deltas = [e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT"]
    assert len(deltas) >= min_deltas and "".join(deltas) == answer
    snap = [e for e in events if e["type"] == "STATE_SNAPSHOT"][-1]
    assert snap["snapshot"]["status"] == "completed"
    assert {e["workflow_id"] for e in events} == {events[0]["workflow_id"]}
    assert len({e["id"] for e in events}) == len(events)


def test_original_example_end_to_end(wfd: DaemonProc) -> None:
    r = submit(wfd, EXAMPLE)
    assert r.status_code == 202, r.text
    wid = r.json()["id"]
    assert r.headers["Location"] == f"/api/v1/workflows/{wid}"
    assert r.json()["status"] == "pending" and r.json()["owner"] == "local"
    rec = wait(wfd, wid)
    assert rec["status"] == "completed", rec
    steps = {s["id"]: s for s in rec["steps"]}
    assert all(s["status"] == "completed" and s["duration_ms"] is not None
               for s in steps.values())
    assert rec["results"]["search"]["ids"] == ["doc-1"]
    assert rec["results"]["summarise"]["text"] == (
        "Echo: Summarise: Citadel replaces Celery workers with supervised actors.")
    assert rec["progress"] == {"total": 4, "completed": 4, "running": 0, "failed": 0}
    listed = httpx.get(wfd.url + "/api/v1/workflows?status=completed&limit=1").json()
    assert listed["total"] >= 1 and len(listed["workflows"]) == 1
    metrics = httpx.get(wfd.url + "/metrics").text
    assert 'citadel_workflows_finished_total{status="completed"}' in metrics
    assert 'citadel_workflow_step_duration_seconds_count{outcome="completed",type="llm_query"}' \
        in metrics
    actors = httpx.get(wfd.url + "/health/detailed").json()["actors"]
    assert any(a["name"] == "workflows" and a["state"] == "running" for a in actors)
    answer = rec["results"]["summarise"]["text"]
    check_example_events(sse_events(wfd, wid), answer)  # the finished run, replayed
    check_example_events(ws_events(wfd, wid), answer)


def test_example_events_live_over_sse_and_websocket(wfd: DaemonProc) -> None:
    """Subscribed before the run starts: both transports deliver the whole run live."""
    import concurrent.futures

    body = json.loads(json.dumps(EXAMPLE))
    body["steps"][3]["params"]["model"] = "slow-model"  # ~1 s of deltas
    wid = submit(wfd, body).json()["id"]

    async def hang_up_early() -> int:  # a watcher that leaves mid-run: the workflow goes on
        async with aiohttp.ClientSession() as s, s.ws_connect(
                f"{wfd.url}/ws/workflows/{wid}") as ws:
            got = 0
            async for _ in ws:
                got += 1
                if got == 3:
                    break
            return got

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        sse = pool.submit(sse_events, wfd, wid)
        ws = pool.submit(ws_events, wfd, wid)
        early = pool.submit(asyncio.run, hang_up_early())
        assert early.result(15) == 3
        rec = wait(wfd, wid)
        assert rec["status"] == "completed", rec
        answer = rec["results"]["summarise"]["text"]
        # slow-model sends a chunk every 100 ms: each one is its own delta event
        words = len(answer.split())
        check_example_events(sse.result(20), answer, min_deltas=words)
        check_example_events(ws.result(20), answer, min_deltas=words)


def test_cancel_during_a_streaming_step(wfd: DaemonProc, slow: Fake) -> None:
    r = submit(wfd, {"steps": [{"id": "talk", "type": "llm_query", "params": {
        "model": "slow-model", "prompt": " ".join(["word"] * 200)}}]})
    wid = r.json()["id"]
    for _ in range(200):
        rec = httpx.get(f"{wfd.url}/api/v1/workflows/{wid}").json()
        if rec["steps"][0]["status"] == "running" and slow.stats()["in_flight"] >= 0:
            break
        time.sleep(0.02)
    time.sleep(0.5)  # mid-stream
    t0 = time.monotonic()
    c = httpx.post(f"{wfd.url}/api/v1/workflows/{wid}/cancel", timeout=10)
    assert c.status_code == 200, c.text
    assert time.monotonic() - t0 < 5.0  # promptly, on a loaded machine too
    assert c.json()["status"] == "cancelled" and c.json()["steps"][0]["status"] == "cancelled"
    time.sleep(0.3)
    assert slow.stats()["in_flight"] == 0  # the upstream request was aborted
    again = httpx.post(f"{wfd.url}/api/v1/workflows/{wid}/cancel", timeout=10)
    assert again.status_code == 409
    events = sse_events(wfd, wid)  # ends at the terminal event (announced exactly once)
    types = [e["type"] for e in events]
    assert types.count("RUN_CANCELLED") == 1 and types[-1] == "RUN_CANCELLED", types
    assert "TEXT_MESSAGE_CONTENT" in types
    assert "STEP_FINISHED" not in types


def test_llm_server_down_retries_then_fails_clearly(wfd: DaemonProc) -> None:
    r = submit(wfd, {"steps": [
        {"id": "embed", "type": "embedding", "params": {"text": "x"}},
        {"id": "ask", "type": "llm_query", "retries": 2, "timeout_s": 5,
         "params": {"model": "ghost", "prompt": "{{steps.embed.output.model}}"}}]})
    rec = wait(wfd, r.json()["id"])
    assert rec["status"] == "failed", rec
    ask = rec["steps"][1]
    assert ask["status"] == "failed" and ask["attempts"] == 3
    assert rec["error"].startswith("step 'ask' (llm_query) failed after 3 attempts: ")
    assert "no LLM server can take model 'ghost'" in rec["error"]
    assert rec["steps"][0]["status"] == "completed"


def test_bad_input_is_a_400_naming_the_step(wfd: DaemonProc) -> None:
    r = submit(wfd, {"steps": [{"type": "embedding", "params": {"text": "x"}}] * 10_000})
    assert r.status_code == 400 and "too many steps: 10000" in r.json()["error"]["message"]
    r = submit(wfd, {"steps": [
        {"id": "a", "type": "embedding", "params": {"text": "x"}, "depends_on": ["b"]},
        {"id": "b", "type": "embedding", "params": {"text": "x"}, "depends_on": ["a"]}]})
    assert r.status_code == 400 and "steps[0] 'a': dependency cycle a -> b -> a" in \
        r.json()["error"]["message"]
    r = submit(wfd, {"steps": [{"id": "q", "type": "llm_query",
                                "params": {"model": "nope", "prompt": "x"}}]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("steps[0] 'q': ")
    r = submit(wfd, {"steps": [{"id": "e", "type": "embedding",
                                "params": {"text": "x", "model": "nope"}}]})
    assert r.status_code == 400 and "steps[0] 'e'" in r.json()["error"]["message"]
    r = httpx.post(wfd.url + "/api/v1/workflows", content=b"{nope", timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    big = {"steps": [{"type": "embedding", "params": {"text": "x" * (5 * 1024 * 1024)}}]}
    r = submit(wfd, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert httpx.get(wfd.url + "/api/v1/workflows/wf_nope").status_code == 404
    assert httpx.get(wfd.url + "/api/v1/workflows?status=weird").status_code == 400
    assert httpx.get(wfd.url + "/api/v1/workflows?limit=0").status_code == 400


def test_list_filter_with_a_nul_is_an_empty_page_not_a_503(wfd: DaemonProc) -> None:
    # schemathesis found this: PostgreSQL refuses a NUL in a string parameter
    r = httpx.get(wfd.url + "/api/v1/workflows", params={"owner": "a\x00b"}, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["workflows"] == [] and r.json()["total"] == 0


def test_kill9_one_of_two_daemons_loses_no_workflow(
        tmp_path: Path, fast: Fake, slow: Fake) -> None:
    p = new_prefix()
    try:
        with temp_database() as db:
            a = start(daemon_config(fast.url, slow.url, db, p, "a", max_concurrent=6),
                      tmp_path / "a")
            b = start(daemon_config(fast.url, slow.url, db, p, "b", max_concurrent=6),
                      tmp_path / "b")
            try:
                res = kill9_scenario(a, b, n=12, slow_words=15, timeout=60)
                assert res.accepted == 12 and res.lost == 0, (res, b.log_tail())
                assert res.resumed_by_survivor >= 1, res
            finally:
                a.stop()
                assert b.stop() == 0, b.log_tail()
    finally:
        drop_prefix(p)
