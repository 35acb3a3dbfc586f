"""In-process workflow services against real PostgreSQL and Redis, with LLM steps served by
the in-process Ollama fake: enough to run several engines ("daemons") in one test."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pykka
import redis

from citadeld.actors.persistence import Persistence
from citadeld.config import Config
from citadeld.health import HealthState
from citadeld.llm.wiring import build_llm
from citadeld.metrics import Metrics
from citadeld.security.principal import LOCAL
from citadeld.storage.metrics import StorageMetrics
from citadeld.workflows.runner import WorkflowActor
from citadeld.workflows.service import WorkflowService

REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_available() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def new_prefix() -> str:
    return f"citadel-test:wf:{uuid.uuid4().hex[:10]}:"


def drop_prefix(prefix: str) -> None:
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def llm_config(url: str, slow_url: str | None = None) -> dict[str, Any]:
    timeouts = {"connect_s": 1, "first_token_s": 5, "idle_s": 5, "total_s": 30}
    servers = [{"name": "fast", "kind": "ollama", "url": url, "models": ["llama3.2"],
                "timeouts": timeouts}]
    if slow_url is not None:
        servers.append({"name": "slow", "kind": "ollama", "url": slow_url,
                        "models": ["slow-model"], "timeouts": timeouts})
    return {"servers": servers}


@dataclass
class Node:
    """One "daemon": its service (loop side), its persistence and its runner actor."""

    svc: WorkflowService
    persistence: Persistence | None
    actor: Any

    async def submit(self, body: dict[str, Any]) -> str:
        rec = await self.svc.submit(body, LOCAL, None)
        return str(rec["id"])

    async def wait(self, wid: str, wait_s: float = 30.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + wait_s
        while True:
            rec = await self.svc.get(wid, LOCAL)
            if rec["status"] in ("completed", "failed", "cancelled"):
                return rec
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"workflow {wid} still {rec['status']}: {rec}")
            await asyncio.sleep(0.05)

    async def halt_runner(self) -> None:
        """Stop the runner without a verdict on what it holds (no grace): like a kill, its
        leases and stream entries are left behind. The API side keeps working."""
        engine = self.svc.engine
        assert engine is not None
        engine.request_stop()
        await asyncio.wrap_future(engine.finished)
        await asyncio.to_thread(lambda: self.actor.stop(block=True, timeout=10))
        self.svc.engine = None

    async def crash(self) -> None:
        await self.halt_runner()
        await self.stop()

    async def stop(self) -> None:
        await self.svc.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(lambda: self.actor.stop(block=True, timeout=10))
        if self.persistence is not None:
            await self.persistence.close()
        if self.svc.llm is not None:
            await self.svc.llm.close()


async def start_node(tmp: Path, *, dsn: str | None, redis_url: str | None, prefix: str,
                     instance: str, llm: dict[str, Any] | None = None,
                     **workflows: Any) -> Node:
    wf = {"key_prefix": prefix, "instance": instance, "redis_url": redis_url,
          "claim_timeout_s": 1.0, "retry_backoff_s": 0.05, "shutdown_grace_s": 0,
          **workflows}
    data: dict[str, Any] = {"workflows": wf, "state_dir": str(tmp / instance)}
    if dsn is not None:
        data["persistence"] = {"dsn": dsn, "instance": instance, "timeout_s": 3,
                               "connect_timeout_s": 2}
    if llm is not None:
        data["llm"] = llm
    cfg = Config.model_validate(data)
    metrics = Metrics()
    router = build_llm(cfg, metrics, HealthState())
    pers = None
    if dsn is not None:
        pers = Persistence(cfg.persistence, str(tmp / instance), StorageMetrics())
        pers.start_unsupervised()
    storage = SimpleNamespace(persistence=pers, service=None)
    svc = WorkflowService(cfg, metrics, storage, router)
    svc.attach(SimpleNamespace(embedding=None))  # type: ignore[arg-type]
    svc.start()
    actor = WorkflowActor.start(svc)
    for _ in range(200):  # the engine is up once it registered itself
        if svc.engine is not None:
            break
        await asyncio.sleep(0.01)
    return Node(svc, pers, actor)


def stop_all_actors() -> None:
    pykka.ActorRegistry.stop_all(block=False)
