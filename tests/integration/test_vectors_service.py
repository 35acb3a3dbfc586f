"""VectorService against the embedded Qdrant store (and real PostgreSQL where an outbox is
needed): the API semantics, bad input, outages and replay order."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from citadeld.actors.vector import QdrantUnavailable, VectorStore
from citadeld.errors import BadRequest, CitadelError, ModelNotFound, NotFound, Unavailable
from citadeld.storage.config import VectorsConfig
from citadeld.storage.ops import point_id
from tests.integration.vector_harness import harness, hash_vector, wait_for
from tests.support.pg import shared_available, temp_database

needs_pg = pytest.mark.skipif(not shared_available(), reason="PostgreSQL at 127.0.0.1:5432")


@pytest.fixture
def pg_dsn() -> Iterator[str]:
    if not shared_available():
        pytest.skip("PostgreSQL at 127.0.0.1:5432 is not running")
    with temp_database() as dsn:
        yield dsn


async def test_roundtrip(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        s = h.service
        out = await s.store_items(None, [
            {"id": "cat", "text": "a cat", "metadata": {"kind": "animal", "legs": 4}},
            {"id": 7, "text": "a table", "metadata": {"kind": "thing", "legs": 4}},
            {"text": "no id given", "metadata": {"kind": "thing"}},
            {"id": "raw", "vector": hash_vector("raw", 8).tolist()},
        ])
        assert out.status == "applied" and out.ids[:2] == ["cat", "7"] and len(out.ids) == 4
        again = await s.store_items(None, [{"id": "cat", "text": "a cat",
                                            "metadata": {"kind": "animal", "legs": 4}}])
        assert again.ids == ["cat"]  # idempotent: same id, one point
        infos = {c["name"]: c for c in await s.list_collections()}
        assert infos["default"]["points"] == 4 and infos["default"]["model"] == "mini"
        res = await s.search(None, text="a cat", limit=3)
        assert res["results"][0]["id"] == "cat" and res["results"][0]["score"] > 0.99
        res = await s.search(None, text="a cat", filter={"kind": "thing", "legs": {"gte": 4}})
        assert [r["id"] for r in res["results"]] == ["7"]
        res = await s.search(None, vector=hash_vector("a table", 8).tolist(), limit=1,
                             with_vectors=True)
        assert res["results"][0]["id"] == "7" and len(res["results"][0]["vector"]) == 8
        res = await s.search(None, text="a cat", score_threshold=0.99)
        assert [r["id"] for r in res["results"]] == ["cat"]
        await s.update_items(None, [{"id": "cat", "metadata": {"kind": "pet"}},
                                    {"id": "7", "text": "a chair"}])
        got = await s.get_item(None, "cat")
        assert got["metadata"] == {"kind": "pet"} and got["text"] == "a cat"
        got = await s.get_item(None, "7", with_vector=True)
        assert got["text"] == "a chair"
        assert abs(float(got["vector"] @ hash_vector("a chair", 8)) - 1) < 1e-5
        await s.delete_item(None, "raw")
        with pytest.raises(NotFound):
            await s.get_item(None, "raw")
        with pytest.raises(NotFound):
            await s.delete_item(None, "raw")


async def test_collections(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        s = h.service
        info, created = await s.create_collection("docs", model="mini:latest")
        assert created and info.model == "mini" and info.dimension == 8
        info, created = await s.create_collection("docs", model="mini")
        assert not created  # idempotent
        with pytest.raises(CitadelError) as err:
            await s.create_collection("docs", model="other")
        assert err.value.status == 409
        info, _ = await s.create_collection("raw", dimension=3, distance="dot")
        assert info.model is None and info.distance == "dot"
        with pytest.raises(BadRequest) as bad:
            await s.create_collection("x", model="mini", dimension=9)
        assert bad.value.code == "dimension_mismatch"
        with pytest.raises(ModelNotFound):
            await s.create_collection("x", model="nope")
        with pytest.raises(BadRequest):
            await s.create_collection("bad name")
        await s.drop_collection("docs")
        with pytest.raises(NotFound):
            await s.drop_collection("docs")
        with pytest.raises(NotFound) as nf:
            await s.store_items("docs", [{"text": "x"}])
        assert nf.value.code == "collection_not_found"


async def test_bad_input(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        s = h.service
        await s.create_collection("raw", dimension=3)

        async def code(coro: object) -> str:
            with pytest.raises(CitadelError) as err:
                await coro  # type: ignore[misc]
            assert 400 <= err.value.status < 500
            return err.value.code

        assert await code(s.store_items(None, [{"vector": [1.0, 2.0]}])) == "dimension_mismatch"
        assert await code(s.store_items("raw", [{"text": "x"}])) == "collection_has_no_model"
        assert await code(s.store_items(None, [{"text": "x"}], model="other")) == \
            "model_mismatch"
        assert await code(s.store_items(None, [{"text": "x"}], model="nope")) == \
            "model_not_found"
        assert await code(s.store_items(None, [{"id": "a", "text": "x"},
                                               {"id": "a", "text": "y"}])) == "duplicate_id"
        assert await code(s.store_items(None, [{"id": 1, "text": "x"},
                                               {"id": "1", "text": "y"}])) == "duplicate_id"
        assert await code(s.store_items(None, [{"text": "x"}] * 10_000)) == "too_many_items"
        assert await code(s.store_items(None, [])) == "invalid_request"
        assert await code(s.store_items(None, [{"text": "x", "vector": [1.0] * 8}])) == \
            "invalid_request"
        assert await code(s.store_items(None, [{"vector": [float("nan")] * 8}])) == \
            "invalid_request"
        assert await code(s.store_items("nope", [{"text": "x"}])) == "collection_not_found"
        assert await code(s.search(None, text="x", filter={"k": {"like": 1}})) == \
            "invalid_filter"
        assert await code(s.search(None, text="x", filter=["k"])) == "invalid_filter"
        assert await code(s.search(None, text="x", limit=0)) == "invalid_request"
        assert await code(s.search(None, text="x", vector=[1.0] * 8)) == "invalid_request"
        assert await code(s.update_items(None, [{"id": "missing", "metadata": {}}])) == \
            "vector_not_found"
        assert await code(s.update_items(None, [{"text": "no id"}])) == "invalid_request"
        assert await code(s.update_items(None, [{"id": "a"}])) == "invalid_request"
        assert h.embedding.calls == 0  # every one of these failed before embedding


async def test_qdrant_outage_without_postgres_is_refused(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        s = h.service
        await s.store_items(None, [{"id": "a", "text": "alpha"}])
        h.fault.write_text("down")
        for _ in range(2):  # the first finds out, the second meets the open breaker
            with pytest.raises(Unavailable) as err:
                await s.store_items(None, [{"id": "b", "text": "beta"}])
            assert err.value.retry_after is not None and "not stored" in err.value.message
        with pytest.raises(Unavailable):
            await s.search(None, text="alpha")  # never an empty result that looks real
        with pytest.raises(Unavailable):
            await s.get_item(None, "a")
        assert s.summary()["vectors"] == "down"
        h.fault.unlink()
        await s.probe()  # the prober closes the breaker
        assert s.summary() == {"vectors": "ok", "persistence": "disabled"}
        res = await s.search(None, text="alpha")
        assert [r["id"] for r in res["results"]] == ["a"]  # b was refused, never half-stored


@needs_pg
async def test_qdrant_outage_queues_and_replays_in_order(tmp_path: Path, pg_dsn: str) -> None:
    async with harness(tmp_path, pg_dsn) as h:
        s, p = h.service, h.persistence
        assert p is not None
        await s.store_items(None, [{"id": "a", "text": "alpha", "metadata": {"v": 1}},
                                   {"id": "b", "text": "beta"}])
        h.fault.write_text("down")
        q1 = await s.store_items(None, [{"id": "c", "text": "gamma"}])
        assert q1.status == "queued" and q1.operation is not None
        assert (tmp_path / "outbox.pending").exists()  # written before the first ack
        q2 = await s.update_items(None, [{"id": "a", "metadata": {"v": 2}}])
        q3 = await s.delete_item(None, "b")
        q4 = await s.store_items(None, [{"id": "a", "text": "alpha two", "metadata": {"v": 3}}])
        assert [q.status for q in (q2, q3, q4)] == ["queued"] * 3
        with pytest.raises(Unavailable):
            await s.search(None, text="alpha")
        st = await s.operation(q1.operation)
        assert st["status"] == "queued" and st["items"] == 1
        assert h.metrics.outbox_depth._value.get() == 4
        h.fault.unlink()
        await wait_for(lambda: s.pending == 0)
        a = await s.get_item(None, "a")
        assert a["metadata"] == {"v": 3} and a["text"] == "alpha two"  # applied in order
        with pytest.raises(NotFound):
            await s.get_item(None, "b")
        assert (await s.get_item(None, "c"))["text"] == "gamma"
        for q in (q1, q2, q3, q4):
            assert (await s.operation(q.operation))["status"] == "applied"  # type: ignore[arg-type]
        await wait_for(lambda: not (tmp_path / "outbox.pending").exists())
        assert h.metrics.outbox_depth._value.get() == 0


@needs_pg
async def test_writes_stay_queued_behind_older_ones(tmp_path: Path, pg_dsn: str) -> None:
    """Once something is queued, later writes queue too (even with Qdrant back) so none can
    overtake an older write to the same id; a write Qdrant rejects on replay is marked failed
    and does not block the rest."""
    async with harness(tmp_path, pg_dsn) as h:
        s = h.service
        await s.create_collection("tmp", model="mini")
        h.fault.write_text("down")
        q1 = await s.store_items("tmp", [{"id": "x", "text": "one"}])
        q2 = await s.update_items(None, [{"id": "ghost", "metadata": {}}])  # fails on replay
        h.fault.unlink()
        await s.store.ping()  # Qdrant is back, but the queue is not drained yet
        s._wake.clear()
        original, s.replay_round = s.replay_round, None  # type: ignore[assignment,method-assign]
        try:
            q3 = await s.store_items("tmp", [{"id": "x", "text": "two"}])
            assert q3.status == "queued"
        finally:
            s.replay_round = original  # type: ignore[method-assign]
        await wait_for(lambda: s.pending == 0)
        assert (await s.get_item("tmp", "x"))["text"] == "two"
        st = await s.operation(q2.operation)  # type: ignore[arg-type]
        assert st["status"] == "failed" and "ghost" in st["error"]
        assert (await s.operation(q1.operation))["status"] == "applied"  # type: ignore[arg-type]
        assert (await s.store_items("tmp", [{"id": "y", "text": "z"}])).status == "applied"


@needs_pg
async def test_restart_with_queued_writes_replays_first(tmp_path: Path, pg_dsn: str) -> None:
    async with harness(tmp_path, pg_dsn) as h:
        h.fault.write_text("down")
        await h.service.store_items(None, [{"id": "late", "text": "queued then restarted"}])
    (tmp_path / "qdrant.fault").unlink()
    async with harness(tmp_path, pg_dsn) as h:
        assert h.service.pending is None or h.service.pending >= 0
        await wait_for(lambda: h.service.pending == 0)
        assert (await h.service.get_item(None, "late"))["text"] == "queued then restarted"
        res = await h.service.search(None, text="queued then restarted", limit=1)
        assert res["results"][0]["id"] == "late" and res["results"][0]["score"] > 0.99


@needs_pg
async def test_qdrant_timing_out(tmp_path: Path, pg_dsn: str) -> None:
    async with harness(tmp_path, pg_dsn, timeout_s=0.5) as h:
        s = h.service
        h.fault.write_text("timeout 1.5")
        out = await s.store_items(None, [{"id": "slow", "text": "slow"}])
        assert out.status == "queued"  # the answer did not come in time: recorded instead
        with pytest.raises(Unavailable):
            await s.search(None, text="slow")
        h.fault.unlink()
        await asyncio.sleep(1.6)  # the stuck call ends; stale messages are skipped
        await wait_for(lambda: s.pending == 0)
        assert (await s.get_item(None, "slow"))["text"] == "slow"


@needs_pg
async def test_both_down_is_refused_not_lost(tmp_path: Path) -> None:
    async with harness(tmp_path, "postgresql://postgres@127.0.0.1:1/none") as h:
        s = h.service
        h.fault.write_text("down")
        with pytest.raises(Unavailable) as err:
            await s.store_items(None, [{"id": "a", "text": "x"}])
        assert "could not be queued" in err.value.message
        assert s.reserved == 0 and s.summary()["persistence"] == "down"


# ---- the server code path, against real sockets ------------------------------------------


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_server_mode_refused_and_hanging(tmp_path: Path) -> None:
    """qdrant_url mode uses the same actor; a refused connection and a server that never answers
    both come out as QdrantUnavailable (real qdrant-client errors, no fault injection)."""
    store = VectorStore(VectorsConfig(qdrant_url=f"http://127.0.0.1:{_dead_port()}",
                                      timeout_s=1), "unused")
    store.start_unsupervised()
    try:
        with pytest.raises(QdrantUnavailable, match="Connect"):
            await store.ping()
        assert not store.breaker.healthy
    finally:
        await store.close()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(listener.accept()[0])  # accept, never answer
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    port = listener.getsockname()[1]
    store = VectorStore(VectorsConfig(qdrant_url=f"http://127.0.0.1:{port}", timeout_s=1),
                        "unused")
    store.start_unsupervised()
    try:
        with pytest.raises(QdrantUnavailable):
            await store.ping()
    finally:
        await store.close()
        stop.set()
        t.join()
        for c in conns:
            c.close()
        listener.close()


# ---- the embedded store's own durability ---------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys, numpy as np
    from citadeld.storage.config import VectorsConfig
    from citadeld.actors.vector import VectorActor, CollectionInfo
    from citadeld.storage.ops import VectorOp, PointWrite, make_payload
    a = VectorActor(cfg=VectorsConfig(), local_path=sys.argv[1])
    a.on_start_supervised()
    if not a.client.collection_exists("c"):
        a._op_create(CollectionInfo("c", 8, "cosine", None, True))
    i = 0
    while True:
        v = np.full(8, i + 1, dtype=np.float32)
        p = PointWrite(str(i), v, make_payload(str(i), None, {}))
        a._op_apply([VectorOp("upsert", "c", [p])])
        print(i, flush=True)  # acknowledged: applied and committed
        i += 1
""")


def test_embedded_store_survives_sigkill(tmp_path: Path) -> None:
    """Committed points of the embedded store (SQLite WAL, synchronous=NORMAL) survive kill -9."""
    path = str(tmp_path / "q")
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, path], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).resolve().parents[2])
    acked = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        acked = int(line)
        if acked >= 150:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    from qdrant_client import QdrantClient

    client = QdrantClient(path=path)
    try:
        got = client.retrieve("c", ids=[point_id(str(i)) for i in range(acked + 1)])
        assert len(got) == acked + 1
        assert client.count("c").count >= acked + 1
    finally:
        client.close()


def test_batched_upserts_isolate_a_rejected_op(tmp_path: Path) -> None:
    """Concurrent writes reach the actor as one batch; consecutive upserts are merged into one
    Qdrant call, and when Qdrant refuses it only the bad op fails."""
    import numpy as np

    from citadeld.actors.vector import CollectionInfo, VectorActor
    from citadeld.storage.ops import PointWrite, VectorOp, make_payload

    a = VectorActor(cfg=VectorsConfig(), local_path=str(tmp_path / "q"))
    a.on_start_supervised()
    try:
        a._op_create(CollectionInfo("c", 4, "cosine", None, True))

        def up(i: str, dims: int = 4) -> VectorOp:
            vec = np.ones(dims, dtype=np.float32)
            return VectorOp("upsert", "c", [PointWrite(i, vec, make_payload(i, None, {}))])

        res = a._op_apply([up("a"), up("bad", 3), up("b"), VectorOp("delete", "c",
                                                                   [PointWrite("a")]), up("c")])
        assert res.done == 5 and set(res.rejected) == {1} and res.unavailable is None
        got = {p["id"] for p in a._op_retrieve(("c", [point_id(x) for x in "abc"], False))}
        assert got == {"b", "c"}
    finally:
        a._close()
