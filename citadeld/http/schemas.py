"""JSON Schemas of request and response bodies: one source for validation and for OpenAPI."""

from __future__ import annotations

from typing import Any

_DIMS = {"type": "integer", "minimum": 1, "maximum": 65536}
_VECTORS = {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}

NATIVE_EMBED_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "texts": {"type": "array", "items": {"type": "string"}},
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "cache": {"type": "boolean"},
        "truncate": {"type": "boolean"},
        "dimensions": _DIMS,
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
}

NATIVE_EMBED_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["model", "dimensions", "embeddings", "cached", "usage", "request_id"],
    "properties": {
        "model": {"type": "string"},
        "dimensions": {"type": "integer"},
        "embeddings": _VECTORS,
        "cached": {"type": "array", "items": {"type": "boolean"}},
        "usage": {
            "type": "object",
            "properties": {"tokens": {"type": "integer"}, "cached": {"type": "integer"}},
        },
        "request_id": {"type": "string"},
    },
}

OPENAI_EMBED_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "input": {"oneOf": [{"type": "string"}, {"type": "array"}]},
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": _DIMS,
        "user": {"type": "string"},
    },
}

OPENAI_EMBED_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [{"type": "array", "items": {"type": "number"}},
                                  {"type": "string"}]
                    },
                },
            },
        },
        "model": {"type": "string"},
        "usage": {
            "type": "object",
            "properties": {
                "prompt_tokens": {"type": "integer"},
                "total_tokens": {"type": "integer"},
            },
        },
    },
}

OLLAMA_EMBED_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "truncate": {"type": "boolean"},
        "dimensions": _DIMS,
        "keep_alive": {"type": ["string", "number"]},
        "options": {"type": "object"},
    },
}

OLLAMA_EMBED_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["model", "embeddings"],
    "properties": {
        "model": {"type": "string"},
        "embeddings": _VECTORS,
        "total_duration": {"type": "integer"},
        "load_duration": {"type": "integer"},
        "prompt_eval_count": {"type": "integer"},
    },
}

OLLAMA_EMBEDDINGS_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "maxLength": 256},
        "prompt": {"type": "string"},
        "keep_alive": {"type": ["string", "number"]},
        "options": {"type": "object"},
    },
}

OLLAMA_EMBEDDINGS_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["embedding"],
    "properties": {"embedding": {"type": "array", "items": {"type": "number"}}},
}

NATIVE_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "request_id"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "request_id": {"type": "string"},
            },
        }
    },
}

OPENAI_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

OLLAMA_ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}
