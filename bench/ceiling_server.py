#!/usr/bin/env python3
"""Ceiling for the cache-hit figure: the fastest an aiohttp-on-uvloop handler answering an
embedding of citadeld's size can go on this machine.

It does the unavoidable part of citadeld's cache-hit path and nothing else: read the body, parse
the JSON, serialise a 384-float answer shaped like citadeld's native ``/api/v1/embed`` answer
(same keys, a 32-hex request id, float32 values printed by orjson), so the byte counts match. The
vector is precomputed; serialisation is not, because citadeld serialises on every request too.
Whatever citadeld adds on top (routing, validation, cache lookup, metrics, logging) is what the
ratio to this ceiling measures.

Run: ``python bench/ceiling_server.py --port 0``; prints ``LISTENING <port>`` once bound. It
takes ``--exit-on-stdin-eof`` like the fakes, so ``tests.fakes.process.start_fake`` can run it and
a killed benchmark leaves no orphan behind.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys

import numpy as np
import orjson
from aiohttp import web

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from tests.fakes.faults import watch_stdin  # noqa: E402

DIMS = 384


def make_vector(dims: int = DIMS) -> np.ndarray:
    """A fixed unit vector with the value spread of real MiniLM output (same printed length)."""
    v = np.random.default_rng(384).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


def build_app(dims: int = DIMS) -> web.Application:
    vector = make_vector(dims)
    ids = itertools.count(1)

    async def embed(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        rid = f"{next(ids):032x}"
        answer = {
            "model": body.get("model") or "all-minilm",
            "dimensions": dims,
            "embeddings": [vector],
            "cached": [True],
            "usage": {"tokens": 0, "cached": 1},
            "request_id": rid,
        }
        return web.Response(
            body=orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY),
            content_type="application/json",
            headers={"X-Request-ID": rid},
        )

    app = web.Application()
    app.router.add_post("/api/v1/embed", embed)
    return app


async def serve(host: str, port: int, dims: int, exit_on_stdin_eof: bool = False) -> None:
    runner = web.AppRunner(build_app(dims), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if exit_on_stdin_eof:
        watch_stdin(loop, stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="aiohttp ceiling server for the cache-hit figure")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--dims", type=int, default=DIMS)
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="exit when stdin closes")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.host, args.port, args.dims, args.exit_on_stdin_eof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
