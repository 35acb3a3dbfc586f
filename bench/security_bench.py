#!/usr/bin/env python3
"""Security figures of citadeld (issue 7), written to bench/RESULTS.md between
``<!-- security:begin -->`` and ``<!-- security:end -->``.

SEC1. Auth + audit overhead on the cache-hit embedding path: 32 closed-loop clients (``wrk``,
      as in the embedding figure 4; ``--loadgen``: ``bench/loadgen.py``, a Python client that
      takes most of a core itself, so PostgreSQL's extra work competes with the client for the
      second core and the ratio says more about the client than about citadeld) send the same
      few texts, answered from the warm
      in-process cache, to two daemons that differ only in security: one with auth off and the
      audit trail off, one with auth on (an API key in ``Authorization: Bearer``) and the audit
      trail on (a row per request into PostgreSQL). Rounds alternate between the two, so drift
      hits both alike; the figure is the throughput ratio (target >= 0.85) and p50/p99 of each.
      A third, diagnostic daemon adds rate limits shared through Redis (one EVALSHA per request).
SEC2. Audit rows lost when PostgreSQL restarts under load: every request the daemon answered
      must have its audit row after recovery (``tests/support/audit_chaos.py``): counted.

Needs Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432 (a throwaway database is made) and
the PostgreSQL server binaries for SEC2's throwaway server. About 2-3 minutes::

    .venv/bin/python bench/security_bench.py [--figures SEC1,SEC2] [--duration 8 --rounds 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import statistics
import subprocess
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

from bench import workload  # noqa: E402
from bench.embed_bench import CLIENTS, CpuMeter, fmt_other, pid_cpu_s, wrk, wrk_script  # noqa: E402
from bench.report import Figure, render, write_section  # noqa: E402
from citadeld.security.keys import generate  # noqa: E402
from tests.fakes.process import start_fake, stop_fake  # noqa: E402
from tests.support.audit_chaos import chaos_postgres_audit  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.pg import temp_database  # noqa: E402

BENCH_DIR = REPO_ROOT / "bench"
RESULTS = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- security:begin -->", "<!-- security:end -->"
EMBED_PATH = "/api/v1/embed"
MODEL = "all-minilm"
SEED = 7
REDIS_URL = "redis://127.0.0.1:6379/0"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (backends, WAL writer, autovacuum...):
    the audit trail's cost lands there, on the same cores as the daemon."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() in ("postgres", "postmaster"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def use_wrk(args: argparse.Namespace) -> bool:
    return not args.loadgen and shutil.which("wrk") is not None


def generate_load(args: argparse.Namespace, url: str, headers: dict[str, str],
                  script_dir: Path) -> dict[str, Any]:
    """wrk when installed and not told ``--loadgen`` (a C client: it leaves the cores to the
    daemon and PostgreSQL, whose extra work is what this figure is about), else
    bench/loadgen.py."""
    if not use_wrk(args):
        return loadgen(url, args.duration, headers, args.texts)
    distinct = args.texts
    script = script_dir / ("sec1-auth.lua" if headers else "sec1.lua")
    if not script.exists():
        bodies = [workload.native_embed(MODEL, seed=SEED, distinct=distinct)(i)
                  for i in range(distinct)]
        wrk_script(bodies, script, headers)
    return wrk(url, script, args.duration, 1)


def loadgen(url: str, seconds: float, headers: dict[str, str], distinct: int) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", url, "-c", str(CLIENTS),
           "--duration", str(seconds), "--warmup", "1", "--body", "bench.workload:native_embed",
           "--body-args", json.dumps({"model": MODEL, "seed": SEED, "distinct": distinct}),
           "--json"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120,
                         cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def base_config(fake_port: int, dsn: str) -> dict[str, Any]:
    """citadeld's defaults (info logging, in-process cache) plus the fake backend and the
    same PostgreSQL for every variant, so only the security features differ."""
    return {
        "cache": {"backend": "memory"},
        "embedding": {"default_model": MODEL, "models": {MODEL: {
            "backend": "ollama", "dims": 384, "max_context": 256,
            "endpoints": [{"url": f"http://127.0.0.1:{fake_port}"}],
            "batch": {"max_items": 64, "max_wait_ms": 5}}}},
        "persistence": {"dsn": dsn},
    }


def sec1_overhead(args: argparse.Namespace, work: Path) -> Figure:
    fig = Figure("SEC1", f"Auth + audit overhead, cache hits, {CLIENTS} clients")
    fake, fake_port = start_fake("tests.fakes.ollama", "--fake-vectors", "hash")
    key_id, key, sha = generate()
    bearer = {"Authorization": f"Bearer {key}"}
    auth = {"enabled": True, "api_keys": [{"id": key_id, "sha256": sha, "name": "bench",
                                           "role": "user", "rate_per_min": 1e9}]}
    prefix = f"citadel-bench:rl:{uuid.uuid4().hex[:8]}:"
    daemons: dict[str, DaemonProc] = {}
    try:
        with temp_database() as dsn:
            base = base_config(fake_port, dsn)
            variants: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
                "auth off, audit off": ({**base, "audit": {"enabled": False}}, {}),
                "auth on (API key), audit on": ({**base, "auth": auth}, bearer),
            }
            if args.split:  # which of the two costs what
                variants["diagnostic: auth only"] = ({**base, "auth": auth,
                                                      "audit": {"enabled": False}}, bearer)
                variants["diagnostic: audit only"] = (base, {})
            if not args.no_rate_limit_variant:
                variants["diagnostic: + rate limits in Redis"] = ({
                    **base, "auth": auth, "rate_limits": {
                        "enabled": True, "redis_url": REDIS_URL, "key_prefix": prefix}}, bearer)
            bodies = [workload.native_embed(MODEL, seed=SEED)(i) for i in range(args.texts)]
            for n, (name, (cfg, headers)) in enumerate(variants.items()):
                d = DaemonProc(cfg, work / f"sec1-{n}").start(ready_timeout=120)
                daemons[name] = d
                for b in bodies:  # warm the cache, then check it answers from it
                    httpx.post(d.url + EMBED_PATH, content=b, timeout=30,
                               headers={"Content-Type": "application/json", **headers})
                r = httpx.post(d.url + EMBED_PATH, content=bodies[0], timeout=30,
                               headers={"Content-Type": "application/json", **headers})
                if r.status_code != 200 or not r.json()["cached"][0]:
                    raise RuntimeError(f"{name}: not a cache hit: {r.status_code} {r.text[:200]}")
            for name, d in daemons.items():  # settle connections and allocators
                loadgen(d.url + EMBED_PATH, 2, variants[name][1], args.texts)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in daemons}
            for rnd in range(args.rounds):
                order = list(daemons.items())
                order = order[rnd % len(order):] + order[:rnd % len(order)]  # no fixed slot
                for name, d in order:
                    pid = d.proc.pid if d.proc else 0
                    pg = postgres_pids()
                    pg0 = sum(pid_cpu_s(p) for p in pg)
                    with CpuMeter([pid]) as cpu:
                        res = generate_load(args, d.url + EMBED_PATH, variants[name][1], work)
                    pg_s = sum(pid_cpu_s(p) for p in pg) - pg0
                    n_req = max(res["requests"], 1)
                    res["other"] = max(0.0, cpu.other_cores - pg_s / cpu.wall)
                    res["cpu_us"] = cpu.server_cpu_s.get(pid, 0.0) / n_req * 1e6
                    res["pg_us"] = pg_s / n_req * 1e6
                    runs[name].append(res)
                log(f"  round {rnd + 1} (req/s): " + ", ".join(
                    f"{k} {v[-1]['throughput_rps']:.0f}" for k, v in runs.items()))
            audited = _audit_rows(dsn)
    finally:
        for d in daemons.values():
            d.stop()
        stop_fake(fake)
        _drop_prefix(prefix)

    names = list(runs)
    off, on = names[0], names[1]
    gen = "wrk -t1" if use_wrk(args) else "bench/loadgen.py"

    def rps(name: str) -> float:
        return sum(r["throughput_rps"] for r in runs[name]) / len(runs[name])

    def lat(name: str, p: str) -> float:
        return statistics.median(r["latency_ms"][p] for r in runs[name])

    errors = {n: sum(r["errors"] for r in rs) for n, rs in runs.items()}
    ratio = rps(on) / rps(off)
    per_round = [b["throughput_rps"] / a["throughput_rps"]
                 for a, b in zip(runs[off], runs[on], strict=True)]
    others = max(r["other"] for rs in runs.values() for r in rs)
    fig.row("throughput, auth + audit on / both off", ">= 0.85",
            f"{ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in per_round)}; "
            f"{'NOISY machine' if others > 0.25 else 'quiet'})",
            ratio >= 0.85 and not errors[on] and not errors[off])
    for name in names:
        fig.row(f"{name}: p50 / p99 latency", "-",
                f"{lat(name, 'p50'):.1f} / {lat(name, 'p99'):.1f} ms at {rps(name):.0f} req/s",
                None)
    for diag in names[2:]:
        fig.row(f"{diag} / both off", "-", f"{rps(diag) / rps(off):.2f}", None)
    fig.details += [
        f"generator: {gen} -c {CLIENTS} -d {args.duration} (own process), "
        f"{args.texts} cached texts cycled, {args.rounds} rounds over the daemons in turn "
        f"(the order rotates each round); errors {errors}",
        "auth on: one API key from `auth.api_keys` (sha256 looked up in memory) with "
        "`rate_per_min` 1e9 so the diagnostic variant never refuses; audit on: one row per "
        f"request into PostgreSQL (rows written during the run: {audited})",
        "CPU per request (median), citadeld + PostgreSQL (all its processes): " + ", ".join(
            f"{n} {statistics.median(r['cpu_us'] for r in runs[n]):.0f} + "
            f"{statistics.median(r['pg_us'] for r in runs[n]):.0f} us" for n in names),
        f"{fmt_other(others)} (max over runs); the machine was shared with other work: "
        "a noisy single run, to be repeated on a quiet machine",
    ]
    return fig


def _audit_rows(dsn: str) -> int:
    import psycopg2

    time.sleep(1.5)  # the flusher writes every second
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM citadel_audit_log WHERE action = 'http'")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def _drop_prefix(prefix: str) -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for k in list(r.scan_iter(match=prefix + "*", count=1000)):
        r.delete(k)


def sec2_pg_restart(args: argparse.Namespace, work: Path) -> Figure:
    fig = Figure("SEC2", "Audit rows lost when PostgreSQL restarts under load")
    fake, fake_port = start_fake("tests.fakes.ollama", "--fake-vectors", "hash")
    try:
        res = chaos_postgres_audit(work / "sec2", f"http://127.0.0.1:{fake_port}",
                                   phase_s=args.chaos_phase, threads=3,
                                   buffer_max_rows=args.buffer_rows)
    finally:
        stop_fake(fake)
    fig.row("audit rows lost (answered requests without a row after recovery)", "0",
            f"{res.lost} of {res.answered}", res.lost == 0 and res.answered > 0)
    fig.details += [
        res.line(),
        f"load: 3 closed-loop clients embedding cached texts, each request with its own "
        f"X-Request-ID; phases of {args.chaos_phase} s: PostgreSQL up, stopped (fast shutdown: "
        "connections dropped mid-transaction), started again; then the buffers drain",
        f"the buffer bound: persistence.buffer_max_rows = {args.buffer_rows} in memory (kept "
        "small here so the outage spills), then the spill file up to "
        "persistence.spill_max_bytes (256 MiB); past that rows would be dropped and counted",
        *res.notes,
    ]
    return fig


def report(figures: list[Figure], command: str, started: dt.datetime, took: float) -> str:
    return render(BEGIN, END, "Security figures (`bench/security_bench.py`)", figures, command,
                  started, took)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="citadeld security benchmarks (SEC1, SEC2)")
    p.add_argument("--figures", default="SEC1,SEC2")
    p.add_argument("--duration", type=float, default=8, help="SEC1: seconds per run")
    p.add_argument("--rounds", type=int, default=2, help="SEC1: alternating rounds")
    p.add_argument("--texts", type=int, default=16, help="SEC1: distinct cached texts")
    p.add_argument("--no-rate-limit-variant", action="store_true",
                   help="SEC1: skip the diagnostic daemon with Redis rate limits")
    p.add_argument("--split", action="store_true",
                   help="SEC1: also daemons with only auth and only the audit trail")
    p.add_argument("--loadgen", action="store_true",
                   help="SEC1: bench/loadgen.py as the client instead of wrk")
    p.add_argument("--chaos-phase", type=float, default=3.0, help="SEC2: seconds per phase")
    p.add_argument("--buffer-rows", type=int, default=2000,
                   help="SEC2: persistence.buffer_max_rows of the daemon")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    wanted = {f.strip().upper() for f in args.figures.split(",") if f.strip()}
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="citadel-security-bench-") as tmp:
        work = Path(tmp)
        for key, fn in (("SEC1", sec1_overhead), ("SEC2", sec2_pg_restart)):
            if key in wanted:
                log(f"figure {key}")
                figures.append(fn(args, work))
    took = time.monotonic() - t0
    given = argv if argv is not None else sys.argv[1:]
    command = "python bench/security_bench.py" + (
        " " + " ".join(shlex.quote(a) for a in given) if given else "")
    section = report(figures, command, started, took)
    print(section)
    if not args.no_write:
        write_section(args.results, BEGIN, END, section)
        log(f"wrote {args.results}")
    return 0 if all(r.ok is not False for f in figures for r in f.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
