"""The OpenAPI 3.1 description of every route the daemon serves.

Request and response bodies come from `schemas.py`, the same dicts the routes validate with, so
the document cannot drift from what the daemon enforces; error examples come from
`errors.error_body`, the function that renders real errors. `downgrade_to_30` exists only
because the Swagger UI bundled with the daemon (4.x) cannot render 3.1 documents.
"""

from __future__ import annotations

import copy
from typing import Any

from citadeld.http import (
    event_openapi,
    llm_openapi,
    schemas,
    vector_schemas,
    workflow_openapi,
)
from citadeld.http.errors import Dialect, error_body
from citadeld.security import audit_routes

OPENAPI_VERSION = "3.1.0"

Json = dict[str, Any]

_DESCRIPTION = """\
Embedding service of the Citadel cluster. The same models are reachable in three API \
dialects, chosen by path prefix, and each dialect answers errors in its own envelope:

* **native** (`/api/v1/*`, `/health*`, `/metrics`): `{"error": {"code", "message", \
"request_id"}}`;
* **OpenAI** (`/v1/*`): `{"error": {"message", "type", "param", "code"}}`, so OpenAI SDKs \
work unchanged;
* **Ollama** (`/api/*` other than `/api/v1/*`): `{"error": "..."}`, so Ollama clients work \
unchanged.

With `encoding_format: base64` (OpenAI dialect) each embedding is the base64 of its \
**little-endian float32** values, 4 bytes per dimension.

Every response carries `X-Request-ID` (the client's own if it sent a valid one); 429 and 503 \
carry `Retry-After` in seconds.
"""

_TAGS: list[Json] = [
    {"name": "native", "description": "Citadel's own API (`/api/v1/*`)."},
    {"name": "openai", "description": "OpenAI-compatible API (`/v1/*`)."},
    {"name": "ollama", "description": "Ollama-compatible API (`/api/*`)."},
    {"name": "health", "description": "Probes and Prometheus metrics; answered while draining."},
    {"name": "docs", "description": "This document and its Swagger UI."},
]

_RID_EXAMPLE = "3f2c9a0e5b7d4c1e8a6f0b2d4e6a8c0f"

# status -> (component suffix, description, example code, example message)
_ERRORS: dict[int, tuple[str, str, str, str]] = {
    400: ("BadRequest",
          "Bad input: the body is not valid JSON or does not match the request schema (wrong"
          " types, missing fields), an input is empty or too long, there are too many inputs,"
          " or `dimensions` is out of range for the model.",
          "too_many_inputs", "too many inputs: 5000 (at most 2048 per request)"),
    404: ("NotFound", "Unknown model (neither a configured name nor an alias), or no such route.",
          "model_not_found", "model 'nope' is not configured"),
    413: ("PayloadTooLarge", "The request body exceeds the configured `max_body_bytes`.",
          "payload_too_large", "request body is 9000000 bytes (at most 4194304)"),
    429: ("Overloaded",
          "The model's queue is full. Retry after `Retry-After` seconds.",
          "overloaded", "model all-minilm has 4096 inputs queued (cap 4096); retry later"),
    500: ("InternalError", "Unexpected failure; the daemon log has the request id.",
          "internal_error", "internal error; see the daemon log for this request id"),
    502: ("UpstreamError", "The embedding backend failed or returned an invalid result.",
          "upstream_error", "embedding backend failed: HTTP 500"),
    503: ("Unavailable",
          "No backend endpoint is reachable, or the daemon is draining. Retry after"
          " `Retry-After` seconds.",
          "unavailable", "daemon is draining; retry on another instance"),
    504: ("UpstreamTimeout", "The embedding backend or the whole request timed out.",
          "upstream_timeout", "request timed out"),
}
_RETRY_AFTER = frozenset({429, 503})
_EMBED_ERRORS = (400, 404, 413, 429, 500, 502, 503, 504)
_READ_ERRORS = (500, 503)  # a read-only route fails only when draining or on a bug

_DIALECTS: dict[Dialect, tuple[str, str]] = {  # dialect -> (component prefix, error schema)
    Dialect.NATIVE: ("Native", "NativeError"),
    Dialect.OPENAI: ("OpenAI", "OpenAIError"),
    Dialect.OLLAMA: ("Ollama", "OllamaError"),
}

_PROP_DOCS: dict[str, str] = {
    "text": "One text to embed (give `text` or `texts`, not both).",
    "texts": "Texts to embed in one call; vectors come back in the same order.",
    "cache": "Look up and store vectors in the embedding cache (default true).",
    "truncate": "Truncate inputs longer than the model's context instead of failing "
                "(default: the model's setting).",
    "dimensions": "Return only the first N dimensions (renormalized when the model "
                  "normalizes); at most the model's size.",
    "input": "A string or an array of strings. Token-id arrays are rejected with 400.",
    "encoding_format": "`float` (default) or `base64`: base64 of little-endian float32 values.",
    "prompt": "The text to embed; an empty prompt yields an empty vector.",
}


def _ref(kind: str, name: str) -> Json:
    return {"$ref": f"#/components/{kind}/{name}"}


def _request_schema(base: Json, model_names: list[str], model_doc: str) -> Json:
    """A documented deep copy: the originals are compiled validators' input and stay as-is."""
    out = copy.deepcopy(base)
    props = out["properties"]
    for name, doc in _PROP_DOCS.items():
        if name in props:
            props[name]["description"] = doc
    props["model"]["description"] = model_doc
    if model_names:  # examples, not an enum: aliases and `name:latest` are accepted too
        props["model"]["examples"] = list(model_names)
    return out


def _component_schemas(model_names: list[str]) -> Json:
    native_req = _request_schema(
        schemas.NATIVE_EMBED_REQUEST, model_names,
        "A configured model name or alias; defaults to the configured default model.",
    )
    # keep the oneOf/required pair as is (additionalProperties stays on the outer object, so
    # each branch only says which field is present); titles just make the branches readable
    native_req["oneOf"] = [
        {"title": "single text", **native_req["oneOf"][0]},
        {"title": "batch of texts", **native_req["oneOf"][1]},
    ]
    openai_req = _request_schema(
        schemas.OPENAI_EMBED_REQUEST, model_names,
        "A configured model name or alias; defaults to the configured default model.",
    )
    ollama_doc = "A configured model name or alias; `name:latest` is accepted for `name`."
    ollama_req = _request_schema(schemas.OLLAMA_EMBED_REQUEST, model_names, ollama_doc)
    ollama_legacy = _request_schema(schemas.OLLAMA_EMBEDDINGS_REQUEST, model_names, ollama_doc)

    health_summary: Json = {
        "type": "object",
        "required": ["status", "ready", "draining", "version", "models", "cache"],
        "properties": {
            "status": {"enum": ["ok", "degraded", "down"]},
            "ready": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "version": {"type": "string"},
            "models": {"type": "object", "additionalProperties": {"enum": ["ok", "down"]}},
            "cache": {"type": "string", "description": "Cache health: ok, down or unknown."},
        },
    }
    return {
        "NativeEmbedRequest": native_req,
        "NativeEmbedResponse": copy.deepcopy(schemas.NATIVE_EMBED_RESPONSE),
        "NativeStatus": {
            "type": "object",
            "required": ["version", "uptime_s", "listen", "draining", "default_model",
                         "models", "cache"],
            "properties": {
                "version": {"type": "string"},
                "uptime_s": {"type": "number"},
                "listen": {"type": "string"},
                "draining": {"type": "boolean"},
                "default_model": {"type": "string"},
                "models": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {
                            "backend": {"type": "string"},
                            "dims": {"type": "integer"},
                            "max_context": {"type": "integer"},
                            "ready": {"type": "boolean"},
                            "queue_depth": {"type": "integer"},
                            "slots": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                },
                "cache": {"type": "object"},
            },
        },
        "OpenAIEmbeddingsRequest": openai_req,
        "OpenAIEmbeddingsResponse": copy.deepcopy(schemas.OPENAI_EMBED_RESPONSE),
        "OpenAIModelList": {
            "type": "object",
            "required": ["object", "data"],
            "properties": {
                "object": {"const": "list"},
                "data": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "object", "created", "owned_by"],
                        "properties": {
                            "id": {"type": "string"},
                            "object": {"const": "model"},
                            "created": {"type": "integer"},
                            "owned_by": {"type": "string"},
                        },
                    },
                },
            },
        },
        "OllamaEmbedRequest": ollama_req,
        "OllamaEmbedResponse": copy.deepcopy(schemas.OLLAMA_EMBED_RESPONSE),
        "OllamaEmbeddingsRequest": ollama_legacy,
        "OllamaEmbeddingsResponse": copy.deepcopy(schemas.OLLAMA_EMBEDDINGS_RESPONSE),
        "OllamaTags": {
            "type": "object",
            "required": ["models"],
            "properties": {
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "model", "modified_at", "size", "digest",
                                     "details"],
                        "properties": {
                            "name": {"type": "string"},
                            "model": {"type": "string"},
                            "modified_at": {"type": "string", "format": "date-time"},
                            "size": {"type": "integer"},
                            "digest": {"type": "string"},
                            "details": {
                                "type": "object",
                                "properties": {
                                    "format": {"type": "string"},
                                    "family": {"type": "string"},
                                    "families": {"type": "array", "items": {"type": "string"}},
                                    "parameter_size": {"type": "string"},
                                    "quantization_level": {"type": "string"},
                                },
                            },
                        },
                    },
                }
            },
        },
        "OllamaVersion": {
            "type": "object",
            "required": ["version"],
            "properties": {"version": {"type": "string"}},
        },
        "HealthSummary": health_summary,
        "HealthLive": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "alive"}},
        },
        "HealthReady": {
            "type": "object",
            "required": ["ready", "draining", "models"],
            "properties": {
                "ready": {"type": "boolean"},
                "draining": {"type": "boolean"},
                "models": {"type": "object", "additionalProperties": {"type": "boolean"}},
            },
        },
        "HealthDetailed": {
            "allOf": [
                _ref("schemas", "HealthSummary"),
                {
                    "type": "object",
                    "required": ["uptime_s", "dependencies", "pools", "cache_stats", "actors"],
                    "properties": {
                        "uptime_s": {"type": "number"},
                        "dependencies": {"type": "object"},
                        "pools": {"type": "object"},
                        "cache_stats": {"type": "object"},
                        "actors": {"type": "array", "items": {"type": "object"}},
                        "event_loop_lag_ms": {"type": "object"},
                    },
                },
            ]
        },
        "NativeError": copy.deepcopy(schemas.NATIVE_ERROR),
        "OpenAIError": copy.deepcopy(schemas.OPENAI_ERROR),
        "OllamaError": copy.deepcopy(schemas.OLLAMA_ERROR),
    }


def _headers() -> Json:
    return {
        "RetryAfter": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1},
        },
        "XRequestID": {
            "description": "The request id, also in the daemon's logs.",
            "schema": {"type": "string"},
        },
    }


def _rid_header() -> Json:
    return {"X-Request-ID": _ref("headers", "XRequestID")}


def _error_responses() -> Json:
    out: Json = {}
    for dialect, (prefix, schema_name) in _DIALECTS.items():
        for status, (suffix, description, code, message) in _ERRORS.items():
            headers = _rid_header()
            if status in _RETRY_AFTER:
                headers["Retry-After"] = _ref("headers", "RetryAfter")
            example = error_body(dialect, status, code, message, None, _RID_EXAMPLE)
            out[f"{prefix}{suffix}"] = {
                "description": description,
                "headers": headers,
                "content": {"application/json": {
                    "schema": _ref("schemas", schema_name),
                    "example": example,
                }},
            }
    return out


def _json_ok(schema: str, description: str = "Success.") -> Json:
    return {
        "description": description,
        "headers": _rid_header(),
        "content": {"application/json": {"schema": _ref("schemas", schema)}},
    }


def _op(
    tag: str,
    operation_id: str,
    summary: str,
    ok: Json,
    *,
    dialect: Dialect = Dialect.NATIVE,
    errors: tuple[int, ...] = (),
    request: str | None = None,
    request_example: Json | None = None,
    extra: Json | None = None,
) -> Json:
    responses: Json = {"200": ok}
    if extra:
        responses.update(extra)
    prefix = _DIALECTS[dialect][0]
    for status in errors:
        responses[str(status)] = _ref("responses", f"{prefix}{_ERRORS[status][0]}")
    op: Json = {
        "tags": [tag],
        "operationId": operation_id,
        "summary": summary,
        "parameters": [_ref("parameters", "XRequestID")],
    }
    if request is not None:
        media: Json = {"schema": _ref("schemas", request)}
        if request_example is not None:
            media["example"] = request_example
        op["requestBody"] = {"required": True, "content": {"application/json": media}}
    op["responses"] = responses
    return op


def _paths(model_names: list[str]) -> Json:
    model = model_names[0] if model_names else "all-minilm"
    return {
        "/api/v1/embed": {"post": _op(
            "native", "nativeEmbed", "Embed one text or a batch", _json_ok("NativeEmbedResponse"),
            errors=_EMBED_ERRORS, request="NativeEmbedRequest",
            request_example={"texts": ["hello", "world"], "model": model},
        )},
        "/api/v1/status": {"get": _op(
            "native", "nativeStatus", "Daemon, model pool and cache status",
            _json_ok("NativeStatus"), errors=_READ_ERRORS,
        )},
        "/v1/embeddings": {"post": _op(
            "openai", "openaiCreateEmbeddings", "Create embeddings (OpenAI-compatible)",
            _json_ok("OpenAIEmbeddingsResponse"), dialect=Dialect.OPENAI,
            errors=_EMBED_ERRORS, request="OpenAIEmbeddingsRequest",
            request_example={"input": ["hello", "world"], "model": model,
                             "encoding_format": "float"},
        )},
        "/v1/models": {"get": _op(
            "openai", "openaiListModels", "List configured models (OpenAI-compatible)",
            _json_ok("OpenAIModelList"), dialect=Dialect.OPENAI, errors=_READ_ERRORS,
        )},
        "/api/embed": {"post": _op(
            "ollama", "ollamaEmbed", "Embed one text or a batch (Ollama-compatible)",
            _json_ok("OllamaEmbedResponse"), dialect=Dialect.OLLAMA,
            errors=_EMBED_ERRORS, request="OllamaEmbedRequest",
            request_example={"model": model, "input": ["hello", "world"]},
        )},
        "/api/embeddings": {"post": _op(
            "ollama", "ollamaEmbeddings", "Embed one prompt (legacy Ollama endpoint)",
            _json_ok("OllamaEmbeddingsResponse"), dialect=Dialect.OLLAMA,
            errors=_EMBED_ERRORS, request="OllamaEmbeddingsRequest",
            request_example={"model": model, "prompt": "hello"},
        )},
        "/api/tags": {"get": _op(
            "ollama", "ollamaTags", "List configured models (Ollama-compatible)",
            _json_ok("OllamaTags"), dialect=Dialect.OLLAMA, errors=_READ_ERRORS,
        )},
        "/api/version": {"get": _op(
            "ollama", "ollamaVersion", "The Ollama API version this daemon emulates",
            _json_ok("OllamaVersion"), dialect=Dialect.OLLAMA, errors=_READ_ERRORS,
        )},
        "/health": {"get": _op(
            "health", "health", "Overall health", _json_ok("HealthSummary", "Ok or degraded."),
            extra={"503": _json_ok("HealthSummary", "Down: no model can embed.")},
        )},
        "/health/live": {"get": _op(
            "health", "healthLive", "Liveness probe: the event loop answers",
            _json_ok("HealthLive"),
        )},
        "/health/ready": {"get": _op(
            "health", "healthReady", "Readiness probe: every model can embed, not draining",
            _json_ok("HealthReady", "Ready."),
            extra={"503": _json_ok("HealthReady", "Not ready or draining.")},
        )},
        "/health/detailed": {"get": _op(
            "health", "healthDetailed", "Health with dependencies, pools, cache and actors",
            _json_ok("HealthDetailed"),
        )},
        "/metrics": {"get": _op(
            "health", "metrics", "Prometheus metrics",
            {
                "description": "Prometheus text exposition format 0.0.4.",
                "headers": _rid_header(),
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
        )},
        "/openapi.json": {"get": _op(
            "docs", "openapiDocument", "This OpenAPI document",
            {
                "description": "The OpenAPI 3.1 document.",
                "headers": _rid_header(),
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
        )},
        "/docs": {"get": _op(
            "docs", "swaggerUi", "Swagger UI for this document (assets served locally)",
            {
                "description": "An HTML page.",
                "headers": _rid_header(),
                "content": {"text/html": {"schema": {"type": "string"}}},
            },
        )},
    }


def build_openapi(app_version: str, model_names: list[str], auth: Any = None) -> Json:
    """The whole document; a pure function of its arguments, so equal inputs give equal JSON.
    `auth` (an AuthConfig) adds security schemes and requirements when auth is on."""
    from citadeld.security.openapi import apply as apply_security
    from citadeld.security.ratelimit_openapi import apply as apply_rate_limits

    return apply_security(apply_rate_limits(_document(app_version, model_names)), auth)


def _document(app_version: str, model_names: list[str]) -> Json:
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "citadeld",
            "version": app_version,
            "description": _DESCRIPTION,
        },
        "tags": copy.deepcopy(_TAGS),
        "paths": {**_paths(model_names), **llm_openapi.paths(_op, _json_ok, "llama3.2"),
                  **vector_schemas.openapi_paths(_op, _json_ok, _ref),
                  **audit_routes.openapi_paths(_op, _json_ok),
                  **workflow_openapi.paths(_op, _json_ok, _ref),
                  **event_openapi.paths(_op, _ref)},
        "components": {
            "schemas": {**_component_schemas(model_names), **llm_openapi.component_schemas(),
                        **vector_schemas.openapi_schemas(), **audit_routes.openapi_schemas(),
                        **workflow_openapi.component_schemas(),
                        **event_openapi.component_schemas()},
            "responses": _error_responses(),
            "headers": _headers(),
            "parameters": {
                "XRequestID": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "Optional request id to propagate (1-128 of "
                                   "`A-Za-z0-9._:-`); otherwise the daemon makes one.",
                    "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
                }
            },
        },
    }


# ---- 3.0 rendering for the bundled Swagger UI ----------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties", "$defs")
_SCHEMA_LISTS = ("oneOf", "anyOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains")


def _schema_30(schema: Any) -> Any:
    """Rewrite the 3.1-only keywords this document uses into their 3.0 equivalents."""
    if not isinstance(schema, dict):
        return schema
    s: Json = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS:
            s[key] = {k: _schema_30(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS:
            s[key] = [_schema_30(v) for v in value]
        elif key in _SCHEMA_ONE:
            s[key] = _schema_30(value)
        else:
            s[key] = value
    if "const" in s:
        s["enum"] = [s.pop("const")]
    if "examples" in s:
        examples = s.pop("examples")
        if examples:
            s["example"] = examples[0]
    types = s.get("type")
    if isinstance(types, list):
        rest = [t for t in types if t != "null"]
        if len(rest) < len(types):
            s["nullable"] = True
        if len(rest) == 1:
            s["type"] = rest[0]
        else:
            del s["type"]
            alt = [{"type": t} for t in rest]
            if "oneOf" in s:
                s["allOf"] = [*s.get("allOf", []), {"oneOf": alt}]
            else:
                s["oneOf"] = alt
    if s.get("type") == "array" and "items" not in s:
        s["items"] = {}  # 3.0 requires items on arrays
    if "$ref" in s and len(s) > 1:  # 3.0 ignores siblings of $ref
        s = {"allOf": [{"$ref": s.pop("$ref")}], **s}
    return s


def _walk_30(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _schema_30(v) if k == "schema" else _walk_30(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk_30(v) for v in node]
    return node


def downgrade_to_30(doc: Json) -> Json:
    """The same API as OpenAPI 3.0.3, for renderers (the bundled Swagger UI 4) that stop at 3.0.

    /openapi.json stays 3.1; this copy only feeds /docs.
    """
    components = doc.get("components", {})
    out = _walk_30({k: v for k, v in doc.items() if k not in ("components", "jsonSchemaDialect",
                                                               "webhooks")})
    out["openapi"] = "3.0.3"
    comps = _walk_30({k: v for k, v in components.items() if k != "schemas"})
    comps["schemas"] = {k: _schema_30(v) for k, v in components.get("schemas", {}).items()}
    out["components"] = comps
    return out
