"""The vector store's data model, independent of the actors that apply it.

* Caller ids (strings, or integers taken as their decimal string) map to Qdrant point ids by
  uuid5, so storing the same caller id twice replaces the point: stores are idempotent.
* A point's payload is ``{"id": caller id, "text": text or null, "metadata": {...}}``; metadata
  filters address ``metadata.<key>``.
* A write is a ``VectorOp`` (upsert | update | delete) that serialises to JSON for the outbox
  (vectors as base64 of little-endian float32, exact and compact) and back.
"""

from __future__ import annotations

import base64
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from qdrant_client.http import models as qm

ID_NAMESPACE = uuid.UUID("5b0c6f0e-8d55-4a8c-9a8b-c17ade1d0c4e")
OpKind = Literal["upsert", "update", "delete"]
_FIELD = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
MAX_ID_CHARS = 256


class FilterError(ValueError):
    """A metadata filter of the wrong shape; the message says what is wrong and where."""


def caller_id(raw: Any) -> str:
    """Normalise a caller id: a non-empty string (at most 256 chars) or a non-negative int."""
    if isinstance(raw, bool):
        raise ValueError("id must be a string or a non-negative integer")
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError("id must be a string or a non-negative integer")
        return str(raw)
    if isinstance(raw, str) and 0 < len(raw) <= MAX_ID_CHARS:
        return raw
    raise ValueError(f"id must be a string of 1-{MAX_ID_CHARS} characters or a non-negative "
                     "integer")


def point_id(cid: str) -> str:
    """The Qdrant point id of a caller id (deterministic: the basis of idempotent stores)."""
    return str(uuid.uuid5(ID_NAMESPACE, cid))


def new_id() -> str:
    return uuid.uuid4().hex


def encode_vector(vec: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


@dataclass(slots=True)
class PointWrite:
    id: str  # the caller's id
    vector: np.ndarray | None = None  # float32 (dims,)
    payload: dict[str, Any] | None = None  # upsert: the whole payload; update: keys to set

    @property
    def pid(self) -> str:
        return point_id(self.id)


@dataclass(slots=True)
class VectorOp:
    kind: OpKind
    collection: str
    points: list[PointWrite] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.points]

    def to_json(self) -> dict[str, Any]:
        pts = []
        for p in self.points:
            d: dict[str, Any] = {"id": p.id}
            if p.vector is not None:
                d["v"] = encode_vector(p.vector)
            if p.payload is not None:
                d["p"] = p.payload
            pts.append(d)
        return {"kind": self.kind, "collection": self.collection, "points": pts}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VectorOp:
        points = [
            PointWrite(d["id"], decode_vector(d["v"]) if "v" in d else None, d.get("p"))
            for d in data["points"]
        ]
        return cls(data["kind"], data["collection"], points)


def make_payload(cid: str, text: str | None, metadata: dict[str, Any] | None) -> dict[str, Any]:
    return {"id": cid, "text": text, "metadata": metadata or {}}


# ---- filters -------------------------------------------------------------------------------

_OPS = frozenset({"eq", "ne", "in", "nin", "gt", "gte", "lt", "lte", "exists"})
_RANGE = ("gt", "gte", "lt", "lte")
MAX_FILTER_DEPTH = 8
MAX_FILTER_CONDITIONS = 256


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _match(key: str, value: Any, where: str) -> qm.Condition:
    if isinstance(value, bool | str) or (isinstance(value, int) and not isinstance(value, bool)):
        return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))
    if _is_number(value):  # a float: equality as a closed range
        return qm.FieldCondition(key=key, range=qm.Range(gte=value, lte=value))
    if value is None:
        raise FilterError(f"{where}: null is not a value; use {{\"exists\": false}}")
    raise FilterError(f"{where}: expected a string, number or boolean, got {type(value).__name__}")


def _any_values(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise FilterError(f"{where}: expected a non-empty array of strings or of integers")
    if all(isinstance(v, str) for v in value):
        return value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise FilterError(f"{where}: values must be all strings or all integers")


class _Builder:
    def __init__(self) -> None:
        self.count = 0

    def build(self, spec: Any, where: str = "filter", depth: int = 0) -> qm.Filter:
        if depth > MAX_FILTER_DEPTH:
            raise FilterError(f"{where}: nested more than {MAX_FILTER_DEPTH} levels")
        if not isinstance(spec, dict):
            raise FilterError(f"{where}: expected an object of metadata conditions")
        must: list[Any] = []
        must_not: list[Any] = []
        should: list[Any] = []
        for key, cond in spec.items():
            self.count += 1
            if self.count > MAX_FILTER_CONDITIONS:
                raise FilterError(f"filter: more than {MAX_FILTER_CONDITIONS} conditions")
            at = f"{where}.{key}"
            if key in ("$and", "$or"):
                if not isinstance(cond, list) or not cond:
                    raise FilterError(f"{at}: expected a non-empty array of filters")
                subs = [self.build(c, f"{at}[{i}]", depth + 1) for i, c in enumerate(cond)]
                if key == "$and":
                    must.extend(subs)
                else:
                    must.append(qm.Filter(should=subs))
            elif key == "$not":
                must_not.append(self.build(cond, at, depth + 1))
            elif key.startswith("$"):
                raise FilterError(f"{at}: unknown operator (use $and, $or, $not)")
            elif not _FIELD.match(key):
                raise FilterError(f"{at}: bad metadata key (1-128 of A-Za-z0-9_.-)")
            else:
                self._field(f"metadata.{key}", cond, at, must, must_not)
        return qm.Filter(must=must or None, must_not=must_not or None, should=should or None)

    def _field(self, key: str, cond: Any, at: str, must: list[Any], must_not: list[Any]) -> None:
        if isinstance(cond, list):
            must.append(qm.FieldCondition(key=key, match=qm.MatchAny(any=_any_values(cond, at))))
            return
        if not isinstance(cond, dict):
            must.append(_match(key, cond, at))
            return
        if not cond:
            raise FilterError(f"{at}: empty condition")
        unknown = set(cond) - _OPS
        if unknown:
            raise FilterError(f"{at}: unknown operator(s) {sorted(unknown)}; use one of "
                              f"{sorted(_OPS)}")
        bounds: dict[str, float] = {}
        for op, value in cond.items():
            here = f"{at}.{op}"
            if op == "eq":
                must.append(_match(key, value, here))
            elif op == "ne":
                must_not.append(_match(key, value, here))
            elif op == "in":
                must.append(qm.FieldCondition(key=key, match=qm.MatchAny(
                    any=_any_values(value, here))))
            elif op == "nin":
                must_not.append(qm.FieldCondition(key=key, match=qm.MatchAny(
                    any=_any_values(value, here))))
            elif op == "exists":
                if not isinstance(value, bool):
                    raise FilterError(f"{here}: expected true or false")
                empty = qm.IsEmptyCondition(is_empty=qm.PayloadField(key=key))
                (must_not if value else must).append(empty)
            else:
                if not _is_number(value):
                    raise FilterError(f"{here}: expected a finite number")
                bounds[op] = float(value)
        if bounds:
            must.append(qm.FieldCondition(key=key, range=qm.Range(**bounds)))


def build_filter(spec: Any) -> qm.Filter | None:
    """Translate the native filter language into a Qdrant filter (FilterError when malformed).

    ``{"lang": "en", "year": {"gte": 2020, "lt": 2024}, "tag": ["a", "b"],
    "draft": {"exists": false}, "$or": [{...}, {...}], "$not": {...}}``: keys are ANDed;
    a scalar means equality, an array means any of, an object holds operators
    (eq ne in nin gt gte lt lte exists).
    """
    if spec is None:
        return None
    if isinstance(spec, dict) and not spec:
        return None
    return _Builder().build(spec)
