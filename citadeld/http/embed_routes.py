"""Embedding routes in the three dialects. Each only translates its wire format to one
EmbeddingService call and back; the error envelope comes from the middleware."""

from __future__ import annotations

import base64
import time
from typing import Any

from aiohttp import web

from citadeld import __version__
from citadeld.embedding import EmbedOutcome
from citadeld.errors import BadRequest
from citadeld.http import schemas
from citadeld.http.body import compile_schema, json_response, read_json
from citadeld.http.llm_routes import llm_model_ids
from citadeld.logs import request_id
from citadeld.state import STATE

_native_embed = compile_schema(schemas.NATIVE_EMBED_REQUEST)
_openai_embed = compile_schema(schemas.OPENAI_EMBED_REQUEST)
_ollama_embed = compile_schema(schemas.OLLAMA_EMBED_REQUEST)
_ollama_embeddings = compile_schema(schemas.OLLAMA_EMBEDDINGS_REQUEST)

OLLAMA_VERSION = "0.6.0"


async def native_embed(request: web.Request) -> web.Response:
    body = await read_json(request, _native_embed)
    texts = [body["text"]] if "text" in body else body["texts"]
    out = request.app[STATE].embedding.embed_now(
        body.get("model"),
        texts,
        use_cache=body.get("cache", True),
        truncate=body.get("truncate"),
        dimensions=body.get("dimensions"),
    )
    if not isinstance(out, EmbedOutcome):  # not all in the in-process cache
        out = await out
    return json_response({
        "model": out.model,
        "dimensions": out.dims,
        "embeddings": out.rows,  # rows: orjson writes 1-D arrays faster than 2-D
        "cached": out.cached,
        "usage": {"tokens": out.total_tokens, "cached": sum(out.cached)},
        "request_id": request_id.get() or "",
    })


def _openai_texts(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw]
    if (raw and all(isinstance(x, int) for x in raw)) or any(isinstance(x, list) for x in raw):
        raise BadRequest("token-id inputs are not supported; send strings", param="input")
    if not all(isinstance(x, str) for x in raw):
        raise BadRequest("input must be a string or an array of strings", param="input")
    return list(raw)


async def openai_embeddings(request: web.Request) -> web.Response:
    body = await read_json(request, _openai_embed)
    texts = _openai_texts(body["input"])
    out = request.app[STATE].embedding.embed_now(
        body.get("model"), texts, dimensions=body.get("dimensions")
    )
    if not isinstance(out, EmbedOutcome):  # not all in the in-process cache
        out = await out
    if body.get("encoding_format", "float") == "base64":
        little = out.vectors.astype("<f4", copy=False)
        data: list[dict[str, Any]] = [
            {"object": "embedding", "index": i,
             "embedding": base64.b64encode(little[i].tobytes()).decode("ascii")}
            for i in range(len(texts))
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": row}
                for i, row in enumerate(out.rows)]
    return json_response({
        "object": "list",
        "data": data,
        "model": out.model,
        "usage": {"prompt_tokens": out.total_tokens, "total_tokens": out.total_tokens},
    })


async def openai_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    created = int(state.started_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "citadel"}
        for name in state.config.embedding.models
    ]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "citadel-llm"}
             for name in llm_model_ids(state) if name not in state.config.embedding.models]
    return json_response({"object": "list", "data": data})


async def ollama_embed(request: web.Request) -> web.Response:
    t0 = time.perf_counter_ns()
    body = await read_json(request, _ollama_embed)
    raw = body.get("input", [])
    texts = [raw] if isinstance(raw, str) else raw
    svc = request.app[STATE].embedding
    if not texts:  # Ollama answers an empty input (used to preload a model) with no vectors
        return json_response({"model": svc.resolve(body["model"]), "embeddings": []})
    out = svc.embed_now(
        body["model"], texts, truncate=body.get("truncate"), dimensions=body.get("dimensions")
    )
    if not isinstance(out, EmbedOutcome):  # not all in the in-process cache
        out = await out
    return json_response({
        "model": out.model,
        "embeddings": out.rows,
        "total_duration": time.perf_counter_ns() - t0,
        "load_duration": 0,
        "prompt_eval_count": out.total_tokens,
    })


async def ollama_embeddings(request: web.Request) -> web.Response:
    body = await read_json(request, _ollama_embeddings)
    prompt = body.get("prompt", "")
    svc = request.app[STATE].embedding
    if not prompt:  # legacy Ollama answers an empty prompt with an empty vector
        svc.resolve(body["model"])
        return json_response({"embedding": []})
    out = svc.embed_now(body["model"], [prompt])
    if not isinstance(out, EmbedOutcome):  # not all in the in-process cache
        out = await out
    return json_response({"embedding": out.rows[0]})


async def ollama_tags(request: web.Request) -> web.Response:
    state = request.app[STATE]
    modified = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(state.started_at))
    models = []
    for name, m in state.config.embedding.models.items():
        tag = name if ":" in name else f"{name}:latest"
        models.append({
            "name": tag,
            "model": tag,
            "modified_at": modified,
            "size": 0,
            "digest": "",
            "details": {
                "format": "gguf" if m.backend == "ollama" else m.backend,
                "family": "bert",
                "families": ["bert"],
                "parameter_size": "",
                "quantization_level": "",
            },
        })
    for name in llm_model_ids(state):  # LLM models the router serves
        tag = name if ":" in name else f"{name}:latest"
        models.append({"name": tag, "model": tag, "modified_at": modified, "size": 0,
                       "digest": "", "details": {"format": "gguf", "family": "llm"}})
    return json_response({"models": models})


async def ollama_version(request: web.Request) -> web.Response:
    return json_response({"version": OLLAMA_VERSION})


async def native_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    models = {}
    for name, pool in state.pools.items():
        m = state.config.embedding.models[name]
        models[name] = {
            "backend": m.backend,
            "dims": m.dims,
            "max_context": m.max_context,
            "ready": pool.can_embed(),
            **pool.snapshot(),
        }
    return json_response({
        "version": __version__,
        "uptime_s": round(time.time() - state.started_at, 3),
        "listen": state.config.server.listen,
        "draining": state.draining,
        "default_model": state.config.embedding.default_model,
        "models": models,
        "cache": state.cache.stats(),
    })


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/embed", native_embed)
    app.router.add_get("/api/v1/status", native_status)
    app.router.add_post("/v1/embeddings", openai_embeddings)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_post("/api/embed", ollama_embed)
    app.router.add_post("/api/embeddings", ollama_embeddings)
    app.router.add_get("/api/tags", ollama_tags)
    app.router.add_get("/api/version", ollama_version)

