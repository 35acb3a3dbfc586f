#!/usr/bin/env python3
"""Closed-loop HTTP load generator: N clients, each sending its next request as soon as the
previous one is answered, for a fixed duration or a fixed number of requests.

Why closed-loop: it measures a server's sustainable throughput at a given concurrency, and the
latency a client sees at that load, without an open-loop generator's unbounded queueing. Run it
in its own process (``python bench/loadgen.py ... --json``) so that client and server never share
a GIL; the benchmark drivers do exactly that.

Each request gets a globally unique index (0, 1, 2, ... across all clients); a body factory
``MODULE:FUNC`` (``FUNC(**body_args)`` returns ``index -> bytes``) turns it into a body, so
workloads such as "never the same text twice" stay deterministic. Example::

    python bench/loadgen.py --url http://127.0.0.1:8000/api/v1/embed -c 32 -d 20 \\
        --body bench.workload:native_embed --body-args '{"seed": 1}' --json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO_ROOT = Path(__file__).resolve().parents[1]

BodyFn = Callable[[int], bytes]


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile (no interpolation: every reported value was really observed)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(
    latencies: list[float], elapsed: float, errors: Counter[str], statuses: Counter[int],
    samples: list[str], concurrency: int,
) -> dict[str, Any]:
    lat = sorted(latencies)
    ms = {
        name: round(percentile(lat, p) * 1000, 3)
        for name, p in (("p50", 50), ("p90", 90), ("p99", 99))
    }
    ms["max"] = round(lat[-1] * 1000, 3) if lat else math.nan
    ms["mean"] = round(sum(lat) / len(lat) * 1000, 3) if lat else math.nan
    ok = statuses.total() - sum(n for s, n in statuses.items() if s >= 400)
    return {
        "concurrency": concurrency,
        "requests": len(lat),
        "ok": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": samples,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(lat) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": ms,
    }


async def run_load(
    url: str,
    *,
    body: BodyFn | None = None,
    method: str | None = None,
    concurrency: int = 32,
    duration: float | None = None,
    requests: int | None = None,
    warmup: float = 0.0,
    headers: dict[str, str] | None = None,
    request_timeout: float = 30.0,
    probe_url: str | None = None,
) -> dict[str, Any]:
    """Drive ``url`` with ``concurrency`` closed-loop clients; returns the summary dict.

    Stops after ``duration`` seconds of measurement (preceded by ``warmup`` seconds whose requests
    are not recorded) or after ``requests`` recorded requests, whichever is given. A request
    counts as an error when it raises or answers a status >= 400; its latency is still recorded.

    ``probe_url`` is fetched (GET) when measurement starts and again when it ends, and both
    bodies are returned as ``probe_start``/``probe_end``: a server's counters (e.g. Prometheus
    histograms) then cover exactly the measured window, warmup excluded.
    """
    if (duration is None) == (requests is None):
        raise ValueError("give exactly one of duration and requests")
    method = method or ("POST" if body is not None else "GET")
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    counter = itertools.count()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    samples: list[str] = []
    t_begin = time.perf_counter()
    t_measure = t_begin + warmup
    deadline = t_measure + duration if duration is not None else math.inf
    last_done = t_measure

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal last_done
        perf = time.perf_counter
        while True:
            i = next(counter)
            if requests is not None and i >= requests:
                return
            t0 = perf()
            if t0 >= deadline:
                return
            data = body(i) if body is not None else None
            status, err = 0, ""
            try:
                async with session.request(method, url, data=data) as resp:
                    payload = await resp.read()
                    status = resp.status
                    if status >= 400:
                        err = f"HTTP {status}"
                        if len(samples) < 5:
                            samples.append(f"{status}: {payload[:200]!r}")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                err = type(exc).__name__
                if len(samples) < 5:
                    samples.append(repr(exc)[:200])
            t1 = perf()
            if t0 < t_measure:
                continue  # warmup request: not recorded
            latencies.append(t1 - t0)
            last_done = max(last_done, t1)
            if status:
                statuses[status] += 1
            if err:
                errors[err] += 1

    probes: dict[str, str] = {}

    async def probe(name: str, at: float) -> None:
        """Its own connection, so it never queues behind the load's pool."""
        assert probe_url is not None
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        async with aiohttp.ClientSession() as s, s.get(probe_url) as resp:
            probes[name] = await resp.text()

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=request_timeout)
    # Session-wide headers, no cookie jar, no decompression: less client CPU per request.
    async with aiohttp.ClientSession(
        connector=connector, timeout=client_timeout, headers=hdrs,
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False,
    ) as session:
        tasks = [client(session) for _ in range(concurrency)]
        if probe_url is not None:
            tasks.append(probe("probe_start", t_measure))
            if duration is not None:
                tasks.append(probe("probe_end", deadline))
        await asyncio.gather(*tasks)
        if probe_url is not None and duration is None:
            await probe("probe_end", 0.0)
    if requests is not None:
        t_measure = t_begin
    result = summarize(latencies, last_done - t_measure, errors, statuses, samples, concurrency)
    result.update(probes)
    return result


def load_body(spec: str | None, args: dict[str, Any], data: str | None) -> BodyFn | None:
    """``MODULE:FUNC`` body factory (repo root importable, e.g. ``bench.workload:...``)."""
    if data is not None:
        raw = data.encode()
        return lambda _i: raw
    if spec is None:
        return None
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    module, _, func = spec.partition(":")
    factory = getattr(importlib.import_module(module), func)
    fn: BodyFn = factory(**args)
    return fn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--url", required=True)
    p.add_argument("-c", "--concurrency", type=int, default=32)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("-d", "--duration", type=float, help="seconds of measurement")
    what.add_argument("-n", "--requests", type=int, help="number of requests")
    p.add_argument("--warmup", type=float, default=0.0, help="unrecorded seconds first")
    p.add_argument("--method", default=None, help="default: POST with a body, else GET")
    p.add_argument("--body", metavar="MODULE:FUNC", help="body factory, e.g. bench.workload:...")
    p.add_argument("--body-args", type=json.loads, default={}, help="JSON kwargs of the factory")
    p.add_argument("--data", help="one fixed body for every request")
    p.add_argument("-H", "--header", action="append", default=[], help="'Name: value'")
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout, seconds")
    p.add_argument("--probe-url", help="GET at measurement start and end (e.g. /metrics)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.warmup and args.requests is not None:
        print("loadgen: --warmup only applies with --duration", file=sys.stderr)
        return 2
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    body = load_body(args.body, args.body_args, args.data)
    coro = run_load(
        args.url, body=body, method=args.method, concurrency=args.concurrency,
        duration=args.duration, requests=args.requests, warmup=args.warmup, headers=headers,
        request_timeout=args.timeout, probe_url=args.probe_url,
    )
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(coro)
    else:
        result = uvloop.run(coro)
    if args.json:
        print(json.dumps(result))
    else:
        lat = result["latency_ms"]
        print(
            f"{result['requests']} requests in {result['elapsed_s']} s: "
            f"{result['throughput_rps']} req/s, errors {result['errors']}, latency ms "
            f"p50 {lat['p50']} p90 {lat['p90']} p99 {lat['p99']} max {lat['max']}"
        )
        for s in result["error_samples"]:
            print("  error:", s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
