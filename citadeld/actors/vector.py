"""Vector store: a supervised VectorActor that owns the Qdrant client, and the loop-side
VectorStore facade.

The same code drives a Qdrant server (``vectors.qdrant_url``, HTTP or gRPC) and the embedded
local mode (a directory under the state directory): the actor uses the *sync* ``QdrantClient``
and handles one message at a time, like the CacheActor (a private loop would add nothing when
messages are serial anyway). Every client error is sorted into two kinds the durability logic
acts on: ``QdrantUnavailable`` (refused, timed out, 5xx: the write may go to the outbox, reads
answer 503) and ``QdrantRejected`` (the request itself is wrong or names something missing:
4xx, never retried).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pykka

from citadeld.actors.facade import ActorFacade
from citadeld.bridge import claim, fail_queued, reject, resolve
from citadeld.storage.config import VectorsConfig
from citadeld.storage.ops import VectorOp
from citadeld.supervision import ChildLink, ChildSpec, SupervisedActor

log = logging.getLogger("citadeld.vectors")

CITADEL_META = "citadel"  # key of our binding in a collection's metadata
WRITE_BATCH_POINTS = 2000  # points per batched apply message


class QdrantUnavailable(Exception):
    """Qdrant could not be reached or did not answer in time: retry later."""


class QdrantRejected(Exception):
    """Qdrant refused the request itself (bad input, missing collection or point)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request",
                 missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code = message, status, code
        self.missing = missing or []


# ---- error classification -------------------------------------------------------------------

_GRPC_TRANSIENT = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                   "CANCELLED", "UNKNOWN", "INTERNAL"}


def classify(exc: BaseException) -> Exception:
    """Map whatever qdrant-client raised to QdrantUnavailable or QdrantRejected; anything else
    is returned as is (a bug: the actor crashes and is restarted)."""
    if isinstance(exc, QdrantUnavailable | QdrantRejected):
        return exc
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, ResponseHandlingException):
        src = exc.source if getattr(exc, "source", None) is not None else exc
        return QdrantUnavailable(f"{type(src).__name__}: {src}")
    if isinstance(exc, UnexpectedResponse):
        status = int(exc.status_code or 500)
        if status >= 500 or status == 429:
            return QdrantUnavailable(f"Qdrant answered HTTP {status}")
        detail = _response_detail(exc)
        if status == 404:
            return QdrantRejected(detail, 404, "not_found")
        return QdrantRejected(detail, 409 if status == 409 else 400)
    grpc_error: Any = None
    with contextlib.suppress(ImportError):
        import grpc

        grpc_error = grpc.RpcError
    if grpc_error is not None and isinstance(exc, grpc_error):
        code = exc.code() if hasattr(exc, "code") else None
        name = getattr(code, "name", "UNKNOWN")
        details = exc.details() if hasattr(exc, "details") else str(exc)
        if name in _GRPC_TRANSIENT:
            return QdrantUnavailable(f"gRPC {name}: {details}")
        if name == "NOT_FOUND":
            return QdrantRejected(str(details), 404, "not_found")
        if name == "ALREADY_EXISTS":
            return QdrantRejected(str(details), 409, "conflict")
        return QdrantRejected(str(details), 400)
    if isinstance(exc, ValueError):  # local mode: bad input or a missing collection
        msg = str(exc)
        if "not found" in msg:
            return QdrantRejected(msg, 404, "not_found")
        if "already exists" in msg:
            return QdrantRejected(msg, 409, "conflict")
        return QdrantRejected(msg, 400)
    if isinstance(exc, TimeoutError | ConnectionError | OSError | sqlite3.OperationalError):
        return QdrantUnavailable(text)
    http_error: Any = None
    with contextlib.suppress(ImportError):
        import httpx

        http_error = httpx.HTTPError
    if http_error is not None and isinstance(exc, http_error):
        return QdrantUnavailable(text)
    return exc if isinstance(exc, Exception) else RuntimeError(text)


def _response_detail(exc: Any) -> str:
    try:
        body = exc.structured()
        return str(body.get("status", {}).get("error") or body)
    except Exception:
        return f"Qdrant answered HTTP {exc.status_code}"


# ---- fault injection (test only) -------------------------------------------------------------

class FaultInjector:
    """TEST ONLY. While ``path`` exists, calls fail the way qdrant-client fails for a server that
    refuses connections (``down``) or stops answering (``timeout <seconds>``). The exceptions are
    qdrant-client's own, so everything above this layer runs its real outage code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def check(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                mode = f.read().strip()
        except FileNotFoundError:
            return
        import httpx
        from qdrant_client.http.exceptions import ResponseHandlingException

        if mode.startswith("timeout"):
            parts = mode.split()
            time.sleep(float(parts[1]) if len(parts) > 1 else 1.0)
            raise ResponseHandlingException(httpx.ReadTimeout("timed out (fault injection)"))
        raise ResponseHandlingException(
            httpx.ConnectError("[Errno 111] Connection refused (fault injection)"))


# ---- messages --------------------------------------------------------------------------------

@dataclass(slots=True)
class _Msg:
    op: str  # ping | list | info | create | drop | apply | search | retrieve
    future: concurrent.futures.Future[Any]
    arg: Any = None
    deadline: float = math.inf


@dataclass(slots=True)
class ApplyResult:
    """Ops applied in order until the first unavailability: ``done`` ops were attempted,
    ``rejected`` maps an op's index to why Qdrant refused it (applied = done - rejected)."""

    done: int = 0
    rejected: dict[int, QdrantRejected] = field(default_factory=dict)
    unavailable: str | None = None


@dataclass(slots=True)
class CollectionInfo:
    name: str
    dimension: int
    distance: str  # cosine | dot | euclid | manhattan
    model: str | None  # the bound embedding model; None: raw vectors only
    managed: bool  # created by citadeld (binding in the metadata)
    points: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "dimension": self.dimension,
                "distance": self.distance, "managed": self.managed, "points": self.points}


_DISTANCES = {"cosine": "Cosine", "dot": "Dot", "euclid": "Euclid", "manhattan": "Manhattan"}


@dataclass(slots=True)
class SearchRequest:
    collection: str
    vector: np.ndarray
    limit: int
    filter: Any  # qdrant Filter or None
    score_threshold: float | None
    with_vectors: bool


class VectorActor(SupervisedActor):
    """Owns the QdrantClient; one message at a time; results are plain Python data."""

    def __init__(self, *, cfg: VectorsConfig, local_path: str, link: ChildLink | None = None
                 ) -> None:
        super().__init__(link=link)
        self.cfg = cfg
        self.local_path = local_path
        self.client: Any = None
        self._normalized: dict[str, bool] = {}  # collection -> stores unit vectors (see create)
        self.faults = FaultInjector(cfg.fault_injection_file) if cfg.fault_injection_file else None

    # -- lifecycle --

    def on_start_supervised(self) -> None:
        from qdrant_client import QdrantClient

        cfg = self.cfg
        if cfg.qdrant_url:
            # no connection is made here: an unreachable server must not fail the start
            self.client = QdrantClient(
                url=cfg.qdrant_url, api_key=cfg.api_key, prefer_grpc=cfg.prefer_grpc,
                grpc_port=cfg.grpc_port, timeout=max(1, math.ceil(cfg.timeout_s)),
                check_compatibility=False)
        else:
            os.makedirs(self.local_path, exist_ok=True)
            # raises while another process (or a dying incarnation) holds the directory lock:
            # a failed start, restarted with backoff by the supervisor
            self.client = QdrantClient(path=self.local_path)
            self._tune_local()
        log.info("vector store open", extra={
            "qdrant": cfg.qdrant_url or f"local:{self.local_path}"})

    def _tune_local(self) -> None:
        """Embedded mode keeps each collection in SQLite and commits once per point. With the
        default rollback journal that is ~4 fsyncs per point (~50 points/s here); WAL with
        synchronous=NORMAL survives a crash or kill -9 of the process (committed pages are in
        the kernel) at ~1000 points/s; ``local_sync: full`` fsyncs every commit."""
        sync = "FULL" if self.cfg.local_sync == "full" else "NORMAL"
        local = getattr(self.client, "_client", None)
        collections = getattr(local, "collections", None)
        if not isinstance(collections, dict):
            log.warning("cannot tune the embedded store (unknown qdrant-client layout)")
            return
        for name, coll in collections.items():
            # qdrant-client turns every query into float64 before the local search; against a
            # float32 matrix numpy then copies the whole matrix to float64 on each search
            # (~2-3x slower). Keep the matrix float64 (as a reloaded store has it anyway).
            mats = getattr(coll, "vectors", None)
            if isinstance(mats, dict):
                for key, mat in mats.items():
                    if isinstance(mat, np.ndarray) and mat.ndim == 2 and mat.dtype == np.float32:
                        mats[key] = mat.astype(np.float64)
            conn = getattr(getattr(coll, "storage", None), "storage", None)
            if isinstance(conn, sqlite3.Connection):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={sync}")
            else:
                log.warning("cannot tune collection %s of the embedded store", name)

    def on_receive_supervised(self, message: Any) -> Any:
        if not isinstance(message, _Msg):
            return super().on_receive_supervised(message)
        fut = message.future
        if not claim(fut):
            return None
        if time.monotonic() > message.deadline:
            reject(fut, QdrantUnavailable("stale request: its caller has given up"))
            return None
        self.current_work = message
        try:
            if self.faults is not None and message.op != "apply":
                self.faults.check()
            resolve(fut, getattr(self, f"_op_{message.op}")(message.arg))
        except Exception as exc:
            mapped = classify(exc)
            if not isinstance(mapped, QdrantUnavailable | QdrantRejected):
                raise  # a bug or a broken client: crash, fail_in_hand, restart
            reject(fut, mapped)
        return None

    def fail_in_hand(self, exc: BaseException) -> None:
        work, self.current_work = self.current_work, None
        fail_queued(self, work, _Msg, exc)
        self._close()

    def _close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()  # releases the embedded store's directory lock

    def on_stop(self) -> None:
        self.fail_in_hand(pykka.ActorDeadError("vector actor stopped"))
        super().on_stop()

    # -- operations (actor thread) --

    def _op_ping(self, _: Any) -> int:
        return len(self.client.get_collections().collections)

    def _info(self, name: str) -> CollectionInfo:
        c = self.client.get_collection(name)
        params = c.config.params.vectors
        if isinstance(params, dict):  # named vectors: not ours; describe the unnamed one if any
            params = params.get("") or next(iter(params.values()))
        meta = (getattr(c.config, "metadata", None) or {}).get(CITADEL_META) or {}
        distance = meta.get("distance") or str(getattr(params.distance, "value",
                                                       params.distance)).lower()
        self._normalized[name] = bool(meta.get("normalized"))
        return CollectionInfo(
            name=name, dimension=int(params.size), distance=distance,
            model=meta.get("model"), managed=bool(meta), points=c.points_count)

    def _op_info(self, name: str) -> CollectionInfo:
        return self._info(name)

    def _op_list(self, _: Any) -> list[CollectionInfo]:
        names = sorted(c.name for c in self.client.get_collections().collections)
        out = []
        for name in names:
            with contextlib.suppress(QdrantRejected, ValueError):
                out.append(self._info(name))
        return out

    def _op_create(self, info: CollectionInfo) -> CollectionInfo:
        from qdrant_client.http import models as qm

        if self.client.collection_exists(info.name):
            raise QdrantRejected(f"collection {info.name!r} already exists", 409, "conflict")
        # The embedded store re-normalises every stored vector on each cosine query (~0.3 s per
        # search at 100k x 384). Cosine is the dot product of unit vectors - Qdrant's server
        # implements it that way too - so embedded cosine collections store unit vectors and
        # search by dot, with the query normalised here as well.
        normalized = info.distance == "cosine" and not self.cfg.qdrant_url
        distance = "dot" if normalized else info.distance
        self.client.create_collection(
            info.name,
            vectors_config=qm.VectorParams(size=info.dimension,
                                           distance=qm.Distance(_DISTANCES[distance])),
            metadata={CITADEL_META: {"model": info.model, "dimension": info.dimension,
                                     "distance": info.distance, "normalized": normalized,
                                     "version": 1}},
        )
        if not self.cfg.qdrant_url:
            self._tune_local()
        return self._info(info.name)

    def _op_drop(self, name: str) -> bool:
        if not self.client.collection_exists(name):
            raise QdrantRejected(f"collection {name!r} does not exist", 404,
                                 "collection_not_found")
        self._normalized.pop(name, None)
        return bool(self.client.delete_collection(name))

    def _unit_array(self, collection: str, vec: np.ndarray | None) -> np.ndarray:
        """The vector as sent to Qdrant: unit length in a normalised (embedded cosine)
        collection, as given otherwise; float32."""
        if collection not in self._normalized:
            with contextlib.suppress(Exception):
                self._info(collection)
        out = np.asarray(vec, dtype=np.float32)
        if self._normalized.get(collection):
            norm = float(np.linalg.norm(out))
            if norm > 1e-12:
                out = (out / norm).astype(np.float32)
        return out

    def _unit(self, collection: str, vec: np.ndarray | None) -> list[float]:
        return _as_list(self._unit_array(collection, vec))

    def _op_apply(self, ops: list[VectorOp]) -> ApplyResult:
        """Apply ops in order. Consecutive upserts to one collection go to Qdrant as one call
        (one round trip for a batch of concurrent requests); if Qdrant rejects that call, they
        are retried one by one so only the bad op fails."""
        out = ApplyResult()
        i = 0
        while i < len(ops):
            j = i + 1
            if ops[i].kind == "upsert":
                while j < len(ops) and ops[j].kind == "upsert" and \
                        ops[j].collection == ops[i].collection:
                    j += 1
            try:
                if self.faults is not None:
                    self.faults.check()
                if j - i > 1:
                    merged = VectorOp("upsert", ops[i].collection,
                                      [p for op in ops[i:j] for p in op.points])
                    self._apply_one(merged)
                else:
                    self._apply_one(ops[i])
            except Exception as exc:
                mapped = classify(exc)
                if isinstance(mapped, QdrantUnavailable):
                    out.unavailable = str(mapped)
                    return out
                if not isinstance(mapped, QdrantRejected):
                    raise
                if j - i > 1:  # isolate the op Qdrant refused
                    j = i + 1
                    try:
                        self._apply_one(ops[i])
                    except Exception as exc2:
                        mapped = classify(exc2)
                        if isinstance(mapped, QdrantUnavailable):
                            out.unavailable = str(mapped)
                            return out
                        if not isinstance(mapped, QdrantRejected):
                            raise
                        out.rejected[i] = mapped
                else:
                    out.rejected[i] = mapped
            out.done = j
            i = j
        return out

    def _apply_one(self, op: VectorOp) -> None:
        from qdrant_client.http import models as qm

        c = self.client
        if op.kind == "upsert":
            points = [qm.PointStruct(id=p.pid, vector=self._unit(op.collection, p.vector),
                                     payload=p.payload)
                      for p in op.points]
            c.upsert(op.collection, points=points, wait=True)
        elif op.kind == "delete":
            c.delete(op.collection, points_selector=qm.PointIdsList(
                points=[p.pid for p in op.points]), wait=True)
        elif op.kind == "update":
            pids = [p.pid for p in op.points]
            found = {str(r.id) for r in c.retrieve(op.collection, ids=pids, with_payload=False,
                                                   with_vectors=False)}
            missing = [p.id for p in op.points if p.pid not in found]
            if missing:
                raise QdrantRejected(f"no such id(s): {missing[:10]}", 404, "not_found", missing)
            vecs = [qm.PointVectors(id=p.pid, vector=self._unit(op.collection, p.vector))
                    for p in op.points if p.vector is not None]
            if vecs:
                c.update_vectors(op.collection, points=vecs, wait=True)
            for p in op.points:
                if p.payload:
                    c.set_payload(op.collection, payload=p.payload, points=[p.pid], wait=True)
        else:
            raise QdrantRejected(f"unknown op {op.kind!r}")

    def _op_search(self, req: SearchRequest) -> list[dict[str, Any]]:
        res = self.client.query_points(
            req.collection, query=self._query(req.collection, req.vector), limit=req.limit,
            query_filter=req.filter, score_threshold=req.score_threshold,
            with_payload=True, with_vectors=req.with_vectors)
        return [_hit(p, req.with_vectors, score=True) for p in res.points]

    def _query(self, collection: str, vec: np.ndarray) -> Any:
        return self._unit(collection, vec)

    def _op_retrieve(self, arg: tuple[str, list[str], bool]) -> list[dict[str, Any]]:
        name, pids, with_vectors = arg
        pts = self.client.retrieve(name, ids=pids, with_payload=True, with_vectors=with_vectors)
        return [_hit(p, with_vectors, score=False) for p in pts]


def _as_list(vec: np.ndarray | None) -> list[float]:
    assert vec is not None
    out: list[float] = np.asarray(vec, dtype=np.float32).tolist()
    return out


def _hit(p: Any, with_vectors: bool, *, score: bool) -> dict[str, Any]:
    payload = p.payload or {}
    out: dict[str, Any] = {"id": payload.get("id", str(p.id))}
    if score:
        out["score"] = float(p.score)
    out["metadata"] = payload.get("metadata") or {}
    out["text"] = payload.get("text")
    if with_vectors:
        vec = p.vector
        if isinstance(vec, dict):
            vec = vec.get("") or next(iter(vec.values()), None)
        out["vector"] = np.asarray(vec, dtype=np.float32) if vec is not None else None
    return out


# ---- loop-side facade ------------------------------------------------------------------------

class Breaker:
    """Open after a failure for a growing backoff (1 s doubling to 10 s); a good call closes it.
    While open, reads fail fast with 503 and writes go straight to the outbox."""

    def __init__(self, backoff_min: float = 1.0, backoff_max: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.backoff_min, self.backoff_max, self.clock = backoff_min, backoff_max, clock
        self.backoff, self.open_until = backoff_min, 0.0
        self.last_error: str | None = None
        self.down_since: float | None = None

    def allow(self) -> bool:
        return self.clock() >= self.open_until

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def failed(self, error: str) -> None:
        now = self.clock()
        if self.last_error is None:
            log.warning("qdrant unavailable: %s", error)
            self.down_since = time.time()
        self.last_error = error
        if now >= self.open_until:
            self.open_until = now + self.backoff
            self.backoff = min(self.backoff * 2, self.backoff_max)

    def succeeded(self) -> None:
        if self.last_error is not None:
            log.info("qdrant recovered")
        self.last_error, self.open_until, self.backoff = None, 0.0, self.backoff_min
        self.down_since = None


class VectorStore(ActorFacade):
    """Loop-side facade: sends messages, bridges the replies, tracks Qdrant's availability."""

    label = "vector actor"

    def __init__(self, cfg: VectorsConfig, local_path: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.local_path = local_path
        self.breaker = Breaker()
        self._writes: deque[tuple[VectorOp, asyncio.Future[Any]]] = deque()
        self._sending = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    @property
    def started(self) -> bool:
        return self._actor is not None

    @property
    def target(self) -> str:
        return self.cfg.qdrant_url or f"local:{self.local_path}"

    def child_spec(self, name: str = "vectors") -> ChildSpec:
        return ChildSpec(
            name=name, on_started=self.set_actor_ref, on_died=self.actor_died,
            start=lambda link: VectorActor.start(cfg=self.cfg, local_path=self.local_path,
                                                 link=link),
            ping_interval=5.0, ping_timeout=self.cfg.timeout_s + 5.0,
            shutdown_timeout=self.cfg.timeout_s + 5.0)

    def died_error(self, exc: BaseException | None) -> BaseException:
        return QdrantUnavailable(f"vector actor died: {exc!r}")

    def start_actor(self) -> pykka.ActorRef[Any]:
        return VectorActor.start(cfg=self.cfg, local_path=self.local_path)

    async def call(self, op: str, arg: Any = None, wait_s: float | None = None) -> Any:
        """One actor round trip. Unavailability (refused, timed out, actor down) opens the
        breaker and raises QdrantUnavailable; QdrantRejected passes through."""
        limit = self.cfg.timeout_s if wait_s is None else wait_s
        cf: concurrent.futures.Future[Any] = concurrent.futures.Future()
        msg = _Msg(op, cf, arg, time.monotonic() + limit)
        if self._actor is None and not self.closed:  # not started yet: no verdict on Qdrant
            raise QdrantUnavailable("the vector store is starting")
        self._inflight.add(cf)
        try:
            if self.closed or self._actor is None:
                raise QdrantUnavailable("vector actor is not running")
            try:
                self._actor.tell(msg)
            except pykka.ActorDeadError as exc:
                raise QdrantUnavailable(f"vector actor is not running: {exc}") from None
            try:
                result = await asyncio.wait_for(asyncio.wrap_future(cf), limit)
            except TimeoutError:
                raise QdrantUnavailable(f"no answer from Qdrant within {limit} s") from None
            except pykka.ActorDeadError as exc:
                raise QdrantUnavailable(f"vector actor died: {exc}") from None
        except QdrantUnavailable as exc:
            self.breaker.failed(str(exc))
            raise
        finally:
            self._inflight.discard(cf)
        if op == "apply" and result.unavailable is not None:
            self.breaker.failed(result.unavailable)
        else:
            self.breaker.succeeded()
        return result

    async def apply_one(self, op: VectorOp, wait_s: float) -> QdrantRejected | None:
        """Apply one write, batched with the writes of concurrent requests: while the actor
        works on one batch the next one gathers (no added delay when idle). Returns None when
        applied, the rejection when Qdrant refused this op; raises QdrantUnavailable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[QdrantRejected | None] = loop.create_future()
        self._writes.append((op, fut))
        if not self._sending:
            self._send_writes()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except TimeoutError:
            self.breaker.failed(f"no answer from Qdrant within {wait_s:.1f} s")
            raise QdrantUnavailable(f"no answer from Qdrant within {wait_s:.1f} s") from None

    def _send_writes(self) -> None:
        batch: list[tuple[VectorOp, asyncio.Future[QdrantRejected | None]]] = []
        points = 0
        while self._writes and (not batch or points + len(self._writes[0][0].points)
                                <= WRITE_BATCH_POINTS):
            op, fut = self._writes.popleft()
            if fut.done():  # its caller gave up already
                continue
            batch.append((op, fut))
            points += len(op.points)
        if not batch:
            return
        self._sending = True
        task = asyncio.get_running_loop().create_task(self._run_writes(batch, points))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_writes(self, batch: list[tuple[VectorOp, asyncio.Future[Any]]],
                          points: int) -> None:
        try:
            res: ApplyResult = await self.call("apply", [op for op, _ in batch],
                                               wait_s=self.cfg.timeout_s + points / 200.0)
        except Exception as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, QdrantUnavailable)
                                      else QdrantUnavailable(repr(exc)))
        else:
            for i, (_, fut) in enumerate(batch):
                if fut.done():
                    continue
                if i < res.done:
                    fut.set_result(res.rejected.get(i))
                else:
                    fut.set_exception(QdrantUnavailable(res.unavailable or "not applied"))
        finally:
            self._sending = False
            if self._writes and not self.closed:
                self._send_writes()

    async def ping(self) -> float:
        """Latency of a round trip to Qdrant in ms (bypasses the breaker: it closes it)."""
        t0 = time.perf_counter()
        await self.call("ping", wait_s=min(self.cfg.timeout_s, 5.0))
        return (time.perf_counter() - t0) * 1000

    async def close(self) -> None:
        self.closed = True
        while self._writes:
            _, fut = self._writes.popleft()
            if not fut.done():
                fut.set_exception(QdrantUnavailable("vector store closed"))
        self.actor_died(RuntimeError("vector store closed"))
        # wait: the embedded store's directory lock goes with the actor
        await self.release_actor(wait_s=30)
