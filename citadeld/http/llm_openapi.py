"""The LLM routes' part of the OpenAPI document; `openapi.build_openapi` merges it in.

Kept apart so the LLM routes and their documentation change together; it takes the document's
own helpers as arguments instead of importing `openapi` (which imports this module).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from citadeld.http.errors import Dialect
from citadeld.llm import schemas

Json = dict[str, Any]

LLM_ERRORS = (400, 404, 413, 429, 500, 502, 503, 504)
_READ_ERRORS = (500, 503)

_ROUTING_HEADERS: Json = {
    "X-Citadel-Upstream": {"description": "The LLM server that answered.",
                           "schema": {"type": "string"}},
    "X-Citadel-Attempts": {"description": "Upstream attempts this request took (failovers "
                                          "included).", "schema": {"type": "integer"}},
}


def component_schemas() -> Json:
    return {
        "NativeGenerateRequest": copy.deepcopy(schemas.NATIVE_GENERATE_REQUEST),
        "NativeGenerateResponse": copy.deepcopy(schemas.NATIVE_GENERATE_RESPONSE),
        "OpenAIChatRequest": copy.deepcopy(schemas.OPENAI_CHAT_REQUEST),
        "OpenAIChatResponse": copy.deepcopy(schemas.OPENAI_CHAT_RESPONSE),
        "OllamaChatRequest": copy.deepcopy(schemas.OLLAMA_CHAT_REQUEST),
        "OllamaGenerateRequest": copy.deepcopy(schemas.OLLAMA_GENERATE_REQUEST),
        "OllamaChatResponse": copy.deepcopy(schemas.OLLAMA_CHAT_RESPONSE),
        "LLMServers": copy.deepcopy(schemas.LLM_SERVERS_RESPONSE),
        "LLMUsage": copy.deepcopy(schemas.LLM_USAGE_RESPONSE),
    }


def _generation_ok(json_ok: Callable[..., Json], schema: str, stream_type: str,
                   stream_doc: str) -> Json:
    ok = json_ok(schema, "The answer (stream: false), or the stream (stream: true).")
    ok["headers"] = {**ok["headers"], **copy.deepcopy(_ROUTING_HEADERS)}
    ok["content"][stream_type] = {"schema": {"type": "string", "description": stream_doc}}
    return ok


def paths(op: Callable[..., Json], json_ok: Callable[..., Json], model: str) -> Json:
    return {
        "/api/v1/llm/generate": {"post": op(
            "native", "nativeLlmGenerate",
            "Generate text on a healthy LLM server, with failover",
            _generation_ok(json_ok, "NativeGenerateResponse", "application/x-ndjson",
                           'NDJSON: {"type":"delta","text"} lines, then {"type":"done",...} '
                           'with server, usage and timings, or {"type":"error","error":{...}} '
                           "if the upstream fails after the stream started."),
            errors=LLM_ERRORS, request="NativeGenerateRequest",
            request_example={"model": model, "prompt": "Say hello", "stream": False},
        )},
        "/api/v1/llm/servers": {"get": op(
            "native", "nativeLlmServers", "LLM servers: breakers, probes, load, retry budget",
            json_ok("LLMServers"), errors=_READ_ERRORS,
        )},
        "/api/v1/llm/usage": {"get": op(
            "native", "nativeLlmUsage", "Tokens and cost per server, model and caller",
            json_ok("LLMUsage"), errors=_READ_ERRORS,
        )},
        "/v1/chat/completions": {"post": op(
            "openai", "openaiCreateChatCompletion", "Chat completion (OpenAI-compatible)",
            _generation_ok(json_ok, "OpenAIChatResponse", "text/event-stream",
                           "SSE chat.completion.chunk events ending with `data: [DONE]`, or "
                           'with `data: {"error": {...}}` if the upstream fails mid-stream.'),
            dialect=Dialect.OPENAI, errors=LLM_ERRORS, request="OpenAIChatRequest",
            request_example={"model": model,
                             "messages": [{"role": "user", "content": "Say hello"}]},
        )},
        "/api/chat": {"post": op(
            "ollama", "ollamaChat", "Chat (Ollama-compatible; streams NDJSON by default)",
            _generation_ok(json_ok, "OllamaChatResponse", "application/x-ndjson",
                           'NDJSON chat parts, the last with done: true; {"error": "..."} if '
                           "the upstream fails mid-stream."),
            dialect=Dialect.OLLAMA, errors=LLM_ERRORS, request="OllamaChatRequest",
            request_example={"model": model, "stream": False,
                             "messages": [{"role": "user", "content": "Say hello"}]},
        )},
        "/api/generate": {"post": op(
            "ollama", "ollamaGenerate", "Generate (Ollama-compatible; streams NDJSON by default)",
            _generation_ok(json_ok, "OllamaChatResponse", "application/x-ndjson",
                           "NDJSON parts with `response`, the last with done: true."),
            dialect=Dialect.OLLAMA, errors=LLM_ERRORS, request="OllamaGenerateRequest",
            request_example={"model": model, "prompt": "Say hello", "stream": False},
        )},
    }
