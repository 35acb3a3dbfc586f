"""The real citadeld process with the vector store: the HTTP API in the native dialect, and the
three durability chaos tests (Qdrant outage, PostgreSQL outage, kill -9)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Fake
from tests.support.daemon import DaemonProc
from tests.support.pg import binaries_available, shared_available, temp_database
from tests.support.storage_chaos import (
    chaos_kill9,
    chaos_postgres,
    chaos_qdrant,
    daemon_config,
    start_daemon,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def hash_fake() -> Iterator[Fake]:
    """An Ollama fake with cheap hash vectors: these tests are about storage, not the model."""
    fake = Fake("ollama", "--fake-vectors", "hash", "--models", "all-minilm")
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, ollama_fake: Fake) -> Iterator[DaemonProc]:
    """Embedded Qdrant, no PostgreSQL (the embedded default), real MiniLM vectors."""
    d = start_daemon(daemon_config(ollama_fake.url, None, None),
                     tmp_path_factory.mktemp("vectors"))
    yield d
    assert d.stop() == 0, d.log_tail()


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    if not shared_available():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not running")
    with temp_database() as dsn:
        yield dsn


def post(d: DaemonProc, path: str, body: object) -> httpx.Response:
    return httpx.post(d.url + path, json=body, timeout=30)


def test_vectors_api(daemon: DaemonProc) -> None:
    h = httpx.get(daemon.url + "/health").json()
    assert h["vectors"] == "ok" and h["persistence"] == "disabled"
    r = post(daemon, "/api/v1/collections", {"name": "docs", "model": "all-minilm"})
    assert r.status_code == 201 and r.json()["dimension"] == 384
    assert post(daemon, "/api/v1/collections", {"name": "docs"}).status_code == 200
    docs = [("cat", "a cat sat on the mat", "animals"), ("kitten", "a kitten rested on the rug",
            "animals"), ("tax", "quarterly tax filing deadline", "finance")]
    r = post(daemon, "/api/v1/vectors/store", {"collection": "docs", "items": [
        {"id": i, "text": t, "metadata": {"topic": topic}} for i, t, topic in docs]})
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == ["cat", "kitten", "tax"] and r.json()["status"] == "applied"
    r = post(daemon, "/api/v1/vectors/search", {"collection": "docs", "text": "a small cat",
                                                "limit": 3})
    ids = [x["id"] for x in r.json()["results"]]
    assert ids[-1] == "tax" and set(ids[:2]) == {"cat", "kitten"}  # real semantic order
    r = post(daemon, "/api/v1/vectors/search", {"collection": "docs", "text": "money",
                                                "filter": {"topic": "finance"}})
    assert [x["id"] for x in r.json()["results"]] == ["tax"]
    r = httpx.get(daemon.url + "/api/v1/vectors/cat?collection=docs&with_vector=true")
    assert r.status_code == 200 and len(r.json()["vector"]) == 384
    r = post(daemon, "/api/v1/vectors/update", {"collection": "docs", "id": "cat",
                                                "metadata": {"topic": "pets"}})
    assert r.status_code == 200
    assert httpx.get(daemon.url + "/api/v1/vectors/cat?collection=docs").json()["metadata"] \
        == {"topic": "pets"}
    assert httpx.delete(daemon.url + "/api/v1/vectors/tax?collection=docs").status_code == 200
    assert httpx.get(daemon.url + "/api/v1/vectors/tax?collection=docs").status_code == 404
    names = [c["name"] for c in httpx.get(daemon.url + "/api/v1/collections").json()
             ["collections"]]
    assert {"default", "docs"} <= set(names)
    assert httpx.delete(daemon.url + "/api/v1/collections/docs").status_code == 200
    assert httpx.get(daemon.url + "/api/v1/collections/docs").status_code == 404
    metrics = httpx.get(daemon.url + "/metrics").text
    for name in ("citadel_vector_outbox_depth", "citadel_vector_outbox_replay_lag_seconds",
                 "citadel_persistence_buffered_rows", "citadel_persistence_pool_connections",
                 "citadel_vector_writes_total"):
        assert name in metrics
    deps = httpx.get(daemon.url + "/health/detailed").json()["dependencies"]
    assert deps["qdrant"]["status"] == "ok" and deps["qdrant"]["latency_ms"] is not None


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"items": [{"vector": [0.1, 0.2]}]}, 400, "dimension_mismatch"),
    ({"collection": "nope", "text": "x"}, 404, "collection_not_found"),
    ({"text": "x", "model": "nomic-embed-text"}, 404, "model_not_found"),
    ({"items": [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}]}, 400, "duplicate_id"),
    ({"items": [{"text": "x"}] * 10_000}, 400, "too_many_items"),
    ({"items": [{"text": "x", "bogus": 1}]}, 400, "invalid_request"),
    ({"items": []}, 400, "invalid_request"),
    ({"text": "x", "items": [{"text": "y"}]}, 400, "invalid_request"),
])
def test_store_bad_input(daemon: DaemonProc, body: object, status: int, code: str) -> None:
    r = post(daemon, "/api/v1/vectors/store", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["request_id"]


@pytest.mark.parametrize("flt", [["topic"], {"topic": None}, {"year": {"gt": "x"}},
                                 {"$or": {}}, {"topic": {"like": "a"}}])
def test_search_bad_filter(daemon: DaemonProc, flt: object) -> None:
    r = post(daemon, "/api/v1/vectors/search", {"text": "x", "filter": flt})
    assert r.status_code == 400
    assert r.json()["error"]["code"] in ("invalid_filter", "invalid_request")


def test_raw_collection_rules(daemon: DaemonProc) -> None:
    assert post(daemon, "/api/v1/collections", {"name": "raw3", "dimension": 3}).status_code \
        == 201
    r = post(daemon, "/api/v1/vectors/store", {"collection": "raw3", "text": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "collection_has_no_model"
    r = post(daemon, "/api/v1/vectors/store", {"collection": "raw3", "vector": [1, 2, 3],
                                               "id": 5})
    assert r.status_code == 200 and r.json()["ids"] == ["5"]
    r = post(daemon, "/api/v1/vectors/search", {"collection": "raw3", "vector": [1, 2, 3]})
    assert r.json()["results"][0]["id"] == "5"
    r = post(daemon, "/api/v1/collections", {"name": "raw3", "dimension": 4})
    assert r.status_code == 409


# ---- chaos -------------------------------------------------------------------------------


def test_chaos_qdrant_outage(tmp_path: Path, hash_fake: Fake, pg_dsn: str) -> None:
    res = chaos_qdrant(tmp_path, hash_fake.url, pg_dsn, phase_s=1.5)
    print(res.line(), *res.notes, sep="\n")
    assert res.queued_requests > 0 and res.acked_ids > res.queued_requests
    assert res.lost == 0


@pytest.mark.skipif(not binaries_available(), reason="PostgreSQL server binaries")
def test_chaos_postgres_outage(tmp_path: Path, hash_fake: Fake) -> None:
    res = chaos_postgres(tmp_path, hash_fake.url, phase_s=1.5)
    print(res.line(), *res.notes, sep="\n")
    assert res.acked_ids > 0
    assert res.lost == 0 and res.lost_rows == 0


def test_chaos_kill9(tmp_path: Path, hash_fake: Fake, pg_dsn: str) -> None:
    res = chaos_kill9(tmp_path, hash_fake.url, pg_dsn, phase_s=1.5)
    print(res.line(), *res.notes, sep="\n")
    assert res.queued_requests > 0 and res.acked_ids > res.queued_requests
    assert res.lost == 0
