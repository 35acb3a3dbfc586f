"""EmbedderPool: batching, dedup, dropped callers, admission control, endpoint fallback, actor
death. Real EmbedderActors under the real Supervisor; the backend is a test double of OUR
backend interface (the upstream fakes are exercised in the integration and e2e tests)."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pykka
import pytest

from citadeld.actors.backends.base import BatchResult
from citadeld.actors.embedder import EmbedderActor
from citadeld.actors.embedder_pool import EmbedderPool
from citadeld.config import BatchConfig, EndpointConfig, ModelConfig
from citadeld.errors import BackendError, ItemError, Overloaded, Unavailable
from citadeld.metrics import Metrics
from citadeld.supervision import ChildLink, ChildSpec, Supervisor


class ScriptedBackend:
    """Records every batch; vectors encode the text's length so results are checkable."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self.delay = delay
        self.batches: list[list[str]] = []
        self.fail_with: BackendError | None = None
        self.crash_on: str | None = None
        self.bad_items: set[str] = set()
        self.release = threading.Event()
        self.release.set()

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        self.release.wait(10)
        if self.crash_on is not None and self.crash_on in texts:
            raise RuntimeError("bug in backend")
        self.batches.append(list(texts))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_with is not None:
            raise self.fail_with
        vecs = np.array([[len(t), 1.0, 0.0, 0.0] for t in texts], dtype=np.float32)
        errors = {
            i: BackendError("too long", kind="client") for i, t in enumerate(texts)
            if t in self.bad_items
        }
        return BatchResult(vecs, [len(t.split()) for t in texts], errors)

    def probe(self) -> None: ...

    def warm(self) -> None: ...

    def close(self) -> None: ...


def model_cfg(**batch: Any) -> ModelConfig:
    return ModelConfig(
        backend="ollama", dims=4, endpoints=(EndpointConfig(url="http://a"),),
        batch=BatchConfig(**{"max_items": 8, "max_wait_ms": 5, **batch}),
        queue_cap=64, attempts=2, timeout_s=5,
    )


@pytest.fixture(autouse=True)
def _stop_actors() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all()


async def make_pool(
    backends: list[ScriptedBackend], cfg: ModelConfig | None = None
) -> tuple[EmbedderPool, Supervisor]:
    cfg = cfg or model_cfg()
    loop = asyncio.get_running_loop()
    pool = EmbedderPool("m", cfg, [b.name for b in backends], Metrics(), loop)
    specs = []
    for i, backend in enumerate(backends):
        def start(link: ChildLink, b: ScriptedBackend = backend) -> Any:
            return EmbedderActor.start(backend_factory=lambda: b, warm_on_start=False, link=link)
        specs.append(ChildSpec(
            name=f"e{i}", start=start,
            on_started=functools.partial(pool.slot_started, i),
            on_died=functools.partial(pool.slot_died, i),
        ))
    sup = Supervisor("pool", specs, backoff_min=0.01, backoff_max=0.05)
    await asyncio.wrap_future(sup.start())
    deadline = time.monotonic() + 5
    while not pool.can_embed():
        assert time.monotonic() < deadline, "pool never became ready"
        await asyncio.sleep(0.01)
    return pool, sup


async def test_concurrent_requests_are_batched() -> None:
    b = ScriptedBackend("a", delay=0.02)
    pool, sup = await make_pool([b])
    texts = [f"text number {i}" for i in range(40)]
    results = await asyncio.gather(*(pool.embed([t], True) for t in texts))
    assert [int(r[0][0][0]) for r in results] == [len(t) for t in texts]
    sizes = [len(x) for x in b.batches]
    assert sum(sizes) == 40
    assert max(sizes) <= 8
    assert len(sizes) <= 8, f"expected few full batches, got {sizes}"
    await asyncio.wrap_future(sup.stop())


async def test_closed_loop_clients_keep_batches_full() -> None:
    """Sixteen clients that resubmit 0-7 ms after their answer (an HTTP round trip), one slot:
    leftovers that missed a batch must not be sent alone the moment the slot frees, or every
    batch alternates between two halves in steady state (figure 2's mean batch was 16 of 32)."""
    b = ScriptedBackend("a", delay=0.02)
    pool, sup = await make_pool([b], model_cfg(max_items=16, max_wait_ms=5))
    stop = time.monotonic() + 1.0

    async def client(c: int) -> None:
        n = 0
        while time.monotonic() < stop:
            await pool.embed([f"client {c} request {n}"], True)
            n += 1
            await asyncio.sleep((c % 8) / 1000)

    await asyncio.gather(*(client(c) for c in range(16)))
    sizes = [len(x) for x in b.batches[1:-1]]  # the first and the last batch are partial
    assert sizes, b.batches
    assert sum(sizes) / len(sizes) >= 10.5, f"batches were not kept full: {sizes}"  # was 8
    await asyncio.wrap_future(sup.stop())


async def test_lone_request_waits_at_most_max_wait() -> None:
    b = ScriptedBackend("a")
    pool, sup = await make_pool([b], model_cfg(max_wait_ms=30))
    t0 = time.monotonic()
    await pool.embed(["only one"], True)
    elapsed = time.monotonic() - t0
    assert 0.025 <= elapsed < 0.5
    await asyncio.wrap_future(sup.stop())


async def test_token_budget_splits_batches() -> None:
    b = ScriptedBackend("a")
    pool, sup = await make_pool([b], model_cfg(max_items=100, max_tokens=60))
    text = "x" * 200  # estimated 52 tokens each: one per batch under a 60-token budget
    await asyncio.gather(*(pool.embed([text + str(i)], True) for i in range(4)))
    assert [len(x) for x in b.batches] == [1, 1, 1, 1]
    await asyncio.wrap_future(sup.stop())


async def test_identical_inflight_texts_are_computed_once() -> None:
    b = ScriptedBackend("a")
    pool, sup = await make_pool([b], model_cfg(max_wait_ms=20))
    results = await asyncio.gather(*(pool.embed(["same text"], True) for _ in range(10)))
    assert len(results) == 10
    assert sum(x.count("same text") for x in b.batches) == 1
    await asyncio.wrap_future(sup.stop())


async def test_abandoned_inputs_are_not_computed() -> None:
    b = ScriptedBackend("a")
    b.release.clear()  # the first batch blocks, so later inputs wait in the queue
    pool, sup = await make_pool([b], model_cfg(max_items=1, max_wait_ms=0))
    first = asyncio.ensure_future(pool.embed(["first"], True))
    await asyncio.sleep(0.05)
    gone = asyncio.ensure_future(pool.embed(["caller left"], True))
    await asyncio.sleep(0.05)
    gone.cancel()
    kept = asyncio.ensure_future(pool.embed(["caller stayed"], True))
    await asyncio.sleep(0.02)
    b.release.set()
    await first
    await kept
    sent = [t for batch in b.batches for t in batch]
    assert "caller left" not in sent
    assert "caller stayed" in sent
    await asyncio.wrap_future(sup.stop())


async def test_queue_cap_answers_overloaded() -> None:
    b = ScriptedBackend("a")
    b.release.clear()
    cfg = model_cfg(max_items=1, max_wait_ms=0).model_copy(update={"queue_cap": 3})
    pool, sup = await make_pool([b], cfg)
    tasks = [asyncio.ensure_future(pool.embed([f"t{i}"], True)) for i in range(4)]
    await asyncio.sleep(0.05)  # one in flight, three queued: the cap is reached
    with pytest.raises(Overloaded) as err:
        await pool.embed(["one too many"], True)
    assert err.value.status == 429 and err.value.retry_after
    b.release.set()
    await asyncio.gather(*tasks)
    await asyncio.wrap_future(sup.stop())


async def test_failed_endpoint_falls_back_to_another() -> None:
    bad, good = ScriptedBackend("bad"), ScriptedBackend("good")
    bad.fail_with = BackendError("refused", kind="connect")
    pool, sup = await make_pool([bad, good])
    results = await asyncio.gather(*(pool.embed([f"t{i}"], True) for i in range(20)))
    assert len(results) == 20
    assert sum(len(x) for x in good.batches) == 20
    # the failed endpoint cools down instead of taking every next batch
    assert len(bad.batches) <= 2
    await asyncio.wrap_future(sup.stop())


async def test_all_endpoints_down_gives_unavailable_with_retry_after() -> None:
    b = ScriptedBackend("a")
    b.fail_with = BackendError("busy", kind="status", status=503, retry_after=0.05)
    pool, sup = await make_pool([b])
    with pytest.raises(Unavailable) as err:
        await pool.embed(["x"], True)
    assert err.value.retry_after is not None
    assert len(b.batches) == 2  # attempts=2, honouring the 50 ms Retry-After in between
    await asyncio.wrap_future(sup.stop())


async def test_bad_input_fails_alone() -> None:
    b = ScriptedBackend("a")
    b.bad_items = {"poison"}
    pool, sup = await make_pool([b], model_cfg(max_wait_ms=20))
    ok, bad = await asyncio.gather(
        pool.embed(["fine"], True), pool.embed(["poison"], True), return_exceptions=True
    )
    assert not isinstance(ok, BaseException)
    assert isinstance(bad, ItemError) and bad.index == 0
    assert len(b.batches) == 1  # they were batch-mates
    await asyncio.wrap_future(sup.stop())


async def test_crashed_actor_fails_over_and_is_restarted() -> None:
    a, c = ScriptedBackend("a"), ScriptedBackend("c")
    a.crash_on = "boom"
    c.crash_on = "boom"
    pool, sup = await make_pool([a, c], model_cfg(max_items=1))
    t0 = time.monotonic()
    with pytest.raises(Unavailable):  # the crash retries once on the other slot, crashes too
        await pool.embed(["boom"], True)
    assert time.monotonic() - t0 < 2.0, "callers of a dead actor must not hang"
    deadline = time.monotonic() + 5
    # the supervisor records a restart on its own thread: wait for both, then for the slots
    while not (all(s.alive for s in pool.slots)
               and sum(row["restarts"] for row in sup.snapshot()) == 2):
        assert time.monotonic() < deadline, f"crashed actors not restarted: {sup.snapshot()}"
        await asyncio.sleep(0.01)
    out = await pool.embed(["after the crash"], True)
    assert int(out[0][0][0]) == len("after the crash")
    await asyncio.wrap_future(sup.stop())
