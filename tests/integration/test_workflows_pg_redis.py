"""Workflow engines against real PostgreSQL and Redis: the accept is durable before the 202,
a resumed workflow skips the steps recorded as done, and two engines share one queue - each
workflow runs once, and the jobs of a silent engine are reclaimed by the other."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from citadeld.errors import BadRequest, NotFound
from citadeld.security.principal import LOCAL, Principal
from tests.fakes.ollama import FakeOllama
from tests.integration.workflow_harness import (
    REDIS_URL,
    drop_prefix,
    llm_config,
    new_prefix,
    redis_available,
    start_node,
)
from tests.support.pg import shared_available, temp_database

pytestmark = pytest.mark.skipif(not (shared_available() and redis_available()),
                                reason="PostgreSQL at 5432 and Redis at 6379 are needed")


@pytest.fixture
def dsn() -> Iterator[str]:
    with temp_database() as d:
        yield d


@pytest.fixture
def prefix() -> Iterator[str]:
    p = new_prefix()
    yield p
    drop_prefix(p)


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeOllama, FakeOllama]]:
    fast = FakeOllama(models=["all-minilm"], chat_models=["llama3.2"], parallel=None,
                      fake_vectors=True)
    slow = FakeOllama(models=["all-minilm"], chat_models=["slow-model"], parallel=None,
                      fake_vectors=True, chunk_delay_ms=150)
    await fast.start()
    await slow.start()
    yield fast, slow
    await fast.stop()
    await slow.stop()


def q(dsn: str, sql: str, args: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def two_steps(slow_words: int = 12) -> dict[str, Any]:
    return {"steps": [
        {"id": "first", "type": "llm_query", "params": {"model": "llama3.2", "prompt": "hi"}},
        {"id": "second", "type": "llm_query", "params": {
            "model": "slow-model",
            "prompt": " ".join(["w"] * slow_words) + " {{steps.first.output.text}}"}},
    ]}


async def test_accept_is_durable_and_a_new_daemon_runs_it(
        tmp_path: Path, dsn: str, prefix: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    fast, slow = fakes
    llm = llm_config(fast.url, slow.url)
    a = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="a", llm=llm, max_concurrent=1)
    await a.halt_runner()  # no runner: what is accepted must wait in PostgreSQL and Redis
    wid = await a.submit(two_steps(2))
    rows = q(dsn, "SELECT status, owner, steps_total FROM citadel_workflows WHERE id = %s",
             (wid,))
    assert rows == [("pending", "local", 2)]  # on disk before submit returned
    b = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="b", llm=llm)
    try:
        rec = await b.wait(wid)
        assert rec["status"] == "completed" and rec["instance"] == "b", rec
        assert rec["results"]["second"]["text"].endswith("Echo: hi")
        row = q(dsn, "SELECT status, steps_done, finished_at IS NOT NULL FROM "
                     "citadel_workflows WHERE id = %s", (wid,))
        assert row == [("completed", 2, True)]
    finally:
        await a.stop()
        await b.stop()


async def test_resume_skips_done_steps_after_the_holder_dies(
        tmp_path: Path, dsn: str, prefix: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    fast, slow = fakes
    llm = llm_config(fast.url, slow.url)
    a = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="a", llm=llm)
    wid = await a.submit(two_steps(20))  # the second step streams for ~3 s
    for _ in range(200):
        rec = await a.svc.get(wid, LOCAL)
        if rec["steps"][1]["status"] == "running":
            break
        await asyncio.sleep(0.02)
    assert rec["steps"][0]["status"] == "completed"
    await a.crash()
    assert fast.stats.calls["/api/generate"] == 1
    b = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="b", llm=llm)
    try:
        rec = await b.wait(wid, wait_s=30)
        assert rec["status"] == "completed", rec
        assert rec["instance"] == "b" and rec["runs"] == 2
        first, second = rec["steps"]
        assert first["attempts"] == 1 and second["status"] == "completed"
        assert fast.stats.calls["/api/generate"] == 1  # the done step was not run again
        assert slow.stats.calls["/api/generate"] == 2  # the interrupted one was
        assert int(b.svc.metrics.reclaimed._value.get()) >= 1
    finally:
        await b.stop()


async def test_two_engines_share_the_queue_each_workflow_runs_once(
        tmp_path: Path, dsn: str, prefix: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    fast, slow = fakes
    llm = llm_config(fast.url, slow.url)
    a = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="a", llm=llm, max_concurrent=4)
    b = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="b", llm=llm, max_concurrent=4)
    try:
        body = {"steps": [{"id": "s", "type": "llm_query",
                           "params": {"model": "slow-model", "prompt": "one two"}}]}
        ids = [await (a if i % 2 else b).submit(body) for i in range(16)]
        recs = [await a.wait(w) for w in ids]
        assert all(r["status"] == "completed" and r["runs"] == 1 for r in recs)
        by = {r["instance"] for r in recs}
        assert by == {"a", "b"}, by  # both claimed work
        assert slow.stats.calls["/api/generate"] == 16  # nothing ran twice
        listed = await b.svc.list(LOCAL, "completed", None, 10, 0)
        assert listed["total"] == 16 and len(listed["workflows"]) == 10
        assert listed["next_offset"] == 10
        other = Principal(name="mallory", role="user", kind="key")
        assert (await b.svc.list(other, None, None, 10, 0))["total"] == 0
        with pytest.raises(NotFound):  # another owner's workflow does not exist for her
            await a.svc.get(ids[0], other)
        with pytest.raises(NotFound):
            await a.svc.cancel(ids[0], other)
        with pytest.raises(NotFound):
            await a.svc.list(other, None, "local", 10, 0)
        mine = await a.svc.submit(body, other, None)
        assert mine["owner"] == "mallory"
        assert (await a.svc.list(other, None, None, 10, 0))["total"] == 1
        assert (await a.svc.get(mine["id"], other))["owner"] == "mallory"
        with pytest.raises(BadRequest):
            await b.svc.list(LOCAL, "bogus", None, 10, 0)
    finally:
        await a.stop()
        await b.stop()


async def test_cancel_reaches_the_holder_on_another_instance(
        tmp_path: Path, dsn: str, prefix: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    fast, slow = fakes
    llm = llm_config(fast.url, slow.url)
    a = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="a", llm=llm)
    await a.halt_runner()  # a only serves the API
    b = await start_node(tmp_path, dsn=dsn, redis_url=REDIS_URL, prefix=prefix,
                         instance="b", llm=llm)
    try:
        wid = await a.submit({"steps": [{"id": "s", "type": "llm_query", "params": {
            "model": "slow-model", "prompt": " ".join(["w"] * 100)}}]})
        for _ in range(200):
            if (await a.svc.get(wid, LOCAL))["status"] == "running":
                break
            await asyncio.sleep(0.02)
        out, final = await a.svc.cancel(wid, LOCAL)
        assert final and out["status"] == "cancelled", out
        assert out["steps"][0]["status"] == "cancelled"
        await asyncio.sleep(0.3)
        assert slow.stats.in_flight == 0  # the upstream stream was aborted
    finally:
        await a.stop()
        await b.stop()


async def test_a_crashing_runner_is_restarted_and_resumes(
        tmp_path: Path, fakes: tuple[FakeOllama, FakeOllama],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory mode under a real Supervisor: the runner's engine dies (an injected bug in its
    claim loop), the supervisor restarts it with backoff, the snapshot shows the restart,
    and the workflow submitted meanwhile completes."""
    from citadeld.supervision import Supervisor
    from citadeld.workflows.runner import Engine

    fast, slow = fakes
    node = await start_node(tmp_path, dsn=None, redis_url=None, prefix="", instance="m",
                            llm=llm_config(fast.url, slow.url))
    await node.halt_runner()  # replaced by a supervised one below
    real = Engine._claim_loop
    crashes: list[int] = []

    async def crash_once(self: Engine) -> None:
        if not crashes:
            crashes.append(1)
            await asyncio.sleep(0.2)
            raise RuntimeError("injected runner bug")
        await real(self)

    monkeypatch.setattr(Engine, "_claim_loop", crash_once)
    sup = Supervisor("root", [node.svc.child_spec()], backoff_min=0.05, backoff_max=0.1)
    await asyncio.wrap_future(sup.start())
    try:
        wid = await node.submit({"steps": [{"id": "s", "type": "llm_query",
                                            "params": {"model": "llama3.2", "prompt": "x"}}]})
        rec = await node.wait(wid, wait_s=20)
        assert rec["status"] == "completed", rec
        snap = sup.snapshot()[0]
        assert snap["name"] == "workflows" and snap["restarts"] == 1, snap
        assert "injected runner bug" in snap["last_failure"] and snap["state"] == "running"
    finally:
        await node.svc.close()
        await asyncio.wrap_future(sup.stop())
        await node.stop()


async def test_redis_restart_during_a_run(
        tmp_path: Path, dsn: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    """Redis dies mid-run and comes back empty: the running workflow keeps its lease (taken
    again), one submitted meanwhile is refused with 503 (not acknowledged), and one accepted
    before the loss but not yet started is re-enqueued from PostgreSQL; all complete."""
    from tests.integration.test_cache_redis import Throwaway, needs_binary

    if needs_binary.args[0]:
        pytest.skip("no redis-server binary")
    srv = Throwaway()
    srv.start()
    fast, slow = fakes
    node = await start_node(tmp_path, dsn=dsn, redis_url=srv.url, prefix="wf:", instance="r",
                            llm=llm_config(fast.url, slow.url), max_concurrent=1)
    try:
        running = await node.submit(two_steps(16))
        queued = await node.submit(two_steps(1))  # waits: max_concurrent is 1
        for _ in range(500):
            rec = await node.svc.get(running, LOCAL)
            if rec["steps"][1]["status"] == "running":
                break
            await asyncio.sleep(0.02)
        assert rec["steps"][1]["status"] == "running", rec  # the outage hits mid-step
        srv.kill()
        with pytest.raises(Exception) as refused:
            await node.submit(two_steps(1))
        assert getattr(refused.value, "status", None) == 503
        await asyncio.sleep(0.5)
        srv.start()  # empty: no stream, no group, no leases
        a = await node.wait(running, wait_s=30)
        b = await node.wait(queued, wait_s=30)
        assert a["status"] == b["status"] == "completed", (a, b)
        assert a["runs"] == 1, a  # never interrupted
    finally:
        await node.stop()
        srv.kill()


async def test_timeouts_deadline_bad_reference_and_pending_cancel(
        tmp_path: Path, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    """Memory mode, one slot: a step that outlives its timeout is retried then fails naming
    the timeout; a workflow past its deadline fails saying so; a reference that cannot be
    resolved at run time fails at once (no retries); a queued workflow cancels at once."""
    fast, slow = fakes
    node = await start_node(tmp_path, dsn=None, redis_url=None, prefix="", instance="t",
                            llm=llm_config(fast.url, slow.url), max_concurrent=1)
    long_prompt = " ".join(["w"] * 40)  # ~6 s of streaming at 150 ms a chunk
    try:
        wid = await node.submit({"steps": [{"id": "s", "type": "llm_query", "retries": 1,
                                            "timeout_s": 0.4, "params": {
                                                "model": "slow-model", "prompt": long_prompt}}]})
        queued = await node.submit({"steps": [{"type": "llm_query", "params": {
            "model": "llama3.2", "prompt": "never"}}]})
        out, final = await node.svc.cancel(queued, LOCAL, "changed my mind")
        assert final and out["status"] == "cancelled"
        assert out["error"] == "cancelled by local: changed my mind"
        rec = await node.wait(wid)
        assert rec["status"] == "failed" and rec["steps"][0]["attempts"] == 2
        assert rec["error"] == ("step 's' (llm_query) failed after 2 attempts: timed out "
                                "after 0.4 s")
        wid = await node.submit({"deadline_s": 0.5, "steps": [{"id": "s", "type": "llm_query",
                                                               "params": {"model": "slow-model",
                                                                          "prompt": long_prompt}}]})
        rec = await node.wait(wid)
        assert rec["status"] == "failed" and rec["error"] == "workflow deadline of 0.5 s exceeded"
        assert rec["steps"][0]["status"] == "cancelled"
        wid = await node.submit({"steps": [
            {"id": "a", "type": "llm_query", "params": {"model": "llama3.2", "prompt": "x"}},
            {"id": "b", "type": "llm_query", "retries": 5, "params": {
                "model": "llama3.2", "prompt": "{{steps.a.output.usage.nope}}"}},
            {"id": "c", "type": "llm_query", "depends_on": ["b"],
             "params": {"model": "llama3.2", "prompt": "x"}}]})
        rec = await node.wait(wid)
        assert rec["status"] == "failed", rec
        assert rec["error"] == ("step 'b' (llm_query) failed after 1 attempt: "
                                "steps.a.output.usage.nope does not exist")
        assert [s["status"] for s in rec["steps"]] == ["completed", "failed", "skipped"]
        with pytest.raises(Exception, match="already failed"):
            await node.svc.cancel(wid, LOCAL)
    finally:
        await node.halt_runner()
        await node.stop()


async def test_postgres_outage_mid_run(
        tmp_path: Path, prefix: str, fakes: tuple[FakeOllama, FakeOllama]) -> None:
    """PostgreSQL stops while a step runs: the step's result cannot be recorded, so the
    workflow is not given a verdict; submits get 503 (nothing unrecorded is acknowledged).
    Once PostgreSQL is back the workflow is reclaimed and finishes, skipping the step that was
    recorded before the outage."""
    from tests.support.pg import ThrowawayPostgres, binaries_available

    if not binaries_available():
        pytest.skip("no PostgreSQL binaries for a throwaway server")
    pg = ThrowawayPostgres().start()
    fast, slow = fakes
    node = await start_node(tmp_path, dsn=pg.dsn, redis_url=REDIS_URL, prefix=prefix,
                            instance="p", llm=llm_config(fast.url, slow.url))
    try:
        wid = await node.submit(two_steps(10))
        for _ in range(300):
            if (await node.svc.get(wid, LOCAL))["steps"][1]["status"] == "running":
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(pg.stop)
        with pytest.raises(Exception) as refused:
            await node.submit(two_steps(1))
        assert getattr(refused.value, "status", None) == 503
        await asyncio.sleep(2.5)  # the step ends; its result cannot be recorded
        assert fast.stats.calls["/api/generate"] == 1
        await asyncio.to_thread(pg.start)
        rec = await node.wait(wid, wait_s=40)
        assert rec["status"] == "completed", rec
        assert rec["runs"] == 2  # resumed after the outage
        assert rec["steps"][0]["attempts"] == 1  # recorded before the outage: not re-run
        assert fast.stats.calls["/api/generate"] == 1
    finally:
        await node.stop()
        pg.cleanup()
