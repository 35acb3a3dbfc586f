"""The real citadeld process, spoken to by the official ollama and openai clients and raw HTTP,
in front of fake upstreams that return real all-MiniLM vectors."""

from __future__ import annotations

import time

import httpx
import numpy as np
import ollama
import openai
import pytest

from tests.e2e.conftest import Fake
from tests.support.daemon import DaemonProc

pytestmark = pytest.mark.e2e

CAT = "a cat sat on the mat"
KITTEN = "a kitten rested on the rug"
TAX = "quarterly tax filing deadline"


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_semantic(vectors: list[list[float]]) -> None:
    cat, kitten, tax = (np.asarray(v, dtype=np.float64) for v in vectors)
    assert cos(cat, kitten) > cos(cat, tax) + 0.2


@pytest.fixture(scope="module", autouse=True)
def _wait_models(daemon: DaemonProc) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        models = httpx.get(daemon.url + "/api/v1/status").json()["models"]
        if all(models[m]["ready"] for m in ("all-minilm", "minilm-openai", "flaky")):
            return
        time.sleep(0.2)
    pytest.fail("models never became ready")


def test_official_ollama_client(daemon: DaemonProc) -> None:
    client = ollama.Client(host=daemon.url, timeout=30)
    resp = client.embed(model="all-minilm", input=[CAT, KITTEN, TAX])
    assert resp.model == "all-minilm"
    assert len(resp.embeddings) == 3 and len(resp.embeddings[0]) == 384
    assert_semantic([list(v) for v in resp.embeddings])
    legacy = client.embeddings(model="all-minilm:latest", prompt=CAT)
    assert np.allclose(legacy.embedding, resp.embeddings[0], atol=1e-6)
    names = [m.model for m in client.list().models]
    assert "all-minilm:latest" in names
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="no-such-model", input="x")
    assert err.value.status_code == 404


def test_official_openai_client(daemon: DaemonProc) -> None:
    client = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0)
    # the SDK asks for base64 by default and decodes little-endian float32 itself
    resp = client.embeddings.create(model="minilm-openai", input=[CAT, KITTEN, TAX])
    assert resp.model == "minilm-openai"
    assert_semantic([d.embedding for d in resp.data])
    floats = client.embeddings.create(
        model="sentence-transformers/all-MiniLM-L6-v2", input=CAT, encoding_format="float"
    )
    assert floats.model == "all-minilm"
    assert cos(np.array(floats.data[0].embedding), np.array(resp.data[0].embedding)) > 0.999
    small = client.embeddings.create(model="all-minilm", input=CAT, dimensions=64)
    vec = np.array(small.data[0].embedding)
    assert vec.shape == (64,) and abs(np.linalg.norm(vec) - 1) < 1e-4
    assert resp.usage.prompt_tokens > 0
    ids = [m.id for m in client.models.list().data]
    assert {"all-minilm", "minilm-openai"} <= set(ids)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_native_route_and_cache(daemon: DaemonProc) -> None:
    body = {"texts": [CAT, "a text only this test uses", TAX]}
    first = httpx.post(daemon.url + "/api/v1/embed", json=body).json()
    assert first["model"] == "all-minilm" and first["dimensions"] == 384
    second = httpx.post(daemon.url + "/api/v1/embed", json=body).json()
    assert second["cached"] == [True, True, True]
    assert np.allclose(first["embeddings"], second["embeddings"], atol=1e-7)
    bypass = httpx.post(daemon.url + "/api/v1/embed", json={**body, "cache": False}).json()
    assert bypass["cached"] == [False, False, False]
    single = httpx.post(daemon.url + "/api/v1/embed", json={"text": KITTEN}).json()
    assert len(single["embeddings"]) == 1


def test_batches_reach_the_upstream_as_lists(daemon: DaemonProc, ollama_fake: Fake) -> None:
    ollama_fake.reset()
    texts = [f"batched sentence number {i} for the upstream" for i in range(40)]
    r = httpx.post(daemon.url + "/api/v1/embed", json={"texts": texts, "cache": False})
    assert r.status_code == 200
    sizes = ollama_fake.stats()["batch_sizes_by_route"]["/api/embed"]
    assert sum(sizes) == 40 and max(sizes) > 1


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/v1/embed", b"{broken", 400),
        ("/api/v1/embed", b"", 400),
        ("/api/v1/embed", b"[1, 2]", 400),
        ("/api/v1/embed", {"texts": []}, 400),
        ("/api/v1/embed", {"texts": ["ok", 5]}, 400),
        ("/api/v1/embed", {"texts": ["x"] * 10_000}, 400),
        ("/api/v1/embed", {"text": "x", "texts": ["y"]}, 400),
        ("/api/v1/embed", {"text": "x", "bogus": 1}, 400),
        ("/api/v1/embed", {"text": ""}, 400),
        ("/api/v1/embed", {"text": "x", "model": "nope"}, 404),
        ("/api/v1/embed", {"text": "x", "dimensions": 4096}, 400),
        ("/api/v1/embed", {"text": "x", "cache": "yes"}, 400),
        ("/v1/embeddings", {"input": [[1, 2, 3]], "model": "all-minilm"}, 400),
        ("/v1/embeddings", {"input": 5, "model": "all-minilm"}, 400),
        ("/v1/embeddings", {"model": "all-minilm"}, 400),
        ("/v1/embeddings", {"input": "x", "model": "all-minilm", "encoding_format": "hex"}, 400),
        ("/v1/embeddings", {"input": "x", "model": "nope"}, 404),
        ("/api/embed", {"input": "x"}, 400),
        ("/api/embed", {"model": "nope", "input": "x"}, 404),
        ("/api/embed", {"model": "all-minilm", "input": [1]}, 400),
        ("/api/embeddings", {"model": "all-minilm", "prompt": 3}, 400),
    ],
)
def test_bad_input_gets_a_clear_4xx_in_dialect(
    daemon: DaemonProc, path: str, body: object, status: int
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(daemon.url + path, content=body,
                       headers={"Content-Type": "application/json"})
    else:
        r = httpx.post(daemon.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if path.startswith("/v1/"):
        assert {"message", "type", "param", "code"} <= set(err)
    elif path.startswith("/api/v1/"):
        assert {"code", "message", "request_id"} <= set(err)
        assert err["request_id"] == r.headers["X-Request-ID"]
    else:
        assert isinstance(err, str)
    assert "Traceback" not in r.text


def test_oversized_body_is_413(daemon: DaemonProc) -> None:
    big = b'{"text": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    r = httpx.post(daemon.url + "/v1/embeddings", content=big, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_route_and_method(daemon: DaemonProc) -> None:
    assert httpx.get(daemon.url + "/api/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(daemon.url + "/v1/embeddings")
    assert r.status_code == 405 and "type" in r.json()["error"]


@pytest.mark.parametrize(
    ("fault", "status", "retry_after"),
    [
        ({"error_status": 500}, 502, False),
        ({"error_status": 503, "retry_after": 3}, 503, True),
        ({"drop": True}, 503, True),
        ({"hang": True}, 504, False),
        ({"nan": True}, 502, False),
    ],
)
def test_backend_faults_map_to_clear_answers(
    daemon: DaemonProc, flaky_fake: Fake, fault: dict[str, object], status: int,
    retry_after: bool,
) -> None:
    flaky_fake.reset()
    flaky_fake.fault(route="/api/embed", **fault)
    try:
        t0 = time.monotonic()
        r = httpx.post(daemon.url + "/api/embed", timeout=30,
                       json={"model": "flaky", "input": [f"fault {fault}"]})
        assert r.status_code == status, r.text
        assert time.monotonic() - t0 < 10
        assert isinstance(r.json()["error"], str)
        assert ("Retry-After" in r.headers) == retry_after
    finally:
        flaky_fake.reset()
    # the daemon keeps serving everyone else, and the model itself recovers
    assert httpx.post(daemon.url + "/api/v1/embed", json={"text": "still fine"}).status_code == 200
    deadline = time.monotonic() + 15
    while True:
        r = httpx.post(daemon.url + "/api/embed", json={"model": "flaky", "input": ["again"]})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert r.status_code == 200, r.text


def test_fallback_model_names_itself(daemon: DaemonProc) -> None:
    r = httpx.post(daemon.url + "/api/v1/embed", json={"text": CAT, "model": "gone"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "all-minilm"


def test_health_and_metrics(daemon: DaemonProc) -> None:
    assert httpx.get(daemon.url + "/health/live").status_code == 200
    ready = httpx.get(daemon.url + "/health/ready")
    assert ready.status_code == 503  # "gone" can never embed
    assert ready.json()["models"] == {
        "all-minilm": True, "minilm-openai": True, "flaky": True, "gone": False
    }
    health = httpx.get(daemon.url + "/health").json()
    assert health["status"] == "degraded"
    detailed = httpx.get(daemon.url + "/health/detailed").json()
    deps = detailed["dependencies"]
    assert any(v["status"] == "down" for k, v in deps.items() if k.startswith("endpoint:"))
    assert deps["cache"]["status"] == "ok"
    assert {"p50", "p99", "max"} <= set(detailed["event_loop_lag_ms"])
    text = httpx.get(daemon.url + "/metrics").text
    for name in ("citadel_http_requests_total", "citadel_embed_stage_seconds_bucket",
                 "citadel_embed_batch_size_bucket", "citadel_cache_hits_total",
                 "citadel_embed_queue_depth", "citadel_event_loop_lag_seconds_bucket",
                 "citadel_embed_backend_errors_total"):
        assert name in text
    for stage in ("queue", "batch", "backend", "cache"):
        assert f'stage="{stage}"' in text
    spec = httpx.get(daemon.url + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert httpx.get(daemon.url + "/docs").status_code == 200


def test_logs_are_json_lines_with_request_ids(daemon: DaemonProc) -> None:
    import json

    rid = "e2e-log-check-1"
    httpx.post(daemon.url + "/api/v1/embed", json={"text": "log me"},
               headers={"X-Request-ID": rid})
    deadline = time.monotonic() + 5  # lines are flushed in batches, at least twice a second
    while True:
        records = [json.loads(x) for x in daemon.logs().splitlines() if x.startswith("{")]
        if any(r.get("request_id") == rid and r.get("path") == "/api/v1/embed"
               for r in records):
            break
        assert time.monotonic() < deadline, "access line with the request id never appeared"
        time.sleep(0.1)


def test_heap_is_frozen_once_models_are_ready(daemon: DaemonProc) -> None:
    """After the models load, the long-lived heap is frozen for the garbage collector so a full
    collection no longer stops the loop for 100+ ms."""
    import json

    deadline = time.monotonic() + 10  # readiness is polled every 2 s
    while True:
        frozen = [json.loads(x) for x in daemon.logs().splitlines()
                  if x.startswith("{") and "heap frozen" in x]
        if frozen:
            break
        assert time.monotonic() < deadline, "the heap was never frozen"
    assert len(frozen) == 1
    assert frozen[0]["objects"] > 50_000


def test_work_of_disconnected_clients_is_dropped(daemon: DaemonProc, flaky_fake: Fake) -> None:
    """A caller that hangs up while its input waits for a batch costs no backend call."""
    import threading

    flaky_fake.reset()
    flaky_fake.fault(route="/api/embed", latency_ms=1200)
    done: dict[str, int] = {}

    def busy() -> None:  # occupies the model's only slot
        r = httpx.post(daemon.url + "/api/v1/embed", timeout=20,
                       json={"text": "keeps the slot busy", "model": "flaky", "cache": False})
        done["status"] = r.status_code

    try:
        t = threading.Thread(target=busy)
        t.start()
        time.sleep(0.3)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(daemon.url + "/api/v1/embed", timeout=0.3,
                       json={"text": "nobody waits for me", "model": "flaky", "cache": False})
        t.join(20)
        assert done.get("status") == 200
        time.sleep(0.5)
        assert flaky_fake.stats()["calls"].get("/api/embed") == 1
        text = httpx.get(daemon.url + "/metrics").text
        assert 'citadel_embed_items_total{model="flaky",outcome="abandoned"}' in text
    finally:
        flaky_fake.reset()
