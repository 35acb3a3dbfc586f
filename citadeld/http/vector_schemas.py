"""JSON Schemas of the vector and collection routes, and their part of the OpenAPI document
(one source for validation and documentation, like ``schemas.py`` for the embedding routes)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Json = dict[str, Any]

_ID: Json = {"oneOf": [{"type": "string", "minLength": 1, "maxLength": 256},
                       {"type": "integer", "minimum": 0}],
             "description": "Caller id (string, or a non-negative integer taken as its decimal "
                            "string). Storing an id again replaces its vector: idempotent."}
_VECTOR: Json = {"type": "array", "items": {"type": "number"}, "minItems": 1,
                 "maxItems": 65536, "description": "A raw vector of the collection's dimension."}
_TEXT: Json = {"type": "string", "minLength": 1,
               "description": "Text embedded by citadeld with the collection's model."}
_META: Json = {"type": "object", "description": "Free-form JSON metadata, filterable."}
_COLLECTION: Json = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$",
                     "description": "Collection name; default: the configured default."}
_MODEL: Json = {"type": "string", "minLength": 1, "maxLength": 256,
                "description": "Optional check: must be the collection's model (or an alias)."}
_FILTER: Json = {
    "type": "object",
    "description": "Metadata filter. Keys are ANDed; a scalar means equality, an array any "
                   "of, an object holds operators eq, ne, in, nin, gt, gte, lt, lte, exists; "
                   "`$and`, `$or` (arrays of filters) and `$not` (a filter) combine them. "
                   "Example: {\"lang\": \"en\", \"year\": {\"gte\": 2020}, \"tag\": [\"a\", "
                   "\"b\"]}.",
}

STORE_ITEM: Json = {
    "type": "object",
    "properties": {"id": _ID, "text": _TEXT, "vector": _VECTOR, "metadata": _META},
    "additionalProperties": False,
}

STORE_REQUEST: Json = {
    "type": "object",
    "properties": {
        "collection": _COLLECTION, "model": _MODEL,
        "items": {"type": "array", "items": STORE_ITEM,
                  "description": "Items to store (each: text or vector). Or give one item's "
                                 "fields at the top level instead."},
        "id": _ID, "text": _TEXT, "vector": _VECTOR, "metadata": _META,
    },
    "additionalProperties": False,
}

UPDATE_ITEM: Json = {
    "type": "object",
    "required": ["id"],
    "properties": {"id": _ID, "text": _TEXT, "vector": _VECTOR, "metadata": _META},
    "additionalProperties": False,
}

UPDATE_REQUEST: Json = {
    "type": "object",
    "properties": {
        "collection": _COLLECTION, "model": _MODEL,
        "items": {"type": "array", "items": UPDATE_ITEM,
                  "description": "Each: id plus a new text or vector and/or new metadata "
                                 "(replaces the old metadata)."},
        "id": _ID, "text": _TEXT, "vector": _VECTOR, "metadata": _META,
    },
    "additionalProperties": False,
}

SEARCH_REQUEST: Json = {
    "type": "object",
    "properties": {
        "collection": _COLLECTION, "model": _MODEL,
        "text": _TEXT, "vector": _VECTOR,
        "limit": {"type": "integer", "minimum": 1, "description": "Results (default 10)."},
        "filter": _FILTER,
        "score_threshold": {"type": "number",
                            "description": "Only results scoring at least this."},
        "with_vectors": {"type": "boolean", "description": "Return stored vectors too."},
    },
    "additionalProperties": False,
}

COLLECTION_REQUEST: Json = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "model": {"type": "string", "minLength": 1, "maxLength": 256,
                  "description": "Embedding model the collection is bound to (default: the "
                                 "default model); its dimension is the collection's."},
        "dimension": {"type": "integer", "minimum": 1, "maximum": 65536,
                      "description": "Without model: a raw-vector collection of this size."},
        "distance": {"enum": ["cosine", "dot", "euclid", "manhattan"]},
        "raw": {"type": "boolean", "description": "No model: raw vectors only."},
    },
    "additionalProperties": False,
}

WRITE_RESPONSE: Json = {
    "type": "object",
    "required": ["collection", "ids", "count", "status", "request_id"],
    "properties": {
        "collection": {"type": "string"},
        "ids": {"type": "array", "items": {"type": "string"}},
        "count": {"type": "integer"},
        "status": {"enum": ["applied", "queued"]},
        "operation": {"type": "integer"},
        "status_url": {"type": "string"},
        "request_id": {"type": "string"},
    },
}

HIT: Json = {
    "type": "object",
    "required": ["id", "metadata"],
    "properties": {
        "id": {"type": "string"},
        "score": {"type": "number"},
        "metadata": {"type": "object"},
        "text": {"type": ["string", "null"]},
        "vector": {"type": ["array", "null"], "items": {"type": "number"}},
        "collection": {"type": "string"},
    },
}

SEARCH_RESPONSE: Json = {
    "type": "object",
    "required": ["collection", "results", "request_id"],
    "properties": {
        "collection": {"type": "string"},
        "model": {"type": ["string", "null"]},
        "results": {"type": "array", "items": HIT},
        "pending_writes": {"type": ["integer", "null"],
                           "description": "Present while queued writes are not yet applied."},
        "request_id": {"type": "string"},
    },
}

COLLECTION: Json = {
    "type": "object",
    "required": ["name", "model", "dimension", "distance"],
    "properties": {
        "name": {"type": "string"},
        "model": {"type": ["string", "null"]},
        "dimension": {"type": "integer"},
        "distance": {"type": "string"},
        "managed": {"type": "boolean"},
        "points": {"type": ["integer", "null"]},
    },
}

COLLECTION_LIST: Json = {
    "type": "object",
    "required": ["collections"],
    "properties": {"collections": {"type": "array", "items": COLLECTION}},
}

OPERATION: Json = {
    "type": "object",
    "required": ["operation", "status"],
    "properties": {
        "operation": {"type": "integer"},
        "collection": {"type": "string"},
        "kind": {"enum": ["upsert", "update", "delete"]},
        "items": {"type": "integer"},
        "status": {"enum": ["queued", "applied", "failed"]},
        "attempts": {"type": "integer"},
        "error": {"type": ["string", "null"]},
        "created_at": {"type": "number"},
        "done_at": {"type": ["number", "null"]},
        "request_id": {"type": ["string", "null"]},
    },
}

_COMPONENTS: dict[str, Json] = {
    "VectorStoreRequest": STORE_REQUEST,
    "VectorUpdateRequest": UPDATE_REQUEST,
    "VectorSearchRequest": SEARCH_REQUEST,
    "VectorWriteResponse": WRITE_RESPONSE,
    "VectorSearchResponse": SEARCH_RESPONSE,
    "VectorItem": HIT,
    "VectorOperation": OPERATION,
    "CollectionRequest": COLLECTION_REQUEST,
    "Collection": COLLECTION,
    "CollectionList": COLLECTION_LIST,
}


def openapi_schemas() -> dict[str, Json]:
    return copy.deepcopy(_COMPONENTS)


_WRITE_ERRORS = (400, 404, 413, 500, 503, 504)
_READ_ERRORS = (400, 404, 500, 503, 504)


def openapi_paths(op: Callable[..., Json], json_ok: Callable[..., Json],
                  ref: Callable[[str, str], Json]) -> dict[str, Json]:
    """Paths of the vector routes, built with the document's own helpers (``_op`` ...)."""

    def conflict(description: str) -> Json:
        return {"description": description,
                "content": {"application/json": {"schema": ref("schemas", "NativeError")}}}

    def param(name: str, where: str, schema: Json, description: str,
              required: bool = False) -> Json:
        return {"name": name, "in": where, "required": required, "description": description,
                "schema": schema}

    queued = json_ok("VectorWriteResponse",
                     "Qdrant is unavailable: the write is recorded in the PostgreSQL outbox and "
                     "will be applied in order; poll `status_url`.")
    coll_q = param("collection", "query", {"type": "string"}, "Collection (default: the "
                   "configured default).")

    def with_params(o: Json, *params: Json) -> Json:
        o["parameters"] = [*o.get("parameters", []), *params]
        return o

    vid = param("id", "path", {"type": "string"}, "The caller's id.", True)
    return {
        "/api/v1/vectors/store": {"post": op(
            "native", "vectorsStore", "Store items (texts embedded, or raw vectors)",
            json_ok("VectorWriteResponse", "Applied in Qdrant."), errors=_WRITE_ERRORS,
            request="VectorStoreRequest",
            request_example={"items": [{"id": "doc-1", "text": "hello world",
                                        "metadata": {"lang": "en"}}]},
            extra={"202": queued})},
        "/api/v1/vectors/search": {"post": op(
            "native", "vectorsSearch", "Search by text or vector, with a metadata filter",
            json_ok("VectorSearchResponse"), errors=_READ_ERRORS,
            request="VectorSearchRequest",
            request_example={"text": "greeting", "limit": 5, "filter": {"lang": "en"}})},
        "/api/v1/vectors/update": {"post": op(
            "native", "vectorsUpdate", "Replace the vector and/or metadata of stored ids",
            json_ok("VectorWriteResponse", "Applied in Qdrant."), errors=_WRITE_ERRORS,
            request="VectorUpdateRequest",
            request_example={"items": [{"id": "doc-1", "metadata": {"lang": "de"}}]},
            extra={"202": queued})},
        "/api/v1/vectors/operations/{operation}": {"get": with_params(op(
            "native", "vectorsOperation", "Status of a queued write (from a 202)",
            json_ok("VectorOperation"), errors=_READ_ERRORS),
            param("operation", "path", {"type": "integer"}, "Operation number.", True))},
        "/api/v1/vectors/{id}": {
            "get": with_params(op(
                "native", "vectorsGet", "One stored item", json_ok("VectorItem"),
                errors=_READ_ERRORS), vid, coll_q,
                param("with_vector", "query", {"type": "boolean"}, "Return the vector too.")),
            "delete": with_params(op(
                "native", "vectorsDelete", "Delete one stored item",
                json_ok("VectorWriteResponse", "Deleted in Qdrant."), errors=_WRITE_ERRORS,
                extra={"202": queued}), vid, coll_q),
        },
        "/api/v1/collections": {
            "get": op("native", "collectionsList", "Collections with their model, dimension"
                      " and distance", json_ok("CollectionList"), errors=(500, 503)),
            "post": op("native", "collectionsCreate", "Create a collection bound to a model",
                       json_ok("Collection", "Exists already with the same binding."),
                       errors=(400, 404, 500, 503), request="CollectionRequest",
                       request_example={"name": "docs", "model": "all-minilm"},
                       extra={"201": json_ok("Collection", "Created."),
                              "409": conflict("Exists with another binding.")}),
        },
        "/api/v1/collections/{name}": {
            "get": with_params(op("native", "collectionsGet", "One collection",
                                  json_ok("Collection"), errors=(400, 404, 500, 503)),
                               param("name", "path", {"type": "string"}, "Collection.", True)),
            "delete": with_params(op(
                "native", "collectionsDelete", "Delete a collection and its vectors",
                json_ok("Collection", "Deleted."), errors=(400, 404, 500, 503),
                extra={"409": conflict("Writes to it are still queued in the outbox.")}),
                param("name", "path", {"type": "string"}, "Collection.", True)),
        },
    }


ROUTES = frozenset({
    ("POST", "/api/v1/vectors/store"),
    ("POST", "/api/v1/vectors/search"),
    ("POST", "/api/v1/vectors/update"),
    ("GET", "/api/v1/vectors/operations/{operation}"),
    ("GET", "/api/v1/vectors/{id}"),
    ("DELETE", "/api/v1/vectors/{id}"),
    ("GET", "/api/v1/collections"),
    ("POST", "/api/v1/collections"),
    ("GET", "/api/v1/collections/{name}"),
    ("DELETE", "/api/v1/collections/{name}"),
})
