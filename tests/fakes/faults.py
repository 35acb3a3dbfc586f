"""Fault injection and the server scaffolding shared by the Ollama and OpenAI fakes.

Both fakes must misbehave in exactly the same ways (slow, erroring, hanging, dropping, NaN,
broken streams) so that the daemon's resilience code is tested against one well-defined set of
failures, whatever dialect it speaks. This module holds that common part: the ``Faults`` state and
its ``/_fault`` control routes, the ``/_stats`` counters tests assert on, the cost model
(``base_ms + per_input_ms * n`` under a ``parallel``-sized gate with an optional ``max_queue``),
and the command line shared by ``python -m tests.fakes.ollama`` and ``...openai_compat``.

Control routes (never subject to faults, never counted):

- ``POST /_fault`` with a JSON object replaces the whole fault state (unset keys take defaults);
  ``GET /_fault`` shows it (with the remaining ``error_count``); ``POST /_fault/reset`` clears it.
  Any change releases requests held by ``hang`` / ``hang_after_headers``; they then carry on
  under the new state.
- ``GET /_stats`` → calls per route, embed batch sizes, concurrency; ``POST /_stats/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from aiohttp import web

from tests.fakes import minilm

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a project dependency
    orjson = None  # type: ignore[assignment]

log = logging.getLogger("tests.fakes")

BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Faults:
    """What the next matching requests should suffer; one state per fake server."""

    route: str | None = None  # path prefix such as "/api/embed"; None means every API route
    latency_ms: float = 0.0  # extra delay before the request is handled
    error_status: int | None = None  # answer this status, in the dialect's error envelope
    error_count: int | None = None  # for the next N matching calls; None means always
    error_message: str | None = None  # message for error_status and error_line_mid_stream
    retry_after: float | None = None  # seconds, sent as Retry-After with error_status
    hang: bool = False  # accept the request, answer nothing until the faults change
    drop: bool = False  # close the TCP connection without any response
    nan: bool = False  # first embedding's first value is NaN (literal ``NaN`` in JSON)
    drop_after_chunks: int | None = None  # streams: close the connection after N chunks
    error_line_mid_stream: int | None = None  # streams: error line after N chunks (true = 1)
    hang_after_headers: bool = False  # send 200 + headers, then hold the body

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Faults:
        """Validate strictly: a typo in a test's fault must fail loudly, not be ignored."""
        if not isinstance(data, Mapping):
            raise ValueError("fault body must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fault keys: {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for key, value in data.items():
            kw[key] = _check_fault_value(key, value)
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def applies(self, path: str) -> bool:
        return self.route is None or path.startswith(self.route)

    @property
    def error_armed(self) -> bool:
        return self.error_status is not None and (self.error_count is None or self.error_count > 0)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fault_value(key: str, value: Any) -> Any:
    if key in ("hang", "drop", "nan", "hang_after_headers"):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be a boolean")
        return value
    if key in ("route", "error_message"):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{key} must be a string or null")
        return value
    if key == "error_line_mid_stream" and isinstance(value, bool):
        return 1 if value else None
    if value is None and key != "latency_ms":
        return None
    if key in ("latency_ms", "retry_after"):
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must be a non-negative number")
        return float(value)
    if key == "error_status":
        if not _is_int(value) or not 400 <= value <= 599:
            raise ValueError("error_status must be an integer in 400..599")
        return value
    # error_count, drop_after_chunks, error_line_mid_stream
    if not _is_int(value) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer or null")
    return value


@dataclass
class Stats:
    """Counters tests assert on (batching, retries, concurrency)."""

    calls: Counter[str] = field(default_factory=Counter)  # per route, faulted calls included
    batch_sizes: list[int] = field(default_factory=list)  # embed requests that reached a handler
    batch_sizes_by_route: dict[str, list[int]] = field(default_factory=dict)
    faults_injected: Counter[str] = field(default_factory=Counter)
    busy_rejections: int = 0  # 503s from max_queue
    in_flight: int = 0  # requests inside the cost gate right now
    max_in_flight: int = 0

    def record_batch(self, route: str, size: int) -> None:
        self.batch_sizes.append(size)
        self.batch_sizes_by_route.setdefault(route, []).append(size)

    def reset(self) -> None:
        """Clear the counters in place (gates keep a reference); in_flight is live state."""
        self.calls.clear()
        self.batch_sizes.clear()
        self.batch_sizes_by_route.clear()
        self.faults_injected.clear()
        self.busy_rejections = 0
        self.max_in_flight = self.in_flight

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": dict(self.calls),
            "batch_sizes": list(self.batch_sizes),
            "batch_sizes_by_route": {k: list(v) for k, v in self.batch_sizes_by_route.items()},
            "faults_injected": dict(self.faults_injected),
            "busy_rejections": self.busy_rejections,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }


class HTTPError(Exception):
    """Raised by handlers; rendered in the dialect's error envelope by the middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


class Busy(HTTPError):
    def __init__(self) -> None:
        super().__init__(503, BUSY_MESSAGE, code="server_busy", headers={"Retry-After": "1"})


class Gate:
    """At most ``parallel`` calls at once (None = unlimited), like Ollama's OLLAMA_NUM_PARALLEL;
    more than ``max_queue`` waiting calls are refused, like OLLAMA_MAX_QUEUE."""

    def __init__(self, parallel: int | None, max_queue: int | None, stats: Stats) -> None:
        self.parallel = parallel
        self.max_queue = max_queue
        self.waiting = 0
        self._sem = asyncio.Semaphore(parallel) if parallel else None
        self._stats = stats

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        sem = self._sem
        if sem is not None:
            if sem.locked() and self.max_queue is not None and self.waiting >= self.max_queue:
                self._stats.busy_rejections += 1
                raise Busy()
            self.waiting += 1
            try:
                await sem.acquire()
            finally:
                self.waiting -= 1
        stats = self._stats
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            yield
        finally:
            stats.in_flight -= 1
            if sem is not None:
                sem.release()


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def dumps(obj: Any, *, allow_nan: bool = False) -> bytes:
    """orjson for speed, with float32 arrays written in shortest float32 form like Ollama's Go
    encoder; json.dumps when a NaN must reach the wire as the literal ``NaN`` (orjson would
    quietly write null, hiding the fault)."""
    if allow_nan or orjson is None:
        return json.dumps(obj, separators=(",", ":"), default=_default).encode()
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)


def words_chunks(text: str) -> list[str]:
    """Word-sized pieces that join back to exactly ``text``."""
    return re.findall(r"\S+\s*", text) or [text]


def content_text(content: Any) -> str:
    """Message content as text: a string, or OpenAI-style parts ``[{"type":"text","text":..}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class FakeServer:
    """aiohttp app with the shared control routes, fault middleware and cost model.

    Subclasses add their dialect's routes in ``add_routes`` and render errors in ``error_body``.
    """

    dialect = "base"
    stream_content_type = "application/octet-stream"

    def __init__(
        self,
        *,
        models: Iterable[str],
        chat_models: Iterable[str] = (),
        base_ms: float = 0.0,
        per_input_ms: float = 0.0,
        parallel: int | None = None,
        max_queue: int | None = None,
        chunk_delay_ms: float = 0.0,
        fake_vectors: bool | None = None,
        vectors: minilm.MiniLM | None = None,
        context: Mapping[str, int] | None = None,
        faults: Faults | Mapping[str, Any] | None = None,
    ) -> None:
        self.embed_models = [self.canonical(m) for m in models]
        self.chat_models = [self.canonical(m) for m in chat_models]
        self.base_ms = base_ms
        self.per_input_ms = per_input_ms
        self.parallel = parallel if parallel else None
        self.max_queue = max_queue
        self.chunk_delay_ms = chunk_delay_ms
        self.context = {self.canonical(k): v for k, v in (context or {}).items()}
        default = minilm.get_default()
        if vectors is not None:
            self.vectors = vectors
        elif fake_vectors is None or fake_vectors == default.fake_vectors:
            self.vectors = default  # shared: the model loads once per process
        else:
            self.vectors = minilm.MiniLM(fake_vectors=fake_vectors)
        if faults is None:
            self.faults = Faults()
        elif isinstance(faults, Faults):
            self.faults = faults
        else:
            self.faults = Faults.from_json(faults)
        self.stats = Stats()
        self.started_at = time.time()
        self._release = asyncio.Event()
        self._stopping = False
        self._embed_gate: Gate | None = None
        self._chat_gate: Gate | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._host = "127.0.0.1"
        self.app = web.Application(middlewares=[self._middleware], client_max_size=256 * 2**20)
        r = self.app.router
        r.add_post("/_fault", self._set_fault)
        r.add_get("/_fault", self._get_fault)
        r.add_post("/_fault/reset", self._reset_fault)
        r.add_get("/_stats", self._get_stats)
        r.add_post("/_stats/reset", self._reset_stats)
        self.add_routes(r)

    # ----- to override -------------------------------------------------------------------
    def add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def error_body(self, err: HTTPError) -> dict[str, Any]:
        raise NotImplementedError

    def canonical(self, model: str) -> str:
        return model

    async def precheck(self, request: web.Request) -> None:
        """Dialect checks that run before every API handler (e.g. the OpenAI API key)."""

    # ----- lifecycle -----------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind and serve on the running loop; returns the bound port (port=0 picks one)."""
        # Gates hold loop-bound primitives: create them on the loop that serves.
        self._embed_gate = Gate(self.parallel, self.max_queue, self.stats)
        self._chat_gate = Gate(self.parallel, self.max_queue, self.stats)
        self._release = asyncio.Event()
        self._stopping = False
        # handler_cancellation: a client that gives up on a hung request frees its handler.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = int(self._runner.addresses[0][1])
        return self._port

    async def stop(self) -> None:
        self._stopping = True  # held requests go on rather than wait for the shutdown timeout
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def __aenter__(self) -> FakeServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- faults ---------------------------------------------------------------------------
    def set_faults(self, faults: Faults | Mapping[str, Any] | None = None, **kw: Any) -> None:
        """Replace the fault state (in-process equivalent of ``POST /_fault``)."""
        if faults is None:
            faults = Faults.from_json(kw)
        elif not isinstance(faults, Faults):
            faults = Faults.from_json({**faults, **kw})
        self.faults = faults
        self._release.set()
        self._release = asyncio.Event()

    def reset_faults(self) -> None:
        self.set_faults(Faults())

    def fault(self, request: web.Request) -> Faults | None:
        """The fault state if it applies to this request's path."""
        f = self.faults
        return f if f.applies(request.path) else None

    async def _hold(self, request: web.Request, flag: str) -> None:
        """Wait while ``flag`` is set for this path; a fault change or stop() releases us, and a
        client disconnect cancels us (handler_cancellation)."""
        counted = False
        while True:
            f = self.fault(request)
            if f is None or not getattr(f, flag) or self._stopping:
                return
            if not counted:
                self.stats.faults_injected[flag] += 1
                counted = True
            await self._release.wait()

    def _drop(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.close()
        # Nothing reaches the client: the transport is closed before any byte of the answer.
        return web.Response(status=500)

    # ----- middleware -------------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/_"):
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        self.stats.calls[route] += 1
        try:
            await self._hold(request, "hang")
            f = self.fault(request)
            if f is not None and f.latency_ms:
                await asyncio.sleep(f.latency_ms / 1000)
            f = self.fault(request)
            if f is not None and f.drop:
                self.stats.faults_injected["drop"] += 1
                return self._drop(request)
            if f is not None and f.error_armed:
                assert f.error_status is not None
                if f.error_count is not None:
                    f.error_count -= 1
                self.stats.faults_injected["error_status"] += 1
                headers = {}
                if f.retry_after is not None:
                    headers["Retry-After"] = fmt_seconds(f.retry_after)
                msg = f.error_message or f"injected fault: HTTP {f.error_status}"
                raise HTTPError(f.error_status, msg, code="injected_fault", headers=headers)
            await self.precheck(request)
            return await handler(request)
        except HTTPError as err:
            return web.Response(
                status=err.status,
                body=dumps(self.error_body(err)),
                content_type="application/json",
                headers=err.headers,
            )

    # ----- helpers for dialect handlers -------------------------------------------------------
    async def read_json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"invalid JSON body: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object", code="invalid_json")
        return body

    def context_of(self, model: str) -> int:
        return self.context.get(self.canonical(model), 2048)

    async def embed_vectors(
        self, request: web.Request, route: str, texts: list[str], dimensions: int | None = None
    ) -> np.ndarray:
        """The cost model: one gate slot for ``base_ms + per_input_ms * n``, with the vectors
        computed in a thread meanwhile so the model never blocks this loop."""
        self.stats.record_batch(route, len(texts))
        assert self._embed_gate is not None
        cost = (self.base_ms + self.per_input_ms * len(texts)) / 1000
        loop = asyncio.get_running_loop()
        async with self._embed_gate.slot():
            _, vecs = await asyncio.gather(
                asyncio.sleep(cost), loop.run_in_executor(None, self.vectors.embed_array, texts)
            )
        if dimensions is not None and 0 < dimensions < vecs.shape[1]:
            vecs = vecs[:, :dimensions].copy()
            norms = np.linalg.norm(vecs, axis=1, keepdims=True)
            vecs /= np.where(norms == 0, 1, norms)
        f = self.fault(request)
        if f is not None and f.nan and len(vecs):
            self.stats.faults_injected["nan"] += 1
            vecs[0, 0] = np.nan
        return vecs

    def chat_slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Chat/generate have their own gate: in Ollama each loaded model has its own runner,
        so a long chat stream does not stall embeddings."""
        assert self._chat_gate is not None
        return self._chat_gate.slot()

    async def respond(
        self, request: web.Request, obj: Any, *, status: int = 200, allow_nan: bool = False
    ) -> web.StreamResponse:
        """A JSON answer, honouring ``hang_after_headers``."""
        body = dumps(obj, allow_nan=allow_nan)
        f = self.fault(request)
        if f is None or not f.hang_after_headers:
            return web.Response(status=status, body=body, content_type="application/json")
        resp = web.StreamResponse(status=status)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        await self._hold(request, "hang_after_headers")
        await resp.write(body)
        await resp.write_eof()
        return resp

    async def stream(
        self, request: web.Request, chunks: list[bytes], error_chunk: Callable[[str], bytes]
    ) -> web.StreamResponse:
        """Stream pre-encoded chunks with ``chunk_delay_ms`` between them, honouring
        ``hang_after_headers``, ``drop_after_chunks`` and ``error_line_mid_stream``
        (N counts every chunk sent, final ones included)."""
        resp = web.StreamResponse(status=200)
        resp.content_type = self.stream_content_type
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)
        await self._hold(request, "hang_after_headers")
        delay = self.chunk_delay_ms / 1000
        for i, chunk in enumerate(chunks):
            f = self.fault(request)
            if f is not None and f.error_line_mid_stream == i:
                self.stats.faults_injected["error_line_mid_stream"] += 1
                msg = f.error_message or "injected fault: error mid-stream"
                await resp.write(error_chunk(msg))
                await resp.write_eof()
                return resp
            if f is not None and f.drop_after_chunks == i:
                self.stats.faults_injected["drop_after_chunks"] += 1
                self._drop(request)
                return resp
            if delay and i:
                await asyncio.sleep(delay)
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    # ----- control routes -----------------------------------------------------------------
    async def _set_fault(self, request: web.Request) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
            self.set_faults(Faults.from_json(body))
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        log.info("%s fake faults: %s", self.dialect, self.faults)
        return web.json_response(self.faults.to_json())

    async def _get_fault(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_json())

    async def _reset_fault(self, request: web.Request) -> web.Response:
        self.reset_faults()
        return web.json_response(self.faults.to_json())

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def _reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.json_response(self.stats.to_json())


# ----- command line ------------------------------------------------------------------------------


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _context(value: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in _csv(value):
        name, _, n = item.partition("=")
        if not n:
            raise argparse.ArgumentTypeError(f"expected name=tokens, got {item!r}")
        out[name] = int(n)
    return out


def build_parser(
    prog: str, description: str, *, parallel: int, models: str, chat_models: str
) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--base-ms", type=float, default=0.0, help="fixed cost of each embed call")
    p.add_argument("--per-input-ms", type=float, default=0.0, help="extra cost per input")
    p.add_argument(
        "--parallel", type=int, default=parallel, help="max concurrent calls; 0 = unlimited"
    )
    p.add_argument("--max-queue", type=int, default=None, help="503 beyond N waiting calls")
    p.add_argument("--models", type=_csv, default=_csv(models), help="embedding models")
    p.add_argument("--chat-models", type=_csv, default=_csv(chat_models), help="chat models")
    p.add_argument("--context", type=_context, default={}, help="per model, e.g. all-minilm=256")
    p.add_argument("--chunk-delay-ms", type=float, default=0.0, help="delay between chunks")
    p.add_argument(
        "--fake-vectors",
        choices=["hash", "model"],
        default=None,
        help="hash: pseudo-random unit vectors, no model CPU (default: $FAKE_VECTORS)",
    )
    p.add_argument("--fault", type=json.loads, default=None, help="initial /_fault JSON body")
    p.add_argument("--no-preload", action="store_true", help="load the model on first use")
    p.add_argument(
        "--exit-on-stdin-eof",
        action="store_true",
        help="exit when stdin closes, so a killed parent leaves no orphan (tests.fakes.process)",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def common_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    fake_vectors = None if args.fake_vectors is None else args.fake_vectors == "hash"
    return {
        "models": args.models,
        "chat_models": args.chat_models,
        "base_ms": args.base_ms,
        "per_input_ms": args.per_input_ms,
        "parallel": args.parallel or None,
        "max_queue": args.max_queue,
        "chunk_delay_ms": args.chunk_delay_ms,
        "fake_vectors": fake_vectors,
        "context": args.context or None,
        "faults": args.fault,
    }


def watch_stdin(loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
    """Stop when stdin reaches EOF: the parent holding the pipe has exited, even if killed.
    A loop reader, not a thread: a daemon thread blocked in stdin aborts interpreter exit."""
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            done.set()

    loop.add_reader(fd, on_readable)


async def _serve(make: Callable[[], FakeServer], args: argparse.Namespace) -> None:
    server = make()
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    if args.exit_on_stdin_eof:
        watch_stdin(loop, done)
    if not args.no_preload:
        await loop.run_in_executor(None, server.vectors.load)
    for sig in (signal.SIGTERM, signal.SIGINT):  # before LISTENING: a stop may follow at once
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, done.set)
    bound = await server.start(args.host, args.port)
    print(f"LISTENING {bound}", flush=True)
    await done.wait()
    await server.stop()


def run_cli(make: Callable[[], FakeServer], args: argparse.Namespace) -> None:
    """Serve until SIGTERM/SIGINT, under uvloop when it is installed."""
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    coro = _serve(make, args)
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)
    # Interpreter finalization with torch loaded takes seconds and there is nothing left to
    # clean up: stop promptly so test teardowns stay fast.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
