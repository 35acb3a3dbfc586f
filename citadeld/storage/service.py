"""VectorService: what the vector and collection routes call; the durability rules live here.

A vector write is acknowledged only once it is either applied in Qdrant (200) or recorded in the
PostgreSQL outbox (202 with a status URL). It goes to the outbox when Qdrant is unavailable
(refused, timed out, breaker open) - and also whenever older writes are still queued, so a
write can never overtake an earlier one to the same id. A background replayer applies queued
writes in sequence order once Qdrant answers again; a write Qdrant rejects on replay (say its
collection was deleted) is marked failed, visible at its status URL, and does not block the
queue. Without PostgreSQL, a write Qdrant cannot take is refused with 503 (not acknowledged).

Reads during an outage answer 503 with Retry-After: never an empty result that looks real.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from citadeld.actors.persistence import Persistence, PersistenceError, PersistenceUnavailable
from citadeld.actors.vector import (
    ApplyResult,
    CollectionInfo,
    QdrantRejected,
    QdrantUnavailable,
    SearchRequest,
    VectorStore,
)
from citadeld.errors import BadRequest, CitadelError, NotFound, Unavailable
from citadeld.storage.config import COLLECTION_NAME, VectorsConfig
from citadeld.storage.metrics import StorageMetrics
from citadeld.storage.ops import (
    FilterError,
    PointWrite,
    VectorOp,
    build_filter,
    caller_id,
    make_payload,
    new_id,
)
from citadeld.storage.spill import OutboxMarker

if TYPE_CHECKING:
    from citadeld.embedding import EmbeddingService
    from citadeld.health import HealthState

log = logging.getLogger("citadeld.vectors")

REPLAY_CHUNK_POINTS = 2000  # points per replay message to the VectorActor


class Conflict(CitadelError):
    status = 409
    code = "conflict"


@dataclass
class WriteOutcome:
    collection: str
    ids: list[str]
    status: str  # applied | queued
    operation: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"collection": self.collection, "ids": self.ids,
                               "count": len(self.ids), "status": self.status}
        if self.operation is not None:
            out["operation"] = self.operation
            out["status_url"] = f"/api/v1/vectors/operations/{self.operation}"
        return out


def _client_error(r: QdrantRejected, what: str = "") -> CitadelError:
    msg = f"{what}{r.message}" if what else r.message
    if r.status == 404:
        return NotFound(msg, code=r.code if r.code != "not_found" else "not_found")
    if r.status == 409:
        return Conflict(msg)
    return BadRequest(msg, code="rejected_by_store")


class VectorService:
    def __init__(self, cfg: VectorsConfig, store: VectorStore, persistence: Persistence | None,
                 metrics: StorageMetrics, marker: OutboxMarker,
                 embedding: EmbeddingService | None = None,
                 health: HealthState | None = None, dependency_up: Any = None) -> None:
        self.cfg = cfg
        self.store = store
        self.persistence = persistence
        self.metrics = metrics
        self.marker = marker
        self.embedding = embedding
        self.health = health
        self.dependency_up = dependency_up  # the daemon's citadel_dependency_up gauge
        self._collections: dict[str, CollectionInfo] = {}
        # queued writes of this daemon not yet applied; None: unknown (PostgreSQL not asked yet)
        self.pending: int | None = 0
        self.reserved = 0  # outbox appends in flight
        self.oldest_pending: float | None = None
        self.marker_set = False
        self._marker_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.bootstrapped = False
        self.closed = False

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.marker_set = self.marker.present()
        if self.persistence is not None:
            self.pending = None if self.marker_set else 0
        elif self.marker_set:
            log.warning("vector writes may be queued in a PostgreSQL outbox, but persistence.dsn"
                        " is not set: they will not be replayed", extra={
                            "marker": str(self.marker.path)})
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._bootstrap(), name="vectors-bootstrap"),
                       loop.create_task(self._replayer(), name="outbox-replayer"),
                       loop.create_task(self._prober(), name="storage-prober")]

    async def close(self) -> None:
        self.closed = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t

    def _unavailable(self, what: str = "the vector store") -> Unavailable:
        err = self.store.breaker.last_error or "not reachable"
        return Unavailable(f"{what} is unavailable ({err}); retry later",
                           retry_after=self.cfg.retry_after_s)

    # ---- collections -------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not COLLECTION_NAME.match(name):
            raise BadRequest(f"bad collection name {name!r} (1-64 of A-Za-z0-9_-)",
                             param="collection")

    async def collection(self, name: str | None) -> CollectionInfo:
        name = name or self.cfg.default_collection
        self._check_name(name)
        info = self._collections.get(name)
        if info is not None:
            return info
        if not self.store.breaker.allow():
            raise self._unavailable()
        try:
            info = await self.store.call("info", name)
        except QdrantUnavailable:
            raise self._unavailable() from None
        except QdrantRejected as r:
            if r.status == 404:
                raise NotFound(f"collection {name!r} does not exist",
                               code="collection_not_found") from None
            raise _client_error(r) from None
        assert info is not None
        self._collections[name] = info
        return info

    def _forget(self, name: str) -> None:
        self._collections.pop(name, None)

    async def list_collections(self) -> list[dict[str, Any]]:
        if not self.store.breaker.allow():
            raise self._unavailable()
        try:
            infos: list[CollectionInfo] = await self.store.call("list")
        except QdrantUnavailable:
            raise self._unavailable() from None
        self._collections = {i.name: i for i in infos}
        return [i.to_json() for i in infos]

    def _resolve_model(self, model: str) -> str:
        if self.embedding is None:
            raise BadRequest("no embedding service: text cannot be embedded", param="model")
        return self.embedding.resolve(model)

    def _binding(self, name: str, model: str | None, dimension: int | None, distance: str,
                 raw: bool = False) -> CollectionInfo:
        if raw or (model is None and dimension is not None):
            if model is not None:
                raise BadRequest("a raw collection takes no model", param="model")
            if dimension is None:
                raise BadRequest("a raw collection needs dimension", param="dimension")
            return CollectionInfo(name, dimension, distance, None, True)
        if self.embedding is None:
            raise BadRequest("no embedding model is configured; give dimension",
                             param="dimension")
        resolved = self._resolve_model(model) if model else self.embedding.resolve(None)
        dims = self.embedding.model_cfg(resolved).dims
        if dimension is not None and dimension != dims:
            raise BadRequest(f"model {resolved} has {dims} dimensions, not {dimension}",
                             code="dimension_mismatch", param="dimension")
        return CollectionInfo(name, dims, distance, resolved, True)

    async def create_collection(self, name: str, model: str | None = None,
                                dimension: int | None = None, distance: str = "cosine",
                                raw: bool = False) -> tuple[CollectionInfo, bool]:
        """Create a collection bound to a model (or raw vectors of a dimension). Idempotent:
        an existing one with the same binding is returned (created False); another is 409."""
        self._check_name(name)
        want = self._binding(name, model, dimension, distance, raw)
        if not self.store.breaker.allow():
            raise self._unavailable()
        try:
            info: CollectionInfo = await self.store.call("create", want)
            created = True
        except QdrantUnavailable:
            raise self._unavailable() from None
        except QdrantRejected as r:
            if r.status != 409:
                raise _client_error(r) from None
            self._forget(name)
            info = await self.collection(name)
            if (info.model, info.dimension, info.distance) != (want.model, want.dimension,
                                                                 want.distance):
                raise Conflict(
                    f"collection {name!r} exists with model {info.model}, dimension "
                    f"{info.dimension}, distance {info.distance}", code="collection_exists"
                ) from None
            created = False
        self._collections[name] = info
        if created:
            self._audit("collections.create", name, 201, model=info.model,
                        dimension=info.dimension, distance=info.distance)
        return info, created

    async def drop_collection(self, name: str) -> None:
        self._check_name(name)
        if self.persistence is not None and (self.pending is None or self.pending
                                             + self.reserved > 0):
            try:
                queued, _ = await self.persistence.outbox_stats(name)
            except (PersistenceUnavailable, PersistenceError):
                raise Unavailable("cannot tell whether writes to this collection are still "
                                  "queued (PostgreSQL unavailable)",
                                  retry_after=self.cfg.retry_after_s) from None
            if queued:
                raise Conflict(f"collection {name!r} has {queued} queued writes; retry once "
                               "they are applied", code="writes_pending",
                               retry_after=self.cfg.retry_after_s)
        if not self.store.breaker.allow():
            raise self._unavailable()
        try:
            await self.store.call("drop", name)
        except QdrantUnavailable:
            raise self._unavailable() from None
        except QdrantRejected as r:
            self._forget(name)
            raise _client_error(r) from None
        self._forget(name)
        self._audit("collections.delete", name, 200)

    async def ensure_configured(self) -> None:
        for name, spec in self.cfg.collections.items():
            try:
                await self.create_collection(name, spec.model, spec.dimension, spec.distance,
                                             spec.raw)
            except Conflict as exc:
                log.warning("configured collection differs from the store: %s", exc.message)

    # ---- writes ------------------------------------------------------------------------------

    def _check_model(self, model: str | None, info: CollectionInfo) -> None:
        if model is None:
            return
        resolved = self._resolve_model(model)
        if info.model is None:
            raise BadRequest(f"collection {info.name!r} holds raw vectors and has no model",
                             code="model_mismatch", param="model")
        if resolved != info.model:
            raise BadRequest(f"collection {info.name!r} is bound to model {info.model}, "
                             f"not {resolved}", code="model_mismatch", param="model")

    def _vector(self, raw: Any, info: CollectionInfo, where: str) -> np.ndarray:
        try:
            vec = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError):
            raise BadRequest(f"{where}: vector must be an array of numbers", param="vector"
                             ) from None
        if vec.ndim != 1 or vec.shape[0] != info.dimension:
            got = vec.shape[0] if vec.ndim == 1 else "a nested array"
            raise BadRequest(f"{where}: vector has {got} dimensions; collection {info.name!r} "
                             f"has {info.dimension}", code="dimension_mismatch", param="vector")
        if not np.all(np.isfinite(vec)):
            raise BadRequest(f"{where}: vector has non-finite values", param="vector")
        return vec

    async def _embed(self, info: CollectionInfo, texts: list[str]) -> np.ndarray:
        if info.model is None:
            raise BadRequest(f"collection {info.name!r} holds raw vectors: it has no model to "
                             "embed text with; send vectors", code="collection_has_no_model",
                             param="text")
        assert self.embedding is not None
        out = await self.embedding.embed(info.model, texts)
        if out.vectors.shape[1] != info.dimension:
            raise Conflict(f"model {info.model} now yields {out.vectors.shape[1]} dimensions "
                           f"but collection {info.name!r} has {info.dimension}",
                           code="collection_model_mismatch")
        return out.vectors

    def _ids(self, items: list[dict[str, Any]], required: bool) -> list[str]:
        ids: list[str] = []
        seen: dict[str, int] = {}
        for i, it in enumerate(items):
            raw = it.get("id")
            if raw is None:
                if required:
                    raise BadRequest(f"items[{i}]: id is required", param="id")
                cid = new_id()
            else:
                try:
                    cid = caller_id(raw)
                except ValueError as exc:
                    raise BadRequest(f"items[{i}]: {exc}", param="id") from None
            if cid in seen:
                raise BadRequest(f"duplicate id {cid!r} in items[{seen[cid]}] and items[{i}]",
                                 code="duplicate_id", param="id")
            seen[cid] = i
            ids.append(cid)
        return ids

    def _check_count(self, items: list[Any]) -> None:
        if not items:
            raise BadRequest("items must hold at least one item", param="items")
        if len(items) > self.cfg.max_items:
            raise BadRequest(f"too many items: {len(items)} (at most {self.cfg.max_items} per "
                             "request)", code="too_many_items", param="items")

    async def store_items(self, collection: str | None, items: list[dict[str, Any]],
                          model: str | None = None, request_id: str | None = None
                          ) -> WriteOutcome:
        self._check_count(items)
        info = await self.collection(collection)
        ids = self._ids(items, required=False)
        vectors = np.empty((len(items), info.dimension), dtype=np.float32)
        text_at: list[int] = []
        for i, it in enumerate(items):
            has_text, has_vec = it.get("text") is not None, it.get("vector") is not None
            if has_text == has_vec:
                raise BadRequest(f"items[{i}]: give exactly one of text or vector",
                                 param="items")
            if has_vec:
                vectors[i] = self._vector(it["vector"], info, f"items[{i}]")
            else:
                text_at.append(i)
        self._check_model(model, info)
        if text_at:
            vectors[text_at] = await self._embed(info, [items[i]["text"] for i in text_at])
        points = [PointWrite(cid, vectors[i], make_payload(cid, it.get("text"),
                                                            it.get("metadata")))
                  for i, (cid, it) in enumerate(zip(ids, items, strict=True))]
        out = await self._write(VectorOp("upsert", info.name, points), request_id)
        self._audit("vectors.store", info.name, 200 if out.status == "applied" else 202,
                    request_id, items=len(ids), operation=out.operation)
        return out

    async def update_items(self, collection: str | None, items: list[dict[str, Any]],
                           model: str | None = None, request_id: str | None = None
                           ) -> WriteOutcome:
        self._check_count(items)
        info = await self.collection(collection)
        ids = self._ids(items, required=True)
        self._check_model(model, info)
        vecs: dict[int, np.ndarray] = {}
        text_at: list[int] = []
        for i, it in enumerate(items):
            has_text, has_vec = it.get("text") is not None, it.get("vector") is not None
            if has_text and has_vec:
                raise BadRequest(f"items[{i}]: give text or vector, not both", param="items")
            if not (has_text or has_vec or "metadata" in it):
                raise BadRequest(f"items[{i}]: nothing to update (give text, vector or "
                                 "metadata)", param="items")
            if has_vec:
                vecs[i] = self._vector(it["vector"], info, f"items[{i}]")
            elif has_text:
                text_at.append(i)
        if text_at:
            embedded = await self._embed(info, [items[i]["text"] for i in text_at])
            for row, i in enumerate(text_at):
                vecs[i] = embedded[row]
        points = []
        for i, (cid, it) in enumerate(zip(ids, items, strict=True)):
            payload: dict[str, Any] = {}
            if i in vecs:
                payload["text"] = it.get("text")  # a new raw vector drops the stale text
            if "metadata" in it:
                payload["metadata"] = it["metadata"] or {}
            points.append(PointWrite(cid, vecs.get(i), payload or None))
        out = await self._write(VectorOp("update", info.name, points), request_id)
        self._audit("vectors.update", info.name, 200 if out.status == "applied" else 202,
                    request_id, items=len(ids), operation=out.operation)
        return out

    async def delete_item(self, collection: str | None, raw_id: str,
                          request_id: str | None = None) -> WriteOutcome:
        info = await self.collection(collection)
        try:
            cid = caller_id(raw_id)
        except ValueError as exc:
            raise BadRequest(str(exc), param="id") from None
        if not self._must_queue():
            found = await self._retrieve(info, [cid], with_vectors=False, fail_open=True)
            if found is not None and not found:
                raise NotFound(f"no vector with id {cid!r} in collection {info.name!r}",
                               code="vector_not_found")
        out = await self._write(VectorOp("delete", info.name, [PointWrite(cid)]), request_id)
        self._audit("vectors.delete", info.name, 200 if out.status == "applied" else 202,
                    request_id, items=1, operation=out.operation, id=cid)
        return out

    def _must_queue(self) -> bool:
        """Whether a write must go to the outbox rather than straight to Qdrant."""
        if self.persistence is None:
            return False
        if self.pending is None or self.pending + self.reserved > 0:
            return True  # older writes are queued: never overtake them
        return not self.store.breaker.allow()

    async def _write(self, op: VectorOp, request_id: str | None) -> WriteOutcome:
        if self._must_queue():
            return await self._enqueue(op, request_id)
        if self.persistence is None and not self.store.breaker.allow():
            return await self._enqueue(op, request_id)  # refused: nowhere to record it
        t0 = time.perf_counter()
        try:
            r = await self.store.apply_one(op, self._apply_timeout(len(op.points)))
        except QdrantUnavailable:
            return await self._enqueue(op, request_id)
        self.metrics.vector_op.labels(op.kind).observe(time.perf_counter() - t0)
        if r is not None:
            if r.status == 404 and r.code != "not_found":
                self._forget(op.collection)
            if r.missing:
                raise NotFound(f"no vector with id(s) {r.missing[:10]} in collection "
                               f"{op.collection!r}", code="vector_not_found")
            if r.status == 404 and "ollection" in r.message:
                self._forget(op.collection)
                raise NotFound(f"collection {op.collection!r} does not exist",
                               code="collection_not_found")
            raise _client_error(r)
        self.metrics.vector_writes.labels("applied").inc()
        return WriteOutcome(op.collection, op.ids, "applied")

    def _apply_timeout(self, points: int) -> float:
        # the embedded store writes ~1000 points/s; allow for a full batch behind others
        return self.cfg.timeout_s + points / 200.0

    async def _enqueue(self, op: VectorOp, request_id: str | None) -> WriteOutcome:
        if self.persistence is None:
            self.metrics.vector_writes.labels("refused").inc()
            raise Unavailable(
                f"the vector store is unavailable ({self.store.breaker.last_error or 'down'}) "
                "and no PostgreSQL outbox is configured: the write was not stored; retry later",
                retry_after=self.cfg.retry_after_s)
        self.reserved += 1
        try:
            async with self._marker_lock:
                if not self.marker_set:
                    # before the first queued write: a restart must know to replay first
                    await asyncio.get_running_loop().run_in_executor(None, self.marker.set)
                    self.marker_set = True
            seqs = await self.persistence.outbox_append([op.to_json()], request_id)
        except (PersistenceUnavailable, PersistenceError, OSError) as exc:
            self.metrics.vector_writes.labels("refused").inc()
            raise Unavailable(
                "the vector store is unavailable and the write could not be queued in the "
                f"outbox ({exc}); it was not stored; retry later",
                retry_after=self.cfg.retry_after_s) from None
        finally:
            self.reserved -= 1
        if self.pending is not None:
            self.pending += 1
        if self.oldest_pending is None:
            self.oldest_pending = time.time()
        self.metrics.vector_writes.labels("queued").inc()
        self._gauges()
        self._wake.set()
        return WriteOutcome(op.collection, op.ids, "queued", seqs[0])

    # ---- reads -------------------------------------------------------------------------------

    async def _retrieve(self, info: CollectionInfo, ids: list[str], with_vectors: bool,
                        fail_open: bool = False) -> list[dict[str, Any]] | None:
        from citadeld.storage.ops import point_id

        if not self.store.breaker.allow():
            if fail_open:
                return None
            raise self._unavailable()
        try:
            found: list[dict[str, Any]] = await self.store.call(
                "retrieve", (info.name, [point_id(i) for i in ids], with_vectors))
        except QdrantUnavailable:
            if fail_open:
                return None
            raise self._unavailable() from None
        except QdrantRejected as r:
            if r.status == 404:
                self._forget(info.name)
            raise _client_error(r) from None
        return found

    async def get_item(self, collection: str | None, raw_id: str, with_vector: bool = False
                       ) -> dict[str, Any]:
        info = await self.collection(collection)
        try:
            cid = caller_id(raw_id)
        except ValueError as exc:
            raise BadRequest(str(exc), param="id") from None
        found = await self._retrieve(info, [cid], with_vector)
        if not found:
            raise NotFound(f"no vector with id {cid!r} in collection {info.name!r}",
                           code="vector_not_found")
        return {"collection": info.name, **found[0]}

    async def search(self, collection: str | None, *, text: str | None = None,
                     vector: Any = None, model: str | None = None, limit: int = 10,
                     filter: Any = None, score_threshold: float | None = None,
                     with_vectors: bool = False) -> dict[str, Any]:
        if (text is None) == (vector is None):
            raise BadRequest("give exactly one of text or vector", param="text")
        if not 1 <= limit <= self.cfg.max_search_limit:
            raise BadRequest(f"limit must be between 1 and {self.cfg.max_search_limit}",
                             param="limit")
        try:
            qfilter = build_filter(filter)
        except FilterError as exc:
            raise BadRequest(str(exc), code="invalid_filter", param="filter") from None
        if score_threshold is not None and not math.isfinite(score_threshold):
            raise BadRequest("score_threshold must be a finite number", param="score_threshold")
        info = await self.collection(collection)
        self._check_model(model, info)
        if text is not None:
            if not text:
                raise BadRequest("text is empty", param="text")
            qvec = (await self._embed(info, [text]))[0]
        else:
            qvec = self._vector(vector, info, "query")
        if not self.store.breaker.allow():
            raise self._unavailable()
        t0 = time.perf_counter()
        try:
            hits = await self.store.call("search", SearchRequest(
                info.name, qvec, limit, qfilter, score_threshold, with_vectors))
        except QdrantUnavailable:
            raise self._unavailable() from None
        except QdrantRejected as r:
            if r.status == 404:
                self._forget(info.name)
            raise _client_error(r) from None
        self.metrics.vector_op.labels("search").observe(time.perf_counter() - t0)
        out: dict[str, Any] = {"collection": info.name, "model": info.model, "results": hits}
        pending = (self.pending or 0) + self.reserved
        if pending or self.pending is None:
            out["pending_writes"] = pending if self.pending is not None else None
        return out

    async def operation(self, seq: int) -> dict[str, Any]:
        if self.persistence is None:
            raise NotFound("no outbox: persistence is disabled", code="operation_not_found")
        try:
            row = await self.persistence.outbox_status(seq)
        except (PersistenceUnavailable, PersistenceError):
            raise Unavailable("PostgreSQL is unavailable; retry later",
                              retry_after=self.cfg.retry_after_s) from None
        if row is None:
            raise NotFound(f"no operation {seq}", code="operation_not_found")
        return row

    # ---- background --------------------------------------------------------------------------

    async def _bootstrap(self) -> None:
        """Create the configured collections once Qdrant answers (retrying until it does)."""
        delay = 0.5
        while not self.closed:
            try:
                await self.ensure_configured()
                await self.list_collections()
                self.bootstrapped = True
                return
            except (Unavailable, QdrantUnavailable) as exc:
                log.info("vector store not ready yet: %s", getattr(exc, "message", exc))
            except Exception:
                log.exception("creating the configured collections failed")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    async def _replayer(self) -> None:
        if self.persistence is None:
            return
        delay = 0.5
        while not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            if self.pending == 0:
                if self.reserved == 0 and self.marker_set:
                    self._clear_marker()
                continue
            if not self.store.breaker.allow():
                continue
            try:
                progressed = await self.replay_round()
            except (QdrantUnavailable, PersistenceUnavailable, PersistenceError) as exc:
                log.info("outbox replay paused: %s", exc)
                progressed = False
            except Exception:
                log.exception("outbox replay failed")
                progressed = False
            if progressed:
                delay = 0.5
                self._wake.set()
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _clear_marker(self) -> None:
        # synchronous on the loop: no append can start between the check and the unlink
        self.marker.clear()
        self.marker_set = False

    async def replay_round(self) -> bool:
        """Apply the next queued writes in order; True when some were applied or failed."""
        assert self.persistence is not None
        if self.pending is None:
            count, oldest = await self.persistence.outbox_stats()
            self.pending, self.oldest_pending = count, oldest
            self._gauges()
        rows = await self.persistence.outbox_fetch(self.cfg.replay_batch)
        if not rows:
            if self.reserved == 0:
                self.pending, self.oldest_pending = 0, None
                self._gauges()
            return False
        progressed = False
        start = 0
        while start < len(rows):
            end, points = start, 0
            while end < len(rows):
                size = len(rows[end].body.get("points", ()))
                if end > start and points + size > REPLAY_CHUNK_POINTS:
                    break
                points += size
                end += 1
            chunk = rows[start:end]
            ops: list[VectorOp] = []
            bad: dict[int, str] = {}
            for r in chunk:
                try:
                    ops.append(VectorOp.from_json(r.body))
                except (KeyError, TypeError, ValueError) as exc:
                    bad[r.seq] = f"unreadable outbox row: {exc!r}"
            good = [r for r in chunk if r.seq not in bad]
            res = ApplyResult()
            if ops:
                res = await self.store.call("apply", ops,
                                            wait_s=self._apply_timeout(points) + 30)
            applied = [good[i].seq for i in range(res.done) if i not in res.rejected]
            failed = {good[i].seq: res.rejected[i].message for i in res.rejected} | bad
            for i, why in res.rejected.items():
                log.warning("queued write %d rejected on replay: %s", good[i].seq, why.message)
                if why.status == 404:
                    self._forget(ops[i].collection)
            if applied or failed:
                await self.persistence.outbox_done(applied, failed)
                self.pending = max(0, (self.pending or 0) - len(applied) - len(failed))
                progressed = True
            if res.unavailable is not None:
                break
            nxt = end if end < len(rows) else None
            self.oldest_pending = rows[nxt].created_at if nxt is not None else None
            start = end
        self._gauges()
        return progressed

    def _gauges(self) -> None:
        depth = (self.pending or 0) + self.reserved
        self.metrics.outbox_depth.set(depth)
        lag = time.time() - self.oldest_pending if self.oldest_pending and depth else 0.0
        self.metrics.replay_lag.set(max(0.0, lag))

    async def _prober(self) -> None:
        while not self.closed:
            await self.probe()
            await asyncio.sleep(2.0 if self.store.started else 0.1)

    async def probe(self) -> None:
        if self.store.started:
            ok, latency, err = True, None, None
            try:
                latency = await self.store.ping()
            except (QdrantUnavailable, QdrantRejected) as exc:
                ok, err = False, str(exc)
            if self.health is not None:
                self.health.set("qdrant", ok, latency, err, target=self.store.target)
            if self.dependency_up is not None:
                self.dependency_up.labels("qdrant").set(1 if ok else 0)
            if ok and (self.pending or self.pending is None):
                self._wake.set()
        if self.persistence is not None:
            pg_ok = await self.persistence.probe()
            if self.dependency_up is not None and pg_ok is not None:
                self.dependency_up.labels("postgres").set(1 if pg_ok else 0)
            if pg_ok and self.pending is None:
                with contextlib.suppress(PersistenceUnavailable, PersistenceError):
                    count, oldest = await self.persistence.outbox_stats()
                    if self.pending is None:
                        self.pending, self.oldest_pending = count, oldest
            if pg_ok and self.pending:
                self._wake.set()
        self._gauges()

    def _audit(self, action: str, target: str, status: int, request_id: str | None = None,
               **detail: Any) -> None:
        if self.persistence is not None:
            if request_id is None:
                from citadeld.logs import request_id as rid_var
                request_id = rid_var.get()
            self.persistence.audit(action, target, request_id, status, **detail)

    # ---- health ------------------------------------------------------------------------------

    def summary(self) -> dict[str, str]:
        b = self.store.breaker
        vectors = "ok" if b.healthy and self.bootstrapped else "down" if not b.healthy \
            else "starting"
        if self.persistence is None:
            pers = "disabled"
        else:
            pers = {True: "ok", False: "down", None: "starting"}[self.persistence.up]
        return {"vectors": vectors, "persistence": pers}

    def detailed(self) -> dict[str, Any]:
        b = self.store.breaker
        out: dict[str, Any] = {
            "vectors": {
                "target": self.store.target, "status": self.summary()["vectors"],
                "last_error": b.last_error, "down_since": b.down_since,
                "collections": sorted(self._collections),
                "outbox_pending": self.pending, "outbox_in_flight": self.reserved,
                "replay_lag_s": round(time.time() - self.oldest_pending, 3)
                if self.oldest_pending and (self.pending or self.reserved) else 0.0,
            },
        }
        p = self.persistence
        if p is None:
            out["persistence"] = {"status": "disabled"}
        else:
            out["persistence"] = {
                "status": self.summary()["persistence"], "instance": p.instance,
                "last_error": p.last_error, "latency_ms": p.latency_ms, "pool": p.pool_stats,
                "buffered_rows": len(p.buffer), "spilled_rows": p.spill.rows,
                "spill_file": str(p.spill.path),
            }
        return out
