"""Pure parts of the vector store and persistence: ids, ops, filters, config, migrations plan,
spill file, error classification, breaker."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from qdrant_client.http import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from citadeld.actors.vector import (
    Breaker,
    FaultInjector,
    QdrantRejected,
    QdrantUnavailable,
    classify,
)
from citadeld.config import ConfigError, load_config, redact
from citadeld.storage import migrations
from citadeld.storage.config import PersistenceConfig, VectorsConfig
from citadeld.storage.ops import (
    FilterError,
    PointWrite,
    VectorOp,
    build_filter,
    caller_id,
    make_payload,
    point_id,
)
from citadeld.storage.spill import OutboxMarker, SpillFile

# ---- ids and ops ---------------------------------------------------------------------------


def test_caller_ids() -> None:
    assert caller_id("doc-1") == "doc-1"
    assert caller_id(7) == "7"
    assert point_id("7") == point_id(caller_id(7))  # 7 and "7" are one point
    assert point_id("a") != point_id("b")
    assert point_id("a") == point_id("a")  # deterministic: stores are idempotent
    for bad in ("", "x" * 257, -1, True, 1.5, None, ["a"]):
        with pytest.raises(ValueError):
            caller_id(bad)


def test_op_json_roundtrip_is_exact() -> None:
    rng = np.random.default_rng(1)
    vec = rng.standard_normal(384).astype(np.float32)
    op = VectorOp("upsert", "docs", [PointWrite("a", vec, make_payload("a", "hi", {"k": 1})),
                                     PointWrite("b", None, {"metadata": {}})])
    back = VectorOp.from_json(op.to_json())
    assert back.kind == "upsert" and back.collection == "docs" and back.ids == ["a", "b"]
    assert back.points[0].vector is not None
    assert np.array_equal(back.points[0].vector, vec)  # bit-exact float32
    assert back.points[0].payload == {"id": "a", "text": "hi", "metadata": {"k": 1}}
    assert back.points[1].vector is None


# ---- filters -------------------------------------------------------------------------------


def test_filter_translation() -> None:
    f = build_filter({"lang": "en", "year": {"gte": 2020, "lt": 2024}, "tag": ["a", "b"],
                      "score": 0.5, "draft": {"exists": False}, "n": {"ne": 3, "nin": [4, 5]},
                      "$or": [{"x": 1}, {"y": True}], "$not": {"z": "q"}})
    assert isinstance(f, qm.Filter)
    keys = {c.key for c in f.must if isinstance(c, qm.FieldCondition)}
    assert {"metadata.lang", "metadata.year", "metadata.tag", "metadata.score"} <= keys
    assert any(isinstance(c, qm.IsEmptyCondition) for c in f.must)
    assert f.must_not is not None and len(f.must_not) == 3
    assert build_filter(None) is None and build_filter({}) is None


@pytest.mark.parametrize("bad", [
    [1, 2], "lang", {"lang": None}, {"lang": {"eq": None}}, {"lang": {}},
    {"lang": {"like": "x"}}, {"year": {"gt": "2020"}}, {"tag": []}, {"tag": ["a", 1]},
    {"$or": {"a": 1}}, {"$xor": []}, {"bad key!": 1}, {"x": {"exists": "yes"}},
    {"x": {"in": "a"}}, {"x": {"nested": {"obj": 1}}}, {"x": [1.5, 2.5]},
])
def test_filter_rejects_wrong_shapes(bad: object) -> None:
    with pytest.raises(FilterError) as err:
        build_filter(bad)
    assert "filter" in str(err.value)


def test_filter_depth_and_size_are_bounded() -> None:
    deep: dict[str, object] = {"a": 1}
    for _ in range(20):
        deep = {"$not": deep}
    with pytest.raises(FilterError):
        build_filter(deep)
    with pytest.raises(FilterError):
        build_filter({f"k{i}": i for i in range(300)})


# ---- config --------------------------------------------------------------------------------


def test_config_sections_and_cross_check() -> None:
    cfg = load_config(env={})
    assert cfg.persistence.dsn is None  # embedded default: persistence disabled
    assert cfg.vectors.qdrant_url is None and cfg.vectors.default_collection == "default"
    cfg = load_config(env={"CITADEL_PERSISTENCE__DSN": "postgresql://u:pw@h/db",
                           "CITADEL_VECTORS__TIMEOUT_S": "3"})
    assert cfg.vectors.timeout_s == 3
    shown = redact(cfg)
    assert "pw" not in shown["persistence"]["dsn"]
    with pytest.raises(ConfigError, match=r"vectors\.collections"):
        load_config(overrides={"vectors.collections": {"default": {"model": "nope"}}}, env={})
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(overrides={"persistence.bogus": 1}, env={})
    with pytest.raises(ConfigError):
        load_config(overrides={"vectors.default_collection": "missing"}, env={})
    with pytest.raises(ValueError):
        PersistenceConfig(pool_min=5, pool_max=2)
    with pytest.raises(ValueError):
        VectorsConfig(qdrant_url="localhost:6333")
    with pytest.raises(ValueError):
        VectorsConfig(collections={"bad/name": {}}, default_collection="bad/name")


# ---- migrations ----------------------------------------------------------------------------


def test_migration_plan_and_render() -> None:
    assert [m.version for m in migrations.MIGRATIONS] == list(
        range(1, len(migrations.MIGRATIONS) + 1))
    assert migrations.pending({}) == list(migrations.MIGRATIONS)
    done = {m.version: m.checksum for m in migrations.MIGRATIONS}
    assert migrations.pending(done) == []
    sql = migrations.render(list(migrations.MIGRATIONS))
    assert "pg_advisory_xact_lock" in sql and sql.strip().endswith("COMMIT;")
    for table in ("citadel_audit_log", "citadel_health_history", "citadel_task_log",
                  "citadel_workflow_state", "citadel_vector_outbox"):
        assert f"CREATE TABLE {table}" in sql


# ---- spill file ----------------------------------------------------------------------------


def test_spill_append_take_read_done(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path / "spill", 1 << 20)
    assert spill.take() is None
    assert spill.append([("audit", {"n": i}) for i in range(10)]) == (10, 0)
    path = spill.take()
    assert path is not None and path.name.endswith("replaying.jsonl")
    spill.append([("health", {"n": 99})])  # spilled during a replay: a fresh file
    rows, bad = SpillFile.read(path)
    assert [r["n"] for _, r in rows] == list(range(10)) and bad == 0
    spill.done(path, len(rows))
    nxt = spill.take()
    assert nxt is not None
    assert SpillFile.read(nxt)[0] == [("health", {"n": 99})]
    # a torn last line (crash mid-append) is skipped and counted
    with open(nxt, "ab") as f:
        f.write(b'{"k": "audit", "r": {"n"')
    assert SpillFile.read(nxt)[1] == 1
    assert SpillFile(tmp_path / "spill", 1 << 20).rows == 2  # counted again on restart


def test_spill_is_bounded(tmp_path: Path) -> None:
    spill = SpillFile(tmp_path, 4096)
    written, dropped = spill.append([("audit", {"pad": "x" * 100, "n": i}) for i in range(100)])
    assert 0 < written < 100 and written + dropped == 100
    assert spill.size() <= 4096
    assert spill.append([("audit", {"pad": "x" * 100})]) == (0, 1)


def test_outbox_marker(tmp_path: Path) -> None:
    m = OutboxMarker(tmp_path / "sub" / "outbox.pending")
    assert not m.present()
    m.set()
    m.set()
    assert m.present()
    m.clear()
    m.clear()
    assert not m.present()


# ---- error classification, fault injection, breaker ---------------------------------------


def test_classify_qdrant_errors() -> None:
    refused = ResponseHandlingException(httpx.ConnectError("[Errno 111] Connection refused"))
    assert isinstance(classify(refused), QdrantUnavailable)
    assert isinstance(classify(ResponseHandlingException(httpx.ReadTimeout("t"))),
                      QdrantUnavailable)
    for status, kind, code in ((503, QdrantUnavailable, None), (429, QdrantUnavailable, None),
                               (404, QdrantRejected, 404), (400, QdrantRejected, 400),
                               (409, QdrantRejected, 409)):
        exc = UnexpectedResponse(status, "x", b'{"status": {"error": "boom"}}', httpx.Headers())
        got = classify(exc)
        assert isinstance(got, kind)
        if code is not None:
            assert isinstance(got, QdrantRejected) and got.status == code
    assert isinstance(classify(ValueError("Collection x not found")), QdrantRejected)
    got = classify(ValueError("Wrong input: Vector dimension error"))
    assert isinstance(got, QdrantRejected) and got.status == 400
    assert isinstance(classify(TimeoutError()), QdrantUnavailable)
    bug = TypeError("a bug")
    assert classify(bug) is bug  # not swallowed: the actor crashes and restarts


def test_fault_injector(tmp_path: Path) -> None:
    path = tmp_path / "fault"
    f = FaultInjector(str(path))
    f.check()  # no file: no fault
    path.write_text("down")
    with pytest.raises(ResponseHandlingException) as err:
        f.check()
    assert isinstance(classify(err.value), QdrantUnavailable)
    path.write_text("timeout 0.01")
    with pytest.raises(ResponseHandlingException):
        f.check()
    os.unlink(path)
    f.check()


def test_breaker() -> None:
    now = [0.0]
    b = Breaker(1.0, 4.0, clock=lambda: now[0])
    assert b.allow() and b.healthy
    b.failed("down")
    assert not b.allow() and not b.healthy
    now[0] = 1.0
    assert b.allow()
    b.failed("down")  # a failed trial doubles the backoff
    assert b.open_until == 3.0
    b.succeeded()
    assert b.allow() and b.healthy and b.backoff == 1.0
