"""Event fan-out lag of the live transports, for both buses (issue 5: delivery lag p99 <= 50 ms
under 1000 concurrent small workflows).

Two processes, so the watchers do not share the server's loop:

- the server (this script with ``--serve``) runs citadeld's own HTTP app
  (``citadeld.http.app.build_app``) with a real bus (in-process, or Redis Streams) and plays the
  workflow engine: once every watcher is subscribed it publishes the events of ``--workflows``
  small workflows (RUN_STARTED, STEP_STARTED/STEP_FINISHED per step, RUN_FINISHED), their
  starts spread over ``--spread`` seconds and their steps ``--step-ms`` apart, all concurrently;
- the watchers (the parent) hold one connection per workflow, half websockets
  ``/ws/workflows/{id}`` and half SSE ``/api/v1/events?workflow_id=``, plus ``--all`` websockets
  on ``/ws`` that see every event, and measure for each event received ``now - event.ts``
  (publish time; same machine, same clock).

Reported per bus: events published, frames delivered, GAPs, lag p50/p99/max as the watchers see
it (includes their own parsing) and the server's own histogram
(``citadel_event_fanout_lag_seconds``: publish to the frame written to the socket).

    python bench/events_bench.py                       # both buses, writes bench/RESULTS.md
    python bench/events_bench.py --bus memory --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.report import write_section  # noqa: E402

RESULTS = BENCH_DIR / "RESULTS.md"
SCRIPT = str(Path(__file__).resolve())
BEGIN, END = "<!-- events:begin -->", "<!-- events:end -->"
TARGET_P99_MS = 50.0


# ---- server side ---------------------------------------------------------------------------


class BareBus:
    """The reference: the least an aiohttp server can do to push the same events (one
    unbounded queue per connection, no ids, history, validation, visibility or metrics)."""

    def __init__(self) -> None:
        self.by_wf: dict[str, set[asyncio.Queue[bytes]]] = {}
        self.all: set[asyncio.Queue[bytes]] = set()
        self.seq = 0

    @property
    def count(self) -> int:
        return len(self.all) + sum(len(v) for v in self.by_wf.values())

    async def publish(self, event: Any) -> str:
        import orjson
        self.seq += 1
        event.id, event.ts = f"{self.seq}-0", time.time()
        data = orjson.dumps(event.to_json())
        for q in (*self.by_wf.get(event.workflow_id, ()), *self.all):
            q.put_nowait(data)
        return event.id

    def app(self) -> Any:
        from aiohttp import web

        def register(wf: str | None) -> asyncio.Queue[bytes]:
            q: asyncio.Queue[bytes] = asyncio.Queue()
            (self.all if wf is None else self.by_wf.setdefault(wf, set())).add(q)
            return q

        def unregister(wf: str | None, q: asyncio.Queue[bytes]) -> None:
            (self.all if wf is None else self.by_wf.get(wf, set())).discard(q)

        async def ws(request: web.Request) -> web.StreamResponse:
            wf = request.match_info.get("wf")
            sock = web.WebSocketResponse()
            await sock.prepare(request)
            q = register(wf)
            try:
                while True:
                    await sock.send_str((await q.get()).decode())
            except (ConnectionError, asyncio.CancelledError):
                return sock
            finally:
                unregister(wf, q)

        async def sse(request: web.Request) -> web.StreamResponse:
            wf = request.query.get("workflow_id")
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            q = register(wf)
            try:
                while True:
                    await resp.write(b"data: " + await q.get() + b"\n\n")
            except (ConnectionError, asyncio.CancelledError):
                return resp
            finally:
                unregister(wf, q)

        app = web.Application()
        app.router.add_get("/ws", ws)
        app.router.add_get("/ws/workflows/{wf}", ws)
        app.router.add_get("/api/v1/events", sse)
        return app


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from citadeld.config import Config
    from citadeld.events.config import EventsConfig
    from citadeld.events.hub import BusBase
    from citadeld.events.memory_bus import MemoryBus
    from citadeld.events.metrics import EventMetrics
    from citadeld.events.model import (
        RUN_FINISHED,
        RUN_STARTED,
        STEP_FINISHED,
        STEP_STARTED,
        Event,
    )
    from citadeld.events.redis_bus import RedisBus
    from citadeld.health import HealthState
    from citadeld.http.app import build_app
    from citadeld.metrics import Metrics
    from citadeld.state import DaemonState

    opts = {"key_prefix": args.prefix, "max_subscribers": 100_000}
    ecfg = EventsConfig.model_validate(opts)
    metrics = Metrics()
    em = EventMetrics(metrics.registry)
    bus: Any
    if args.bus == "bare":
        bus = BareBus()
        app = bus.app()
        count = lambda: bus.count  # noqa: E731
    else:
        bus = (MemoryBus(ecfg, em) if args.bus == "memory"
               else RedisBus(ecfg, args.redis_url, em))
        await bus.start()
        state = DaemonState(config=Config.model_validate({"events": opts}), metrics=metrics,
                            embedding=cast(Any, None), pools={}, cache=cast(Any, None),
                            health=HealthState(), events=cast(BusBase, bus))
        app = build_app(state)
        count = lambda: bus.hub.count  # noqa: E731
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=4096)
    await site.start()
    if not args.no_freeze:  # as citadeld does once it is ready (runtime.Daemon.run)
        import gc
        gc.collect()
        gc.freeze()
    print("READY", flush=True)
    expected = args.workflows + args.all
    for _ in range(100_000):  # until every watcher is subscribed
        if count() >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # replays (empty) done: every subscription is live

    rng = random.Random(1)

    async def workflow(i: int) -> None:
        wf = f"wf-{i}"
        await asyncio.sleep(rng.uniform(0, args.spread))
        await bus.publish(Event(RUN_STARTED, wf))
        for s in range(args.steps):
            await bus.publish(Event(STEP_STARTED, wf, {"step_id": f"s{s}"}))
            await asyncio.sleep(args.step_ms / 1000)
            await bus.publish(Event(STEP_FINISHED, wf, {"step_id": f"s{s}"}))
        await bus.publish(Event(RUN_FINISHED, wf, {"result": {"ok": True}}))

    import gc
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started[0])
    gc.callbacks.append(on_gc)
    t0 = time.perf_counter()
    await asyncio.gather(*(workflow(i) for i in range(args.workflows)))
    took = time.perf_counter() - t0
    gc.callbacks.remove(on_gc)
    gcs = ",".join(f"{len(v)}:{max(v, default=0) * 1000:.1f}" for v in pauses.values())
    print(f"PUBLISHED {args.workflows * (2 + 2 * args.steps)} {took:.3f} {gcs}", flush=True)
    if args.profile:
        await asyncio.sleep(3)
        return
    await asyncio.Event().wait()  # the parent reads /metrics, then stops us


# ---- watchers --------------------------------------------------------------------------------


class Watch:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self.frames = 0
        self.gaps = 0
        self.errors: list[str] = []

    def see(self, obj: dict[str, Any]) -> None:
        now = time.time()
        self.frames += 1
        if obj.get("type") == "GAP":
            self.gaps += 1
        elif "ts" in obj:
            self.lags.append(now - float(obj["ts"]))


async def watch_ws(session: Any, url: str, w: Watch, until_terminal: bool, stop: asyncio.Event
                   ) -> None:
    import orjson
    from aiohttp import WSMsgType
    try:
        async with session.ws_connect(url, heartbeat=None, max_msg_size=0) as ws:
            while not stop.is_set():
                try:
                    msg = await ws.receive(timeout=1.0)
                except TimeoutError:
                    continue
                if msg.type is not WSMsgType.TEXT:
                    break
                obj = orjson.loads(msg.data)
                w.see(obj)
                if until_terminal and obj.get("type") == "RUN_FINISHED":
                    break
    except Exception as exc:
        w.errors.append(f"ws: {type(exc).__name__}: {exc}"[:200])


async def watch_sse(session: Any, url: str, w: Watch) -> None:
    import orjson
    try:
        async with session.get(url) as resp:
            async for raw in resp.content:
                if raw.startswith(b"data: "):
                    obj = orjson.loads(raw[6:])
                    w.see(obj)
                    if obj.get("type") == "RUN_FINISHED":
                        break
    except Exception as exc:
        w.errors.append(f"sse: {type(exc).__name__}: {exc}"[:200])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def hist_quantile(metrics_text: str, name: str, q: float) -> tuple[float, float]:
    """(upper bucket bound holding quantile q in seconds, count), summed over label sets."""
    buckets: dict[float, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            bound = float("inf") if le == "+Inf" else float(le)
            buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    if not buckets:
        return float("nan"), 0.0
    total = buckets[float("inf")]
    for bound in sorted(buckets):
        if buckets[bound] >= q * total:
            return bound, total
    return float("inf"), total


async def run_bus(args: argparse.Namespace, bus: str) -> dict[str, Any]:
    import aiohttp
    import httpx

    from tests.support.daemon import free_port
    port = free_port()
    prefix = f"bench:ev:{uuid.uuid4().hex[:8]}:"
    cmd = [sys.executable, SCRIPT, "--serve", "--bus", bus,
           "--port", str(port), "--prefix", prefix, "--redis-url", args.redis_url,
           "--workflows", str(args.workflows), "--all", str(args.all),
           "--steps", str(args.steps), "--step-ms", str(args.step_ms),
           "--spread", str(args.spread), *(["--profile", args.profile] if args.profile else []),
           *(["--no-freeze"] if args.no_freeze else [])]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = await asyncio.to_thread(subprocess.Popen, cmd, stdout=subprocess.PIPE, text=True,
                                   env=env)
    assert proc.stdout is not None
    try:
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != "READY":
            raise RuntimeError(f"bench server did not start: {line!r}")
        base = f"http://127.0.0.1:{port}"
        w_ws, w_sse, w_all = Watch(), Watch(), Watch()
        stop = asyncio.Event()
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            tasks = []
            for i in range(args.workflows):
                if i % 2 == 0:
                    tasks.append(asyncio.create_task(watch_ws(
                        session, f"{base}/ws/workflows/wf-{i}", w_ws, True, stop)))
                else:
                    tasks.append(asyncio.create_task(watch_sse(
                        session, f"{base}/api/v1/events?workflow_id=wf-{i}", w_sse)))
            alls = [asyncio.create_task(watch_ws(session, f"{base}/ws", w_all, False, stop))
                    for _ in range(args.all)]
            published = await asyncio.to_thread(proc.stdout.readline)
            _, n_pub, pub_s, gcs = published.split()
            _, pending = await asyncio.wait(tasks, timeout=60)
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*alls, *pending, return_exceptions=True)
        async with httpx.AsyncClient(timeout=10) as c:
            text = (await c.get(base + "/metrics")).text
        cpu_s = await asyncio.to_thread(cpu_seconds, proc.pid)
        srv_p99, srv_n = hist_quantile(text, "citadel_event_fanout_lag_seconds", 0.99)
        srv_p50, _ = hist_quantile(text, "citadel_event_fanout_lag_seconds", 0.50)
        lags = w_ws.lags + w_sse.lags + w_all.lags
        return {
            "bus": bus, "published": int(n_pub), "publish_s": float(pub_s),
            "frames": w_ws.frames + w_sse.frames + w_all.frames,
            "expected": int(n_pub) * (1 + args.all),
            "gaps": w_ws.gaps + w_sse.gaps + w_all.gaps,
            "p50": pct(lags, 0.50) * 1000, "p99": pct(lags, 0.99) * 1000,
            "max": max(lags) * 1000 if lags else float("nan"),
            "p99_ws": pct(w_ws.lags, 0.99) * 1000, "p99_sse": pct(w_sse.lags, 0.99) * 1000,
            "p99_all": pct(w_all.lags, 0.99) * 1000,
            "srv_p50": srv_p50 * 1000, "srv_p99": srv_p99 * 1000, "srv_n": srv_n,
            "errors": w_ws.errors + w_sse.errors + w_all.errors,
            "unfinished": len(pending), "cpu_s": cpu_s, "gc": gcs,
        }
    finally:
        if args.profile:  # it writes its profile and exits by itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if bus == "redis":
            import redis
            r = redis.Redis.from_url(args.redis_url)
            for k in list(r.scan_iter(match=prefix + "*", count=1000)):
                r.delete(k)


# ---- report ----------------------------------------------------------------------------------


def other_load() -> float:
    """Load average minus what we use, a rough 'is the machine busy' figure."""
    return os.getloadavg()[0]


def report(rows: list[dict[str, Any]], args: argparse.Namespace, command: str,
           started: dt.datetime, load: float) -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor() or "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=REPO_ROOT).stdout.strip()
    noisy = " (NOISY: other processes were using the cores)" if load > 1.0 else ""
    lines = [
        BEGIN,
        "## Event fan-out figures (`bench/events_bench.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {len(os.sched_getaffinity(0))} cores ({cpu}), Python "
        f"{platform.python_version()}, kernel {platform.release()}; load average "
        f"{load:.2f} at the start{noisy}",
        f"- citadeld: commit {commit}",
        f"- workload: {args.workflows} concurrent workflows of {2 + 2 * args.steps} events "
        f"({args.steps} steps {args.step_ms} ms apart, starts spread over {args.spread} s); one "
        f"watcher per workflow (half websocket `/ws/workflows/{{id}}`, half SSE), plus "
        f"{args.all} `/ws` watchers of every event; server and watchers in two processes",
        "",
        "| bus | what | target | measured | result |",
        "|---|---|---|---|---|",
    ]
    bare = next((r for r in rows if r["bus"] == "bare"), None)
    for r in rows:
        if r["bus"] == "bare":
            lines.append(
                f"| bare | reference: a minimal aiohttp push server, same load, same run | "
                f"measured | p99 {r['p99']:.1f} ms (p50 {r['p50']:.1f}, max {r['max']:.1f}) | "
                f"**measured** |")
            continue
        ok = r["p99"] <= TARGET_P99_MS and not r["errors"] and not r["unfinished"]
        lines.append(
            f"| {r['bus']} | event delivery lag p99, publish to watcher | <= {TARGET_P99_MS:.0f}"
            f" ms | {r['p99']:.1f} ms (p50 {r['p50']:.1f}, max {r['max']:.1f}) | "
            f"**{'PASS' if ok else 'FAIL'}**{' (noisy)' if noisy else ''} |")
        if bare is not None and bare["p99"] > 0:
            lines.append(
                f"| {r['bus']} | lag p99 / reference p99 (same run) | measured | "
                f"{r['p99'] / bare['p99']:.2f} | **measured** |")
    lines.append("")
    for r in rows:
        lines.append(f"### {r['bus']}")
        lines.append("")
        lines.append(f"- published {r['published']} events in {r['publish_s']:.2f} s; watchers "
                     f"got {r['frames']} frames of {r['expected']} expected, {r['gaps']} GAPs, "
                     f"{r['unfinished']} workflow watchers unfinished, {len(r['errors'])} errors"
                     + (f" (first: {r['errors'][0]})" if r["errors"] else ""))
        lines.append(f"- lag p99 by transport: websocket per workflow {r['p99_ws']:.1f} ms, SSE "
                     f"{r['p99_sse']:.1f} ms, `/ws` all events {r['p99_all']:.1f} ms")
        if r["srv_n"]:
            lines.append(f"- server histogram citadel_event_fanout_lag_seconds "
                         f"({r['srv_n']:.0f} frames): p50 <= {r['srv_p50']:.1f} ms, p99 <= "
                         f"{r['srv_p99']:.1f} ms (bucket bounds)")
        lines.append(f"- server garbage collections while publishing, per generation "
                     f"count:longest ms: {r['gc']}")
        lines.append(f"- CPU of the server process: {r['cpu_s']:.2f} s "
                     f"({r['cpu_s'] / max(1, r['frames']) * 1e6:.0f} us per frame delivered)")
        lines.append("")
    lines.append(END)
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="citadeld event fan-out lag")
    p.add_argument("--bus", choices=["memory", "redis", "bare", "all"], default="all",
                   help="all: the bare aiohttp reference, then both buses")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--workflows", type=int, default=1000)
    p.add_argument("--all", type=int, default=2, help="/ws watchers of every event")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=50)
    p.add_argument("--spread", type=float, default=2.0)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="bench:ev:", help=argparse.SUPPRESS)
    p.add_argument("--profile", default="", help="server: write cProfile stats here")
    p.add_argument("--no-freeze", action="store_true",
                   help="server: skip the gc.freeze() the daemon does after start-up")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        import uvloop
        if args.profile:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
            uvloop.run(serve(args))
            prof.disable()
            prof.dump_stats(args.profile)
            return 0
        uvloop.run(serve(args))
        return 0
    started = dt.datetime.now(dt.UTC)
    load = other_load()
    buses = ["bare", "memory", "redis"] if args.bus == "all" else [args.bus]
    rows = []
    for bus in buses:
        r = asyncio.run(run_bus(args, bus))
        rows.append(r)
        print(f"{bus}: p50 {r['p50']:.1f} ms p99 {r['p99']:.1f} ms max {r['max']:.1f} ms; "
              f"frames {r['frames']}/{r['expected']} gaps {r['gaps']} errors {len(r['errors'])}"
              f"; server p99 <= {r['srv_p99']:.1f} ms; gc gen:count:max_ms {r['gc']}", flush=True)
    command = "python bench/events_bench.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    section = report(rows, args, command.strip(), started, load)
    if not args.no_write:
        write_section(args.results, BEGIN, END, section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
