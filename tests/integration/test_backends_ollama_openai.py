"""HTTP backends against the fake upstreams (tests/fakes), and EmbedderActor's reply contract.

Backends are synchronous, so each fake serves from its own event loop in a background thread
and faults are injected over its `/_fault` API, as a test against a real server would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import httpx
import numpy as np
import pykka
import pytest

from citadeld.actors.backends.base import BatchResult, EmbeddingBackend
from citadeld.actors.backends.ollama import OllamaBackend, distribute_tokens, parse_retry_after
from citadeld.actors.backends.openai_compat import OpenAICompatBackend
from citadeld.actors.embedder import EmbedBatch, EmbedderActor, Probe
from citadeld.config import EndpointConfig, ModelConfig
from citadeld.errors import BackendError
from citadeld.supervision import ChildSpec, Supervisor
from tests.fakes import minilm
from tests.fakes.faults import FakeServer
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai_compat import FakeOpenAI

CAT = "a cat sat on the mat"
KITTEN = "a kitten rested on the rug"
TAX = "quarterly tax filing deadline"
TOO_LONG = "word " * 300  # the fakes' all-minilm accepts 256 (words stand for tokens)


class LoopThread:
    """An event loop in a daemon thread, for async fakes driven by sync code."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Upstream:
    """One running fake plus helpers to fault it and to build backends pointing at it."""

    def __init__(self, dialect: str, server: FakeServer, lt: LoopThread) -> None:
        self.dialect = dialect
        self.server = server
        self.lt = lt
        self.url = server.url

    def fault(self, **kw: Any) -> None:
        httpx.post(f"{self.url}/_fault", json=kw).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fault/reset").raise_for_status()
        httpx.post(f"{self.url}/_stats/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = httpx.get(f"{self.url}/_stats").json()
        return out

    def backend(
        self, model_name: str = "all-minilm", url: str | None = None, **cfg: Any
    ) -> EmbeddingBackend:
        return make_backend(self.dialect, url or self.url, model_name, **cfg)


def make_backend(dialect: str, url: str, model_name: str, **cfg: Any) -> EmbeddingBackend:
    endpoint = EndpointConfig(url=url)
    fields: dict[str, Any] = {"dims": 384, "max_context": 256, "timeout_s": 10.0, **cfg}
    if dialect == "ollama":
        model = ModelConfig(backend="ollama", endpoints=(endpoint,), **fields)
        return OllamaBackend(endpoint, model, model_name)
    model = ModelConfig(backend="openai", endpoints=(endpoint,), **fields)
    return OpenAICompatBackend(endpoint, model, model_name)


def _make_fake(dialect: str) -> FakeServer:
    if dialect == "ollama":
        return FakeOllama(models=("all-minilm",))
    return FakeOpenAI(models=("all-minilm",))


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module", params=["ollama", "openai"])
def upstream_server(request: pytest.FixtureRequest, loop_thread: LoopThread) -> Iterator[Upstream]:
    dialect: str = request.param

    async def start() -> FakeServer:
        server = _make_fake(dialect)
        await asyncio.get_running_loop().run_in_executor(None, server.vectors.load)
        await server.start("127.0.0.1", 0)
        return server

    server = loop_thread.run(start())
    yield Upstream(dialect, server, loop_thread)
    loop_thread.run(server.stop())


@pytest.fixture
def up(upstream_server: Upstream) -> Iterator[Upstream]:
    upstream_server.reset()
    yield upstream_server
    upstream_server.reset()  # also releases anything a test left hanging


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- backends -------------------------------------------------------------------------------


def test_batch_returns_the_right_vectors_in_one_call(up: Upstream) -> None:
    b = up.backend()
    try:
        r = b.embed([CAT, KITTEN, TAX], truncate=True)
    finally:
        b.close()
    assert r.errors == {}
    assert r.vectors.shape == (3, 384) and r.vectors.dtype == np.float32
    ref = minilm.get_default().embed_array([CAT, KITTEN, TAX])
    for got, want in zip(r.vectors, ref, strict=True):
        assert cosine(got, want) > 0.9999
    np.testing.assert_allclose(np.linalg.norm(r.vectors, axis=1), 1.0, atol=1e-5)
    if not minilm.get_default().fake_vectors:
        assert cosine(r.vectors[0], r.vectors[1]) > cosine(r.vectors[0], r.vectors[2])
    assert r.tokens == [minilm.approx_tokens(t) for t in (CAT, KITTEN, TAX)]
    assert up.stats()["batch_sizes"] == [3]


def test_connection_refused_is_connect(up: Upstream) -> None:
    b = up.backend(url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    assert info.value.kind == "connect" and info.value.retryable
    with pytest.raises(BackendError) as info:
        b.probe()
    assert info.value.kind == "connect"
    b.close()


@pytest.mark.parametrize("status", [503, 429])
def test_overload_status_carries_retry_after(up: Upstream, status: int) -> None:
    up.fault(error_status=status, retry_after=7, error_message="busy")
    b = up.backend()
    with pytest.raises(BackendError) as info:
        b.embed([CAT, TAX], truncate=True)
    b.close()
    err = info.value
    assert (err.kind, err.status, err.retry_after) == ("status", status, 7.0)
    assert "busy" in err.message


def test_one_off_server_error_then_recovery(up: Upstream) -> None:
    up.fault(error_status=500, error_count=1)
    b = up.backend()
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    assert (info.value.kind, info.value.status, info.value.retry_after) == ("status", 500, None)
    assert b.embed([CAT], truncate=True).errors == {}
    b.close()


@pytest.mark.parametrize("fault", ["hang", "hang_after_headers"])
def test_hang_times_out_within_the_configured_timeout(up: Upstream, fault: str) -> None:
    up.fault(**{fault: True})
    b = up.backend(timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    elapsed = time.monotonic() - started
    b.close()
    assert info.value.kind == "timeout"
    assert 0.4 < elapsed < 2.5


def test_dropped_connection_is_connect(up: Upstream) -> None:
    up.fault(drop=True)
    b = up.backend()
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    b.close()
    assert info.value.kind == "connect"


def test_nan_fails_only_its_item(up: Upstream) -> None:
    up.fault(nan=True)
    b = up.backend()
    r = b.embed([CAT, KITTEN, TAX], truncate=True)
    b.close()
    assert set(r.errors) == {0}
    assert r.errors[0].kind == "protocol"
    assert np.isfinite(r.vectors).all()
    ref = minilm.get_default().embed_array([KITTEN, TAX])
    assert cosine(r.vectors[1], ref[0]) > 0.9999 and cosine(r.vectors[2], ref[1]) > 0.9999


def test_too_long_without_truncate_fails_alone(up: Upstream) -> None:
    b = up.backend()
    texts = [CAT, KITTEN, TOO_LONG, TAX, "one more", "and another"]
    r = b.embed(texts, truncate=False)
    assert set(r.errors) == {2}
    err = r.errors[2]
    assert err.kind == "client" and not err.retryable
    ok = [t for t in texts if t != TOO_LONG]
    ref = minilm.get_default().embed_array(ok)
    for got, want in zip(np.delete(r.vectors, 2, axis=0), ref, strict=True):
        assert cosine(got, want) > 0.9999
    assert r.tokens[2] == 0 and all(r.tokens[i] > 0 for i in (0, 1, 3, 4, 5))
    # Bisection: far fewer calls than one per item plus the first.
    assert sum(up.stats()["calls"].values()) <= 1 + 2 * 3
    # With truncation the same batch succeeds whole (one call).
    assert b.embed(texts, truncate=True).errors == {}
    b.close()


def test_unknown_model_is_status_404(up: Upstream) -> None:
    b = up.backend(model_name="no-such-model")
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    assert (info.value.kind, info.value.status) == ("status", 404)
    if up.dialect == "ollama":  # OpenAI-compatible servers serve one model: nothing to list
        with pytest.raises(BackendError) as info:
            b.probe()
        assert (info.value.kind, info.value.status) == ("status", 404)
    b.close()


def test_wrong_dims_is_protocol(up: Upstream) -> None:
    b = up.backend(dims=768)
    with pytest.raises(BackendError) as info:
        b.embed([CAT], truncate=True)
    b.close()
    assert info.value.kind == "protocol"


def test_probe_warm_and_empty_batch(up: Upstream) -> None:
    b = up.backend()
    b.probe()
    b.warm()
    assert b.embed([], truncate=True).vectors.shape == (0, 384)
    b.close()


def test_helpers() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    tokens = distribute_tokens(100, ["a b c", "d", "e f g h i j k"])
    assert sum(tokens) == 100 and tokens[2] > tokens[0] > tokens[1]
    assert distribute_tokens(None, ["a b", ""]) == [4, 2]


# ---- EmbedderActor ---------------------------------------------------------------------------


class DoubleBackend:
    """Test double of our backend interface: records calls, raises `exc` when set."""

    name = "double"

    def __init__(self, exc: BaseException | None = None) -> None:
        self.exc = exc
        self.calls: list[list[str]] = []
        self.closed = False

    def embed(self, texts: list[str], truncate: bool) -> BatchResult:
        self.calls.append(texts)
        if self.exc is not None:
            raise self.exc
        return BatchResult(np.ones((len(texts), 4), np.float32), [1] * len(texts))

    def probe(self) -> None:
        if self.exc is not None:
            raise self.exc

    def warm(self) -> None:
        raise RuntimeError("warming is best effort: this must not crash the actor")

    def close(self) -> None:
        self.closed = True


def send(ref: pykka.ActorRef[Any], texts: list[str]) -> concurrent.futures.Future[BatchResult]:
    reply: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
    ref.tell(EmbedBatch(texts, True, reply, 1))
    return reply


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_actor_resolves_replies_against_the_fake(up: Upstream) -> None:
    ref = EmbedderActor.start(lambda: up.backend())
    try:
        result = send(ref, [CAT, TAX]).result(10)
        assert result.vectors.shape == (2, 384) and result.errors == {}
        up.fault(error_status=503, retry_after=2)
        err = send(ref, [CAT]).exception(10)
        assert isinstance(err, BackendError) and (err.kind, err.retry_after) == ("status", 2.0)
        assert err.endpoint and up.dialect in err.endpoint
        up.reset()
        probe = Probe()
        ref.tell(probe)
        assert probe.reply.result(10) is None
        assert send(ref, [KITTEN]).result(10).errors == {}  # a BackendError is no crash
        assert ref.is_alive()
    finally:
        ref.stop()


def test_actor_starts_while_the_upstream_is_down(up: Upstream) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    ref = EmbedderActor.start(lambda: up.backend(url=url))  # warms on start: fails quietly
    try:
        err = send(ref, [CAT]).exception(10)
        assert isinstance(err, BackendError) and err.kind == "connect"
        assert ref.is_alive()
    finally:
        ref.stop()


def test_actor_bug_fails_the_reply_and_the_supervisor_restarts_it() -> None:
    backends: list[DoubleBackend] = []
    refs: list[pykka.ActorRef[Any]] = []

    def factory() -> EmbeddingBackend:
        backends.append(DoubleBackend(RuntimeError("bug in the backend")))
        return backends[-1]

    sup = Supervisor(
        "embedders",
        [ChildSpec("e0", lambda link: EmbedderActor.start(factory, link=link), refs.append)],
        backoff_min=0.01,
        backoff_max=0.05,
    )
    sup.start().result(5)
    try:
        wait_for(lambda: len(refs) == 1, "first start")
        err = send(refs[0], [CAT]).exception(5)
        assert isinstance(err, RuntimeError) and "bug" in str(err)
        wait_for(lambda: len(refs) == 2 and refs[1].is_alive(), "restart")
        assert not refs[0].is_alive()
        assert backends[0].closed, "a crashed actor closes its backend"
        backends[1].exc = None
        assert send(refs[1], [CAT, TAX]).result(5).vectors.shape == (2, 4)
    finally:
        sup.stop().result(10)
    assert backends[1].closed


def test_actor_skips_a_batch_whose_caller_cancelled() -> None:
    backend = DoubleBackend()
    ref = EmbedderActor.start(lambda: backend, warm_on_start=False)
    try:
        cancelled: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
        cancelled.cancel()
        ref.tell(EmbedBatch(["gone"], True, cancelled, 1))
        assert send(ref, ["kept"]).result(5).tokens == [1]
        assert backend.calls == [["kept"]]
    finally:
        ref.stop()


def test_fail_in_hand_reports_died_once() -> None:
    actor = EmbedderActor(lambda: DoubleBackend())
    reply: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
    actor.current_work = EmbedBatch([CAT], True, reply, 7)
    actor.fail_in_hand(RuntimeError("thread blew up"))
    err = reply.exception(0)
    assert isinstance(err, BackendError) and err.kind == "died"
    actor.fail_in_hand(RuntimeError("again"))  # already resolved: ignored, no InvalidStateError
    assert reply.exception(0) is err


def test_openai_api_key_is_sent(loop_thread: LoopThread) -> None:
    async def start() -> FakeServer:
        server = FakeOpenAI(models=("all-minilm",), api_key="s3cret")
        await server.start("127.0.0.1", 0)
        return server

    server = loop_thread.run(start())
    try:
        endpoint = EndpointConfig(url=server.url, api_key="s3cret")
        model = ModelConfig(backend="openai", dims=384, endpoints=(endpoint,))
        good = OpenAICompatBackend(endpoint, model, "all-minilm")
        good.probe()
        assert good.embed([CAT], truncate=True).errors == {}
        good.close()
        bad = make_backend("openai", server.url, "all-minilm")
        with pytest.raises(BackendError) as info:
            bad.embed([CAT], truncate=True)
        bad.close()
        assert (info.value.kind, info.value.status) == ("status", 401)
        assert "Incorrect API key" in info.value.message
    finally:
        loop_thread.run(server.stop())
