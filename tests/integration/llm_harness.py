"""In-process harness for the LLM router tests: fake upstreams (tests/fakes) on the test's own
event loop, the real LLMRouter and Registry, and the real LLM routes behind the daemon's real
middleware in an aiohttp TestServer."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from citadeld.config import Config
from citadeld.health import HealthState
from citadeld.http import embed_routes, health_routes, llm_routes
from citadeld.http.app import core_middleware, install_core
from citadeld.llm.config import LLMConfig
from citadeld.llm.metrics import LLMMetrics
from citadeld.llm.registry import Registry
from citadeld.llm.router import LLMRouter
from citadeld.metrics import Metrics
from tests.fakes.faults import FakeServer
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_compat import FakeOpenAI

MODEL = "llama3.2"

FAST_BREAKER = {
    "window_size": 4, "minimum_calls": 2, "failure_rate_threshold": 50, "wait_open_s": 0.3,
    "wait_open_multiplier": 2.0, "wait_open_max_s": 2.0, "wait_open_jitter": 0.0,
    "half_open_calls": 1,
}


def dead_url() -> str:
    """A URL nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def fake(kind: str, **kw: Any) -> FakeServer:
    kw.setdefault("models", [])
    kw.setdefault("chat_models", [MODEL])
    kw.setdefault("fake_vectors", True)
    kw.setdefault("parallel", None)
    return FakeOllama(**kw) if kind == "ollama" else FakeOpenAI(**kw)


@dataclass
class Env:
    client: TestClient[web.Request, web.Application]
    router: LLMRouter
    registry: Registry
    metrics: Metrics
    fakes: dict[str, FakeServer]
    state: Any

    def breaker(self, name: str) -> str:
        return self.registry.states()[name].value

    def calls(self, name: str) -> int:
        stats = self.fakes[name].stats
        return sum(n for route, n in stats.calls.items() if route in (
            "/api/chat", "/api/generate", "/v1/chat/completions"))

    async def generate(self, prompt: str = "hello world", **kw: Any) -> Any:
        return await self.client.post("/api/v1/llm/generate",
                                      json={"model": MODEL, "prompt": prompt, **kw})


def server_entry(name: str, kind: str, url: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": kind, "url": url, "models": [MODEL], **kw}


@asynccontextmanager
async def llm_env(
    servers: list[tuple[str, str, FakeServer | str]],
    *,
    per_server: dict[str, dict[str, Any]] | None = None,
    **llm: Any,
) -> AsyncIterator[Env]:
    """`servers`: (name, kind, a fake to start or a URL); server order gives priority."""
    fakes: dict[str, FakeServer] = {}
    entries = []
    for i, (name, kind, target) in enumerate(servers):
        if isinstance(target, FakeServer):
            await target.start()
            fakes[name] = target
            url = target.url
        else:
            url = target
        extra = {"priority": i, "timeouts": {"connect_s": 1, "first_token_s": 2, "idle_s": 2,
                                             "total_s": 10}}
        extra.update((per_server or {}).get(name, {}))
        entries.append(server_entry(name, kind, url, **extra))
    llm.setdefault("breaker", FAST_BREAKER)
    routing = {"backoff_base_s": 0.0, **llm.pop("routing", {})}
    cfg = LLMConfig.model_validate({"servers": entries, "routing": routing, **llm})
    metrics = Metrics()
    registry = Registry(cfg)
    router = LLMRouter(cfg, registry, LLMMetrics(metrics.registry))
    config = Config(llm=cfg, server={"max_body_bytes": 64 * 1024})
    state = SimpleNamespace(config=config, metrics=metrics, draining=False, llm=router,
                            started_at=0.0, health=HealthState(), pools={}, supervisor=None,
                            cache=SimpleNamespace(stats=dict), extra={})
    app = web.Application(middlewares=[core_middleware],
                          client_max_size=config.server.max_body_bytes)
    install_core(app, state)  # type: ignore[arg-type]
    embed_routes.add_routes(app)
    llm_routes.add_routes(app)
    health_routes.add_routes(app)
    # like the daemon's runner: a client that goes away cancels its handler
    server = TestServer(app, handler_cancellation=True)
    client: TestClient[web.Request, web.Application] = TestClient(server)
    await client.start_server()
    try:
        yield Env(client, router, registry, metrics, fakes, state)
    finally:
        await client.close()
        for f in fakes.values():
            await f.stop()
