#!/usr/bin/env python3
"""LLM router figures, written to bench/RESULTS.md (between ``<!-- router:begin -->`` and
``<!-- router:end -->``; other sections are left alone).

1. Overhead: the same non-streaming Ollama ``/api/chat`` request sent to a zero-latency fake
   directly and through citadeld (which routes it to that fake), alternately, one at a time, in
   one run; the figure is the difference of the two latency distributions (p50, p99). Comparing
   within one run, request by request, is what makes it meaningful on a shared machine.
2. Failover: an open-loop load of ``--rps`` non-streaming requests/s (one every 1/rps s, whatever
   the answers do, so an outage cannot slow the load down and hide itself) against two servers;
   the primary is SIGKILLed mid-run. Failed and hung requests are counted, and the time from the
   kill to the primary's breaker leaving CLOSED is taken by polling ``/api/v1/llm/servers``.
3. Recovery: the primary is restarted on its port later in the same run; the time from its
   return to the first request it serves is compared with its remaining OPEN wait at that moment.

Every process (fakes, daemon, this load generator) is separate, so none shares a GIL.
Run: ``.venv/bin/python bench/router_bench.py`` (about a minute); ``--no-write`` to only print.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.report import machine, write_section  # noqa: E402
from tests.fakes.process import start_fake, stop_fake  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402

RESULTS = REPO_ROOT / "bench" / "RESULTS.md"
BEGIN, END = "<!-- router:begin -->", "<!-- router:end -->"
MODEL = "llama3.2"
HANG_S = 10.0  # an answer slower than this counts as a hang
WAIT_OPEN_S, WAIT_OPEN_MAX_S = 1.0, 8.0


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: every reported value was really observed."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s), max(1, math.ceil(p / 100 * len(s)))) - 1]


def fake_args(*extra: str) -> list[str]:
    return ["--fake-vectors", "hash", "--no-preload", "--models", "all-minilm",
            "--chat-models", MODEL, "--parallel", "0", *extra]


def daemon_config(primary: str, secondary: str) -> dict[str, Any]:
    timeouts = {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 30}
    return {
        "logging": {"level": "info"},  # as deployed: access log line per request included
        "embedding": {"default_model": "all-minilm", "models": {"all-minilm": {
            "backend": "openai", "dims": 384, "endpoints": [{"url": secondary}]}}},
        "llm": {
            "servers": [
                {"name": "primary", "kind": "ollama", "url": primary, "models": [MODEL],
                 "priority": 0, "timeouts": timeouts},
                {"name": "secondary", "kind": "openai", "url": secondary, "models": [MODEL],
                 "priority": 1, "timeouts": timeouts},
            ],
            "breaker": {"window_type": "count", "window_size": 20, "minimum_calls": 5,
                        "failure_rate_threshold": 50, "wait_open_s": WAIT_OPEN_S,
                        "wait_open_multiplier": 2, "wait_open_max_s": WAIT_OPEN_MAX_S,
                        "half_open_calls": 2},
            "probes": {"interval_s": 1.0, "timeout_s": 0.5},
        },
    }


# ---- figure 1: overhead ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc; load-independent, unlike
    latency on a shared machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def overhead(direct: str, via: str, ceiling: str, n: int, warmup: int,
                   pids: dict[str, int] | None = None) -> dict[str, Any]:
    """Four arms, rotated request by request: the fake directly (the client's own request),
    the fake directly with `stream: true` read to the end (what citadeld sends upstream: it
    always streams, to time the first token), the same request through a bare streaming proxy
    (bench/router_ceiling_proxy.py: the cost of any Python hop), and through citadeld."""
    body = {"model": MODEL, "stream": False,
            "messages": [{"role": "user", "content": "hello there general kenobi"}]}
    arms = {"direct": (direct, body), "direct_stream": (direct, {**body, "stream": True}),
            "ceiling": (ceiling, body), "via": (via, body)}
    lat: dict[str, list[float]] = {arm: [] for arm in arms}
    served: set[str] = set()
    conn = aiohttp.TCPConnector(limit=4)
    cpu0: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=conn) as session:
        names = list(arms)
        for i in range(warmup + n):
            if i == warmup:
                cpu0 = {arm: cpu_seconds(pid) for arm, pid in (pids or {}).items()}
            for k in range(len(names)):
                arm = names[(i + k) % len(names)]
                url, payload = arms[arm]
                t0 = time.perf_counter()
                async with session.post(url, json=payload) as r:
                    await r.read()
                    assert r.status == 200, await r.text()
                elapsed = time.perf_counter() - t0
                if i >= warmup:
                    lat[arm].append(elapsed)
                if arm == "via":
                    served.add(r.headers.get("X-Citadel-Upstream", "?"))
    out: dict[str, Any] = {"n": n, "served_by": sorted(served)}
    out["cpu_ms"] = {arm: (cpu_seconds(pid) - cpu0[arm]) / n * 1e3
                     for arm, pid in (pids or {}).items()}
    for arm in arms:
        out[arm] = {p: percentile(lat[arm], q) * 1e3 for p, q in (("p50", 50), ("p99", 99))}
    # per-round differences too: the same moment's noise hits every arm of a round
    diffs = [v - d for v, d in zip(lat["via"], lat["direct"], strict=True)]
    out["pair_diff_p50_ms"] = percentile(diffs, 50) * 1e3
    out["added_p50_ms"] = out["via"]["p50"] - out["direct"]["p50"]
    out["added_p99_ms"] = out["via"]["p99"] - out["direct"]["p99"]
    out["stream_cost_p50_ms"] = out["direct_stream"]["p50"] - out["direct"]["p50"]
    out["ceiling_added_p50_ms"] = out["ceiling"]["p50"] - out["direct"]["p50"]
    out["ceiling_added_p99_ms"] = out["ceiling"]["p99"] - out["direct"]["p99"]
    return out


# ---- figures 2 and 3: failover and recovery ------------------------------------------------------


def breaker(d: DaemonProc, name: str = "primary") -> dict[str, Any]:
    r = httpx.get(d.url + "/api/v1/llm/servers", timeout=5)
    return dict(r.json()["servers"][name]["breaker"])


async def failover(d: DaemonProc, primary_proc: subprocess.Popen[str], primary_port: int,
                   rps: float, duration: float, kill_at: float, restart_at: float
                   ) -> tuple[dict[str, Any], subprocess.Popen[str]]:
    url = d.url + "/api/v1/llm/generate"
    log: list[dict[str, Any]] = []
    events: dict[str, Any] = {}
    state = {"proc": primary_proc}
    loop = asyncio.get_running_loop()
    timeout = aiohttp.ClientTimeout(total=HANG_S * 3)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int) -> None:
            t0 = time.monotonic()
            row: dict[str, Any] = {"t": t0}
            try:
                async with session.post(url, json={"model": MODEL, "prompt": f"q {i}"}) as r:
                    await r.read()
                    row.update(status=r.status, server=r.headers.get("X-Citadel-Upstream"),
                               attempts=int(r.headers.get("X-Citadel-Attempts", "0")))
            except Exception as exc:
                row.update(status=-1, error=repr(exc))
            row["done"] = time.monotonic()
            log.append(row)

        def chaos(start: float) -> None:
            time.sleep(max(0.0, start + kill_at - time.monotonic()))
            events["killed"] = time.monotonic()
            state["proc"].send_signal(signal.SIGKILL)
            state["proc"].wait()
            while time.monotonic() - events["killed"] < 5:
                if breaker(d)["state"] != "closed":
                    events["opened"] = time.monotonic()
                    break
                time.sleep(0.01)
            time.sleep(max(0.0, start + restart_at - time.monotonic()))
            proc, _ = start_fake("ollama", *fake_args("--port", str(primary_port)))
            events["back"] = time.monotonic()
            snap = breaker(d)
            events["state_at_back"] = snap["state"]
            events["wait_at_back"] = snap.get("half_open_in_s", 0.0)
            events["trips_at_back"] = snap["trips"]
            state["proc"] = proc

        start = time.monotonic()
        chaos_done = loop.run_in_executor(None, chaos, start)
        tasks = []
        i = 0
        while time.monotonic() - start < duration:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(max(0.0, start + i / rps - time.monotonic()))
        await asyncio.gather(*tasks)
        await chaos_done

    lat = [r["done"] - r["t"] for r in log]
    failed = [r for r in log if r["status"] != 200]
    back = events["back"]
    served = [r for r in log if r.get("server") == "primary" and r["t"] >= back]
    first_served = min((r["done"] for r in served), default=None)
    during = [r for r in log if events["killed"] <= r["t"] < back]
    out = {
        "requests": len(log),
        "rps_sent": len(log) / duration,
        "failed": len(failed),
        "failed_pct": 100.0 * len(failed) / max(1, len(log)),
        "failed_samples": [{k: r.get(k) for k in ("status", "error")} for r in failed[:3]],
        "hung": sum(1 for x in lat if x >= HANG_S),
        "max_latency_s": max(lat),
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "p99_outage_ms": percentile([r["done"] - r["t"] for r in during], 99) * 1e3,
        "retried": sum(1 for r in log if r.get("attempts", 0) > 1),
        "open_after_s": (events["opened"] - events["killed"]) if "opened" in events else None,
        "state_at_back": events["state_at_back"],
        "wait_at_back_s": events["wait_at_back"],
        "trips_at_back": events["trips_at_back"],
        "recovered_after_s": None if first_served is None else first_served - back,
        "downtime_s": back - events["killed"],
    }
    return out, state["proc"]


def scrape(d: DaemonProc) -> dict[str, float]:
    text = httpx.get(d.url + "/metrics", timeout=5).text
    want = ("citadel_llm_retries_total", "citadel_llm_failovers_total",
            "citadel_llm_retry_budget_exhausted_total", "citadel_llm_breaker_transitions_total",
            "citadel_llm_no_server_available_total")
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in want:
            if line.startswith(name):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


# ---- report ------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


def report(ov: dict[str, Any], fo: dict[str, Any], metrics: dict[str, float], command: str,
           started: dt.datetime, load_before: str, args: argparse.Namespace) -> str:
    m = machine()
    rec = fo["recovered_after_s"]
    rec_target = fo["wait_at_back_s"] + 1.0
    opened = fo["open_after_s"]
    rows = [
        ("Failover: failed requests", f"<= 0.1% of {fo['requests']}",
         f"{fo['failed']} ({fo['failed_pct']:.2f}%)", fo["failed_pct"] <= 0.1),
        ("Failover: hung requests (no answer in 10 s)", "0",
         f"{fo['hung']} (slowest answer {fo['max_latency_s'] * 1e3:.0f} ms)", fo["hung"] == 0),
        ("Failover: primary's breaker opens after the kill", "<= 1 s",
         "never" if opened is None else f"{opened * 1e3:.0f} ms",
         opened is not None and opened <= 1.0),
        ("Recovery: primary serves again after it returns",
         f"<= remaining OPEN wait + 1 s = {rec_target:.2f} s",
         "never" if rec is None else f"{rec:.2f} s", rec is not None and rec <= rec_target),
        ("Overhead: added p50 vs direct (same run)", "<= 2 ms",
         f"{ov['added_p50_ms']:.2f} ms", ov["added_p50_ms"] <= 2.0),
        ("Overhead: added p99 vs direct (same run)", "<= 10 ms",
         f"{ov['added_p99_ms']:.2f} ms", ov["added_p99_ms"] <= 10.0),
    ]
    lines = [
        BEGIN,
        "## LLM router figures (`bench/router_bench.py`)",
        "",
        f"- command: `{command}`",
        f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {m['nproc']} cores ({m['cpu']}), {m['ram']} RAM, Python {m['python']}, "
        f"kernel {m['kernel']}; load average before/after: {load_before} / {m['load']} "
        "(shared with other engineers' test runs: compare within the run only)",
        "- setup: citadeld (default `info` logging, one access-log line per request) in front of "
        "two fake servers in their own processes: `primary` (Ollama dialect, priority 0) and "
        "`secondary` (OpenAI dialect, priority 1), zero added latency; breaker: count window "
        f"20, minimum 5 calls, 50% failure rate, OPEN wait {WAIT_OPEN_S:g} s doubling to "
        f"{WAIT_OPEN_MAX_S:g} s (+/-20% jitter), 2 half-open probes; probes every 1 s",
        "",
        "| figure | target | measured | result |",
        "|---|---|---|---|",
        *[f"| {what} | {target} | {measured} | {verdict(ok)} |"
          for what, target, measured, ok in rows],
        "",
        "### Failover and recovery",
        "",
        f"- load: open loop, {args.rps:g} non-streaming `POST /api/v1/llm/generate`/s for "
        f"{args.duration:g} s ({fo['requests']} sent, {fo['rps_sent']:.1f}/s); primary SIGKILLed "
        f"at {args.kill_at:g} s, restarted on its port at {args.restart_at:g} s "
        f"(down {fo['downtime_s']:.1f} s)",
        f"- latency over the whole run: p50 {fo['p50_ms']:.1f} ms, p99 {fo['p99_ms']:.1f} ms; "
        f"p99 of requests sent while the primary was down: {fo['p99_outage_ms']:.1f} ms",
        f"- requests that needed more than one attempt: {fo['retried']}; daemon counters: "
        + ", ".join(f"{k.removeprefix('citadel_llm_').removesuffix('_total')} {v:g}"
                    for k, v in sorted(metrics.items())),
        f"- at the primary's return its breaker was `{fo['state_at_back']}` after "
        f"{fo['trips_at_back']} consecutive trips, {fo['wait_at_back_s']:.2f} s from half-open",
    ]
    if fo["failed_samples"]:
        lines.append(f"- failed samples: `{fo['failed_samples']}`")
    lines += [
        "",
        "### Overhead",
        "",
        f"- {ov['n']} rounds after {args.warmup} warm-up rounds; each round sends the same "
        "non-streaming Ollama `/api/chat` request once per arm, the arms rotating their order, "
        "one request at a time over keep-alive connections; citadeld routed to: "
        f"{', '.join(ov['served_by'])}",
        "",
        "| path | p50 | p99 |",
        "|---|---|---|",
        f"| fake directly (the figure's baseline) | {ov['direct']['p50']:.2f} ms | "
        f"{ov['direct']['p99']:.2f} ms |",
        f"| fake directly, `stream: true` read to the end | {ov['direct_stream']['p50']:.2f} ms "
        f"| {ov['direct_stream']['p99']:.2f} ms |",
        f"| through a bare aiohttp streaming proxy (ceiling) | {ov['ceiling']['p50']:.2f} ms | "
        f"{ov['ceiling']['p99']:.2f} ms |",
        f"| through citadeld | {ov['via']['p50']:.2f} ms | {ov['via']['p99']:.2f} ms |",
        f"| added by the bare proxy (ceiling - directly) | {ov['ceiling_added_p50_ms']:.2f} ms "
        f"| {ov['ceiling_added_p99_ms']:.2f} ms |",
        f"| added by citadeld (through - directly) | {ov['added_p50_ms']:.2f} ms | "
        f"{ov['added_p99_ms']:.2f} ms |",
        "",
        f"- median of per-round differences (through - directly): "
        f"{ov['pair_diff_p50_ms']:.2f} ms. Through citadeld the request is validated, routed, "
        "sent upstream as a stream (always: it times the first token and catches a hung server "
        "by its first-token deadline) and re-assembled, counted in metrics and access-logged; "
        f"the fake's own extra cost of streaming is {ov['stream_cost_p50_ms']:.2f} ms of the "
        "p50 (second row minus first) and is included in the figure. The bare proxy "
        "(`bench/router_ceiling_proxy.py`: forward with `stream: true`, join, answer; nothing "
        "else) is what any extra Python hop costs on this machine; citadeld's own logic is the "
        f"rest: {ov['added_p50_ms'] - ov['ceiling_added_p50_ms']:.2f} ms of the p50.",
        f"- CPU time per request (user + system, from /proc; does not depend on the neighbours' "
        f"load as latency does): citadeld {ov['cpu_ms'].get('via', math.nan):.2f} ms, the bare "
        f"proxy {ov['cpu_ms'].get('ceiling', math.nan):.2f} ms (citadeld's figure includes its "
        "background work during the run: probes, watchdog pings, loop-lag sampling).",
        END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="citadeld LLM router benchmark")
    p.add_argument("--rps", type=float, default=50)
    p.add_argument("--duration", type=float, default=40, help="failover run, seconds")
    p.add_argument("--kill-at", type=float, default=10)
    p.add_argument("--restart-at", type=float, default=24)
    p.add_argument("--overhead-n", type=int, default=2000, help="rounds (one request per arm)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = "python bench/router_bench.py " + shlex.join(argv if argv is not None
                                                           else sys.argv[1:])
    started = dt.datetime.now(dt.UTC)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    primary, pport = start_fake("ollama", *fake_args())
    secondary, sport = start_fake("openai_compat", *fake_args())
    workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
    ceiling, cport = start_fake("bench.router_ceiling_proxy", "--upstream",
                                f"http://127.0.0.1:{pport}")
    d = DaemonProc(daemon_config(f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{sport}"),
                   workdir)
    try:
        d.start(require_ready=False)
        assert d.proc is not None
        ov = asyncio.run(overhead(f"http://127.0.0.1:{pport}/api/chat", d.url + "/api/chat",
                                  f"http://127.0.0.1:{cport}/api/chat", args.overhead_n,
                                  args.warmup, {"via": d.proc.pid, "ceiling": ceiling.pid}))
        stop_fake(ceiling)
        print("overhead", ov, flush=True)
        fo, primary = asyncio.run(failover(d, primary, pport, args.rps, args.duration,
                                           args.kill_at, args.restart_at))
        print("failover", fo, flush=True)
        metrics = scrape(d)
    finally:
        code = d.stop()
        stop_fake(primary)
        stop_fake(secondary)
        stop_fake(ceiling)
    if code != 0:
        print(d.log_tail(), file=sys.stderr)
    section = report(ov, fo, metrics, command, started, load_before, args)
    print(section)
    if not args.no_write:
        write_section(args.results, BEGIN, END, section)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
