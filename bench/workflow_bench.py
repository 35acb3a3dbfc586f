#!/usr/bin/env python3
"""Workflow figures of citadeld (issue 5), written to bench/RESULTS.md between
``<!-- workflows:begin -->`` and ``<!-- workflows:end -->`` (other sections are kept).

W1. ``--workflows`` (default 1000) small workflows submitted at once - embed, search, ask the
    LLM quoting the hits - against fast fakes, on a daemon with PostgreSQL and Redis (the
    durable, multi-instance mode): all must complete; throughput and the p99 completion time
    (submit -> final state, the daemon's own timestamps) are reported. Event delivery lag
    (publish ``ts`` -> received over SSE ``/api/v1/events`` by a separate process) p99 must
    be <= 50 ms; when the daemon has no SSE route the figure says so.
W2. kill -9 of one of two daemons sharing PostgreSQL and Redis while they run ``--kill-workflows``
    workflows: every accepted workflow must complete on the survivor (lost = 0).

Servers (fakes, daemons) and the SSE reader run as separate processes. Needs PostgreSQL at
127.0.0.1:5432 and Redis at 127.0.0.1:6379 (each run uses its own database and key prefix).

    .venv/bin/python bench/workflow_bench.py                # both figures, ~2-4 minutes
    .venv/bin/python bench/workflow_bench.py --figures W1 --workflows 200
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import multiprocessing
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.embed_bench import CpuMeter, fmt_other  # noqa: E402
from bench.report import machine, write_section  # noqa: E402
from tests.fakes.process import start_fake, stop_fake  # noqa: E402
from tests.support.pg import temp_database  # noqa: E402
from tests.support.workflow_chaos import daemon_config, kill9_scenario, start  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- workflows:begin -->", "<!-- workflows:end -->"
TERMINAL_EVENTS = ("RUN_FINISHED", "RUN_ERROR", "RUN_CANCELLED")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def small_workflow(i: int) -> dict[str, Any]:
    return {"name": f"bench-{i}", "steps": [
        {"id": "embed", "type": "embedding", "params": {"text": f"question number {i}"}},
        {"id": "search", "type": "vector_search",
         "params": {"vector": "{{steps.embed.output.vector}}", "limit": 3}},
        {"id": "ask", "type": "llm_query", "params": {
            "model": "llama3.2", "prompt": "Answer from: {{steps.search.output.texts}}"}},
    ]}


# ---- SSE reader (separate process) -------------------------------------------------------


def _sse_reader(url: str, out_path: str, stop: Any, ready: Any) -> None:
    """Read every event until told to stop; (receive time - publish ts) per event is written
    to ``out_path`` every second, so a reader that is stopped hard still reports."""
    lags: list[float] = []
    gaps = finished = 0
    last_write = time.monotonic()

    def write(error: str | None = None) -> None:
        Path(out_path).write_text(json.dumps({"lags": lags, "finished": finished,
                                              "gaps": gaps, "error": error}))
    try:
        with httpx.Client(timeout=httpx.Timeout(10, read=60)) as c, \
                c.stream("GET", url, headers={"Accept": "text/event-stream"}) as r:
            if r.status_code != 200:
                write(f"HTTP {r.status_code}")
                ready.set()
                return
            ready.set()
            for line in r.iter_lines():
                if stop.is_set():
                    break
                if time.monotonic() - last_write > 1.0:
                    write()
                    last_write = time.monotonic()
                if not line.startswith("data:"):
                    continue
                now = time.time()
                try:
                    ev = json.loads(line[5:].strip())
                except ValueError:
                    continue
                ts = ev.get("ts")
                if isinstance(ts, int | float) and ts > 0:
                    lags.append(now - ts)
                if ev.get("type") == "GAP":
                    gaps += 1
                elif ev.get("type") in TERMINAL_EVENTS:
                    finished += 1
    except Exception as exc:  # reported, not raised: the figure says what went wrong
        write(repr(exc))
        ready.set()
        return
    write()


# ---- W1 ----------------------------------------------------------------------------------


async def _submit_all(url: str, n: int, concurrency: int) -> tuple[list[str], dict[int, int],
                                                                   float]:
    sem = asyncio.Semaphore(concurrency)
    ids: list[str] = []
    statuses: dict[int, int] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def one(i: int) -> None:
            async with sem:
                r = await c.post("/api/v1/workflows", json=small_workflow(i))
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 202:
                ids.append(r.json()["id"])
        t0 = time.monotonic()
        await asyncio.gather(*[one(i) for i in range(n)])
        return ids, statuses, time.monotonic() - t0


def _collect(url: str, ids: set[str], timeout: float) -> list[dict[str, Any]]:
    """Wait until every id is final; return their list summaries (server timestamps)."""
    deadline = time.monotonic() + timeout
    errors: list[int] = []
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            done: dict[str, dict[str, Any]] = {}
            for status in ("completed", "failed", "cancelled"):
                offset = 0
                while True:
                    r = c.get("/api/v1/workflows", params={
                        "status": status, "limit": 500, "offset": offset})
                    if r.status_code != 200:  # e.g. 503 while PostgreSQL is saturated
                        errors.append(r.status_code)
                        break
                    page = r.json()
                    for w in page["workflows"]:
                        if w["id"] in ids:
                            done[w["id"]] = w
                    if "next_offset" not in page:
                        break
                    offset = page["next_offset"]
            if len(done) >= len(ids):
                return list(done.values())
            time.sleep(0.5)
        return list(done.values())


def w1(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fast_proc, fast_port = start_fake("ollama", "--fake-vectors", "hash", "--models",
                                      "all-minilm", "--chat-models", "llama3.2",
                                      "--parallel", "0")
    slow_proc, slow_port = start_fake("ollama", "--fake-vectors", "hash", "--models",
                                      "all-minilm", "--chat-models", "slow-model",
                                      "--parallel", "0")
    fast, slow = f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"
    prefix = f"citadel-bench:wf:{uuid.uuid4().hex[:8]}:"
    out: dict[str, Any] = {"n": args.workflows, "mode": args.mode}
    try:
        with temp_database() as dsn:
            durable = args.mode == "durable"
            cfg = daemon_config(fast, slow, dsn if durable else None, prefix if durable else "",
                                "bench", max_concurrent=args.workflows)
            cfg["embedding"]["models"]["all-minilm"]["batch"] = {"max_wait_ms": 2,
                                                                "max_items": 64}
            cfg["embedding"]["models"]["all-minilm"]["queue_cap"] = 100_000
            d = start(cfg, work / "w1")
            try:
                seed = httpx.post(d.url + "/api/v1/vectors/store", timeout=30, json={"items": [
                    {"id": f"doc-{k}", "text": f"reference document {k} about topic {k % 7}"}
                    for k in range(50)]})
                seed.raise_for_status()
                sse_url = d.url + "/api/v1/events"
                lag_file = work / "lags.json"
                ctx = multiprocessing.get_context("spawn")
                ready, stop = ctx.Event(), ctx.Event()
                reader = ctx.Process(target=_sse_reader, args=(
                    sse_url, str(lag_file), stop, ready), daemon=True)
                reader.start()
                ready.wait(15)
                time.sleep(0.5)
                t0 = time.time()
                assert d.proc is not None
                with CpuMeter([d.proc.pid, fast_proc.pid]) as cpu:
                    ids, statuses, submit_s = asyncio.run(
                        _submit_all(d.url, args.workflows, args.submit_concurrency))
                    done = _collect(d.url, set(ids), args.timeout)
                time.sleep(1.0)  # the last events are on their way
                stop.set()
                reader.join(15)
                if reader.is_alive():
                    reader.terminate()
                completed = [w for w in done if w["status"] == "completed"]
                comp_s = [w["finished_at"] - w["created_at"] for w in completed]
                last = max((w["finished_at"] for w in done), default=t0)
                first = min((w["created_at"] for w in done), default=t0)
                out.update(accepted=len(ids), statuses=statuses, submit_s=round(submit_s, 2),
                           completed=len(completed), finished=len(done),
                           wall_s=round(last - first, 2),
                           throughput=round(len(completed) / max(1e-9, last - first), 1),
                           p50_s=round(pct(comp_s, 50), 3), p99_s=round(pct(comp_s, 99), 3),
                           max_s=round(max(comp_s, default=math.nan), 3),
                           other_cpu=fmt_other(cpu.other_cores),
                           daemon_run_wait=cpu.run_wait.get(d.proc.pid),
                           daemon_cores=cpu.server_cores.get(d.proc.pid))
                if lag_file.exists():
                    data = json.loads(lag_file.read_text())
                    lags = [x * 1000 for x in data.get("lags", [])]
                    out.update(events=len(lags), gaps=data.get("gaps"),
                               terminal_events=data.get("finished"),
                               lag_p50_ms=round(pct(lags, 50), 2),
                               lag_p99_ms=round(pct(lags, 99), 2),
                               lag_max_ms=round(max(lags, default=math.nan), 2),
                               lag_error=data.get("error"))
                else:
                    out["lag_error"] = "the SSE reader wrote nothing"
                out["loop_lag_ms"] = httpx.get(d.url + "/health/detailed", timeout=10).json(
                ).get("event_loop_lag_ms")
                metrics = httpx.get(d.url + "/metrics", timeout=10).text
                out["metrics"] = [ln for ln in metrics.splitlines()
                                  if ln.startswith(("citadel_workflows_finished_total",
                                                    "citadel_workflow_step_failures_total"))]
            finally:
                d.stop()
    finally:
        stop_fake(fast_proc)
        stop_fake(slow_proc)
        _drop_prefix(prefix)
    return out


def _drop_prefix(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


# ---- W2 ----------------------------------------------------------------------------------


def w2(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    fast_proc, fast_port = start_fake("ollama", "--fake-vectors", "hash", "--models",
                                      "all-minilm", "--chat-models", "llama3.2",
                                      "--parallel", "0")
    slow_proc, slow_port = start_fake("ollama", "--fake-vectors", "hash", "--models",
                                      "all-minilm", "--chat-models", "slow-model",
                                      "--parallel", "0", "--chunk-delay-ms", "100")
    fast, slow = f"http://127.0.0.1:{fast_port}", f"http://127.0.0.1:{slow_port}"
    prefix = f"citadel-bench:wf:{uuid.uuid4().hex[:8]}:"
    try:
        with temp_database() as dsn:
            a = start(daemon_config(fast, slow, dsn, prefix, "a", max_concurrent=64),
                      work / "a")
            b = start(daemon_config(fast, slow, dsn, prefix, "b", max_concurrent=64),
                      work / "b")
            try:
                res = kill9_scenario(a, b, n=args.kill_workflows, slow_words=20,
                                     timeout=args.timeout)
            finally:
                a.stop()
                b.stop()
    finally:
        stop_fake(fast_proc)
        stop_fake(slow_proc)
        _drop_prefix(prefix)
    return {"line": res.line(), "lost": res.lost, "accepted": res.accepted,
            "completed": res.completed, "resumed": res.resumed_by_survivor,
            "seconds": res.seconds_to_finish, "statuses": res.statuses}


# ---- report ------------------------------------------------------------------------------


def report(r1: dict[str, Any] | None, r2: dict[str, Any] | None, command: str,
           started: dt.datetime, took: float) -> str:
    m = machine()
    rows = ["| figure | what | target | measured | result |", "|---|---|---|---|---|"]
    details: list[str] = []
    noisy = r1 is not None and "NOISY" in str(r1.get("other_cpu"))
    mark = " (NOISY machine)" if noisy else ""
    if r1 is not None:
        ok = r1.get("completed") == r1["n"]
        rows.append(f"| W1 | {r1['n']} concurrent workflows (embed + search + LLM), all "
                    f"complete | all | {r1.get('completed')} of {r1['n']} completed "
                    f"| **{'PASS' if ok else 'FAIL'}** |")
        rows.append(f"| W1 | throughput, completion time | reported | "
                    f"{r1.get('throughput')} workflows/s; completion p50 {r1.get('p50_s')} s, "
                    f"p99 {r1.get('p99_s')} s, max {r1.get('max_s')} s | **INFO** |")
        if r1.get("lag_p99_ms") is not None and not r1.get("lag_error"):
            lag_ok = r1["lag_p99_ms"] <= 50
            rows.append(f"| W1 | event delivery lag (publish -> SSE client) | p99 <= 50 ms | "
                        f"p99 {r1['lag_p99_ms']} ms (p50 {r1['lag_p50_ms']} ms, max "
                        f"{r1['lag_max_ms']} ms, {r1['events']} events, "
                        f"{r1.get('terminal_events')} runs ended, {r1.get('gaps')} GAPs) | "
                        f"**{'PASS' if lag_ok else 'FAIL'}**{mark} |")
        else:
            rows.append(f"| W1 | event delivery lag | p99 <= 50 ms | not measured: "
                        f"{r1.get('lag_error')} | n/a |")
        details += [f"W1: {r1.get('accepted')} accepted ({r1.get('statuses')}) in "
                    f"{r1.get('submit_s')} s of submitting; first submit to last finish "
                    f"{r1.get('wall_s')} s; daemon used {r1.get('daemon_cores')} cores, its main "
                    f"thread waited runnable for a CPU {r1.get('daemon_run_wait')} of the run; "
                    f"daemon event-loop lag {r1.get('loop_lag_ms')}; "
                    f"{r1.get('other_cpu')}",
                    ("W1 mode: PostgreSQL + Redis (durable, group-committed state, Redis Streams"
                     " claiming)" if r1["mode"] == "durable" else "W1 mode: in memory (no "
                     "PostgreSQL, no Redis: the embedded default)")
                    + f", max_concurrent {r1['n']}; metrics: "
                    + "; ".join(r1.get("metrics", []))]
    if r2 is not None:
        rows.append(f"| W2 | workflows lost across kill -9 of one of two daemons | 0 | "
                    f"{r2['lost']} ({r2['accepted']} accepted, {r2['resumed']} resumed by "
                    f"the survivor) | **{'PASS' if r2['lost'] == 0 else 'FAIL'}** |")
        details.append(f"W2: {r2['line']}; survivor finished everything {r2['seconds']} s "
                       f"after the kill (claim timeout 1.5 s); statuses {r2['statuses']}")
    lines = [BEGIN, "## Workflow figures (`bench/workflow_bench.py`)", "",
             f"- command: `{command}`",
             f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}, took {took / 60:.1f} min",
             f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram']} RAM, {m['os']}, kernel "
             f"{m['kernel']}, Python {m['python']}",
             f"- citadeld: commit {m['commit']}",
             f"- other processes during W1: {r1.get('other_cpu') if r1 else 'not measured'}",
             "", *rows, ""]
    lines += [f"- {d}" for d in details]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="citadeld workflow benchmarks (W1, W2)")
    p.add_argument("--figures", default="W1,W2")
    p.add_argument("--workflows", type=int, default=1000)
    p.add_argument("--mode", choices=["durable", "memory"], default="durable",
                   help="W1: PostgreSQL + Redis (default) or the in-memory embedded default")
    p.add_argument("--submit-concurrency", type=int, default=100)
    p.add_argument("--kill-workflows", type=int, default=60)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    wanted = {f.strip().upper() for f in args.figures.split(",")}
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    r1 = r2 = None
    with tempfile.TemporaryDirectory(prefix="citadel-wf-bench-") as tmp:
        if "W1" in wanted:
            log("W1")
            r1 = w1(args, Path(tmp))
            log(json.dumps(r1))
        if "W2" in wanted:
            log("W2")
            r2 = w2(args, Path(tmp))
            log(json.dumps(r2))
    argv_ = argv if argv is not None else sys.argv[1:]
    command = "python bench/workflow_bench.py" + (
        " " + " ".join(shlex.quote(a) for a in argv_) if argv_ else "")
    section = report(r1, r2, command, started, time.monotonic() - t0)
    print(section)
    if not args.no_write:
        write_section(args.results, BEGIN, END, section)
    ok = (r1 is None or r1.get("completed") == r1["n"]) and (r2 is None or r2["lost"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
