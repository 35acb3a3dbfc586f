#!/usr/bin/env python3
"""The in-process model's own throughput: the ceiling for citadeld's local-backend figure.

Loads citadeld's ``LocalBackend`` (all-MiniLM-L6-v2 from the bundled package, offline) exactly as
the daemon does and times ``backend.embed(batch, truncate=True)`` on fresh batches of the same
deterministic ~16-word texts the load generator sends (``bench.workload.text``), with torch's
default thread count, as in the daemon. Runs in its own process so that torch's threads and the
~20 s model load never touch the benchmark driver.

Run once: ``python bench/model_limit.py --batch 32 --duration 15 --json``.
Serve: ``--serve`` loads the model, prints ``READY``, then answers each stdin line
``SECONDS OFFSET`` with one JSON result line (texts ``OFFSET, OFFSET+1, ...`` of ``--seed``);
the benchmark driver uses it to alternate model-alone and through-the-daemon runs on a shared
machine without paying the model load each time. EOF on stdin ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def load() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from citadeld.actors.backends.local import LocalBackend
    from citadeld.config import ModelConfig

    return LocalBackend(ModelConfig(backend="local", dims=384, max_context=256), "all-minilm")


def run(
    backend: Any, batch: int, duration: float, seed: int, offset: int, warmup_batches: int
) -> dict[str, Any]:
    """Time whole ``embed`` calls for ``duration`` seconds after ``warmup_batches`` untimed ones
    (the first calls pay for lazy init and allocator growth)."""
    import torch

    from bench.workload import texts

    start = offset
    for _ in range(warmup_batches):
        backend.embed(texts(batch, seed, start), True)
        start += batch
    per_batch: list[float] = []
    t_end = time.perf_counter() + duration
    while time.perf_counter() < t_end:
        chunk = texts(batch, seed, start)  # built outside the timed call, as the daemon does
        start += batch
        t1 = time.perf_counter()
        result = backend.embed(chunk, True)
        per_batch.append(time.perf_counter() - t1)
        if result.errors or result.vectors.shape != (batch, 384):
            raise RuntimeError(f"unexpected result: {result.vectors.shape}, {result.errors}")
    total = sum(per_batch)
    per_batch.sort()
    return {
        "batch": batch,
        "batches": len(per_batch),
        "items": batch * len(per_batch),
        "seconds": round(total, 3),
        "items_per_s": round(batch * len(per_batch) / total, 2),
        "batch_ms_p50": round(per_batch[len(per_batch) // 2] * 1000, 2),
        "batch_ms_max": round(per_batch[-1] * 1000, 2),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="in-process model throughput at a fixed batch size")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of timed batches")
    p.add_argument("--warmup-batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="text seed (bench.workload.text)")
    p.add_argument("--offset", type=int, default=0, help="index of the first text")
    p.add_argument("--serve", action="store_true", help="load, then run on each stdin line")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    backend = load()
    load_s = round(time.perf_counter() - t0, 2)
    if not args.serve:
        result = run(backend, args.batch, args.duration, args.seed, args.offset,
                     args.warmup_batches)
        result["load_s"] = load_s
        print(json.dumps(result) if args.json else result)
        return 0
    print(f"READY {load_s}", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        seconds, offset = line.split()
        result = run(backend, args.batch, float(seconds), args.seed, int(offset),
                     args.warmup_batches)
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
