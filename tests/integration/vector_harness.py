"""In-process vector store + persistence for integration tests: the real VectorActor on an
embedded Qdrant directory, the real PersistenceActor on a real PostgreSQL, the real
VectorService, and a deterministic stand-in for the embedding service (no model needed)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from citadeld.actors.persistence import Persistence
from citadeld.actors.vector import VectorStore
from citadeld.errors import ModelNotFound
from citadeld.health import HealthState
from citadeld.storage.config import CollectionSpec, PersistenceConfig, VectorsConfig
from citadeld.storage.metrics import StorageMetrics
from citadeld.storage.service import VectorService
from citadeld.storage.spill import OutboxMarker

MODELS = {"mini": 8, "other": 16}
ALIASES = {"mini:latest": "mini"}


def hash_vector(text: str, dims: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    v = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEmbedding:
    """What VectorService needs of EmbeddingService: resolve, model_cfg, embed."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: Exception | None = None

    def resolve(self, model: str | None) -> str:
        if model is None:
            return "mini"
        name = ALIASES.get(model, model)
        if name not in MODELS:
            raise ModelNotFound(f"model {model!r} is not configured", param="model")
        return name

    def model_cfg(self, name: str) -> Any:
        return SimpleNamespace(dims=MODELS[name])

    async def embed(self, model: str | None, texts: list[str], **_: Any) -> Any:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        name = self.resolve(model)
        vecs = np.stack([hash_vector(t, MODELS[name]) for t in texts])
        return SimpleNamespace(model=name, vectors=vecs)


@dataclass
class Harness:
    service: VectorService
    store: VectorStore
    persistence: Persistence | None
    metrics: StorageMetrics
    embedding: FakeEmbedding
    health: HealthState
    fault: Path


@asynccontextmanager
async def harness(tmp_path: Path, dsn: str | None = None, *, timeout_s: float = 3.0,
                  **pers: Any) -> AsyncIterator[Harness]:
    fault = tmp_path / "qdrant.fault"
    vc = VectorsConfig(collections={"default": CollectionSpec(model="mini")},
                       fault_injection_file=str(fault), timeout_s=timeout_s, retry_after_s=2)
    metrics = StorageMetrics()
    health = HealthState()
    store = VectorStore(vc, str(tmp_path / "qdrant"))
    store.start_unsupervised()
    persistence = None
    if dsn is not None:
        pc = PersistenceConfig(dsn=dsn, instance="test", flush_interval_s=0.1,
                               timeout_s=3, connect_timeout_s=2, **pers)
        persistence = Persistence(pc, str(tmp_path), metrics, health)
        persistence.start_unsupervised()
        persistence.start()
    emb = FakeEmbedding()
    svc = VectorService(vc, store, persistence, metrics,
                        OutboxMarker(tmp_path / "outbox.pending"), embedding=emb,  # type: ignore[arg-type]
                        health=health)
    svc.start()
    await wait_for(lambda: svc.bootstrapped)
    try:
        yield Harness(svc, store, persistence, metrics, emb, health, fault)
    finally:
        await svc.close()
        if persistence is not None:
            await persistence.close()
        await store.close()


async def wait_for(pred: Any, within: float = 20.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(interval)
    raise AssertionError("condition not met in time")
