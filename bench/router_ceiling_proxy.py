#!/usr/bin/env python3
"""Ceiling for the router-overhead figure: the least a Python hop between client and LLM server
can add on this machine. One aiohttp-on-uvloop handler that forwards an Ollama `/api/chat`
request upstream with `stream: true` (as citadeld always does), joins the NDJSON parts and
answers one JSON object: no validation, routing, breakers, metrics or logs. Whatever citadeld
adds beyond this is the cost of its own logic; this much is the cost of being a hop at all.

Run: ``python bench/router_ceiling_proxy.py --upstream URL --port 0``; prints
``LISTENING <port>``; exits when stdin closes (``--exit-on-stdin-eof``, as the fakes do).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import aiohttp
import orjson
from aiohttp import web


def build_app(upstream: str) -> web.Application:
    app = web.Application()

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession()

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def chat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        body["stream"] = True
        parts = []
        last: dict[str, object] = {}
        async with request.app["session"].post(
            upstream + "/api/chat", data=orjson.dumps(body),
            headers={"Content-Type": "application/json"},
        ) as resp:
            async for line in resp.content:
                last = orjson.loads(line)
                parts.append(last["message"]["content"])  # type: ignore[index]
        last["message"] = {"role": "assistant", "content": "".join(parts)}
        return web.Response(body=orjson.dumps(last), content_type="application/json")

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/api/chat", chat)
    return app


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(args.upstream), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    done = asyncio.Event()
    if args.exit_on_stdin_eof:
        loop = asyncio.get_running_loop()
        fd = sys.stdin.fileno()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(fd)
                done.set()

        loop.add_reader(fd, readable)
    await done.wait()
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--upstream", required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
