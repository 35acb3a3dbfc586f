#!/usr/bin/env python3
"""Embedding benchmarks of citadeld: figures 1-5 of bench/README.md, printed as a table and
written to bench/RESULTS.md (between ``<!-- embed:begin -->`` and ``<!-- embed:end -->``).

Every figure is a ratio or a bound measured in this same run against a reference measured
right next to it (the model alone, the upstream alone, a bare aiohttp handler), because absolute
numbers mean little on a shared 2-core machine. Servers run as separate processes and load comes
from a separate process (``bench/loadgen.py``, or ``wrk`` for the cache-hit figure), so client
and server never share a GIL. The CPU used by other processes on the machine during each run is
measured and reported next to the figure, so a noisy neighbour is visible instead of silently
skewing the result.

Run everything (about 8-10 minutes)::

    .venv/bin/python bench/embed_bench.py

or some figures, shorter: ``--figures 3,4 --duration 8 --fig4-duration 5``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import resource
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import tracemalloc
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import workload  # noqa: E402
from bench.report import Figure, machine, render, table, write_section  # noqa: E402
from tests.fakes.process import start_fake, stop_fake  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402

BENCH_DIR = REPO_ROOT / "bench"
RESULTS = BENCH_DIR / "RESULTS.md"
BEGIN, END = "<!-- embed:begin -->", "<!-- embed:end -->"
EMBED_PATH = "/api/v1/embed"
MODEL = "all-minilm"
CLIENTS = 32
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Text seeds (bench.workload.text): one per workload, so no figure hits another's cache entry.
SEED_MODEL = 1  # figures 1 and 2: the same texts for the model alone and through citadeld
SEED_UPSTREAM = 3
SEED_HITS = 4
SEED_MEMORY = 5
WARMUP_OFFSET = 10_000_000  # warmup texts: same seed, indices far above the measured ones


# ---- results -------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- CPU accounting --------------------------------------------------------------------------


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine has spent busy since boot (all cores)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def pid_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _runqueue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the event loop) spent runnable but not running."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _own_cpu_s() -> float:
    """This driver plus every child it has already reaped (load generators, wrk)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class CpuMeter:
    """Splits the machine's CPU time over a run into ours (servers, load generator, driver) and
    other processes', in cores (1.0 = one core busy for the whole run); also how long each
    server's main thread waited, runnable, for a CPU (``run_wait``, share of the run), which is
    what a busy neighbour does to an event loop."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.other_cores = self.ours_cores = self.client_cores = 0.0
        self.server_cores: dict[int, float] = {}
        self.run_wait: dict[int, float] = {}
        self.server_cpu_s: dict[int, float] = {}
        self.wall = 0.0

    def __enter__(self) -> CpuMeter:
        self._t = time.monotonic()
        self._busy = _machine_busy_s()
        self._own = _own_cpu_s()
        self._pid = {p: pid_cpu_s(p) for p in self.pids}
        self._wait = {p: _runqueue_wait_s(p) for p in self.pids}
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = wall = max(time.monotonic() - self._t, 1e-9)
        busy = _machine_busy_s() - self._busy
        self.run_wait = {p: round((_runqueue_wait_s(p) - v) / wall, 3)
                         for p, v in self._wait.items()}
        servers = {p: pid_cpu_s(p) - v for p, v in self._pid.items()}
        ours = sum(servers.values()) + _own_cpu_s() - self._own
        self.server_cpu_s = servers
        self.server_cores = {p: round(v / wall, 2) for p, v in servers.items()}
        self.ours_cores = round(ours / wall, 2)
        self.client_cores = round((ours - sum(servers.values())) / wall, 2)
        self.other_cores = round(max(0.0, busy - ours) / wall, 2)


def wait_quiet(max_wait: float, threshold: float) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` cores;
    returns the last sample. Our own idle servers count as 'other' here, so call it between
    figures, when none of ours is running."""
    deadline = time.monotonic() + max_wait
    while True:
        with CpuMeter([]) as m:
            time.sleep(1.0)
        if m.other_cores < threshold or time.monotonic() >= deadline:
            return m.other_cores
        log(f"machine busy ({m.other_cores} cores used by other processes); waiting")
        time.sleep(4.0)


# ---- Prometheus histograms -------------------------------------------------------------------


def histogram(text: str, name: str) -> tuple[list[tuple[float, float]], float, float]:
    """(cumulative buckets [(le, count)], sum, count) of histogram ``name`` (labels summed)."""
    buckets: dict[float, float] = {}
    total_sum = total_count = 0.0
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == name + "_sum":
                total_sum += s.value
            elif s.name == name + "_count":
                total_count += s.value
    return sorted(buckets.items()), total_sum, total_count


def histogram_delta(
    before: str, after: str, name: str
) -> tuple[list[tuple[float, float]], float, float]:
    b, bs, bc = histogram(before, name)
    a, as_, ac = histogram(after, name)
    prev = dict(b)
    return [(le, n - prev.get(le, 0.0)) for le, n in a], as_ - bs, ac - bc


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cum in buckets:
        if cum >= rank:
            if math.isinf(le):
                return lower  # past the last finite bound: that bound is all we know
            return lower + (le - lower) * (rank - below) / max(cum - below, 1e-12)
        lower, below = le, cum
    return lower


def share_at_most(buckets: list[tuple[float, float]], bound: float) -> float:
    """Exact share of observations <= ``bound`` when ``bound`` is a bucket boundary."""
    total = buckets[-1][1] if buckets else 0.0
    for le, cum in buckets:
        if math.isclose(le, bound):
            return cum / total if total else math.nan
    raise ValueError(f"{bound} is not a bucket boundary")


def lag_summary(before: str, after: str) -> dict[str, float]:
    buckets, _, count = histogram_delta(before, after, "citadel_event_loop_lag_seconds")
    return {
        "samples": count,
        "p50_ms": round(quantile(buckets, 0.50) * 1000, 2),
        "p99_ms": round(quantile(buckets, 0.99) * 1000, 2),
        "share_le_10ms": round(share_at_most(buckets, 0.01), 4),
    }


def mean_batch(before: str, after: str) -> float:
    _, total, count = histogram_delta(before, after, "citadel_embed_batch_size")
    return round(total / count, 1) if count else math.nan


# ---- processes -------------------------------------------------------------------------------


class Procs:
    """Every server this run starts, stopped in reverse order whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        self._n = 0

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def fake(self, module: str, *args: str) -> tuple[subprocess.Popen[str], int]:
        proc, port = start_fake(module, *args)
        self._stack.callback(stop_fake, proc)
        return proc, port

    def daemon(self, config: dict[str, Any], ready_timeout: float = 240.0) -> DaemonProc:
        self._n += 1
        d = DaemonProc(config, self.workdir / f"daemon{self._n}")
        self._stack.callback(_stop_daemon, d)
        d.start(ready_timeout=ready_timeout)
        return d

    def popen(self, cmd: list[str]) -> subprocess.Popen[str]:
        """A helper process speaking lines on stdin/stdout; closing stdin ends it."""
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT)
        self._stack.callback(_stop_popen, proc)
        return proc

    @contextlib.contextmanager
    def scope(self) -> Iterator[Procs]:
        """Servers started inside are stopped when the block ends (one figure's servers)."""
        outer, self._stack = self._stack, contextlib.ExitStack()
        try:
            with self._stack:
                yield self
        finally:
            self._stack = outer


def _stop_popen(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _stop_daemon(d: DaemonProc) -> None:
    if d.proc is not None and d.proc.poll() is None:
        code = d.stop()
        if code != 0:
            log(f"citadeld on {d.url} exited with {code}; log: {d.log_path}")


def ollama_model(port: int, max_items: int = 64) -> dict[str, Any]:
    return {
        "backend": "ollama", "dims": 384, "max_context": 256,
        "endpoints": [{"url": f"http://127.0.0.1:{port}"}],
        "batch": {"max_items": max_items, "max_wait_ms": 5},
    }


def daemon_config(models: dict[str, Any] | None = None, **cache: Any) -> dict[str, Any]:
    """citadeld's defaults (info logging, in-process cache) plus what the figure needs."""
    cfg: dict[str, Any] = {"cache": {"backend": "memory", **cache}}
    if models is not None:
        cfg["embedding"] = {"default_model": next(iter(models)), "models": models}
    return cfg


def run_loadgen(
    url: str, body: str, body_args: dict[str, Any], *, duration: float | None = None,
    requests: int | None = None, warmup: float = 0.0, probe_url: str | None = None,
    concurrency: int = CLIENTS,
) -> dict[str, Any]:
    """bench/loadgen.py in its own process; returns its JSON summary."""
    cmd = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--url", url, "-c", str(concurrency),
           "--body", body, "--body-args", json.dumps(body_args), "--json"]
    if duration is not None:
        cmd += ["--duration", str(duration), "--warmup", str(warmup)]
    else:
        cmd += ["--requests", str(requests)]
    if probe_url:
        cmd += ["--probe-url", probe_url]
    limit = (duration or 0) + warmup + (requests or 0) / 50 + 120  # >= 50 req/s or it's broken
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=REPO_ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["errors"]:
        log(f"  loadgen errors: {result['error_kinds']} e.g. {result['error_samples'][:2]}")
    return result


def metrics(url: str) -> str:
    return httpx.get(url + "/metrics", timeout=10).text


def check_embed(url: str, body: bytes) -> dict[str, Any]:
    r = httpx.post(url + EMBED_PATH, content=body, timeout=60,
                   headers={"Content-Type": "application/json"})
    r.raise_for_status()
    answer: dict[str, Any] = r.json()
    if len(answer["embeddings"][0]) != 384:
        raise RuntimeError(f"unexpected answer from {url}: {r.text[:200]}")
    return answer


def fmt_other(cores: float) -> str:
    return f"{cores:.2f} cores used by other processes" + (" (NOISY)" if cores > 0.25 else "")


# ---- figures ---------------------------------------------------------------------------------


class ModelWorker:
    """bench/model_limit.py --serve: the model loaded once in its own process, timed on demand,
    so model-alone and through-the-daemon runs can alternate."""

    def __init__(self, procs: Procs, batch: int = 32) -> None:
        cmd = [sys.executable, str(BENCH_DIR / "model_limit.py"), "--serve", "--batch",
               str(batch), "--seed", str(SEED_MODEL)]
        self.proc = procs.popen(cmd)
        self.load_s = math.nan

    def ready(self, timeout: float = 300.0) -> None:
        line = self._line(timeout)
        if not line.startswith("READY"):
            raise RuntimeError(f"model worker: unexpected {line!r}")
        self.load_s = float(line.split()[1])

    def run(self, seconds: float, offset: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seconds} {offset}\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._line(seconds + 300))
        return result

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], timeout)[0]
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"model worker gave no answer (exit {self.proc.poll()})")
        return line.strip()


def fig12_local(args: argparse.Namespace, procs: Procs) -> list[Figure]:
    """Figures 1 and 2 in alternation (model alone, daemon, model alone, daemon, ...): the ratio
    is taken per round, so a neighbour's load hits numerator and denominator alike."""
    fig1 = Figure("1", "In-process model alone, batch 32 (the limit for figure 2)")
    fig2 = Figure("2", f"Local backend, {CLIENTS} clients, one new text per request")
    worker = ModelWorker(procs)  # loads while the daemon below loads its own copy
    d = procs.daemon(daemon_config())
    worker.ready()
    pids = [worker.proc.pid] + ([d.proc.pid] if d.proc else [])
    url = d.url + EMBED_PATH
    body = "bench.workload:native_embed"
    check_embed(d.url, workload.native_embed(seed=SEED_MODEL, offset=WARMUP_OFFSET - 1)(0))
    log(f"  warmup {args.warmup} s")
    run_loadgen(url, body, {"seed": SEED_MODEL, "offset": WARMUP_OFFSET}, duration=args.warmup)
    limits: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for n in range(args.rounds12):
        offset = n * 1_000_000  # both sides of a round embed the same texts
        with CpuMeter(pids) as cpu_a:
            lim = worker.run(args.fig1_duration, offset)
        lim["other"] = cpu_a.other_cores
        with CpuMeter(pids) as cpu_b:
            r = run_loadgen(url, body, {"seed": SEED_MODEL, "offset": offset},
                            duration=args.duration, warmup=2, probe_url=d.url + "/metrics")
        r["lag"] = lag_summary(r["probe_start"], r["probe_end"])
        r["batch"] = mean_batch(r["probe_start"], r["probe_end"])
        r["cores"], r["client_cores"] = cpu_b.server_cores.get(pids[-1], 0.0), cpu_b.client_cores
        r["run_wait"] = cpu_b.run_wait.get(pids[-1], 0.0)
        r["other"] = cpu_b.other_cores
        limits.append(lim)
        runs.append(r)
        log(f"  round {n + 1}: model alone {lim['items_per_s']:.1f} texts/s, citadeld "
            f"{r['throughput_rps']:.1f} req/s, p99 {r['latency_ms']['p99']:.0f} ms")

    limit = statistics.median(x["items_per_s"] for x in limits)
    fig1.row("LocalBackend.embed, batch 32 (median of rounds)", "reference",
             f"{limit:.1f} texts/s", None)
    fig1.details += [
        f"model loaded in {worker.load_s} s; torch threads {limits[0]['torch_threads']}; timed "
        f"for {args.fig1_duration} s per round, {args.rounds12} rounds alternating with figure 2",
        *(f"round {n}: {x['items_per_s']} texts/s, {x['batches']} batches, {x['batch_ms_p50']} "
          f"ms per batch p50 (max {x['batch_ms_max']}); {fmt_other(x['other'])}"
          for n, x in enumerate(limits, 1)),
    ]
    ratios = [r["throughput_rps"] / x["items_per_s"] for r, x in zip(runs, limits, strict=True)]
    ratio = statistics.median(ratios)
    p99 = statistics.median(r["latency_ms"]["p99"] for r in runs)
    lag_p99 = statistics.median(r["lag"]["p99_ms"] for r in runs)
    lag_share = statistics.median(r["lag"]["share_le_10ms"] for r in runs)
    errors = sum(r["errors"] for r in runs)
    fig2.row("throughput vs figure 1 (median of per-round ratios)", ">= 0.80",
             f"{ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)})",
             ratio >= 0.80 and not errors)
    fig2.row("p99 latency (median of rounds)", "<= 400 ms", f"{p99:.0f} ms", p99 <= 400)
    fig2.row("event-loop lag p99 (median of rounds)", "<= 10 ms",
             f"{lag_p99:.1f} ms ({lag_share:.1%} of samples <= 10 ms)", lag_share >= 0.99)
    fig2.details += [
        f"{args.duration} s per round after 2 s of warmup; lag p99 is interpolated inside the "
        f"histogram buckets as Prometheus does, the share of samples <= 10 ms (a bucket "
        f"boundary) is exact and decides PASS/FAIL; one lag sample every 50 ms. 'Loop thread "
        f"waiting for a CPU' is the share of the run citadeld's main thread was runnable but "
        f"not running (/proc/PID/schedstat): lag no code of citadeld's can avoid",
        "| round | req/s | ratio | latency p50 / p90 / p99 / max ms | mean batch | lag p50 / p99 "
        "ms | lag <= 10 ms | citadeld CPU | loop thread waiting for a CPU | loadgen CPU "
        "| other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *(f"| {n} | {r['throughput_rps']:.1f} | {q:.2f} | {r['latency_ms']['p50']:.0f} / "
          f"{r['latency_ms']['p90']:.0f} / {r['latency_ms']['p99']:.0f} / "
          f"{r['latency_ms']['max']:.0f} | {r['batch']} | {r['lag']['p50_ms']} / "
          f"{r['lag']['p99_ms']} | {r['lag']['share_le_10ms']:.1%} | {r['cores']} | "
          f"{r['run_wait']:.0%} | {r['client_cores']} | "
          f"{r['other']}{' NOISY' if r['other'] > 0.25 else ''} |"
          for n, (r, q) in enumerate(zip(runs, ratios, strict=True), 1)),
        f"{sum(r['requests'] for r in runs)} requests, {errors} errors",
    ]
    return [fig1, fig2]


def fig3_upstream(args: argparse.Namespace, procs: Procs) -> Figure:
    fig = Figure("3", f"Ollama fake (20 ms + 2 ms/input, parallel 1), {CLIENTS} clients")
    fake, port = procs.fake("tests.fakes.ollama", "--base-ms", "20", "--per-input-ms", "2",
                            "--parallel", "1", "--fake-vectors", "hash")
    d = procs.daemon(daemon_config({MODEL: ollama_model(port)}))
    direct_url = f"http://127.0.0.1:{port}/api/embed"
    check_embed(d.url, workload.native_embed(MODEL, seed=SEED_UPSTREAM, offset=WARMUP_OFFSET)(0))
    pids = [fake.pid] + ([d.proc.pid] if d.proc else [])
    log(f"  direct to the fake, {args.fig3_duration} s")
    with CpuMeter(pids) as cpu_a:
        direct = run_loadgen(direct_url, "bench.workload:ollama_embed",
                             {"seed": SEED_UPSTREAM, "offset": 0}, duration=args.fig3_duration,
                             warmup=2)
    log(f"  through citadeld, {args.fig3_duration} s")
    with CpuMeter(pids) as cpu_b:
        via = run_loadgen(d.url + EMBED_PATH, "bench.workload:native_embed",
                          {"model": MODEL, "seed": SEED_UPSTREAM, "offset": 1_000_000},
                          duration=args.fig3_duration, warmup=2, probe_url=d.url + "/metrics")
    ratio = via["throughput_rps"] / max(direct["throughput_rps"], 1e-9)
    fig.row("citadeld vs direct calls", ">= 5x",
            f"{ratio:.1f}x ({via['throughput_rps']:.0f} vs {direct['throughput_rps']:.1f} req/s)",
            ratio >= 5 and not via["errors"])
    lat_d, lat_v = direct["latency_ms"], via["latency_ms"]
    fig.details += [
        f"direct: one input per call, calls serialised by the fake: {lat_d['p50']} ms p50, "
        f"{lat_d['p99']} ms p99 (at best 1000/22 = 45.5 calls/s), {direct['errors']} errors",
        f"citadeld: mean batch {mean_batch(via['probe_start'], via['probe_end'])} texts, "
        f"{lat_v['p50']} ms p50, {lat_v['p99']} ms p99, {via['errors']} errors",
        f"CPU through citadeld: citadeld {cpu_b.server_cores.get(pids[-1], 0)} cores (its loop "
        f"thread waited for a CPU {cpu_b.run_wait.get(pids[-1], 0):.0%} of the run), fake "
        f"{cpu_b.server_cores.get(fake.pid, 0)}, load generator {cpu_b.client_cores}; "
        f"{fmt_other(max(cpu_a.other_cores, cpu_b.other_cores))} (max of both runs)",
    ]
    return fig


def wrk_script(bodies: list[bytes], path: Path, headers: dict[str, str] | None = None) -> None:
    """A wrk Lua script cycling over fixed POST bodies; done() prints one JSON line."""
    items = ",\n".join("  " + json.dumps(b.decode()) for b in bodies)
    extra = "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n"
                    for k, v in (headers or {}).items())
    path.write_text(f"""-- generated by bench/embed_bench.py
local bodies = {{
{items}
}}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{extra}request = function()
  i = i % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"errors":%d,"non2xx":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect + e.read + e.write + e.timeout + e.status, e.status))
end
""")


def wrk(url: str, script: Path, seconds: float, threads: int) -> dict[str, Any]:
    cmd = ["wrk", f"-t{threads}", f"-c{CLIENTS}", f"-d{max(1, round(seconds))}s", "--timeout", "5s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1000:]}{out.stderr}")
    r = json.loads(line[8:])
    return {
        "requests": r["requests"],
        "throughput_rps": r["requests"] / (r["duration_us"] / 1e6),
        "errors": r["errors"],
        "latency_ms": {"p50": r["p50_us"] / 1000, "p99": r["p99_us"] / 1000,
                       "max": r["max_us"] / 1000},
    }


def fig4_cache_hits(args: argparse.Namespace, procs: Procs, workdir: Path) -> Figure:
    fig = Figure("4", f"Cache hits, {CLIENTS} clients, vs a bare aiohttp handler")
    _, fake_port = procs.fake("tests.fakes.ollama", "--fake-vectors", "hash")
    ceiling, ceiling_port = procs.fake("bench.ceiling_server")
    models = {MODEL: ollama_model(fake_port)}
    targets = {"ceiling": f"http://127.0.0.1:{ceiling_port}"}
    pids = {"ceiling": ceiling.pid}
    variants = {"citadeld": daemon_config(models)}
    if args.fig4_quiet_variant:  # same daemon without per-request access-log lines
        variants["citadeld, logging warning"] = {**daemon_config(models),
                                                 "logging": {"level": "warning"}}
    bodies = [workload.native_embed(MODEL, seed=SEED_HITS)(i) for i in range(args.hit_texts)]
    for name, cfg in variants.items():
        d = procs.daemon(cfg)
        targets[name], pids[name] = d.url, d.proc.pid if d.proc else 0
        for b in bodies:  # warm the cache, then make sure it really answers from it
            check_embed(d.url, b)
        if not all(check_embed(d.url, b)["cached"][0] for b in bodies):
            raise RuntimeError("warmed texts are not answered from the cache")
    size = {name: len(httpx.post(u + EMBED_PATH, content=bodies[0], timeout=10).content)
            for name, u in targets.items()}

    use_wrk = shutil.which("wrk") is not None
    if use_wrk:
        script = workdir / "cache_hits.lua"
        wrk_script(bodies, script)

        def load(base: str, seconds: float) -> dict[str, Any]:
            return wrk(base + EMBED_PATH, script, seconds, args.wrk_threads)
    else:
        log("WARNING: wrk not found (Debian/Ubuntu: apt-get install wrk); figure 4 falls back "
            "to the Python load generator, which may itself be the bottleneck")

        def load(base: str, seconds: float) -> dict[str, Any]:
            return run_loadgen(base + EMBED_PATH, "bench.workload:native_embed",
                               {"model": MODEL, "seed": SEED_HITS, "distinct": args.hit_texts},
                               duration=seconds)

    for base in targets.values():  # connections, caches, allocators: settle them all first
        load(base, 2)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    others: list[float] = []
    for n in range(args.fig4_rounds):  # A B (C) A B (C) ...: drift hits every server alike
        for name, base in targets.items():
            before = metrics(base) if name != "ceiling" else ""
            with CpuMeter(list(pids.values())) as cpu:
                r = load(base, args.fig4_duration)
            if name != "ceiling":
                r["lag"] = lag_summary(before, metrics(base))
            r["cores"] = cpu.server_cores.get(pids[name], 0.0)
            r["run_wait"] = cpu.run_wait.get(pids[name], 0.0)
            # CPU per request barely depends on the neighbours' load, unlike req/s
            r["cpu_us"] = cpu.server_cpu_s.get(pids[name], 0.0) / max(r["requests"], 1) * 1e6
            others.append(cpu.other_cores)
            runs[name].append(r)
        line = ", ".join(f"{k} {v[-1]['throughput_rps']:.0f}" for k, v in runs.items())
        log(f"  round {n + 1} (req/s): {line}")

    def ratios(name: str) -> list[float]:
        return [b["throughput_rps"] / a["throughput_rps"]
                for a, b in zip(runs["ceiling"], runs[name], strict=True)]

    def med(name: str, key: Callable[[dict[str, Any]], float]) -> float:
        return statistics.median(key(r) for r in runs[name])

    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    main = ratios("citadeld")
    p99 = med("citadeld", lambda r: r["latency_ms"]["p99"])
    fig.row("throughput vs ceiling (median of rounds)", ">= 0.60",
            f"{statistics.median(main):.2f} (rounds: {', '.join(f'{x:.2f}' for x in main)})",
            statistics.median(main) >= 0.60 and not errors)
    fig.row("citadeld p99 latency (median of rounds)", "<= 30 ms", f"{p99:.1f} ms", p99 <= 30)
    cpu_us = {name: med(name, lambda r: r["cpu_us"]) for name in runs}
    fig.row("diagnostic: server CPU per request, ceiling / citadeld", "-",
            f"{cpu_us['ceiling'] / cpu_us['citadeld']:.2f} ({cpu_us['ceiling']:.0f} vs "
            f"{cpu_us['citadeld']:.0f} us)", None)
    for name in variants:
        if name != "citadeld":
            rs = ratios(name)
            fig.row(f"diagnostic: {name} vs ceiling", "-",
                    f"{statistics.median(rs):.2f} (rounds: {', '.join(f'{x:.2f}' for x in rs)}); "
                    f"CPU per request {cpu_us[name]:.0f} us", None)
    gen = (f"wrk -t{args.wrk_threads} -c{CLIENTS} -d{round(args.fig4_duration)}s" if use_wrk
           else f"bench/loadgen.py -c {CLIENTS} -d {args.fig4_duration} (wrk absent)")
    fig.details += [
        f"generator: {gen}, servers in alternation ({' / '.join(targets)}), "
        f"{args.fig4_rounds} rounds, {args.hit_texts} cached texts cycled; answer bytes: "
        + ", ".join(f"{k} {v}" for k, v in size.items()) + f"; errors {errors}",
        "| round | server | req/s | ratio to ceiling | p50 / p99 ms | server CPU cores "
        "| server CPU per request | server main thread waiting for a CPU | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in range(args.fig4_rounds):
        base_rps = runs["ceiling"][n]["throughput_rps"]
        for name, of_server in runs.items():
            one = of_server[n]
            lag = one.get("lag", {}).get("p99_ms", "-")
            fig.details.append(
                f"| {n + 1} | {name} | {one['throughput_rps']:.0f} | "
                f"{one['throughput_rps'] / base_rps:.2f} | {one['latency_ms']['p50']:.1f} / "
                f"{one['latency_ms']['p99']:.1f} | {one['cores']} | {one['cpu_us']:.0f} us | "
                f"{one['run_wait']:.0%} | {lag} |")
    fig.details.append(
        "medians (req/s): " + ", ".join(
            f"{k} {med(k, lambda r: r['throughput_rps']):.0f}" for k in runs)
        + f"; {fmt_other(max(others))} (max over runs)")
    if args.fig4_quiet_variant:
        fig.details.append(
            "the diagnostic row runs the same daemon with `logging.level: warning`, i.e. without "
            "the JSON access-log line citadeld writes to stdout for every request at the default "
            "level `info`; the difference is that line's cost on the event loop")
    return fig


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _cache_entries(url: str) -> int:
    return int(httpx.get(url + "/api/v1/status", timeout=10).json()["cache"]["entries"])


def _memory_run(
    procs: Procs, fake_pid: int, fake_port: int, first: int, total: int, **cache: Any
) -> dict[str, Any]:
    d = procs.daemon(daemon_config({MODEL: ollama_model(fake_port)}, **cache))
    assert d.proc is not None
    url = d.url + EMBED_PATH
    args = {"model": MODEL, "seed": SEED_MEMORY}
    with CpuMeter([d.proc.pid, fake_pid]) as cpu:
        r1 = run_loadgen(url, "bench.workload:native_embed", {**args, "offset": 0},
                         requests=first)
        rss1, n1 = _rss_kb(d.proc.pid), _cache_entries(d.url)
        log(f"  after {first}: RSS {rss1 / 1024:.1f} MiB, {n1} cache entries; "
            f"{total - first} more requests")
        r2 = run_loadgen(url, "bench.workload:native_embed", {**args, "offset": first},
                         requests=total - first)
        rss2, n2 = _rss_kb(d.proc.pid), _cache_entries(d.url)
    _stop_daemon(d)
    return {"rss1": rss1, "rss2": rss2, "entries1": n1, "entries2": n2,
            "errors": r1["errors"] + r2["errors"], "rps": r2["throughput_rps"],
            "other": cpu.other_cores}


def expected_entry_bytes(n: int = 20_000) -> float:
    """Python-heap bytes per entry of citadeld's in-process LRU, from its data layout
    (OrderedDict[key, (expiry, read-only float32[384])], the key as ``MemoryCache.key`` makes
    it for this benchmark's texts), measured with tracemalloc."""
    from citadeld.cache_core import MemoryCache

    key = MemoryCache(max_entries=1, ttl_s=0).key
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    data: OrderedDict[Any, tuple[float, np.ndarray]] = OrderedDict()
    for i in range(n):
        v = np.array(np.arange(384, dtype=np.float32) + i, dtype=np.float32, copy=True)
        v.setflags(write=False)
        # the text is traced too: the key keeps alive what the request would have freed
        data[key(MODEL, 384, True, workload.text(i, SEED_MEMORY))] = (time.monotonic() + 1e6, v)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del data
    return used / n


def fig5_memory(args: argparse.Namespace, procs: Procs) -> Figure:
    total, first = args.mem_requests, 1000
    fig = Figure("5", f"citadeld RSS after {first} vs after {total} distinct requests")
    fake, port = procs.fake("tests.fakes.ollama", "--base-ms", "0", "--per-input-ms", "0",
                            "--parallel", "1", "--fake-vectors", "hash")
    log("  cache bounded to 1000 entries (leak check)")
    a = _memory_run(procs, fake.pid, port, first, total, max_entries=1000)
    ratio = a["rss2"] / a["rss1"]
    fig.row(f"RSS {total} / RSS {first} requests, cache max_entries 1000", "<= 1.20",
            f"{ratio:.3f} ({a['rss1'] / 1024:.1f} -> {a['rss2'] / 1024:.1f} MiB)",
            ratio <= 1.2 and not a["errors"])
    log("  default cache (max_entries 100000)")
    b = _memory_run(procs, fake.pid, port, first, total)
    grown = (b["rss2"] - b["rss1"]) * 1024
    added = b["entries2"] - b["entries1"]
    per_entry = grown / added if added else math.nan
    expect = expected_entry_bytes()
    fig.row(f"RSS growth {first} -> {total} requests, default cache", "explained by the cache",
            f"{b['rss1'] / 1024:.1f} -> {b['rss2'] / 1024:.1f} MiB = {per_entry:.0f} B per "
            f"added entry", None)
    fig.details += [
        f"bounded run: cache entries {a['entries1']} -> {a['entries2']}, {a['errors']} errors, "
        f"{a['rps']:.0f} req/s; RSS growth {(a['rss2'] - a['rss1']) / 1024:.1f} MiB is allocator "
        f"and interpreter warm-up, not per-request state",
        f"default run: cache entries {b['entries1']} -> {b['entries2']} (+{added}), "
        f"{b['errors']} errors; growth {grown / 2**20:.1f} MiB = {per_entry:.0f} B per entry vs "
        f"{expect:.0f} B expected from the LRU's layout (float32[384] = 1536 B of data + numpy "
        f"header + a key tuple holding the text + (expiry, vector) tuple + OrderedDict slot and "
        f"link), "
        f"measured with tracemalloc; at the default max_entries 100000 the cache alone holds "
        f"~{expect * 100_000 / 2**20:.0f} MiB",
        f"{fmt_other(max(a['other'], b['other']))} (max of both runs)",
    ]
    return fig


# ---- report ----------------------------------------------------------------------------------


def report(figures: list[Figure], command: str, started: dt.datetime, took: float) -> str:
    return render(BEGIN, END, "Embedding figures (`bench/embed_bench.py`)", figures, command,
                  started, took,
                  tools=f", wrk {machine()['wrk']}")


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="citadeld embedding benchmarks (figures 1-5)")
    p.add_argument("--figures", default="1,2,3,4,5", help="comma-separated subset of 1-5")
    p.add_argument("--duration", type=float, default=20,
                   help="figure 2: measured seconds per round")
    p.add_argument("--warmup", type=float, default=5, help="figure 2: warmup seconds")
    p.add_argument("--fig1-duration", type=float, default=15,
                   help="figure 1: timed seconds per round")
    p.add_argument("--rounds12", type=int, default=2,
                   help="figures 1 and 2: rounds of model alone / through citadeld")
    p.add_argument("--fig3-duration", type=float, default=15, help="figure 3: seconds per side")
    # many short alternating rounds: on a shared 2-core VM one 6-8 s run of the same server
    # varies by +-20% (seen with both pinned to cores), so a median of 3 rounds swings by 0.1
    p.add_argument("--fig4-duration", type=float, default=5, help="figure 4: seconds per run")
    p.add_argument("--fig4-rounds", type=int, default=7, help="figure 4: A B rounds (>= 3)")
    p.add_argument("--wrk-threads", type=int, default=1, help="figure 4: wrk threads")
    p.add_argument("--hit-texts", type=int, default=64, help="figure 4: cached texts cycled")
    p.add_argument("--no-fig4-quiet-variant", dest="fig4_quiet_variant", action="store_false",
                   help="figure 4: skip the diagnostic run of citadeld at logging level warning")
    p.add_argument("--mem-requests", type=int, default=100_000, help="figure 5: total requests")
    p.add_argument("--quiet-wait", type=float, default=0,
                   help="before each figure wait up to this many seconds for other processes "
                        "to use < 0.25 cores (0: only report their load)")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file to update")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and daemon logs")
    return p.parse_args(argv)


def _command(argv: list[str]) -> str:
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO_ROOT)
    return shlex.join([str(exe), "bench/embed_bench.py", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    wanted = {f.strip() for f in args.figures.split(",") if f.strip()}
    if not wanted <= {"1", "2", "3", "4", "5"}:
        raise SystemExit(f"--figures: unknown figure in {args.figures!r}")
    if len(wanted & {"1", "2"}) == 1:
        log("figures 1 and 2 are measured in alternation: running both")

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwinds through every cleanup below

    signal.signal(signal.SIGTERM, on_term)
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="citadel-bench-"))
    figures: list[Figure] = []
    steps: list[tuple[str, Callable[[Procs], list[Figure]]]] = []
    for key, fn in (
        ("1,2", lambda p: fig12_local(args, p)),
        ("3", lambda p: [fig3_upstream(args, p)]),
        ("4", lambda p: [fig4_cache_hits(args, p, workdir)]),
        ("5", lambda p: [fig5_memory(args, p)]),
    ):
        if wanted & set(key.split(",")):
            steps.append((key, fn))
    try:
        with Procs(workdir) as procs:
            for key, fn in steps:
                if args.quiet_wait > 0:
                    wait_quiet(args.quiet_wait, 0.25)
                log(f"figure {key}")
                try:
                    with procs.scope():
                        done = fn(procs)
                except Exception as exc:  # one broken figure must not hide the others
                    log(f"figure {key} failed: {exc!r}")
                    traceback.print_exc()
                    fig = Figure(key, "did not complete")
                    fig.row("run", "completes", f"error: {type(exc).__name__}: {exc}"[:300],
                            False)
                    done = [fig]
                figures += done
                for fig in done:
                    for row in fig.rows:
                        log(f"  {fig.key}: {row.what}: {row.measured} [{row.status}] "
                            f"(target {row.target})")
                    for line in fig.details:
                        print(f"    {line}", flush=True)
    finally:
        if args.keep_workdir:
            log(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    section = report(figures, _command(argv), started, time.monotonic() - t0)
    print()
    print("\n".join(table([r for f in figures for r in f.rows])))
    if not args.no_write:
        write_section(args.results, BEGIN, END, section)
        log(f"wrote {args.results}")
    return 0 if all(r.status != "FAIL" for f in figures for r in f.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
