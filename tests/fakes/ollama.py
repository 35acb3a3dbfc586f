"""Fake Ollama server speaking Ollama's real wire format, for tests and load benchmarks.

Why a fake: the daemon's Ollama backend must be tested against the exact JSON, NDJSON streams,
status codes and queueing behaviour of Ollama, with faults on demand and without a GPU. Vectors
are real all-MiniLM-L6-v2 embeddings (see ``minilm``), so semantic assertions hold. Every
embedding model, whatever its name (``nomic-embed-text``, ``mxbai-embed-large``...), answers with
those same 384-dim MiniLM vectors; only names, sizes and context lengths differ.

Cost model (benchmarks rely on it): each ``/api/embed`` call sleeps ``base_ms + per_input_ms * n``
while holding one of ``parallel`` slots (default 1, like OLLAMA_NUM_PARALLEL=1), so calls are
serialized; with ``max_queue`` set, a call arriving while more than that many wait gets 503 with
Retry-After. Chat and generate use their own gate (Ollama runs one runner per model) and cost
``chunk_delay_ms`` between chunks. Replies are ``"Echo: " + <last user message or prompt>``.

Run: ``python -m tests.fakes.ollama --port 0 --base-ms 20 --per-input-ms 2 --parallel 1``; it
prints ``LISTENING <port>`` once bound. Faults: see ``tests.fakes.faults``.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from aiohttp import web

from tests.fakes.faults import (
    FakeServer,
    HTTPError,
    build_parser,
    common_kwargs,
    content_text,
    dumps,
    run_cli,
    words_chunks,
)
from tests.fakes.minilm import DIM, approx_tokens

VERSION = "0.6.0"
DEFAULT_KEEP_ALIVE_S = 300.0
MODIFIED_AT = "2025-01-15T10:00:00.000000000Z"


@dataclass(frozen=True)
class ModelInfo:
    family: str
    parameter_size: str
    quantization_level: str
    size: int
    context: int


KNOWN_MODELS: dict[str, ModelInfo] = {
    "all-minilm": ModelInfo("bert", "23M", "F16", 45_960_996, 256),
    "nomic-embed-text": ModelInfo("nomic-bert", "137M", "F16", 274_302_450, 8192),
    "mxbai-embed-large": ModelInfo("bert", "334M", "F16", 669_615_493, 512),
    "llama3.2": ModelInfo("llama", "3.2B", "Q4_K_M", 2_019_393_189, 131_072),
}
UNKNOWN_MODEL = ModelInfo("fake", "100M", "F16", 100_000_000, 2048)


def _info(name: str) -> ModelInfo:
    return KNOWN_MODELS.get(name.split(":", 1)[0], UNKNOWN_MODEL)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _keep_alive_s(value: Any) -> float:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m"); negative = forever."""
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", str(value))
        if not m:
            raise HTTPError(400, f"invalid keep_alive {value!r}")
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
        seconds = float(m.group(1)) * scale
    return float("inf") if seconds < 0 else seconds


class FakeOllama(FakeServer):
    """In-process fake: ``port = await FakeOllama().start()``; ``url`` for the client."""

    dialect = "ollama"
    stream_content_type = "application/x-ndjson"

    def __init__(
        self,
        *,
        models: Iterable[str] = ("all-minilm",),
        chat_models: Iterable[str] = ("llama3.2",),
        parallel: int | None = 1,
        context: Mapping[str, int] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            models=models, chat_models=chat_models, parallel=parallel, context=context, **kw
        )
        self._loaded: dict[str, float] = {}  # model -> expiry (epoch seconds), for /api/ps

    def canonical(self, model: str) -> str:
        """Ollama names without a tag mean ``:latest``."""
        return model if ":" in model.rsplit("/", 1)[-1] else f"{model}:latest"

    def context_of(self, model: str) -> int:
        name = self.canonical(model)
        return self.context.get(name) or _info(name).context

    def error_body(self, err: HTTPError) -> dict[str, Any]:
        return {"error": err.message}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self._root)
        router.add_get("/api/version", self._version)
        router.add_get("/api/tags", self._tags)
        router.add_get("/api/ps", self._ps)
        router.add_post("/api/show", self._show)
        router.add_post("/api/embed", self._embed)
        router.add_post("/api/embeddings", self._embeddings)
        router.add_post("/api/chat", self._chat)
        router.add_post("/api/generate", self._generate)

    # ----- models ---------------------------------------------------------------------------
    @property
    def served(self) -> list[str]:
        return list(dict.fromkeys(self.embed_models + self.chat_models))

    def _model(self, body: Mapping[str, Any], key: str = "model") -> tuple[str, str]:
        """(name as the client spelled it, canonical name), or Ollama's 400/404."""
        given = body.get(key) or (body.get("name") if key == "model" else None)
        if not isinstance(given, str) or not given:
            raise HTTPError(400, "model is required")
        name = self.canonical(given)
        if name not in self.served:
            raise HTTPError(404, f'model "{given}" not found, try pulling it first')
        return given, name

    def _touch(self, name: str, keep_alive: Any) -> None:
        seconds = _keep_alive_s(keep_alive)
        if seconds == 0:
            self._loaded.pop(name, None)
        else:
            self._loaded[name] = time.time() + seconds

    def _details(self, name: str) -> dict[str, Any]:
        info = _info(name)
        return {
            "parent_model": "",
            "format": "gguf",
            "family": info.family,
            "families": [info.family],
            "parameter_size": info.parameter_size,
            "quantization_level": info.quantization_level,
        }

    def _entry(self, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": MODIFIED_AT,
            "size": _info(name).size,
            "digest": _digest(name),
            "details": self._details(name),
        }

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return await self.respond(request, {"version": VERSION})

    async def _tags(self, request: web.Request) -> web.StreamResponse:
        return await self.respond(request, {"models": [self._entry(m) for m in self.served]})

    async def _ps(self, request: web.Request) -> web.StreamResponse:
        now = time.time()
        models = []
        for name, expiry in self._loaded.items():
            if expiry <= now:
                continue
            entry = self._entry(name)
            del entry["modified_at"]
            expires = (
                datetime(9999, 1, 1, tzinfo=UTC)
                if expiry == float("inf")
                else (datetime.now(UTC) + timedelta(seconds=expiry - now))
            )
            entry["expires_at"] = expires.isoformat().replace("+00:00", "Z")
            entry["size_vram"] = entry["size"]
            models.append(entry)
        return await self.respond(request, {"models": models})

    async def _show(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        _, name = self._model(body)
        info = _info(name)
        embedding = name in self.embed_models
        arch = info.family.replace("-", "_")
        return await self.respond(
            request,
            {
                "license": "",
                "modelfile": f"FROM {name}\n",
                "parameters": "",
                "template": "" if embedding else "{{ .Prompt }}",
                "details": self._details(name),
                "model_info": {
                    "general.architecture": arch,
                    f"{arch}.context_length": self.context_of(name),
                    f"{arch}.embedding_length": DIM if embedding else 3072,
                },
                "capabilities": ["embedding"] if embedding else ["completion"],
                "modified_at": MODIFIED_AT,
            },
        )

    # ----- embeddings -------------------------------------------------------------------------
    async def _embed(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body = await self.read_json(request)
        given, name = self._model(body)
        raw = body.get("input")
        if raw is None:
            texts: list[str] = []
        elif isinstance(raw, str):
            texts = [raw] if raw else []
        elif isinstance(raw, list) and all(isinstance(t, str) for t in raw):
            texts = raw
        else:
            raise HTTPError(400, "invalid input type")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
            raise HTTPError(400, "dimensions must be an integer")
        options = body.get("options") or {}
        self._touch(name, body.get("keep_alive"))
        if not texts:
            self.stats.record_batch("/api/embed", 0)
            return await self.respond(request, {"model": given, "embeddings": []})
        ctx = int(options.get("num_ctx") or self.context_of(name))
        truncate = body.get("truncate", True) is not False
        fitted = []
        for text in texts:
            words = text.split()
            if len(words) > ctx:
                if not truncate:
                    raise HTTPError(400, "the input length exceeds the context length")
                text = " ".join(words[:ctx])
            fitted.append(text)
        vecs = await self.embed_vectors(request, "/api/embed", fitted, dims)
        return await self.respond(
            request,
            {
                "model": given,
                "embeddings": vecs,
                "total_duration": _ns(time.perf_counter() - t0),
                "load_duration": 0,
                "prompt_eval_count": sum(approx_tokens(t) for t in fitted),
            },
            allow_nan=bool(np.isnan(vecs).any()),
        )

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """Legacy single-prompt route (Ollama < 0.3 clients)."""
        body = await self.read_json(request)
        _, name = self._model(body)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise HTTPError(400, "prompt must be a string")
        self._touch(name, body.get("keep_alive"))
        if not prompt:
            self.stats.record_batch("/api/embeddings", 0)
            return await self.respond(request, {"embedding": []})
        vecs = await self.embed_vectors(request, "/api/embeddings", [prompt])
        return await self.respond(
            request, {"embedding": vecs[0]}, allow_nan=bool(np.isnan(vecs).any())
        )

    # ----- chat / generate --------------------------------------------------------------------
    def _chat_model(self, body: Mapping[str, Any], capability: str) -> tuple[str, str]:
        given, name = self._model(body)
        if name not in self.chat_models:
            raise HTTPError(400, f'"{given}" does not support {capability}')
        self._touch(name, body.get("keep_alive"))
        return given, name

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        given, _ = self._chat_model(body, "chat")
        messages = body.get("messages") or []
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise HTTPError(400, "invalid message format")
        if not messages:  # Ollama's "load the model" request
            return await self.respond(
                request,
                {
                    "model": given,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": ""},
                    "done_reason": "load",
                    "done": True,
                },
            )
        last_user = next(
            (content_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        prompt_tokens = sum(approx_tokens(content_text(m.get("content"))) for m in messages)
        return await self._complete(request, body, given, "Echo: " + last_user, prompt_tokens)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await self.read_json(request)
        given, _ = self._chat_model(body, "generate")
        prompt = body.get("prompt") or ""
        if not isinstance(prompt, str):
            raise HTTPError(400, "prompt must be a string")
        if not prompt:
            return await self.respond(
                request,
                {
                    "model": given,
                    "created_at": _now(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                },
            )
        return await self._complete(request, body, given, "Echo: " + prompt, approx_tokens(prompt))

    async def _complete(
        self,
        request: web.Request,
        body: Mapping[str, Any],
        model: str,
        reply: str,
        prompt_tokens: int,
    ) -> web.StreamResponse:
        chat = request.path == "/api/chat"
        pieces = words_chunks(reply)
        done_reason = "stop"
        num_predict = (body.get("options") or {}).get("num_predict")
        if isinstance(num_predict, int) and 0 < num_predict < len(pieces):
            pieces, done_reason = pieces[:num_predict], "length"
        delay = self.chunk_delay_ms / 1000
        t0 = time.perf_counter()

        def part(text: str, done: bool) -> dict[str, Any]:
            obj: dict[str, Any] = {"model": model, "created_at": _now()}
            if chat:
                obj["message"] = {"role": "assistant", "content": text}
            else:
                obj["response"] = text
            obj["done"] = done
            return obj

        stream = body.get("stream", True) is not False
        eval_s = delay * max(len(pieces) - 1, 0)

        def final(text: str) -> dict[str, Any]:
            # Streams are encoded up front, so count the chunk delays still to come.
            obj = part(text, True)
            elapsed = time.perf_counter() - t0 + (eval_s if stream else 0.0)
            obj.update(
                done_reason=done_reason,
                total_duration=_ns(elapsed) or 1,
                load_duration=0,
                prompt_eval_count=prompt_tokens,
                prompt_eval_duration=_ns(0.001),
                eval_count=len(pieces),
                eval_duration=_ns(eval_s) or 1,
            )
            return obj

        async with self.chat_slot():
            if stream:
                lines = [dumps(part(p, False)) + b"\n" for p in pieces]
                lines.append(dumps(final("")) + b"\n")
                return await self.stream(request, lines, lambda msg: dumps({"error": msg}) + b"\n")
            if delay and len(pieces) > 1:
                await asyncio.sleep(delay * (len(pieces) - 1))
            return await self.respond(request, final("".join(pieces)))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(
        "python -m tests.fakes.ollama",
        "Fake Ollama server for tests and benchmarks.",
        parallel=1,
        models="all-minilm",
        chat_models="llama3.2",
    )
    args = parser.parse_args(argv)
    run_cli(lambda: FakeOllama(**common_kwargs(args)), args)


if __name__ == "__main__":
    main(sys.argv[1:])
