"""JSON Schemas of the LLM routes' request and response bodies: the routes validate with these
(compiled once by fastjsonschema) and the OpenAPI document shows the same dicts.

The OpenAI and Ollama request schemas allow unknown keys, as their own servers ignore fields
they do not use and official clients send some by default; the native one is strict.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]

_MODEL: Json = {"type": "string", "minLength": 1, "maxLength": 256}
_STOP: Json = {"type": ["string", "array", "null"], "items": {"type": "string"}, "maxItems": 16}
_TEXT_PART: Json = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"type": "string"}, "text": {"type": "string"}},
}
_ROLE: Json = {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]}

NATIVE_MESSAGE: Json = {
    "type": "object",
    "additionalProperties": False,
    "required": ["role", "content"],
    "properties": {"role": _ROLE, "content": {"type": "string"}},
}

NATIVE_GENERATE_REQUEST: Json = {
    "type": "object",
    "additionalProperties": False,
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "prompt": {"type": "string", "description": "Give `prompt` or `messages`."},
        "system": {"type": "string", "description": "System prompt used with `prompt`."},
        "messages": {"type": "array", "items": NATIVE_MESSAGE},
        "server": {"type": "string", "minLength": 1, "maxLength": 64,
                   "description": "Preferred server; others still take over if it fails."},
        "stream": {"type": "boolean", "description": "NDJSON events instead of one answer."},
        "caller": {"type": "string", "maxLength": 128,
                   "description": "Usage accounting label (else the X-Citadel-Caller header)."},
        "options": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                "top_p": {"type": "number", "minimum": 0, "maximum": 1},
                "max_tokens": {"type": "integer", "minimum": 1},
                "stop": _STOP,
                "seed": {"type": "integer"},
                "frequency_penalty": {"type": "number"},
                "presence_penalty": {"type": "number"},
                "json": {"type": "boolean", "description": "Ask for a JSON answer."},
            },
        },
    },
}

_USAGE: Json = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "estimated": {"type": "boolean",
                      "description": "true when the server reported no counts"},
        "cost": {"type": ["number", "null"]},
        "currency": {"type": "string"},
    },
}

NATIVE_GENERATE_RESPONSE: Json = {
    "type": "object",
    "required": ["model", "server", "text", "finish_reason", "attempts", "usage", "timings"],
    "properties": {
        "model": {"type": "string"},
        "server": {"type": "string", "description": "The server that answered."},
        "text": {"type": "string"},
        "finish_reason": {"type": "string"},
        "attempts": {"type": "integer", "description": "Upstream attempts, failed ones too."},
        "usage": _USAGE,
        "timings": {
            "type": "object",
            "properties": {
                "total_ms": {"type": "number"},
                "ttft_ms": {"type": "number"},
                "upstream_ttft_ms": {"type": "number"},
            },
        },
        "request_id": {"type": "string"},
    },
}

_OPENAI_MESSAGE: Json = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": _ROLE,
        "content": {"type": ["string", "array", "null"], "items": _TEXT_PART},
        "name": {"type": "string"},
    },
}

_NUM_OR_NULL: Json = {"type": ["number", "null"]}

OPENAI_CHAT_REQUEST: Json = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": _MODEL,
        "messages": {"type": "array", "items": _OPENAI_MESSAGE},
        "stream": {"type": ["boolean", "null"]},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "temperature": _NUM_OR_NULL,
        "top_p": _NUM_OR_NULL,
        "max_tokens": {"type": ["integer", "null"], "minimum": 1},
        "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
        "stop": _STOP,
        "seed": {"type": ["integer", "null"]},
        "n": {"type": ["integer", "null"], "minimum": 1},
        "frequency_penalty": _NUM_OR_NULL,
        "presence_penalty": _NUM_OR_NULL,
        "user": {"type": "string"},
        "response_format": {"type": ["object", "null"]},
        "tools": {"type": ["array", "null"]},
    },
}

OPENAI_CHAT_RESPONSE: Json = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "index": {"type": "integer"},
                "message": {"type": "object", "properties": {
                    "role": {"const": "assistant"}, "content": {"type": "string"}}},
                "finish_reason": {"type": "string"},
            },
        }},
        "usage": _USAGE,
    },
}

_OLLAMA_MESSAGE: Json = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": _ROLE,
        "content": {"type": "string"},
        "images": {"type": ["array", "null"], "items": {"type": "string"}},
    },
}

OLLAMA_CHAT_REQUEST: Json = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "messages": {"type": "array", "items": _OLLAMA_MESSAGE},
        "stream": {"type": "boolean", "description": "Default true (NDJSON)."},
        "options": {"type": ["object", "null"]},
        "format": {"type": ["string", "object", "null"]},
        "keep_alive": {"type": ["string", "number", "null"]},
        "tools": {"type": ["array", "null"]},
    },
}

OLLAMA_GENERATE_REQUEST: Json = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": _MODEL,
        "prompt": {"type": "string"},
        "system": {"type": "string"},
        "stream": {"type": "boolean", "description": "Default true (NDJSON)."},
        "options": {"type": ["object", "null"]},
        "format": {"type": ["string", "object", "null"]},
        "images": {"type": ["array", "null"]},
        "raw": {"type": "boolean"},
        "keep_alive": {"type": ["string", "number", "null"]},
    },
}

OLLAMA_CHAT_RESPONSE: Json = {
    "type": "object",
    "required": ["model", "created_at", "done"],
    "properties": {
        "model": {"type": "string"},
        "created_at": {"type": "string"},
        "message": {"type": "object", "properties": {
            "role": {"type": "string"}, "content": {"type": "string"}}},
        "response": {"type": "string", "description": "/api/generate only"},
        "done": {"type": "boolean"},
        "done_reason": {"type": "string"},
        "total_duration": {"type": "integer"},
        "load_duration": {"type": "integer"},
        "prompt_eval_count": {"type": "integer"},
        "prompt_eval_duration": {"type": "integer"},
        "eval_count": {"type": "integer"},
        "eval_duration": {"type": "integer"},
    },
}

LLM_SERVERS_RESPONSE: Json = {
    "type": "object",
    "description": "Per-server breaker, probe, load and latency state; the retry budget.",
    "properties": {
        "strategy": {"type": "string"},
        "when_all_open": {"type": "string"},
        "servers": {"type": "object", "additionalProperties": {"type": "object"}},
        "retry_budget": {"type": "object"},
        "models": {"type": "array", "items": {"type": "string"}},
    },
}

LLM_USAGE_RESPONSE: Json = {
    "type": "object",
    "properties": {
        "currency": {"type": "string"},
        "rows": {"type": "array", "items": {"type": "object", "properties": {
            "server": {"type": "string"}, "model": {"type": "string"},
            "caller": {"type": "string"}, "requests": {"type": "integer"},
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "cost": {"type": ["number", "null"]},
        }}},
    },
}
